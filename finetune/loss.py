"""Where the loss is computed: `CausalLMLoss`, and the fused head that computes it without full logits.

`CausalLMLoss` is the mean next-token cross-entropy over real target tokens (labels of -100 are
ignored), in fp32 whatever precision produced the logits; it keeps per-row loss sums and token
counts for the perplexity metrics.

The fused head: a causal LM's last step, `logits = lm_head(hidden)`, makes a (tokens x vocabulary) matrix that the
loss then copies to fp32, turns into log-probabilities and differentiates: for SmolLM2 (49,152
tokens of vocabulary) that is 1 GB per 2,048 tokens of batch before the backward pass starts, and it
grows with `bs * seq_len`. `linear_cross_entropy` computes the same loss from the hidden states a
few hundred rows at a time, and computes the gradients of the hidden states and of the head weight
in the same pass (the softmax of a chunk is its gradient), so the backward pass only scales them by
the incoming gradient. Matmuls run in the autocast dtype and the softmax in fp32, as the unfused
path does under autocast.

Around each forward pass of a fit (or for a whole evaluation), `head_bypass` puts a `HeadBypass` in
the output layer's place, so the model returns its final hidden states; `learn.pred` is then a
`HeadInput` (hidden states + the head), which `CausalLMLoss` scores with `linear_cross_entropy`.
The bypass holds the head's own parameters under the same names, so the model's parameters and
`state_dict` are unchanged while it is in place. Models whose forward changes the logits after the
head (soft-capping, logit scales) are detected by `supports_head_bypass` and keep the ordinary path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import eval_mode
from .packing import IGNORE_INDEX
from .precision import autocast

__all__ = [
    'head_is_bypassable',
    'resolve_fused_head',
    'IGNORE_INDEX',
    'CausalLMLoss',
    'HeadInput',
    'HeadBypass',
    'head_bypass',
    'supports_head_bypass',
    'linear_cross_entropy',
    'chunk_rows',
]

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in fp32)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab` tokens."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass
class HeadInput:
    """What the model returns in a bypassed forward: final hidden states and the head that would map them."""

    hidden: torch.Tensor  # (..., hidden_size)
    head: nn.Linear  # the model's output layer
    dtype: torch.dtype | None = None  # the autocast dtype of the forward pass, None for fp32

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have."""
        return torch.Size((*self.hidden.shape[:-1], self.head.out_features))

    def logits(self) -> torch.Tensor:
        """The full logits (materialised: only for small batches)."""
        with autocast(self.hidden.device.type, self.dtype):
            return self.head(self.hidden)

    @torch.no_grad()
    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The most likely next token at each position (over the vocabulary), computed chunk by chunk."""
        if dim not in (-1, len(self.shape) - 1):
            raise ValueError(f'HeadInput.argmax works over the vocabulary (dim=-1), not dim={dim}')
        flat = self.hidden.reshape(-1, self.hidden.shape[-1])
        weight, bias = _cast(self.head.weight, self.head.bias, self.dtype)
        step = chunk_rows(self.head.out_features)
        rows = range(0, len(flat), step)
        ids = [F.linear(flat[s : s + step].to(weight.dtype), weight, bias).argmax(-1) for s in rows]
        return torch.cat(ids).view(self.hidden.shape[:-1])


class HeadBypass(nn.Module):
    """Stands in for the output layer: passes the hidden states through, holding the head's parameters.

    Registering the head's own `weight` (and `bias`) here keeps `model.parameters()`, the optimizer's
    groups and `model.state_dict()` exactly as they are with the head in place.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _head_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The parent module and attribute name of the model's output layer, if it is a plain `nn.Linear`."""
    get = getattr(model, 'get_output_embeddings', None)
    head = get() if get is not None else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    for module in model.modules():
        for attr, child in module.named_children():
            if child is head:
                return module, attr
    return None


class head_bypass:
    """Context manager: within it, `model(...)` returns final hidden states in place of logits.

    The head is put back however the block ends (exceptions and Ctrl-C included).
    """

    def __init__(self, model: nn.Module):
        slot = _head_slot(model)
        if slot is None:
            raise ValueError(f'{type(model).__name__} has no plain nn.Linear output layer to bypass')
        self.parent, self.attr = slot
        self.head = getattr(self.parent, self.attr)
        self.bypass = HeadBypass(self.head)

    def __enter__(self) -> nn.Linear:
        setattr(self.parent, self.attr, self.bypass)
        return self.head

    def __exit__(self, *exc):  # putting the head back twice is harmless
        setattr(self.parent, self.attr, self.head)


@torch.no_grad()
def head_is_bypassable(model: nn.Module) -> bool:
    """The structural half of `supports_head_bypass`, with no forward pass: a plain `nn.Linear` head, no hooks."""
    return _head_slot(model) is not None


def supports_head_bypass(model: nn.Module) -> bool:
    """True when the model's logits are exactly `head(final hidden states)`, checked on a 3-token forward.

    False for models that scale or soft-cap logits after the head (Gemma 2, Cohere, Granite...), whose
    output layer is not a plain `nn.Linear`, or that cannot run a forward pass this way.
    """
    if _head_slot(model) is None:
        return False
    try:
        with eval_mode(model):
            device = next(model.parameters()).device
            ids = torch.tensor([[1, 2, 3]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            with head_bypass(model) as head:
                hidden = model(input_ids=ids, use_cache=False).logits
        if hidden.shape[-1] != head.in_features:
            return False
        return torch.allclose(head(hidden).float(), logits, rtol=1e-4, atol=1e-4)
    except Exception:  # an architecture this check does not understand keeps the ordinary path
        return False


def _cast(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """The head's weight and bias in the matmul dtype (themselves for None: no autocast)."""
    if dtype is None:
        return weight, bias
    return weight.to(dtype), bias.to(dtype) if bias is not None else None


def _chunked(hidden, weight, bias, labels, dtype, need_h, need_w, need_b):
    """Token losses, and (when asked) the gradients of their sum w.r.t. hidden, weight and bias.

    The weight's gradient accumulates in the matmul dtype (bf16 has fp32's range), as the unfused
    path's single matmul produces it; with fp16, whose sums over many rows can overflow, that matmul
    runs in fp32. Ignored positions are masked on the small (rows x hidden) side of each product.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    w, b = _cast(weight, bias, dtype)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    acc = torch.float32 if w.dtype == torch.float16 else w.dtype
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    step = chunk_rows(vocab)
    for s in range(0, n, step):
        h = hidden[s : s + step].to(w.dtype)
        y = labels[s : s + step]
        real = y != IGNORE_INDEX
        target = torch.where(real, y, 0).unsqueeze(1)
        logp = torch.log_softmax(F.linear(h, w, b), -1, dtype=torch.float32)
        losses[s : s + step] = logp.gather(1, target).squeeze(1).neg_().mul_(real)
        if not (need_h or need_w or need_b):
            continue
        grad = logp.exp_()  # softmax, in place of the log-probabilities
        grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))  # minus the one-hot target
        keep = real.unsqueeze(1).to(w.dtype)
        if need_b:
            grad_b += grad.t() @ keep.squeeze(1).float()
        grad32 = grad if need_w and acc != w.dtype else None
        grad = grad.to(w.dtype)
        if need_h:
            grad_h[s : s + step] = (grad @ w).mul_(keep)
        if need_w and grad_w.dtype == w.dtype:
            grad_w.addmm_(grad.t(), h * keep)
        elif need_w:
            grad_w.addmm_(grad32.t(), (h * keep).float())
    return losses, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        losses, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, labels, dtype, need_h, need_w, need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_total.float()
        return (
            (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None,
            grad_w.to(ctx.weight_dtype).mul_(scale) if grad_w is not None else None,
            grad_b.mul_(scale).to(ctx.weight_dtype) if grad_b is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,  # (..., hidden_size) final hidden states
    head: nn.Linear,  # the output layer
    labels: torch.Tensor,  # (...) target ids, IGNORE_INDEX where there is none
    dtype: torch.dtype | None = None,  # matmul dtype (the autocast dtype); None: the weight's own
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of token losses, per-token losses)` of `cross_entropy(head(hidden), labels)`, chunk by chunk.

    The sum is differentiable (w.r.t. hidden, head weight and bias); the per-token losses (0 where
    ignored) are detached, for metrics. Gradients are computed during the forward pass and kept
    until backward: hidden-sized and head-sized, not logits-sized.
    """
    flat, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    if not torch.is_grad_enabled():
        losses = _chunked(flat, head.weight, head.bias, y, dtype, False, False, False)[0]
        return losses.sum(), losses.view(labels.shape)
    total, losses = _LinearCrossEntropy.apply(flat, head.weight, head.bias, y, dtype)
    return total, losses.view(labels.shape)


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


def resolve_fused_head(model, fused_head: bool | None, loss_func) -> bool:
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
