"""The fastai `Learner` for Hugging Face causal LMs.

`causal_lm_learner` (in `build.py`) wraps any `AutoModelForCausalLM` (or the hub id, folder or GGUF
file of one) in `CausalLMLearner`, a small `Learner` subclass: fastai's `fit_one_cycle`,
`fine_tune`, `lr_find`, recorder and progress bars work unchanged, and everything a language-model
user looks for lives here in one place: `groups()`, `generate`, `save_pretrained`, and the
overrides that make freezing, `lr_find`, `get_preds`, `predict`, `show_results`, `to_bf16` and a
multi-process fit right for LLMs (the work of the last ones is in `inference.py` and `ddp.py`).

Defaults, and why (fine-tuning a pretrained LM, not training a CNN head):
- torch's fused AdamW, no weight decay on 1-D tensors (norms, biases), `wd=0` as in the HF Trainer;
- peak LR 1e-4 for full fine-tuning and 2e-4 with LoRA (fastai's 2e-3 is for new heads);
- `fine_tune`: every group trains from the first step (a frozen phase first only when weights were
  initialised anew), the head group peaking at 2e-4 and the blocks spread below it over `lr_mult=3`
  (about 0.96x per layer on a 30-layer model, the range of layer-wise LR decay used for transformer
  fine-tuning; ULMFiT's 2.6x per LSTM layer is far too steep for dozens of blocks): measured by
  `bench/fine_tune_defaults.py` against `fit_one_cycle` and fastai's frozen-phase defaults;
- gradient clipping at norm 1.0, mixed precision picked for the device (`precision='auto'`);
- `train_bn=False`: a frozen group is entirely frozen, norms included.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import fastai.callback.hook  # noqa: F401  (learn.summary)
import fastai.callback.progress  # noqa: F401  (registers the progress bars for every Learner)
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find live there)
import numpy as np
import torch
from fastai.callback.core import CancelEpochException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.learner import Learner
from fastai.torch_core import to_detach
from fastcore.basics import noop
from fastcore.foundation import L

from .cache import atomic_folder, scratch_folder
from .callbacks import (
    CompileBlocksCallback,
    HFCausalLMCallback,
    MixCallback,
    SyncFreeProgressCallback,
    TrainStepCallback,
)
from .checkpoint import (
    Checkpoint,
    ResumeCallback,
    SaveCheckpoint,
    find_checkpoint,
    jsonable,
    learner_state,
    new_run_dir,
    read_checkpoint,
    restore_learner,
    save_checkpoint,
)
from .data import LMDataLoaders
from .ddp import DDPTrainer
from .display import show_table
from .distributed import barrier, broadcast_object, rank, single_process, world_size
from .evaluate import CorpusPerplexity, default_metrics
from .generate import generate
from .inference import KeepPredictions, decode_rows, predict_text, results_table
from .lora import is_peft_model, save_lora
from .loss import CausalLMLoss
from .master_weights import MasterWeightsCallback
from .optimizer import AdamW, adamw
from .precision import Precision, resolve_precision
from .runlog import MetricsLog
from .schedule import fine_tune_phases
from .splitter import LayerGroup, decoder_groups, norm_bias_params

__all__ = ['CausalLMLearner', 'AdamW', 'adamw', 'DEFAULT_LR', 'LORA_LR']

DEFAULT_LR = 1e-4  # peak one-cycle LR for full fine-tuning of a pretrained LM
LORA_LR = 2e-4  # the same with LoRA adapters, which tolerate (and need) a larger step


FASTAI_STEP_CALLBACKS = {
    MixedPrecision: "precision= ('bf16', 'bf16-true', 'bf16-autocast', 'fp16' on CUDA, 'fp32', 'auto'), or "
    'learn.to_bf16() / learn.to_fp16()',
    GradientAccumulation: 'accum_steps= (the gradient per token of the whole window)',
    GradientClip: "clip= (applied to the fp32 gradients with precision='bf16')",
}


class CausalLMLearner(Learner):
    """A fastai `Learner` for causal LMs: layer groups, LLM-sized `fine_tune`, generation, HF export.

    Built complete by its constructor (usually through `causal_lm_learner`): the tokenizer, the
    layer groups, the precision and the fused head are arguments, and the callbacks that apply them
    are added here. A fit that ends with an exception (Ctrl-C, out of memory, an error in a hook)
    first ends like a cancelled one: every callback's `after_cancel_fit` and `after_fit` run, so
    the model is left exactly as before the fit (head, config, no autocast, no stray gradients).
    """

    def __init__(
        self,
        dls,
        model,
        *,
        tokenizer=None,  # for generation and export
        precision: Precision | None = None,  # from `resolve_precision`; None: fp32
        fused_head: bool = False,  # LM head + loss in chunks (see `loss.py`); needs `CausalLMLoss`
        n_groups: int | None = None,  # decoder-block groups (see `splitter.decoder_groups`)
        only: set[int] | None = None,  # ids of the only parameters grouped and trained (LoRA adapters)
        new_params: list[str] | None = None,  # names of weights initialised anew: `fine_tune` trains them first
        accum_steps: int = 1,  # micro-batches per optimizer step
        clip: float | None = 1.0,  # gradient-norm clipping; None turns it off
        compile: bool | dict = False,  # torch.compile each decoder block while fitting
        run_dir: str | os.PathLike | None = None,  # the run's folder: metrics.jsonl, checkpoints/, tracker files
        checkpoint_every: int | None = None,  # save a checkpoint every this many optimizer steps
        keep: int | None = None,  # keep only the newest `keep` checkpoints
        log_every: int = 10,  # with a run_dir: a line of metrics.jsonl every this many optimizer steps
        report_to=None,  # also send the logs to 'tensorboard', 'wandb', 'mlflow' or 'trackio' (a name or a list)
        loss_func=None,  # default `CausalLMLoss()`
        opt_func=None,  # default: torch's fused AdamW, no decay on 1-D tensors unless wd_bn_bias=True
        lr: float = DEFAULT_LR,
        wd: float = 0.0,
        train_bn: bool = False,  # a frozen group is entirely frozen, norms included
        metrics=None,  # default: perplexity, and each corpus's (following `learn.dls` when it is swapped)
        cbs=None,  # more fastai callbacks
        **kwargs,  # passed to `Learner`
    ):
        loading = sorted(set(kwargs) & {'dtype', 'torch_dtype', 'device_map', 'revision', 'attn_implementation'})
        if loading:
            raise TypeError(
                f'{loading} are options for loading the model: pass them as model_kwargs={{...}} to causal_lm_learner'
            )
        self._auto_metrics = metrics is None
        self.tokenizer, self.fused_head = tokenizer, fused_head
        self.precision = precision or Precision('fp32')
        self.n_groups, self.only = n_groups, only
        self.new_params = list(new_params or [])
        self.lr_given = True  # False when the learner's lr is the default (then fine_tune uses FINE_TUNE_LR)
        self._groups_of = None  # (model, groups): found once per model
        self.opt_steps = 0  # optimizer steps over the learner's life (TrainStepCallback counts them)
        self._fit_plan, self._resume = None, None  # the fit running now, for checkpoints; the checkpoint it resumes
        self._phase = None  # the phase of `fine_tune` running now
        self.fitting = False  # True inside fit (not validate or get_preds)
        if (checkpoint_every is not None or report_to) and run_dir is None:
            run_dir = broadcast_object(new_run_dir())  # said at the first fit; several processes share one
        self.run_dir = Path(run_dir) if run_dir is not None else None
        own = [HFCausalLMCallback(), MasterWeightsCallback(), TrainStepCallback(accum_steps, clip)]
        if isinstance(dls, LMDataLoaders):
            own.append(MixCallback())
        if compile:
            own.append(CompileBlocksCallback(**(compile if isinstance(compile, dict) else {})))
        if self.run_dir is not None:
            own.append(MetricsLog(self.run_dir, log_every, report_to))
        if checkpoint_every is not None:
            own.append(SaveCheckpoint(checkpoint_every, keep))
        wd_bn_bias = kwargs.get('wd_bn_bias', False)
        super().__init__(
            dls,
            model,
            loss_func=CausalLMLoss() if loss_func is None else loss_func,
            opt_func=partial(adamw, decay_1d=wd_bn_bias) if opt_func in (None, adamw) else opt_func,
            lr=lr,
            wd=wd,
            train_bn=train_bn,
            splitter=self._splitter,
            metrics=default_metrics(dls) if metrics is None else metrics,
            cbs=[*own, *L(cbs)],
            **kwargs,
        )
        if type(getattr(self, 'progress', None)) is ProgressCallback:  # fastai's reads the loss every batch
            self.remove_cb(self.progress)
            self.add_cb(SyncFreeProgressCallback())
        self.layer_groups()  # checks n_groups now, not at the first fit
        self._new_param_tensors()  # checks the names now
        if world_size() > 1:  # started by torchrun, accelerate launch or notebook_launcher: train together
            self.to_distributed()

    def __repr__(self) -> str:
        p = next(self.model.parameters())
        n = sum(q.numel() for q in self.model.parameters())
        low = p.dtype != torch.float32 and self.precision.weights is None  # loaded in low precision by the user
        pure = '' if not low else f' (weights in {str(p.dtype)[6:]}: trained without an fp32 copy)'
        return (
            f'{type(self).__name__}({type(self.model).__name__}, {n / 1e6:,.1f}M parameters in {str(p.dtype)[6:]} '
            f'on {p.device}, precision {self.precision.says}{pure}, {len(self.layer_groups())} layer groups, '
            f'fused head {"on" if self.fused_head else "off"})'
        )

    # --- the data, and the per-corpus metrics that follow it ---
    @property
    def dls(self):
        return self._dls

    @dls.setter
    def dls(self, dls):
        metrics = getattr(self, '_metrics', None)  # None while fastai's __init__ sets dls first
        if metrics is not None and self._auto_metrics:
            self.metrics = default_metrics(dls)
        elif metrics is not None:
            names = list(dls.names) if isinstance(dls, LMDataLoaders) else []
            stale = [m.name for m in metrics if isinstance(m, CorpusPerplexity) and names[m.corpus : m.corpus + 1] !=
                     [m.name[4:]]]  # fmt: skip
            if stale:
                raise ValueError(
                    f'the metrics {stale} are for corpora these DataLoaders do not have in that place ({names}): '
                    'set learn.metrics = default_metrics(dls) (from finetune.evaluate) or metrics of your own first'
                )
        self._dls = dls

    # --- fastai's precision switches and export, mapped onto what this learner does ---
    def to_fp16(self, **kwargs):
        """fastai's fp16 switch: here `precision='fp16'` (CUDA only; the loss is scaled)."""
        return self._use_precision('fp16')

    def to_bf16(self):
        """fastai's bf16 switch: here `precision='bf16'` (a bf16 copy of the fp32 weights computes)."""
        return self._use_precision('bf16')

    def to_fp32(self):
        return self._use_precision('fp32')

    def _use_precision(self, name: str):
        self.precision = resolve_precision(name, next(self.model.parameters()).device)  # errors name precision=
        return self

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this fit's forward passes: 'bf16' runs as autocast on several processes."""
        if self.precision.master and self.world > 1:
            return torch.bfloat16
        return self.precision.autocast

    def add_cb(self, cb):
        kind = cb if isinstance(cb, type) else type(cb)
        for fastai_cb, ours in FASTAI_STEP_CALLBACKS.items():  # what TrainStepCallback and precision= do
            if issubclass(kind, fastai_cb):
                raise ValueError(f"fastai's {fastai_cb.__name__} callback does not apply here: use {ours}")
        return super().add_cb(cb)

    def export(self, *args, **kwargs):
        raise NotImplementedError(
            'learn.export() would pickle the whole Learner (absolute paths, data and all), and load_learner cannot '
            'rebuild its batches: use learn.save_pretrained(path) for the model (plain transformers loads it, and '
            'causal_lm_learner(dls, path) makes a learner of it again), and checkpoint_every= to resume a run'
        )

    # --- several processes (see `ddp.py`) ---
    @property
    def world(self) -> int:
        """Processes that train together in this learner's fits (1 unless distributed)."""
        return world_size() if any(isinstance(cb, DDPTrainer) for cb in self.cbs) else 1

    def to_distributed(self, sync_bn: bool = False, **kwargs):
        """Train on every process of the launch (fastai's method, with `ddp.DDPTrainer`); done on its own under one."""
        if not any(isinstance(cb, DDPTrainer) for cb in self.cbs):
            self.add_cb(DDPTrainer(**kwargs))
            if rank():
                self.remove_cb(ProgressCallback)  # one set of progress bars, process 0's
        return self

    def to_detach(self, b, cpu=True, gather=True):
        """Detach, no gathering: every reduction across processes is an explicit one (`ddp.py`)."""
        return to_detach(b, cpu, gather=False)

    # --- a fit that is safe to interrupt, and that can resume ---
    def _with_events(self, f, event_type, ex, final=noop):
        if event_type != 'fit':
            return super()._with_events(f, event_type, ex, final)
        self.fitting, self.fit_failed = True, False  # callbacks tell a fit from validate() and get_preds()
        try:  # before_fit included: a callback that fails there must not leave the others' changes behind
            super()._with_events(f, event_type, ex, final)
        except BaseException:
            self._end_failed_fit()
            raise
        finally:
            self.fitting = False

    def _do_fit(self):  # fastai's, starting at a resumed checkpoint's epoch
        start = self._resume.state['position']['epoch'] if self._resume is not None else 0
        for epoch in range(start, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, 'epoch', CancelEpochException)

    def _end_failed_fit(self):
        """Run `after_cancel_fit` and `after_fit` on every callback, each on its own, as a cancelled fit would."""
        self.fit_failed = True
        for event in ('after_cancel_fit', 'after_fit'):
            for cb in self.cbs.sorted('order'):
                try:
                    cb(event)
                except Exception as e:  # keep cleaning up; the original exception is what propagates
                    message = f'{type(cb).__name__}.{event} failed while ending an interrupted fit: {e!r}'
                    warnings.warn(message, stacklevel=3)
        self._end_cleanup()

    def _say(self, message: str) -> None:
        if rank() == 0:  # once, not once per process
            print(message)

    # --- layer groups and freezing ---
    def layer_groups(self) -> list[LayerGroup]:
        """Embeddings | decoder-block groups | norm + head, found once per model (it takes a forward pass)."""
        if self._groups_of is None or self._groups_of[0] is not self.model:
            self._groups_of = (self.model, decoder_groups(self.model, self.n_groups, self.only))
        return self._groups_of[1]

    def _splitter(self, model) -> list[list[torch.nn.Parameter]]:
        return [g.params for g in self.layer_groups()]

    def groups(self):
        """Each group's modules, parameter count, trainable count and current LR, as a DataFrame."""
        import pandas as pd

        if self.opt is None:
            self.create_opt()
        rows = []
        for i, (g, hyper) in enumerate(zip(self.layer_groups(), self.opt.hypers)):
            rows.append(
                {
                    'group': i,
                    'name': g.name,
                    'modules': ', '.join(g.modules[:3]) + (' ...' if len(g.modules) > 3 else ''),
                    'params': sum(p.numel() for p in g.params),
                    'trainable': sum(p.numel() for p in g.params if p.requires_grad),
                    'lr': hyper['lr'],
                }
            )
        return pd.DataFrame(rows)

    def _bn_bias_state(self, with_bias):
        # fastai's own search knows BatchNorm and LayerNorm only; this one also finds RMSNorm-style layers
        return L(norm_bias_params(self.model, with_bias)).map(self.opt.state)

    def freeze_to(self, n: int):
        if self.opt is None:
            self.create_opt()
        count = len(self.opt.param_lists)
        if not -count < n < count:
            raise ValueError(
                f'freeze_to({n}): the model has {count} parameter groups, so n must be in {-count + 1}..{count - 1} '
                '(negative counts from the end; 0 unfreezes everything)'
            )
        super().freeze_to(n)

    def freeze(self):
        if self.opt is None:
            self.create_opt()
        if len(self.opt.param_lists) < 2:
            raise ValueError('the model has a single parameter group: there is nothing to freeze separately')
        self.freeze_to(-1)

    @contextmanager
    def no_bar(self):
        """No progress bars inside; the same progress callback as before afterwards (fastai's adds its own back)."""
        progress = getattr(self, 'progress', None)
        if progress is not None:
            self.remove_cb(progress)
        try:
            yield self
        finally:
            if progress is not None:
                self.add_cb(progress)

    # --- learning rates ---
    def _check_lr(self, lr) -> None:
        if lr is None or isinstance(lr, (int, float, slice)):
            return
        if self.opt is None:
            self.create_opt()
        values = list(np.ravel(lr))
        if len(values) not in (1, len(self.opt.param_lists)):
            raise ValueError(
                f'{len(values)} learning rates for {len(self.opt.param_lists)} parameter groups: give one, '
                'one per group, or a slice(lo, hi) to spread them'
            )

    def fit(self, n_epoch, lr=None, *args, **kwargs):
        self._check_lr(lr)
        return super().fit(n_epoch, lr, *args, **kwargs)

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max=None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd: float | None = None,
        moms=None,
        cbs=None,
        reset_opt: bool = False,
        start_epoch: int = 0,
        resume: str | os.PathLike | None = None,  # 'latest' (of `run_dir`) or a checkpoint folder: go on from there
        force: bool = False,  # resume even if the data, model or batch size differ from the checkpoint's
    ):
        """fastai's one-cycle fit; with `resume=`, the same fit continued exactly where a checkpoint left it."""
        self._check_lr(lr_max)
        plan = {
            'method': 'fit_one_cycle',
            'n_epoch': n_epoch,
            'lr_max': jsonable(lr_max),
            'div': div,
            'div_final': div_final,
            'pct_start': pct_start,
            'wd': wd,
            'moms': jsonable(moms),
            'phase': getattr(self, '_phase', None),
        }
        with self._fit_as(plan, resume, force) as extra:
            return super().fit_one_cycle(
                n_epoch, lr_max, div, div_final, pct_start, wd, moms, L(cbs) + extra, reset_opt, start_epoch
            )

    @contextmanager
    def _fit_as(self, plan: dict, resume, force: bool):
        """The fit described by `plan` runs inside: checkpoints record it; `resume` loads one and goes on from it."""
        json.dumps(plan)  # a fit argument that cannot be recorded fails here, not at the first checkpoint
        extra = L()
        if resume is not None:
            path = find_checkpoint(resume, self.run_dir)
            checkpoint = read_checkpoint(path)
            saved = checkpoint.state['fit']
            if saved != plan and not force:
                diff = {k: (saved.get(k), plan.get(k)) for k in set(saved) | set(plan) if saved.get(k) != plan.get(k)}
                raise ValueError(
                    f'checkpoint {path} was saved by a different fit: {diff} (checkpoint, now); call it with the '
                    'same arguments, or pass force=True'
                )
            self.load_checkpoint(checkpoint, force=force)
            extra = L(ResumeCallback(checkpoint))
            where = checkpoint.state['position']
            self._say(
                f'resuming from {path}: epoch {where["epoch"]}, {where["iter"]} batches into it, step {self.opt_steps}'
            )
        try:
            self._fit_plan, self._resume = plan, (checkpoint if resume is not None else None)
            yield extra
        finally:
            self._fit_plan, self._resume = None, None

    def _new_param_tensors(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        unknown = [n for n in self.new_params if n not in named]
        if unknown:
            raise ValueError(
                f'new_params names {unknown}, which are not parameters of {type(self.model).__name__} '
                f'(its parameters are named like {list(named)[:3]})'
            )
        return [named[n] for n in self.new_params]

    def fine_tune(
        self,
        epochs: int,  # epochs with every group training
        base_lr: float
        | None = None,  # peak LR of the last group; default FINE_TUNE_LR, or the lr the learner was given
        freeze_epochs: int | None = None,  # epochs training only the head group and new weights; default 1 or 0
        lr_mult: float = 3,  # the first group's LR is base_lr / lr_mult, the others spread geometrically
        pct_start: float = 0.3,  # warm-up fraction of the unfrozen one-cycle
        div: float = 5.0,  # one-cycle starts at lr / div
        gradual: bool = False,  # ULMFiT gradual unfreezing: one more group per epoch before the full phase
        resume: str | os.PathLike | None = None,  # 'latest' or a checkpoint folder: go on from its phase and step
        force: bool = False,  # resume even if the data, model or batch size differ from the checkpoint's
        **kwargs,
    ):
        """fastai's `fine_tune` (a frozen phase when it protects something, then discriminative LRs), for LLMs.

        The frozen phase of ULMFiT protects the pretrained body from the gradients of a head that
        starts from random weights. An LLM's head is pretrained, so by default (`freeze_epochs=None`)
        the phase runs only when `learn.new_params` names weights that were initialised anew (a
        head missing from the checkpoint, resized embeddings): then the head group and those weights
        train alone for one epoch, and the full phase runs at half the LR, as in fastai. Without
        new weights every epoch trains every group (`bench/fine_tune_defaults.py`: at equal steps the
        frozen phase lowered the target's perplexity 3x less). `freeze_epochs=1` asks for it anyway.
        The defaults (head group at 2e-4, blocks spread below it over `lr_mult=3`) come from the same
        benchmark.

        With `resume=`, the phases before the checkpoint's are skipped (their LR arithmetic still
        applies), the checkpoint's phase goes on where it stopped, and the later ones run as usual.
        """
        return fine_tune_phases(
            self, epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, gradual, resume, force, **kwargs
        )

    def lr_find(self, *args, **kwargs):
        """fastai's `lr_find`, leaving weights, optimizer, step count, RNG states and data order as they were.

        fastai keeps the weights in a file under `learn.path` while it runs; here that file lives in
        a temporary folder of the cache, so nothing is written where the user did not ask. With
        several processes, each runs the same short search alone (no communication), on its own data.
        """
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        sampler = getattr(self.dls.train, 'sampler', None)
        state = sampler.state_dict() if sampler is not None else None
        path, model_dir, steps = self.path, self.model_dir, self.opt_steps
        try:
            quiet = self.no_bar() if rank() else nullcontext()  # one set of bars with several processes
            with scratch_folder('lr_find') as tmp, single_process(), quiet:
                self.path, self.model_dir = tmp, 'models'
                found = super().lr_find(*args, **kwargs)
            return broadcast_object(found)  # several processes: process 0's suggestion, the same LR everywhere
        finally:
            self.path, self.model_dir, self.opt_steps = path, model_dir, steps  # its steps are undone too
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            if sampler is not None:
                sampler.load_state_dict(state)

    # --- checkpoints ---
    def save_checkpoint(self, keep: int | None = None, epoch_done: bool = False) -> Path:
        """Save `run_dir/checkpoints/step-N/` now (inside a fit, at an optimizer-step boundary); see `checkpoint.py`."""
        if self.run_dir is None:
            raise ValueError('save_checkpoint needs a run folder: pass run_dir= to causal_lm_learner')
        if self._fit_plan is None:
            raise ValueError('save_checkpoint saves a fit in progress: call it from a callback during fit_one_cycle')
        mix = next((cb for cb in self.cbs if isinstance(cb, MixCallback)), None)
        if mix is not None:
            mix.trained()  # every process takes part in summing the token counts
        path = self.run_dir / 'checkpoints' / f'step-{self.opt_steps}'
        if rank() == 0:  # the processes hold the same weights and optimizer state: process 0 copies and writes them
            state, weights, optimizer = learner_state(self, epoch_done)
            save_checkpoint(path, state, weights, optimizer, keep)
        barrier()
        return path

    def load_checkpoint(self, checkpoint: str | os.PathLike | Checkpoint, force: bool = False) -> Checkpoint:
        """Load weights, optimizer, frozen groups, sampler, trained tokens and step count from a checkpoint.

        Refuses (unless `force=True`) a checkpoint of other data (token stores), another model, another
        batch size or other training settings (accumulation, clipping, precision), naming what differs,
        before anything is changed. Where the fit stood is applied by `fit_one_cycle(resume=...)`.
        """
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(Path(checkpoint))
        restore_learner(self, ckpt, force)
        return ckpt

    # --- what fastai users call after training (see `inference.py`) ---
    def get_preds(self, ds_idx=1, dl=None, with_input=False, with_decoded=False, with_loss=False, act=None, **kwargs):
        """Per position the most likely next token id (or `act(logits)`, per batch), the labels; decoded as text and
        each row's mean loss on request. Full-vocabulary logits are never kept: they would not fit in memory."""
        cbs = [KeepPredictions(act), *L(kwargs.pop('cbs', None))]
        res = list(super().get_preds(ds_idx, dl, with_input, False, with_loss, act=noop, cbs=cbs, **kwargs))
        i = 1 if with_input else 0
        if with_decoded:
            ids = res[i] is not None and not res[i].is_floating_point()
            res.insert(i + 2, decode_rows(self.tokenizer, res[i]) if ids else res[i])
        return tuple(res)

    def predict(self, item, max_new_tokens: int | None = None, n_words: int | None = None, **kwargs) -> str:
        """`item` (a text, or a row of token ids) continued by the model, as text; options as for `generate`."""
        return predict_text(self, item, max_new_tokens, n_words, **kwargs)

    def show_results(self, ds_idx: int = 1, dl=None, max_n: int = 6, shuffle: bool = True, show: bool = True):
        """Rows of a batch: corpus, input, the target's last tokens and the model's greedy next tokens there."""
        table = results_table(self, dl if dl is not None else self.dls[ds_idx].new(shuffle=shuffle), max_n)
        return show_table(table) if show else table

    # --- using the model ---
    def generate(self, prompts: str | list[str], max_new_tokens: int | None = None, **kwargs) -> str | list:
        """Continue `prompts` with the model's `generate` (see `finetune.generate.generate` for options)."""
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, merged: bool = False, overwrite: bool = False) -> Path:
        """Write a Hugging Face folder: safetensors weights, config, generation config, tokenizer.

        A plain model reloads with `AutoModelForCausalLM.from_pretrained(path)` and gives the same
        logits. With LoRA, `merged=False` writes the adapter (load it with peft), `merged=True` a
        plain model with the adapters merged in. An existing non-empty folder is left alone unless
        `overwrite=True`. The folder is written through `cache.atomic_folder`: whenever the
        process is killed, `path` holds either the whole old export or the whole new one.
        """
        path = Path(path).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True to replace it')
        barrier()  # with several processes: each has looked at `path`; process 0 writes, the others wait
        if rank() == 0:
            self._write_pretrained(path, merged, overwrite)
        barrier()
        return path

    def _write_pretrained(self, path: Path, merged: bool, overwrite: bool) -> None:
        with atomic_folder(path, overwrite=overwrite) as tmp:
            if is_peft_model(self.model):
                save_lora(self.model, tmp, merged)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
