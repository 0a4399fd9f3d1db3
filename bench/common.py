"""What the benchmark scripts share: the training corpus, the plain loop, a step timer, peak RSS and child processes."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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

    from finetune.precision import autocast

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    dtype = torch.bfloat16 if precision == 'bf16' else None
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
