"""Callbacks that fit Hugging Face causal LMs into fastai's training loop.

`HFCausalLMCallback` is fastai's two-line `DropOutput` pattern plus what a transformers model
needs: inputs go in as plain tensors (fastai's tensor subclasses would route every op of the
model through `__torch_function__`), the model output is reduced to its logits, and the KV cache
is off while fitting (it only costs memory during training).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

__all__ = ['HFCausalLMCallback']


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
