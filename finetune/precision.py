"""Where precision is chosen: the names a user can give, what each means on a device, and the autocast it implies.

`resolve_precision` turns a name ('auto', 'bf16', 'fp16', 'fp32') into the autocast dtype for the
device the model is on (None: fp32, no autocast), once, when a learner or an evaluation starts.
Everything downstream (the training step, the fused head, `corpus_perplexity`) receives that dtype
and enters `autocast(device, dtype)`; nothing reads the autocast state back at run time.

'auto' picks bf16 on CUDA GPUs that have it (fp16 with loss scaling on those that don't), bf16 on
CPUs that compute it natively (x86 AVX512-BF16 or AMX, ARM BF16), and fp32 elsewhere: on a CPU
without bf16 instructions a bf16 matmul is emulated, tens of times slower than fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ['PRECISIONS', 'resolve_precision', 'cpu_has_native_bf16', 'autocast']

PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')  # the names `precision=` and `--precision` take


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX, ARM BF16), where autocast pays off."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return any(flag in flags for flag in (' avx512_bf16', ' amx_bf16', ' bf16'))


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for fp32."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r}: use one of {", ".join(map(repr, PRECISIONS))}')
    if precision == 'fp32':
        return None
    cuda = device.type == 'cuda'
    if precision == 'fp16':
        if not cuda:
            raise ValueError(
                f"precision='fp16' needs a CUDA GPU (the model is on {device.type}): fp16 autocast elsewhere is slow "
                "and has no loss scaling; use 'bf16' or 'fp32'"
            )
        return torch.float16
    if precision == 'bf16':
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16: use precision='fp16' (with loss scaling) or 'fp32'")
        if device.type not in ('cpu', 'cuda'):
            raise ValueError(f"bf16 autocast is supported here on CPU and CUDA, not {device.type}: use 'fp32'")
        return torch.bfloat16
    # auto: the fastest safe choice
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cpu' and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device_type: str, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device_type` ('cpu', 'cuda'); a no-op for None (fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
