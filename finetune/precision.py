"""Where precision is chosen: the names a user can give, what each means on a device, and whether the CPU has bf16.

`resolve_precision` turns a name into a `Precision` for the device the model is on, once, when a
learner or an evaluation starts. Everything downstream reads that object; nothing reads the
autocast state back at run time.

- 'bf16': mixed precision with fp32 master weights. The optimizer keeps the fp32 weights; the
  forward and backward passes run on a bf16 copy of them, refreshed once per optimizer step
  (`callbacks.MasterWeightsCallback`), so activations, norms and the residual stream are bf16 too
  and nothing is cast per forward pass. The gradients reach the optimizer in fp32.
- 'bf16-autocast': torch autocast; the weights stay fp32 and every matmul casts its weight and
  input to bf16 in each forward pass (the gradients back in each backward).
- 'bf16-true': bf16 end to end: the model is cast to bf16, and the gradients and the optimizer
  state are bf16 too (half the memory of 'bf16'); updates smaller than half a bf16 step of a
  weight are lost, so the loss falls more slowly at fine-tuning learning rates (README, Precision).
- 'fp16': autocast with loss scaling, CUDA only. 'fp32': no mixed precision.
- 'auto': 'bf16' on CPUs that compute bf16 natively (x86 AVX512-BF16 or AMX, ARM BF16), 'fp32' on
  other CPUs (a bf16 matmul is emulated there, tens of times slower than fp32); on CUDA GPUs
  'bf16-autocast' where they have bf16 ('fp16' where they don't): 'bf16' was measured against it on
  CPUs only.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache

import torch

from .cache import atomic_write_text, cache_folder

__all__ = [
    'PRECISIONS',
    'Precision',
    'resolve_precision',
    'BF16_FLAGS',
    'cpu_flags',
    'cpu_has_native_bf16',
    'matmul_flops',
    'cast_parameters',
    'autocast',
]

PRECISIONS = ('auto', 'bf16', 'bf16-true', 'bf16-autocast', 'fp16', 'fp32')  # what `precision=` takes


@dataclass(frozen=True)
class Precision:
    """What a precision name means on one device."""

    name: str  # 'fp32', 'bf16', 'bf16-true', 'bf16-autocast' or 'fp16' ('auto' resolved)
    autocast: torch.dtype | None = None  # autocast dtype of the forward pass; None: no autocast
    master: bool = False  # fp32 master weights, a bf16 copy for forward and backward ('bf16')
    weights: torch.dtype | None = None  # the dtype the model is cast to for good ('bf16-true')

    def __str__(self) -> str:
        return self.name

    @property
    def compute(self) -> torch.dtype | None:
        """The dtype matmuls run in (None: fp32): an evaluation autocasts to it, leaving the model as it is."""
        return self.autocast or self.weights or (torch.bfloat16 if self.master else None)

    @property
    def says(self) -> str:
        """The name with what it means, for a learner's repr and logs."""
        return {
            'bf16': 'bf16 (fp32 master weights)',
            'bf16-autocast': 'bf16 autocast',
            'bf16-true': 'bf16-true (weights, gradients and optimizer state in bf16)',
            'fp16': 'fp16 autocast (loss scaled)',
        }.get(self.name, self.name)


BF16_FLAGS = {'avx512_bf16', 'amx_bf16', 'bf16'}  # x86 AVX512-BF16, AMX, ARM BF16 (Linux's and macOS's names)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the OS reports them (empty where it does not: then bf16 is measured)."""
    system = platform.system()
    if system == 'Linux':
        try:
            with open('/proc/cpuinfo') as f:
                text = f.read(1 << 16)
        except OSError:
            return set()
        line = next((s for s in text.splitlines() if s.startswith(('flags', 'Features'))), '')
        return set(line.partition(':')[2].split())
    if system == 'Darwin':  # Apple silicon: FEAT_BF16 from M2 on
        try:
            out = subprocess.run(['sysctl', '-n', 'hw.optional.arm.FEAT_BF16'], capture_output=True, text=True)
        except OSError:
            return set()
        return {'bf16'} if out.stdout.strip() == '1' else {'nobf16'}
    return set()  # Windows and others


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on this CPU with torch's threads (the best of repeated runs)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: threads, kernels
    best, end = float('inf'), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX, ARM BF16), where bf16 pays off.

    Read from the CPU's flags on Linux and macOS; elsewhere a bf16 and an fp32 matmul are timed once
    (native when bf16 runs at least as fast) and the answer is kept in the cache folder.
    """
    flags = cpu_flags()
    if flags:
        return bool(flags & BF16_FLAGS)
    key = f'{platform.processor() or platform.machine()} torch {torch.__version__}'
    try:
        path = cache_folder('machine') / 'bf16.json'
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        path, known = None, {}
    if key not in known:
        n = 256  # small: an emulated bf16 matmul takes milliseconds at this size, not seconds
        known[key] = matmul_flops(torch.bfloat16, n, 0.1) >= matmul_flops(torch.float32, n, 0.1)
        try:
            if path is not None:
                atomic_write_text(path, json.dumps(known))
        except OSError:
            pass  # measured again next time; an unwritable cache must not stop training
    return bool(known[key])


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """What `precision` means on `device`; 'auto' becomes the fastest safe choice there."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r}: use one of {", ".join(map(repr, PRECISIONS))}')
    cuda = device.type == 'cuda'
    if precision == 'auto':
        if cuda:
            precision = 'bf16-autocast' if torch.cuda.is_bf16_supported() else 'fp16'  # not measured on GPUs
        else:
            precision = 'bf16' if device.type == 'cpu' and cpu_has_native_bf16() else 'fp32'
    if precision == 'fp32':
        return Precision('fp32')
    if precision == 'fp16':
        if not cuda:
            raise ValueError(
                f"precision='fp16' needs a CUDA GPU (the model is on {device.type}): fp16 autocast elsewhere is slow "
                "and has no loss scaling; use 'bf16' or 'fp32'"
            )
        return Precision('fp16', autocast=torch.float16)
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"precision={precision!r} is supported here on CPU and CUDA, not {device.type}: use 'fp32'")
    if cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision={precision!r}: this GPU has no bf16; use 'fp16' (with loss scaling) or 'fp32'")
    if device.type == 'cpu' and not cpu_has_native_bf16():
        warnings.warn(
            f'precision={precision!r}: this CPU has no bf16 instructions (no AVX512-BF16, AMX or ARM BF16), so bf16 '
            "matmuls are emulated, often tens of times slower than fp32; precision='auto' picks 'fp32' here",
            stacklevel=3,
        )
    if precision == 'bf16-autocast':
        return Precision(precision, autocast=torch.bfloat16)
    if precision == 'bf16-true':
        return Precision(precision, weights=torch.bfloat16)
    return Precision('bf16', master=True)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters of `model` to `dtype` ('bf16-true'), leaving its buffers as they are:
    `model.to(dtype)` would also round fp32 buffers such as RoPE's `inv_freq`, shifting positions far out."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def autocast(device_type: str, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device_type` ('cpu', 'cuda'); a no-op for None (fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
