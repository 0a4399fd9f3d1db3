"""Data-parallel training on several processes: fastai's `DistributedTrainer`, made exact for causal LMs.

`CausalLMLearner` adds a `DDPTrainer` by itself when its process was started as one of several
(`torchrun`, `accelerate launch`, `notebook_launcher`), and fastai's `learn.distrib_ctx()` /
`learn.to_distributed()` add the same one. fastai's trainer wraps the model in DDP for the whole
fit and the data loaders in its `DistributedDL`; this subclass differs where an LM fit needs it:

- the model is DDP (built by fastai's accelerate `Accelerator`) only for each training forward
  pass: in between, `learn.model` is the plain model, so generation, export and checkpoints from
  a callback see the model they expect;
- no `DistributedDL` (it broadcasts through CUDA, pads by repeating blocks and gives each process
  a contiguous slice of the epoch): the mix sampler shards each global batch itself
  (`mix.shard_order`), so step k trains exactly the blocks of a one-process step k with batch
  `bs x processes`, and the validation blocks are split in runs;
- on micro-batches that do not end an accumulation window, DDP's gradient all-reduce is skipped
  (`no_sync`); the gradient is per token over every process (`callbacks.TrainStepCallback`);
- validation sums (the loss, perplexity, per-corpus perplexities: every metric that keeps `total`
  and `count`) are all-reduced before the recorder reads them, and fastai's implicit gathers
  (`learn.to_detach`) are off: every reduction is one of these explicit ones.
"""

from __future__ import annotations

import os
import warnings

import torch
from fastai.distributed import DistributedTrainer
from fastcore.basics import noop

from .data import LMDataLoader
from .distributed import all_reduce_sum, init_distributed, rank, world_size

__all__ = ['DDPTrainer']


class DDPTrainer(DistributedTrainer):
    """fastai's `DistributedTrainer` for causal LMs: DDP around each training forward pass, a sharded mix sampler."""

    order = 1  # before MixCallback and TrainStepCallback read `learn.world`; before the recorder reads metrics

    def __init__(self, **kwargs):  # accelerate.Accelerator options (fastai's)
        init_distributed()
        kwargs.setdefault('cpu', not torch.cuda.is_available())
        # the learner's `precision` decides autocast; accelerate's own (ACCELERATE_MIXED_PRECISION, set by
        # `accelerate launch` from its config) would wrap model.forward for good, fp16 without a loss scaler
        asked = os.environ.get('ACCELERATE_MIXED_PRECISION', 'no')
        if asked not in ('no', '') and 'mixed_precision' not in kwargs:
            warnings.warn(
                f"accelerate's mixed precision {asked!r} is not used: finetune's precision= (causal_lm_learner's "
                "argument, 'auto' by default) decides autocast on every process",
                stacklevel=2,
            )
        kwargs.setdefault('mixed_precision', 'no')
        kwargs.setdefault('dynamo_backend', 'no')
        super().__init__(sync_bn=False, **kwargs)
        self.ddp, self._no_sync, self.sharded = None, None, False

    def before_fit(self):
        self.procs, self.proc = world_size(), rank()
        self.ddp, self._no_sync = None, None
        self.sharded = self.procs > 1 and not hasattr(self.learn, 'gather_preds')  # get_preds sees every block
        if not self.sharded:
            return
        loaders = [dl for dl in self.dls.loaders]
        plain = [type(dl).__name__ for dl in loaders if not isinstance(dl, LMDataLoader)]
        if plain:
            raise TypeError(
                f'training on {self.procs} processes needs the DataLoaders of lm_dataloaders (their mix sampler '
                f'shards each batch), not {plain}'
            )
        if self.learn.fitting and any(p.requires_grad for p in self.learn.model.parameters()):
            self.ddp = self.accelerator.prepare_model(self.learn.model)  # over the parameters that train now
        for dl in loaders:
            dl.shard = (self.proc, self.procs)
        if self.proc:
            self.learn.logger = noop

    def before_train(self):
        if self.ddp is not None:
            self.ddp.train()

    def before_validate(self):  # fastai's wraps the loader; here the loader shards itself
        pass

    def before_batch(self):
        if self.ddp is None or not self.training:
            return
        if not self.learn.train_step.last_micro_batch():  # gradients stay local until the window's last backward
            self._no_sync = self.ddp.no_sync()
            self._no_sync.__enter__()
        self.learn.model = self.ddp

    def after_pred(self):
        if self.ddp is not None and self.learn.model is self.ddp:
            self.learn.model = self.ddp.module

    def after_backward(self):
        self._leave_no_sync()

    def after_batch(self):
        self.after_pred()
        self._leave_no_sync()

    def _leave_no_sync(self):
        if self._no_sync is not None:
            self._no_sync.__exit__(None, None, None)
            self._no_sync = None

    def after_validate(self):
        if not self.sharded:
            return
        for metric in self.learn.recorder._valid_mets:
            if not (hasattr(metric, 'total') and hasattr(metric, 'count')):
                continue  # a metric of another kind is this process's alone
            total, count = (
                torch.zeros((), dtype=torch.float64) if v is None else torch.as_tensor(v, dtype=torch.float64).cpu()
                for v in (metric.total, metric.count)
            )
            summed = all_reduce_sum(torch.stack([total, count]))
            metric.total, metric.count = summed[0].float(), summed[1].round().long()

    def after_fit(self):  # idempotent: CausalLMLearner also runs it after a failed fit
        self.after_batch()
        for dl in self.dls.loaders:
            if isinstance(dl, LMDataLoader):
                dl.shard = None
        self.ddp, self.sharded = None, False
