"""precision='bf16': fp32 master weights in the optimizer, a bf16 copy of them for the forward and backward passes.

Autocast keeps the weights in fp32 and casts each one to bf16 in every forward pass (and each
weight's gradient back in every backward); norms, activations and the residual stream stay fp32.
Here the model computes in bf16 throughout, on a bf16 copy of the weights made once per optimizer
step, and the optimizer still updates fp32 weights with fp32 gradients, so updates smaller than a
bf16 step of a weight are kept (they are lost with `precision='bf16-true'`).

The parameters stay the same objects (the optimizer's state, the layer groups, freezing and
checkpoints all see them); only what their `.data` points at changes, for the span of a batch:

    before_batch    .data -> the bf16 copy (refreshed first if the optimizer stepped since)
    after_backward  each bf16 gradient is added to an fp32 one (micro-batches of an accumulation
                    window sum there); .grad cleared, .data -> the fp32 weight again
    before_step     .grad -> the fp32 gradient: clipping and the optimizer step see fp32 only
    after_batch     .data -> the fp32 weight (a validation batch, a cancelled one)

so outside a batch (checkpoints, metrics logs, `after_fit`, a failed fit) the model is fp32 as it
was. With several processes (DDP buckets gradients by the dtype they had when it wrapped the
model) the fit uses bf16 autocast instead (`CausalLMLearner.autocast_dtype`).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

__all__ = ['MasterWeightsCallback']


class MasterWeightsCallback(Callback):
    """Train on a bf16 copy of fp32 weights, refreshed once per optimizer step (see the module's docstring)."""

    order = 15  # after_backward and before_step run before TrainStepCallback's (accumulation, clipping)

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.params, self.masters, self.copies, self.grads = [], [], [], {}
        self.stale = True

    def before_fit(self):
        self.after_fit()  # a fit that failed before its after_fit left nothing here; make sure
        on = self.learn.precision.master and self.learn.world == 1
        self.params = [p for p in self.learn.model.parameters() if p.dtype == torch.float32] if on else []
        self.masters = [p.data for p in self.params]
        self.copies, self.stale = [], True

    def _refresh(self):
        if not self.copies:
            self.copies = [m.to(self.dtype) for m in self.masters]
        else:  # only what trains has changed
            moved = [i for i, p in enumerate(self.params) if p.requires_grad]
            torch._foreach_copy_([self.copies[i] for i in moved], [self.masters[i] for i in moved])
        self.stale = False

    def before_batch(self):
        if not self.params:
            return
        if self.stale:
            self._refresh()
        for p, c in zip(self.params, self.copies):
            p.data = c

    def after_backward(self):
        for i, p in enumerate(self.params):
            if p.grad is not None:
                if i in self.grads:
                    self.grads[i].add_(p.grad)
                else:
                    self.grads[i] = p.grad.float()
                p.grad = None
        self._fp32()

    def before_step(self):
        for i, g in self.grads.items():
            self.params[i].grad = g
        self.grads = {}

    def after_step(self):
        self.stale = True

    def after_batch(self):
        self._fp32()

    def _fp32(self):
        for p, m in zip(self.params, self.masters):
            p.data = m

    def after_fit(self):  # also after a failed fit; may run twice
        self._fp32()
        self.params, self.masters, self.copies, self.grads = [], [], [], {}
