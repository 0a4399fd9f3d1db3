"""Callbacks that fit Hugging Face causal LMs and corpus mixes into fastai's training loop.

`HFCausalLMCallback` is fastai's two-line `DropOutput` pattern plus what a transformers model
needs: inputs go in as plain tensors (fastai's tensor subclasses would route every op of the
model through `__torch_function__`), the model output is reduced to its logits, and the KV cache
is off while fitting (it only costs memory during training).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

__all__ = ['HFCausalLMCallback', 'MixCallback']


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor else t


class HFCausalLMCallback(Callback):
    """Plain-tensor inputs and targets in, `logits` out, no KV cache while fitting."""

    order = -10  # before anything that reads the batch

    def before_fit(self):
        config = getattr(self.learn.model, 'config', None)
        self._use_cache = getattr(config, 'use_cache', None)
        if config is not None and self._use_cache is not None:
            config.use_cache = False

    def after_fit(self):
        config = getattr(self.learn.model, 'config', None)
        if config is not None and self._use_cache is not None:
            config.use_cache = self._use_cache

    def before_batch(self):
        self.learn.xb = tuple(_plain(x) for x in self.xb)
        self.learn.yb = tuple(_plain(y) for y in self.yb)

    def after_pred(self):
        pred = self.pred
        self.learn.pred = pred.logits if hasattr(pred, 'logits') else pred[0] if isinstance(pred, tuple) else pred


class MixCallback(Callback):
    """Keeps the mix sampler's place, so the next fit resumes the epoch, and counts trained tokens per corpus.

    `lr_find` runs are not counted and do not move the sampler: the data order after it is the same.
    Counts stay on the device during the fit and are added to `dls.trained_tokens` at its end.
    """

    order = 5

    def before_fit(self):
        self.sampler = getattr(self.dls.train, 'sampler', None)
        self.active = self.sampler is not None and not hasattr(self.learn, 'lr_finder')
        self.counts = None

    def after_batch(self):
        if not (self.active and self.training) or len(self.yb) < 2:
            return
        labels, corpus = self.yb[0], self.yb[1]
        self.sampler.advance(len(labels))
        tokens = (labels != -100).sum(-1)
        n = len(self.dls.packed.names)
        counts = torch.zeros(n, dtype=torch.long, device=tokens.device).index_add_(0, corpus.long(), tokens)
        self.counts = counts if self.counts is None else self.counts + counts

    def after_fit(self):
        if self.counts is not None:
            before = self.dls.trained_tokens
            self.dls._trained_tokens = [a + int(b) for a, b in zip(before, self.counts.tolist())]
            self.counts = None
