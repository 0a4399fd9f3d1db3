"""How a causal LM is scored: the next-token loss and token-weighted perplexity.

The loss is the mean cross-entropy over real target tokens (labels of -100 are ignored), computed
in fp32 whatever precision produced the logits. Perplexity accumulates sums of token losses and
token counts, never logits, and stays on the device until it is read, so it costs no host sync
per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.learner import Metric

__all__ = ['CausalLMLoss', 'Perplexity', 'IGNORE_INDEX']

IGNORE_INDEX = -100  # Hugging Face's label for "no target here"


class CausalLMLoss:
    """Mean next-token cross-entropy over the labels that are not `IGNORE_INDEX`.

    Labels are already shifted (the data pipeline cuts `seq_len + 1` windows), so `labels[:, t]`
    is the target for `logits[:, t]`.
    """

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *_) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten().long(), ignore_index=IGNORE_INDEX)

    def __repr__(self) -> str:
        return 'CausalLMLoss()'


class Perplexity(Metric):
    """exp of the token-weighted mean validation loss (not the mean of per-batch perplexities)."""

    def reset(self):
        self.total, self.count = None, None

    def accumulate(self, learn):
        n = (learn.yb[0] != IGNORE_INDEX).sum()
        total = learn.loss.detach().float() * n
        self.total = total if self.total is None else self.total + total
        self.count = n if self.count is None else self.count + n

    @property
    def value(self):
        if self.count is None or int(self.count) == 0:
            return None
        return torch.exp(self.total / self.count).item()

    @property
    def name(self) -> str:
        return 'perplexity'
