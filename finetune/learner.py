"""The fastai `Learner` for Hugging Face causal LMs.

`causal_lm_learner` wraps any `AutoModelForCausalLM` (or the hub id, folder or GGUF file of one)
in `CausalLMLearner`, a small `Learner` subclass: fastai's `fit_one_cycle`, `fine_tune`,
`lr_find`, recorder and progress bars work unchanged, and the methods a language-model user
looks for (`generate`, `save_pretrained`) live here, in one place.

Defaults are sized for fine-tuning a pretrained LLM, not for training a CNN head: AdamW from
torch (foreach kernels), a peak learning rate of 1e-4 for the one-cycle schedule, and no weight
decay, as in the Hugging Face Trainer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (registers the progress bars for every Learner)
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find live there)
import torch
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper

from .callbacks import HFCausalLMCallback, MixCallback
from .evaluate import CausalLMLoss, CorpusPerplexity, Perplexity
from .generate import generate
from .models import ensure_pad_token, load_model, load_tokenizer, model_context_length

__all__ = ['CausalLMLearner', 'causal_lm_learner', 'default_metrics', 'DEFAULT_LR', 'adamw']

DEFAULT_LR = 1e-4  # peak one-cycle LR for full fine-tuning of a pretrained LM


def adamw(params, **kwargs) -> OptimWrapper:
    """torch's AdamW behind fastai's optimizer interface (param groups, freezing, LR schedules)."""
    return OptimWrapper(params, opt=torch.optim.AdamW, **kwargs)


class CausalLMLearner(Learner):
    """A fastai `Learner` that also generates text and saves in Hugging Face format."""

    tokenizer = None

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, **kwargs) -> str | list[str]:
        """Continue `prompts` with the model's `generate` (see `finetune.generate.generate` for options)."""
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write safetensors weights, config, generation config and tokenizer to `path`.

        `AutoModelForCausalLM.from_pretrained(path)` then gives the same logits as this model.
        An existing non-empty folder is left alone unless `overwrite=True`; the files are written
        to a temporary folder beside it first, so a failure leaves nothing half-written.
        """
        path = Path(path).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True to replace it')
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}-', dir=path.parent))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def causal_lm_learner(
    dls,  # DataLoaders from `lm_dataloaders` (or any yielding input_ids, labels[, corpus])
    model,  # an `AutoModelForCausalLM`, or a hub id / folder / .gguf file to load one from
    *,
    tokenizer=None,  # defaults to `dls.tokenizer`, else loaded from `model` when that is a name or path
    lr: float = DEFAULT_LR,  # default peak learning rate for `fit`, `fit_one_cycle`
    wd: float = 0.0,  # weight decay (decoupled, AdamW)
    opt_func=adamw,  # optimizer constructor taking fastai param groups
    loss_func=None,  # defaults to `CausalLMLoss()`: mean next-token cross-entropy
    metrics=None,  # defaults to perplexity, plus one `ppl_<corpus>` per corpus when there are several
    cbs=None,  # extra fastai callbacks
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
        ensure_pad_token(tokenizer)
        _check_vocab(model, tokenizer)
    _check_seq_len(model, getattr(dls, 'seq_len', None))
    device = getattr(dls, 'device', None)
    if device is not None:
        model.to(device)
    learn = CausalLMLearner(
        dls,
        model,
        loss_func=loss_func if loss_func is not None else CausalLMLoss(),
        opt_func=opt_func,
        lr=lr,
        wd=wd,
        metrics=metrics if metrics is not None else default_metrics(dls),
        cbs=[HFCausalLMCallback(), *([MixCallback()] if hasattr(dls, 'packed') else []), *(cbs or [])],
        **kwargs,
    )
    learn.tokenizer = tokenizer
    return learn


def default_metrics(dls) -> list:
    """Overall perplexity, and each corpus's when the data has several."""
    names = getattr(getattr(dls, 'packed', None), 'names', [])
    return [Perplexity(), *([CorpusPerplexity(i, n) for i, n in enumerate(names)] if len(names) > 1 else [])]


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
