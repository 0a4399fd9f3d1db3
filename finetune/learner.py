"""The fastai `Learner` for Hugging Face causal LMs.

`causal_lm_learner` wraps any `AutoModelForCausalLM` (or the hub id, folder or GGUF file of one)
in `CausalLMLearner`, a small `Learner` subclass: fastai's `fit_one_cycle`, `fine_tune`,
`lr_find`, recorder and progress bars work unchanged, and everything a language-model user looks
for lives here in one place: `groups()`, `generate`, `save_pretrained`, and the overrides that make
freezing, `lr_find` and `get_preds` right for LLMs.

Defaults, and why (fine-tuning a pretrained LM, not training a CNN head):
- torch's fused AdamW, no weight decay on norms and biases, `wd=0` as in the HF Trainer;
- peak LR 1e-4 for full fine-tuning and 2e-4 with LoRA (fastai's 2e-3 is for new heads);
- `fine_tune`: one frozen epoch (only the last group, norm + LM head, trains), then all groups with
  discriminative LRs spread over `lr_mult=10`: about 0.92x per layer on a 30-layer model, the range
  of layer-wise LR decay used for transformer fine-tuning (ULMFiT's 2.6x per LSTM layer is too
  steep for dozens of blocks);
- gradient clipping at norm 1.0, mixed precision picked for the device (`precision='auto'`);
- `train_bn=False`: a frozen group is entirely frozen, norms included.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (registers the progress bars for every Learner)
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find live there)
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastcore.foundation import L

from .cache import atomic_folder, cache_folder
from .callbacks import (
    CompileBlocksCallback,
    HFCausalLMCallback,
    MixCallback,
    SyncFreeProgressCallback,
    TrainStepCallback,
)
from .data import LMDataLoaders
from .evaluate import CorpusPerplexity, Perplexity
from .generate import generate
from .lora import add_lora, is_peft_model, save_lora
from .loss import CausalLMLoss, supports_head_bypass
from .models import load_model, load_tokenizer, model_context_length
from .precision import resolve_precision
from .splitter import LayerGroup, decoder_groups, norm_bias_params

__all__ = ['CausalLMLearner', 'causal_lm_learner', 'default_metrics', 'AdamW', 'adamw', 'DEFAULT_LR', 'LORA_LR']

DEFAULT_LR = 1e-4  # peak one-cycle LR for full fine-tuning of a pretrained LM
LORA_LR = 2e-4  # the same with LoRA adapters, which tolerate (and need) a larger step


class AdamW(torch.optim.AdamW):
    """torch's AdamW, fused where it can be, with no weight decay on 1-D tensors (norm weights, biases).

    torch's fused kernel updates each parameter in one pass (5x faster than its foreach default for
    SmolLM2 on this CPU: 155 vs 788 ms a step); it is used when every parameter is a floating-point
    tensor on the CPU or a CUDA device, as the HF Trainer's default `adamw_torch_fused` does. Decay
    goes to matrices only (embeddings, projections, LoRA factors), the rule of nanoGPT and the HF
    Trainer; `decay_1d=True` (fastai's `wd_bn_bias`) decays every tensor.
    """

    def __init__(self, params, *args, fused: bool | None = None, decay_1d: bool = False, **kwargs):
        params = list(params)
        if fused is None:
            tensors = [t for g in params for t in (g['params'] if isinstance(g, dict) else [g])]
            fused = bool(tensors) and all(t.is_floating_point() and t.device.type in ('cpu', 'cuda') for t in tensors)
        super().__init__(params, *args, fused=fused, **kwargs)
        self.decay_1d = decay_1d

    def decays(self, p: torch.Tensor) -> bool:
        """Whether weight decay applies to `p`."""
        return self.decay_1d or p.ndim > 1

    @torch.no_grad()
    def step(self, closure=None):
        saved = [g['weight_decay'] for g in self.param_groups]
        for g in self.param_groups:  # decoupled decay first, exactly as AdamW does, on the decayed params only
            if g['weight_decay']:
                decay = [p for p in g['params'] if p.grad is not None and self.decays(p)]
                if decay:
                    torch._foreach_mul_(decay, 1 - g['lr'] * g['weight_decay'])
            g['weight_decay'] = 0.0
        try:
            return super().step(closure)
        finally:
            for g, wd in zip(self.param_groups, saved):
                g['weight_decay'] = wd


def adamw(params, **kwargs) -> OptimWrapper:
    """`AdamW` behind fastai's optimizer interface (param groups, freezing, LR and momentum schedules)."""
    return OptimWrapper(params, opt=AdamW, **kwargs)


class _SlimPreds(Callback):
    """For `get_preds`: keep the most likely next token and the per-row loss, never full-vocab logits."""

    order = 30

    def after_loss(self):
        self.learn.pred = self.pred.argmax(-1)


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
        precision: torch.dtype | None = None,  # autocast dtype of the forward pass; None: fp32
        fused_head: bool = False,  # LM head + loss in chunks (see `loss.py`); needs `CausalLMLoss`
        n_groups: int | None = None,  # decoder-block groups (see `splitter.decoder_groups`)
        only: set[int] | None = None,  # ids of the only parameters grouped and trained (LoRA adapters)
        accum_steps: int = 1,  # micro-batches per optimizer step
        clip: float | None = 1.0,  # gradient-norm clipping; None turns it off
        compile: bool | dict = False,  # torch.compile each decoder block while fitting
        loss_func=None,  # default `CausalLMLoss()`
        cbs=None,  # more fastai callbacks
        **kwargs,  # passed to `Learner`
    ):
        self.tokenizer, self.precision, self.fused_head = tokenizer, precision, fused_head
        self.n_groups, self.only = n_groups, only
        self._groups_of = None  # (model, groups): found once per model
        own = [HFCausalLMCallback(), TrainStepCallback(accum_steps, clip)]
        if isinstance(dls, LMDataLoaders):
            own.append(MixCallback())
        if compile:
            own.append(CompileBlocksCallback(**(compile if isinstance(compile, dict) else {})))
        super().__init__(
            dls,
            model,
            loss_func=CausalLMLoss() if loss_func is None else loss_func,
            splitter=self._splitter,
            cbs=[*own, *L(cbs)],
            **kwargs,
        )
        if type(getattr(self, 'progress', None)) is ProgressCallback:  # fastai's reads the loss every batch
            self.remove_cb(self.progress)
            self.add_cb(SyncFreeProgressCallback())
        self.layer_groups()  # checks n_groups now, not at the first fit

    # --- a fit that is safe to interrupt ---
    def _do_fit(self):
        try:
            super()._do_fit()
        except CancelFitException:
            raise  # fastai runs after_cancel_fit and after_fit itself
        except BaseException:
            self._end_failed_fit()
            raise

    def _end_failed_fit(self):
        """Run `after_cancel_fit` and `after_fit` on every callback, each on its own, as a cancelled fit would."""
        for event in ('after_cancel_fit', 'after_fit'):
            for cb in self.cbs.sorted('order'):
                try:
                    cb(event)
                except Exception as e:  # keep cleaning up; the original exception is what propagates
                    message = f'{type(cb).__name__}.{event} failed while ending an interrupted fit: {e!r}'
                    warnings.warn(message, stacklevel=3)
        self._end_cleanup()

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

    def fit_one_cycle(self, n_epoch, lr_max=None, *args, **kwargs):
        self._check_lr(lr_max)
        return super().fit_one_cycle(n_epoch, lr_max, *args, **kwargs)

    def fine_tune(
        self,
        epochs: int,  # epochs with every group training
        base_lr: float | None = None,  # peak LR of the last group; default: the learner's lr
        freeze_epochs: int = 1,  # epochs with only the last group (norm + LM head) training
        lr_mult: float = 10,  # the first group's LR is base_lr / lr_mult, the others spread geometrically
        pct_start: float = 0.3,  # warm-up fraction of the unfrozen one-cycle
        div: float = 5.0,  # one-cycle starts at lr / div
        gradual: bool = False,  # ULMFiT gradual unfreezing: one more group per epoch before the full phase
        **kwargs,
    ):
        """fastai's `fine_tune` (frozen phase, then discriminative LRs), with defaults sized for LLMs."""
        base_lr = self.lr if base_lr is None else base_lr
        groups = self.layer_groups()
        n = len(groups)
        if n < 2 or freeze_epochs == 0:
            if n < 2 and freeze_epochs:
                warnings.warn('a single parameter group: skipping the frozen phase', stacklevel=2)
        elif gradual:
            for k in range(1, n):
                self.freeze_to(-k)
                print(f'gradual unfreezing: training the last {k} of {n} groups')
                self.fit_one_cycle(1, slice(base_lr / lr_mult, base_lr), pct_start=0.99, **kwargs)
            base_lr /= 2
        else:
            self.freeze()
            print(f'frozen phase: {freeze_epochs} epoch(s), only group {n - 1} ({groups[-1].name}) trains')
            self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs)
            base_lr /= 2
        self.unfreeze()
        lrs = slice(base_lr / lr_mult, base_lr) if n > 1 else base_lr
        print(f'unfrozen: {epochs} epoch(s), LRs from {base_lr / lr_mult if n > 1 else base_lr:.2g} to {base_lr:.2g}')
        self.fit_one_cycle(epochs, lrs, pct_start=pct_start, div=div, **kwargs)

    def lr_find(self, *args, **kwargs):
        """fastai's `lr_find`, leaving weights, optimizer, RNG states and data order as they were.

        fastai keeps the weights in a file under `learn.path` while it runs; here that file lives in
        a temporary folder of the cache, so nothing is written where the user did not ask.
        """
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        sampler = getattr(self.dls.train, 'sampler', None)
        state = sampler.state_dict() if sampler is not None else None
        path, model_dir = self.path, self.model_dir
        try:
            with tempfile.TemporaryDirectory(prefix='lr_find-', dir=cache_folder('tmp')) as tmp:
                self.path, self.model_dir = Path(tmp), 'models'
                return super().lr_find(*args, **kwargs)
        finally:
            self.path, self.model_dir = path, model_dir
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            if sampler is not None:
                sampler.load_state_dict(state)

    def get_preds(self, ds_idx=1, dl=None, with_input=False, with_decoded=False, with_loss=False, **kwargs):
        """Per position, the most likely next token id, and the labels (with `with_loss`, each row's mean loss).

        Full-vocabulary logits are never kept: for a validation set they would not fit in memory.
        """
        cbs = [_SlimPreds(), *L(kwargs.pop('cbs', None))]
        return super().get_preds(ds_idx, dl, with_input, False, with_loss, act=lambda x: x, cbs=cbs, **kwargs)

    # --- using the model ---
    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, **kwargs) -> str | list[str]:
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
        with atomic_folder(path, overwrite=overwrite) as tmp:
            if is_peft_model(self.model):
                save_lora(self.model, tmp, merged)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
        return path


def causal_lm_learner(
    dls,  # DataLoaders from `lm_dataloaders` (or any yielding input_ids, labels[, corpus])
    model,  # an `AutoModelForCausalLM`, or a hub id / folder / .gguf file to load one from
    *,
    tokenizer=None,  # defaults to `dls.tokenizer`, else loaded from `model` when that is a name or path
    n_groups: int | None = None,  # block groups (plus embeddings and head); default 4, fewer for small models
    precision: str = 'auto',  # 'auto', 'bf16', 'fp16' (CUDA) or 'fp32'; autocast on the model's device
    accum_steps: int = 1,  # micro-batches per optimizer step (the gradient equals one large batch's)
    clip: float | None = 1.0,  # gradient-norm clipping; None turns it off
    grad_checkpointing: bool = False,  # recompute activations in backward: less memory, about 30% slower
    fused_head: bool | None = None,  # LM head + loss in chunks, no full logits; default: wherever the model allows
    compile: bool | dict = False,  # torch.compile each decoder block while fitting (a dict: torch.compile options)
    lora=None,  # True, or a `peft.LoraConfig`: train LoRA adapters instead of all weights
    lr: float | None = None,  # default peak LR: 1e-4, or 2e-4 with LoRA
    wd: float = 0.0,  # decoupled weight decay (on matrices only, unless wd_bn_bias=True)
    opt_func=None,  # optimizer constructor taking fastai param groups; default `adamw`
    loss_func=None,  # defaults to `CausalLMLoss()`: mean next-token cross-entropy
    metrics=None,  # defaults to perplexity, plus one `ppl_<corpus>` per corpus when there are several
    cbs=None,  # extra fastai callbacks
    train_bn: bool = False,  # keep norms and biases of frozen groups training (fastai's default is True)
    wd_bn_bias: bool = False,  # weight decay on norms and biases too
    trust_remote_code: bool = False,  # for loading `model` by name
    **kwargs,  # passed to `Learner`
) -> CausalLMLearner:
    """A fastai `Learner` around a causal LM, ready for `lr_find`, `fit_one_cycle` and `fine_tune`."""
    source = model
    model = load_model(model, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        tokenizer = getattr(dls, 'tokenizer', None)
    if tokenizer is None and isinstance(source, (str, os.PathLike)):
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        _check_vocab(model, tokenizer)
    _check_seq_len(model, getattr(dls, 'seq_len', None))
    device = getattr(dls, 'device', None)
    if device is not None:
        model.to(device)
    dtype = resolve_precision(precision, next(model.parameters()).device)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    only = None
    if lora:
        model = add_lora(model, lora)
        only = {id(p) for p in model.parameters() if p.requires_grad}
    return CausalLMLearner(
        dls,
        model,
        tokenizer=tokenizer,
        precision=dtype,
        fused_head=_resolve_fused_head(model, fused_head, loss_func),
        n_groups=n_groups,
        only=only,
        accum_steps=accum_steps,
        clip=clip,
        compile=compile,
        loss_func=loss_func,
        opt_func=opt_func if opt_func is not None else partial(adamw, decay_1d=wd_bn_bias),
        lr=lr if lr is not None else (LORA_LR if lora else DEFAULT_LR),
        wd=wd,
        metrics=metrics if metrics is not None else default_metrics(dls),
        cbs=cbs,
        train_bn=train_bn,
        wd_bn_bias=wd_bn_bias,
        **kwargs,
    )


def default_metrics(dls) -> list:
    """Overall perplexity, and each corpus's when the data has several."""
    names = dls.names if isinstance(dls, LMDataLoaders) else []
    return [Perplexity(), *([CorpusPerplexity(i, n) for i, n in enumerate(names)] if len(names) > 1 else [])]


def _resolve_fused_head(model, fused_head: bool | None, loss_func) -> bool:
    custom = loss_func is not None and not isinstance(loss_func, CausalLMLoss)
    if fused_head is False or (fused_head is None and custom):
        return False  # a loss function of the user's own gets logits
    if custom:
        raise ValueError(f'fused_head=True needs CausalLMLoss, not {type(loss_func).__name__}: use fused_head=False')
    supported = supports_head_bypass(model)
    if fused_head and not supported:
        raise ValueError(
            f'fused_head=True, but the logits of {type(model).__name__} are not just its output layer applied to '
            'the final hidden states (soft-capping or scaling after the head, or an output layer that is not a '
            'plain nn.Linear): use fused_head=False'
        )
    return supported


def _check_seq_len(model, seq_len: int | None) -> None:
    limit = model_context_length(model)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise ValueError(
            f'seq_len={seq_len} is longer than the context window of {type(model).__name__} '
            f'({limit} positions): rebuild the DataLoaders with seq_len <= {limit}'
        )


def _check_vocab(model, tokenizer) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f'the tokenizer has {len(tokenizer):,} tokens but the model embeds only {rows:,}: '
            'use the tokenizer that belongs to this model (or resize its embeddings)'
        )
