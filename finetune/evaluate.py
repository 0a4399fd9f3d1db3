"""How a causal LM is scored: the next-token loss and token-weighted perplexity.

The loss is the mean cross-entropy over real target tokens (labels of -100 are ignored), computed
in fp32 whatever precision produced the logits. Perplexity accumulates sums of token losses and
token counts, never logits, and stays on the device until it is read, so it costs no host sync
per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fastai.learner import Metric

from .head_loss import IGNORE_INDEX, HeadInput, head_bypass, linear_cross_entropy, supports_head_bypass

__all__ = ['CausalLMLoss', 'Perplexity', 'CorpusPerplexity', 'corpus_perplexity', 'IGNORE_INDEX']


class CausalLMLoss:
    """Mean next-token cross-entropy over the labels that are not `IGNORE_INDEX`.

    Labels are already shifted (the data pipeline cuts `seq_len + 1` windows), so `labels[:, t]`
    is the target for `logits[:, t]`. Given a `HeadInput` (final hidden states and the LM head, from
    a fit with the fused head) it computes the same loss with `linear_cross_entropy`, without
    materialising the logits. Each call also keeps the detached per-row loss sums and
    token counts (`row_loss`, `row_tokens`), which the per-corpus metrics read instead of
    recomputing anything.
    """

    row_loss: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None
    reduction: str = 'mean'  # 'none' gives each row's mean token loss (fastai sets it in get_preds)

    def __call__(self, logits: torch.Tensor | HeadInput, labels: torch.Tensor, *_) -> torch.Tensor:
        labels = labels.long()
        real = labels != IGNORE_INDEX
        self.row_tokens = real.sum(-1)
        if isinstance(logits, HeadInput) and (self.reduction == 'mean' or not torch.is_grad_enabled()):
            total, token_loss = linear_cross_entropy(logits.hidden, logits.head, labels, logits.dtype)
            self.row_loss = token_loss.sum(-1)
            if self.reduction == 'none':
                return self.row_loss / self.row_tokens.clamp(min=1)
            return total / real.sum().clamp(min=1)
        if isinstance(logits, HeadInput):  # per-row losses to differentiate: materialise the logits
            logits = logits.logits()
        token_loss = F.cross_entropy(
            logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction='none'
        ).view(labels.shape)
        self.row_loss = token_loss.detach().sum(-1)
        if self.reduction == 'none':
            return token_loss.sum(-1) / self.row_tokens.clamp(min=1)
        return token_loss.sum() / real.sum().clamp(min=1)

    def __repr__(self) -> str:
        return 'CausalLMLoss()'


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
    precision: str = 'auto',  # autocast dtype, as for training
    max_blocks: int | None = None,  # evaluate at most this many blocks per corpus
    cache=None,  # token cache folder
):
    """Token-weighted perplexity of `model` on each corpus, over all of its tokens; a DataFrame."""
    import pandas as pd
    from fastprogress.fastprogress import progress_bar

    from .callbacks import resolve_precision
    from .corpora import Corpus
    from .tokens import PackedBlocks, build_token_store

    corpora = [corpora] if isinstance(corpora, Corpus) else list(corpora)
    device = next(model.parameters()).device
    dtype = resolve_precision(precision, device)
    loss_func, rows = CausalLMLoss(), []
    was_training = model.training
    bypass = head_bypass(model) if supports_head_bypass(model) else None  # no full logits here either
    model.eval()
    try:
        for corpus in corpora:
            store = build_token_store(corpus, tokenizer, cache)
            blocks = PackedBlocks(store.ids, [(0, store.n_tokens)], seq_len)
            if not len(blocks):
                raise ValueError(
                    f'corpus {corpus.name!r} has {store.n_tokens:,} tokens, fewer than one block of '
                    f'seq_len={seq_len} + 1: lower seq_len or add documents'
                )
            n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
            total, count = 0, 0  # summed on the device: read once per corpus
            for start in progress_bar(range(0, n, bs), leave=False):
                batch = torch.stack(
                    [torch.from_numpy(blocks[i].astype('int64')) for i in range(start, min(n, start + bs))]
                )
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    if bypass is None:
                        pred = model(input_ids=batch[:, :-1]).logits
                    else:
                        with bypass:
                            pred = HeadInput(model(input_ids=batch[:, :-1]).logits, bypass.head, dtype)
                loss_func(pred, batch[:, 1:])
                total = total + loss_func.row_loss.sum()
                count = count + loss_func.row_tokens.sum()
            total, count = float(total), int(count)
            rows.append({'corpus': corpus.name, 'tokens': count, 'perplexity': math.exp(total / count)})
    finally:
        model.train(was_training)
    return pd.DataFrame(rows)
