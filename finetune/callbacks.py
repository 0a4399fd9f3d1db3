"""Callbacks that fit Hugging Face causal LMs and corpus mixes into fastai's training loop, one concern each.

`HFCausalLMCallback` is fastai's two-line `DropOutput` pattern plus what a transformers model
needs: inputs go in as plain tensors (fastai's tensor subclasses would route every op of the
model through `__torch_function__`), the model output is reduced to its logits (or the fused
head's input), and the KV cache is off while fitting (it only costs memory during training).
`TrainStepCallback` owns everything between the forward pass and the optimizer step, `MixCallback`
the mix sampler's place and the trained-token counts, `CompileBlocksCallback` regional
`torch.compile`, `SyncFreeProgressCallback` the progress bars.

Each callback that changes the model puts it back in `after_fit`, which `CausalLMLearner` also runs
for a fit that ends with an exception (fastai does not), and which may therefore run twice.
"""

from __future__ import annotations

import time
import warnings

import torch
from fastai.callback.core import Callback, CancelBatchException, CancelStepException
from fastai.callback.progress import ProgressCallback

from .allocator import keep_freed_memory
from .distributed import all_reduce_sum
from .loss import IGNORE_INDEX, CausalLMLoss, HeadInput, head_bypass, head_is_bypassable
from .precision import autocast
from .splitter import find_blocks

__all__ = [
    'HFCausalLMCallback',
    'MixCallback',
    'TrainStepCallback',
    'CompileBlocksCallback',
    'SyncFreeProgressCallback',
]


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor else t


class HFCausalLMCallback(Callback):
    """Plain-tensor inputs and targets in, `logits` (or the fused head's input) out, no KV cache while fitting.

    With `learn.fused_head` (the default of `causal_lm_learner` wherever the model allows it) the
    output layer is bypassed for each forward pass, and `learn.pred` is a `HeadInput` (final hidden
    states + head + `learn.autocast_dtype`): `CausalLMLoss` then computes head and loss together in
    chunks, never holding full logits. The head is back in place as soon as the forward pass is
    done, so a callback may generate or export between batches; if a forward pass fails, `after_fit`
    (which `CausalLMLearner` runs for a failed fit too) puts it back, and `config.use_cache` as well.
    """

    order = -10  # before anything that reads the batch

    def __init__(self):
        self._bypass, self._config, self._use_cache, self._detach = None, None, None, None

    def before_fit(self):
        self._detach_frozen_body()
        config = getattr(self.learn.model, 'config', None)
        if self._config is None and getattr(config, 'use_cache', None) is not None:
            self._config, self._use_cache = config, config.use_cache
            config.use_cache = False
        fused = self.learn.fused_head and isinstance(self.learn.loss_func, CausalLMLoss)
        # a hook on the head (learn.summary's, a user's) must see its output: full logits for that fit
        fused = fused and head_is_bypassable(self.learn.model)
        self._bypass = head_bypass(self.learn.model) if fused else None  # found once per fit

    def before_batch(self):
        self.learn.xb = tuple(_plain(x) for x in self.xb)
        self.learn.yb = tuple(_plain(y) for y in self.yb)
        if self._bypass is not None and len(self.yb):
            self._bypass.__enter__()

    def after_pred(self):
        pred = self.pred
        pred = pred.logits if hasattr(pred, 'logits') else pred[0] if isinstance(pred, tuple) else pred
        if self._bypass is not None and len(self.yb):
            self._bypass.__exit__(None, None, None)
            pred = HeadInput(pred, self._bypass.head, self.learn.autocast_dtype)
        self.learn.pred = pred

    def _detach_frozen_body(self):
        """When no decoder block trains (a frozen phase), cut the graph at the embeddings' output.

        With tied embeddings the input embedding is the head's weight, which trains, so autograd would
        carry the backward pass through every frozen block just to add the input side's share to that
        weight: a frozen step would cost nearly a full one. Detached, only the head's use of the
        weight trains and the backward pass stops at the final norm.
        """
        model, found = self.learn.model, find_blocks(self.learn.model)
        embed = model.get_input_embeddings() if hasattr(model, 'get_input_embeddings') else None
        head = model.get_output_embeddings() if hasattr(model, 'get_output_embeddings') else None
        if found is None or embed is None or head is None or self._detach is not None:
            return
        tied = {id(p) for p in head.parameters()}
        trains = [p for p in embed.parameters() if p.requires_grad]
        body_trains = any(p.requires_grad for p in found[1].parameters())
        if trains and all(id(p) in tied for p in trains) and not body_trains:  # only the head's use would train
            self._detach = embed.register_forward_hook(lambda module, args, out: out.detach())

    def after_fit(self):  # idempotent: putting the head back twice is harmless
        if self._detach is not None:
            self._detach.remove()
            self._detach = None
        if self._bypass is not None:
            self._bypass.__exit__(None, None, None)
            self._bypass = None
        if self._config is not None:
            self._config.use_cache = self._use_cache
            self._config = None


class MixCallback(Callback):
    """Keeps the mix sampler's place, so the next fit resumes the epoch, and counts trained tokens per corpus.

    `lr_find` runs are not counted and do not move the sampler: the data order after it is the same.
    Counts stay on the device during the fit and are handed to `dls.record_trained` at its end. With
    several processes the sampler moves by whole global batches and the counts are summed over the
    processes at each epoch's end (`trained()` sums them at any step boundary, for checkpoints).
    """

    order = 5

    def before_fit(self):
        self.sampler = self.dls.train.sampler
        self.active = not hasattr(self.learn, 'lr_finder')
        self.procs = getattr(self.learn, 'world', 1)
        self.counts, self.summed = None, None  # this process's since the last sum; every process's

    def after_batch(self):
        if not (self.active and self.training) or len(self.yb) < 2:
            return
        labels, corpus = self.yb[0], self.yb[1]
        self.sampler.advance(self.sampler.step_blocks(len(labels) if self.procs == 1 else self.dl.bs, self.procs))
        tokens = (labels != IGNORE_INDEX).sum(-1)
        counts = torch.zeros(len(self.dls.names), dtype=torch.long, device=tokens.device)
        counts.index_add_(0, corpus.long(), tokens)
        self.counts = counts if self.counts is None else self.counts + counts

    def trained(self) -> list[int] | None:
        """Tokens this fit has trained per corpus so far, over every process (all of them must call it)."""
        if self.counts is not None:
            counts = all_reduce_sum(self.counts) if self.procs > 1 else self.counts
            self.summed = counts if self.summed is None else self.summed + counts
            self.counts = None
        return None if self.summed is None else self.summed.tolist()

    def after_train(self):
        if self.active:
            self.trained()

    def after_fit(self):
        if self.procs == 1 or not getattr(self.learn, 'fit_failed', False):  # a failed fit cannot reach the others
            self.trained()
        if self.summed is not None:
            self.dls.record_trained(self.summed.tolist())
        self.counts, self.summed = None, None


class TrainStepCallback(Callback):
    """Everything between the forward pass and the optimizer step, in one explicit order.

    1. autocast the forward pass to `learn.autocast_dtype` on the model's device ('bf16-autocast', fp16
       on CUDA; none for 'bf16', whose bf16 copy of the weights `MasterWeightsCallback` swaps in);
       the loss and metrics are computed outside it, in fp32 (the fused head runs its matmuls in
       that dtype);
    2. with `accum_steps` > 1, backpropagate each micro-batch's summed token loss and step every
       `accum_steps` micro-batches (and at the end of an epoch), dividing the gradients by the
       tokens of the whole window: exactly the gradient of one large batch. With several processes
       (`procs` > 1, with `ddp.DDPTrainer`) the same, with the window's tokens summed over every
       process (DDP averages the gradients, so they are multiplied back by `procs`), and
       `learn.loss` is the mean token loss of the global batch, not of this process's rows;
    3. fp16 only: scale the loss, unscale the gradients before clipping, skip steps that overflow;
    4. clip the gradient norm to `clip` (None: no clipping);
    5. watch the loss: the first batch whose loss is NaN or infinite is noted on the device (no
       host sync per batch), and `check_finite()` raises naming its step and corpus; it runs where
       the host reads the device anyway: before each checkpoint (none is written after a bad
       loss) and at each epoch's end.
    """

    order = 20

    def __init__(self, accum_steps: int = 1, clip: float | None = 1.0):
        if not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f'accum_steps must be a whole number >= 1, got {accum_steps!r}')
        if clip is not None and not clip > 0:
            raise ValueError(f'clip must be a positive gradient norm or None, got {clip!r}')
        self.accum_steps, self.clip = accum_steps, clip
        self.procs = 1  # processes training together: `learn.world`, read at each fit's start
        self._autocast, self.scaler, self._scaler_state = None, None, None
        self.grad_norm = None  # the last step's gradient norm before clipping (with clip set)

    def before_fit(self):
        keep_freed_memory()  # once per process: the steps reuse freed heap memory (allocator.py)
        self.procs = getattr(self.learn, 'world', 1)
        self._dtype = self.learn.autocast_dtype
        self.device_type = next(self.learn.model.parameters()).device.type
        if self._dtype == torch.float16 and self.device_type != 'cuda':
            raise ValueError("fp16 needs a CUDA GPU: use precision='bf16' or 'fp32'")
        self.scaler = torch.amp.GradScaler(self.device_type) if self._dtype == torch.float16 else None
        if self.scaler is not None and self._scaler_state is not None:
            self.scaler.load_state_dict(self._scaler_state)  # a resumed fit: the loss scale it had reached
        self._scaler_state = None
        self.count, self.window_tokens = 0, 0
        self._bad = None  # (optimizer step, corpus id) of the first non-finite loss, on the device

    def after_loss(self):
        if not self.training:
            return
        if self.procs > 1:  # one small all-reduce: the global batch's loss and token count
            n = (self.yb[0] != IGNORE_INDEX).sum()
            total = torch.where(n > 0, self.learn.loss.detach().float() * n, 0.0)  # a stand-in row: nothing, not NaN
            both = all_reduce_sum(torch.stack([total, n.float()]))
            self.learn.loss, self._global_tokens = both[0] / both[1].clamp(min=1), both[1]
        loss = self.learn.loss.detach()
        bad = ~torch.isfinite(loss)
        corpus = self.yb[1] if len(self.yb) > 1 else None
        rows = getattr(self.learn.loss_func, 'row_loss', None)
        if corpus is not None and rows is not None and rows.shape == corpus.shape:
            which = corpus[torch.argmax((~torch.isfinite(rows)).int())].long()
        else:
            which = torch.zeros((), dtype=torch.long, device=loss.device) - 1
        now = torch.stack([torch.full_like(which, self.learn.opt_steps + 1), which])
        first = bad if self._bad is None else bad & (self._bad[0] < 0)
        self._bad = torch.where(first, now, now.new_full((2,), -1) if self._bad is None else self._bad)

    def check_finite(self) -> None:
        """Raise if a training loss of this fit was NaN or infinite (reads one small tensor from the device)."""
        if self._bad is None:
            return
        step, corpus = self._bad.tolist()
        if step < 0:
            return
        names = getattr(self.dls, 'names', None)
        which = f' of corpus {names[corpus]!r}' if names and corpus >= 0 else ''
        raise FloatingPointError(
            f'the training loss became NaN or infinite at optimizer step {step}, on a batch{which}: the fit stopped '
            "there, and no checkpoint was written after it. Lower the learning rate, use precision='bf16' or "
            "'fp32' rather than fp16, or look at that corpus's text; resume from the last checkpoint"
        )

    def after_epoch(self):
        if not hasattr(self.learn, 'lr_finder'):  # lr_find runs until the loss diverges, on purpose
            self.check_finite()

    def scaler_state(self) -> dict | None:
        """The fp16 loss scaler's state (JSON), for checkpoints; None without fp16."""
        return None if self.scaler is None else dict(self.scaler.state_dict())  # Python floats and ints

    def load_scaler_state(self, state: dict | None) -> None:
        """Use `state` for the loss scaler of the next fit (a resumed one)."""
        self._scaler_state = state

    # 1. autocast, around the forward pass only
    def before_batch(self):
        self._autocast = autocast(self.device_type, self._dtype)
        self._autocast.__enter__()

    def after_pred(self):
        self._leave_autocast()

    def after_batch(self):
        self._leave_autocast()

    def after_fit(self):  # also after a fit that failed inside the forward pass
        self._leave_autocast()
        if self.learn.opt is not None:
            self.learn.opt.zero_grad()  # no half-accumulated gradient carries into the next fit

    def _leave_autocast(self):
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None

    # 2-3. accumulation and loss scaling
    def before_backward(self):
        if self.accum_steps > 1 or self.procs > 1:
            n = (self.yb[0] != IGNORE_INDEX).sum()
            self.learn.loss_grad = self.loss_grad * n
            self.window_tokens = self.window_tokens + (n if self.procs == 1 else self._global_tokens)
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.loss_grad)

    def last_micro_batch(self) -> bool:
        """Whether the batch about to run ends an accumulation window (the optimizer steps after it)."""
        return self.count + 1 >= self.accum_steps or self.iter >= self.n_iter - 1

    def after_backward(self):
        if self.accum_steps > 1:
            last = self.last_micro_batch()
            self.count += 1
            if not last:
                raise CancelBatchException()

    def before_step(self):
        self._cancelled = False
        params = [p for p in self.learn.model.parameters() if p.grad is not None]
        if self.accum_steps > 1 or self.procs > 1:
            if params:
                per_token = self.window_tokens.clamp(min=1) / self.procs
                torch._foreach_div_([p.grad for p in params], per_token.to(params[0].grad.dtype))
            self.count, self.window_tokens = 0, 0
        if self.scaler is not None:
            self.scaler.unscale_(self)
        if self.clip is not None and params:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip)  # on the device; logs read it
        if self.scaler is not None:
            self._stepped = False
            self.scaler.step(self)  # calls self.step() only when no gradient overflowed
            if not self._stepped:
                raise CancelStepException()

    def after_cancel_step(self):
        self._cancelled = True

    def after_step(self):  # fastai runs it after a cancelled step too
        if self.scaler is not None:
            self.scaler.update()
        if not self._cancelled:
            self.learn.opt_steps += 1  # optimizer steps over the learner's life: checkpoints count in them

    # the GradScaler talks to this object as if it were the optimizer
    @property
    def param_groups(self):
        return self.learn.opt.opt.param_groups if hasattr(self.learn.opt, 'opt') else self.learn.opt.param_groups

    def step(self, *args, **kwargs):
        self._stepped = True


class CompileBlocksCallback(Callback):
    """`torch.compile` on each decoder block while fitting (regional compilation).

    The blocks share one piece of code, so one block is compiled and serves them all: tens of
    seconds instead of minutes for a whole model. Frozen and unfrozen blocks, training and
    validation get their own compiled variants, chosen by torch's guards (which check each
    parameter's `requires_grad`), so freezing and unfreezing recompile once and stay correct.
    Outside a fit (generation, `corpus_perplexity`) the blocks run eagerly, as before.
    """

    order = -20

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs
        self.blocks = []

    def before_fit(self):
        found = find_blocks(self.learn.model)
        if found is None:
            warnings.warn('compile: no decoder blocks found; training runs eagerly', stacklevel=2)
            return
        self.blocks = list(found[1])
        for block in self.blocks:
            block.compile(**self.compile_kwargs)

    def after_fit(self):
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: eager again
        self.blocks = []


class SyncFreeProgressCallback(ProgressCallback):
    """fastai's progress bars, reading the smoothed loss for the bar's comment at most every `interval` s.

    fastai's own callback reads it (`.item()`) after every batch: on a GPU that is a host sync per
    batch, which stalls the queue of kernels; here it is one every half second at most.
    """

    name = 'progress'  # takes the place of fastai's: `learn.progress`, `learn.no_bar()`
    interval = 0.5

    def before_fit(self):
        super().before_fit()
        self._shown = time.monotonic()

    def before_train(self):
        super().before_train()
        self._done = 0  # counted here: a resumed epoch's `iter` starts where the epoch stopped

    def before_validate(self):
        super().before_validate()
        self._done = 0

    def after_batch(self):
        self._done += 1
        self.pbar.update(self._done)
        now = time.monotonic()
        if hasattr(self, 'smooth_loss') and now - self._shown >= self.interval:
            self._shown = now
            self.pbar.comment = f'{self.smooth_loss.item():.4f}'
