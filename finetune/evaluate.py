"""Evaluation: token-weighted perplexity, overall and per corpus, during a fit and of any model on whole corpora.

The metrics accumulate the sums of token losses and token counts that `CausalLMLoss` keeps per
row, never logits, and stay on the device until read, so they cost no host sync per batch.
`corpus_perplexity` scores a model on each corpus's full token stream, with the fused head where
the model allows it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from fastai.learner import Metric

from .corpora import Corpus
from .data import LMDataLoaders
from .loss import IGNORE_INDEX, CausalLMLoss, HeadInput, head_bypass, supports_head_bypass
from .models import check_seq_len, eval_mode
from .precision import autocast, resolve_precision
from .tokens import PackedBlocks, build_token_store

__all__ = ['Perplexity', 'CorpusPerplexity', 'corpus_perplexity', 'default_metrics']


class _TokenPerplexity(Metric):
    """exp of summed token losses over the token count; sums stay on the device until read."""

    def reset(self):
        self.total, self.count = None, None

    def _add(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    @property
    def value(self):
        if self.count is None or int(self.count) == 0:
            return None
        return torch.exp(self.total / self.count).item()


class Perplexity(_TokenPerplexity):
    """Token-weighted validation perplexity (not the mean of per-batch perplexities)."""

    def accumulate(self, learn):
        loss_func = learn.loss_func
        if getattr(loss_func, 'row_loss', None) is not None:  # exact sums, whatever the reduction
            self._add(loss_func.row_loss.sum(), loss_func.row_tokens.sum())
        else:
            n = (learn.yb[0] != IGNORE_INDEX).sum()
            self._add(learn.loss.detach().float().mean() * n, n)

    @property
    def name(self) -> str:
        return 'perplexity'


class CorpusPerplexity(_TokenPerplexity):
    """Token-weighted validation perplexity of one corpus, from the loss function's per-row sums."""

    def __init__(self, corpus: int, name: str):
        self.corpus, self._name = corpus, name

    def accumulate(self, learn):
        loss_func = learn.loss_func
        if getattr(loss_func, 'row_loss', None) is None or len(learn.yb) < 2:
            raise RuntimeError('CorpusPerplexity needs CausalLMLoss and batches of (input_ids, labels, corpus)')
        mine = learn.yb[1] == self.corpus
        self._add((loss_func.row_loss * mine).sum(), (loss_func.row_tokens * mine).sum())

    @property
    def name(self) -> str:
        return f'ppl_{self._name}'


@torch.no_grad()
def corpus_perplexity(
    model,  # a causal LM
    tokenizer,  # its tokenizer
    corpora,  # a Corpus or a list of them
    seq_len: int = 512,  # tokens per evaluated block
    bs: int = 8,  # blocks per forward pass
    precision: str = 'auto',  # as for training; evaluated under autocast to its dtype
    max_blocks: int | None = None,  # evaluate at most this many blocks per corpus
    cache=None,  # token cache folder
):
    """Token-weighted perplexity of `model` on each corpus, over all of its tokens (a chat corpus's replies); a
    DataFrame."""
    import pandas as pd
    from fastprogress.fastprogress import progress_bar

    corpora = [corpora] if isinstance(corpora, Corpus) else list(corpora)
    check_seq_len(model, seq_len, fix='evaluate with')  # past the context a model fails or scores garbage
    device = next(model.parameters()).device
    dtype = resolve_precision(precision, device).compute
    loss_func, rows = CausalLMLoss(), []
    fused = supports_head_bypass(model)  # no full logits here either
    with eval_mode(model), head_bypass(model) if fused else nullcontext() as head:
        for corpus in corpora:
            store = build_token_store(corpus, tokenizer, cache)
            blocks = PackedBlocks(store.ids, [(0, store.n_tokens)], seq_len, store.mask)
            if not len(blocks):
                raise ValueError(
                    f'corpus {corpus.name!r} has {store.n_tokens:,} tokens, fewer than one block of '
                    f'seq_len={seq_len} + 1: lower seq_len or add documents'
                )
            n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
            total, count = 0, 0  # summed on the device: read once per corpus
            for start in progress_bar(range(0, n, bs), leave=False):
                picks = range(start, min(n, start + bs))
                batch = torch.stack([torch.from_numpy(blocks[i].astype('int64')) for i in picks]).to(device)
                labels = batch[:, 1:].clone()
                if blocks.mask is not None:  # a chat corpus: scored on its replies, as it is trained
                    mask = torch.stack([torch.from_numpy(blocks.mask_window(i)[1:].astype(bool)) for i in picks])
                    labels[~mask.to(device)] = IGNORE_INDEX
                with autocast(device.type, dtype):
                    pred = model(input_ids=batch[:, :-1]).logits
                loss_func(HeadInput(pred, head, dtype) if fused else pred, labels)
                total = total + loss_func.row_loss.sum()
                count = count + loss_func.row_tokens.sum()
            total, count = float(total), int(count)
            rows.append({'corpus': corpus.name, 'tokens': count, 'perplexity': math.exp(total / count)})
    return pd.DataFrame(rows)


def default_metrics(dls) -> list:
    """Overall perplexity, and each corpus's when the data has several (`dls.names`)."""
    names = list(dls.names) if isinstance(dls, LMDataLoaders) else []  # fastai's DataLoaders delegate getattr
    return [Perplexity(), *([CorpusPerplexity(i, n) for i, n in enumerate(names)] if len(names) > 1 else [])]
