"""The optimizer: torch's fused AdamW behind fastai's optimizer interface, with no decay on 1-D tensors."""

from __future__ import annotations

import torch
from fastai.optimizer import OptimWrapper

__all__ = ['AdamW', 'adamw']


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
