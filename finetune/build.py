"""`causal_lm_learner`: DataLoaders and a model (any source) in, a complete `CausalLMLearner` out.

The model is loaded (hub id, folder, GGUF file, embedded name, or an `AutoModelForCausalLM` as it
is, with `model_kwargs` passed to `from_pretrained`), checked against the tokenizer and `seq_len`,
moved to the data's device, given LoRA adapters or gradient checkpointing when asked, and the
learner is built with the precision, fused head, LR and metrics an expert would pick.
"""

from __future__ import annotations

import os

import torch

from .learner import DEFAULT_LR, LORA_LR, CausalLMLearner
from .lora import add_lora
from .loss import resolve_fused_head
from .models import check_seq_len, check_vocab, load_model, load_tokenizer, new_parameters
from .precision import cast_parameters, resolve_precision

__all__ = ['causal_lm_learner']


def causal_lm_learner(
    dls,  # DataLoaders from `lm_dataloaders` (or any yielding input_ids, labels[, corpus])
    model,  # an `AutoModelForCausalLM`, or a hub id / folder / .gguf file to load one from
    *,
    tokenizer=None,  # defaults to `dls.tokenizer`, else loaded from `model` when that is a name or path
    n_groups: int | None = None,  # block groups (plus embeddings and head); default 4, fewer for small models
    precision: str = 'auto',  # 'auto', 'bf16', 'bf16-true', 'bf16-autocast', 'fp16' (CUDA), 'fp32' (precision.py)
    accum_steps: int = 1,  # micro-batches per optimizer step (the gradient equals one large batch's)
    clip: float | None = 1.0,  # gradient-norm clipping; None turns it off
    grad_checkpointing: bool = False,  # recompute activations in backward: less memory, about 30% slower
    fused_head: bool | None = None,  # LM head + loss in chunks, no full logits; default: wherever the model allows
    compile: bool | dict = False,  # torch.compile each decoder block while fitting (a dict: torch.compile options)
    run_dir: str | os.PathLike | None = None,  # the run's folder (checkpoints/); default with checkpoints: runs/<time>
    checkpoint_every: int | None = None,  # save a checkpoint every this many optimizer steps
    keep: int | None = None,  # keep only the newest `keep` checkpoints (default: all)
    log_every: int = 10,  # with a run_dir: a line of metrics.jsonl every this many optimizer steps
    report_to=None,  # also send the logs to 'tensorboard', 'wandb', 'mlflow' or 'trackio'
    lora=None,  # True, or a `peft.LoraConfig`: train LoRA adapters instead of all weights
    new_params: list[str] | None = None,  # weights initialised anew (resized embeddings...); default: load_model's
    lr: float | None = None,  # default peak LR: 1e-4, or 2e-4 with LoRA
    wd: float = 0.0,  # decoupled weight decay (on matrices only, unless wd_bn_bias=True)
    opt_func=None,  # optimizer constructor taking fastai param groups; default `adamw`
    loss_func=None,  # defaults to `CausalLMLoss()`: mean next-token cross-entropy
    metrics=None,  # defaults to perplexity, plus one `ppl_<corpus>` per corpus when there are several
    cbs=None,  # extra fastai callbacks
    train_bn: bool = False,  # keep norms and biases of frozen groups training (fastai's default is True)
    wd_bn_bias: bool = False,  # weight decay on norms and biases too
    trust_remote_code: bool = False,  # for loading `model` by name
    model_kwargs: dict
    | None = None,  # more `from_pretrained` options: dtype, device_map, revision, attn_implementation
    **kwargs,  # passed to `Learner`
) -> CausalLMLearner:
    """A fastai `Learner` around a causal LM, ready for `lr_find`, `fit_one_cycle` and `fine_tune`."""
    source = model
    if model_kwargs and isinstance(model, torch.nn.Module):
        raise ValueError('model_kwargs are options for loading a model by name or path; this model is loaded already')
    model = load_model(model, trust_remote_code=trust_remote_code, **(model_kwargs or {}))
    if tokenizer is None:
        tokenizer = getattr(dls, 'tokenizer', None)
    if tokenizer is None and isinstance(source, (str, os.PathLike)):
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        check_vocab(model, tokenizer)
    check_seq_len(model, getattr(dls, 'seq_len', None))
    device = getattr(dls, 'device', None)
    if device is not None:
        model.to(device)
    resolved = resolve_precision(precision, next(model.parameters()).device)
    if resolved.weights is not None:  # 'bf16-true': the model's parameters are cast, its buffers kept
        cast_parameters(model, resolved.weights)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    only = None
    if lora:
        model = add_lora(model, lora)
        only = {id(p) for p in model.parameters() if p.requires_grad}
    learn = CausalLMLearner(
        dls,
        model,
        tokenizer=tokenizer,
        precision=resolved,
        fused_head=resolve_fused_head(model, fused_head, loss_func),
        n_groups=n_groups,
        only=only,
        new_params=[] if lora else (new_parameters(model) if new_params is None else list(new_params)),
        accum_steps=accum_steps,
        clip=clip,
        compile=compile,
        run_dir=run_dir,
        checkpoint_every=checkpoint_every,
        keep=keep,
        log_every=log_every,
        report_to=report_to,
        loss_func=loss_func,
        opt_func=opt_func,
        lr=lr if lr is not None else (LORA_LR if lora else DEFAULT_LR),
        wd=wd,
        metrics=metrics,
        cbs=cbs,
        train_bn=train_bn,
        wd_bn_bias=wd_bn_bias,
        **kwargs,
    )
    learn.lr_given = lr is not None
    return learn
