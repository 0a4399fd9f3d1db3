"""What the benchmark scripts share: the machine report, the training corpus, the plain loop, a step timer, peak RSS and
child processes."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'asimd', 'bf16')  # what matmul speed hangs on


def cpu_name() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines() if Path('/proc/cpuinfo').exists() else []:
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(peaks: bool = True) -> dict:
    """Print the CPU (model, cores, torch threads, the flags that matter) and its measured matmul peaks.

    The peaks are the best FLOP/s of a 1024 x 1024 matmul in fp32 and in bf16 with torch's threads:
    the ceilings MFU is divided by, measured in the same run as the figures they divide.
    """
    import torch

    from finetune.precision import cpu_flags, cpu_has_native_bf16, matmul_flops

    flags = sorted(set(FLAGS) & cpu_flags(), key=FLAGS.index)
    out = {'cpu': cpu_name(), 'cores': os.cpu_count(), 'threads': torch.get_num_threads(), 'flags': flags,
           'native_bf16': cpu_has_native_bf16()}  # fmt: skip
    if peaks:
        out['peak'] = {'fp32': matmul_flops(torch.float32, 1024, 1.0), 'bf16': matmul_flops(torch.bfloat16, 1024, 1.0)}
    say = f'CPU: {out["cpu"]}, {out["cores"]} cores, {out["threads"]} torch threads; flags: {" ".join(flags) or "none"}'
    if peaks:
        say += '; measured matmul peak: ' + ', '.join(f'{k} {v / 1e9:,.0f} GFLOP/s' for k, v in out['peak'].items())
    print(say)
    return out


def peak_of(report: dict, precision: str) -> float:
    """The measured matmul peak a precision's MFU divides by (bf16 for every bf16 variant)."""
    return report['peak']['fp32' if precision == 'fp32' else 'bf16']


def reference_dls(steps: int, seq_len: int, bs: int, **kwargs):
    """The Python language reference, packed for SmolLM2: `steps` training batches per epoch."""
    from finetune import CorpusMix, lm_dataloaders, load_tokenizer
    from finetune.quickstart import python_reference_corpus

    corpus = python_reference_corpus(Path(tempfile.mkdtemp()) / 'reference')
    mix = CorpusMix([corpus], epoch_tokens=steps * bs * seq_len)
    tok = load_tokenizer('smollm2-135m')
    return lm_dataloaders(mix, tok, seq_len=seq_len, bs=bs, valid_pct=0.01, verbose=False, **kwargs)


def step_timer():
    """A fastai callback whose `times` are the wall times between consecutive optimizer-step ends of a fit."""
    from fastai.callback.core import Callback

    class StepTimes(Callback):
        order = 100

        def before_fit(self):
            self.times, self._last = [], None

        def after_step(self):
            now = time.perf_counter()
            if self._last is not None:
                self.times.append(now - self._last)
            self._last = now

    return StepTimes()


PLAIN_PHASES = ('forward (with loss)', 'backward', 'clipping (+ accumulation)', 'optimizer step', 'zero_grad')


def plain_loop(model, batches, precision: str, lr: float):
    """The plain PyTorch loop, the floor any wrapper must not fall below (BENCH.md workload 1).

    `run(steps)` trains on the first `steps` batches and returns, per step, the `perf_counter` time
    before it and at the end of each of `PLAIN_PHASES`.
    """
    import torch

    from finetune.precision import autocast, cast_parameters

    if precision == 'bf16-true':
        cast_parameters(model, torch.bfloat16)  # weights, so gradients and optimizer state too
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    dtype = torch.bfloat16 if precision in ('bf16', 'bf16-autocast') else None  # autocast
    model.train()

    def run(steps: int) -> list[list[float]]:
        out = []
        for x in batches[:steps]:
            t = [time.perf_counter()]
            with autocast('cpu', dtype):
                loss = model(input_ids=x, labels=x).loss
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            out.append(t)
        return out

    return run


def peak_rss_gib() -> float:
    """This process's peak RSS. Not `ru_maxrss`: on Linux a child started by `subprocess` inherits its
    parent's value across fork and exec, while `VmHWM` belongs to the new address space."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(script: str, *args: str) -> dict:
    """Run `script` with `args` in a fresh interpreter; the JSON object it prints last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.rfind('{') :])
