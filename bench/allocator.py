"""Allocator churn: a training step with glibc's default malloc thresholds against ones that keep freed memory.

glibc serves a large allocation (above a threshold that starts at 128 KiB and grows to at most 32 MiB)
with its own mmap and returns it to the OS when freed, and trims the heap's top when more than
128 KiB are free there; every step's activations then start from fresh, zeroed pages (minor page
faults). `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` (the environment form of `mallopt`)
keep them. Each setting runs the Learner alone in a child process (SmolLM2-135M, seq_len 256,
batch 4, `precision='auto'`), alternating A B B A; it prints the median step time and the minor
page faults per step.

    python bench/allocator.py [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

from common import machine, reference_dls, step_timer

SEQ_LEN, BS = 256, 4
SETTINGS = {
    'glibc defaults': {},
    "finetune's (mallopt at the first fit)": {'FINETUNE_MALLOPT': '1'},
}


def child(steps: int) -> dict:
    from fastai.callback.core import Callback

    from finetune import causal_lm_learner, load_model

    class Faults(Callback):
        order = 101

        def before_fit(self):
            self.faults = []

        def before_batch(self):
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def after_step(self):
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.start)

    warnings.filterwarnings('ignore')
    dls = reference_dls(steps, SEQ_LEN, BS, max_valid_blocks=1)
    timer, faults = step_timer(), Faults()
    learn = causal_lm_learner(dls, load_model('smollm2-135m'), cbs=[timer, faults])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-5)
    return {'step_s': statistics.median(timer.times[1:]), 'faults': statistics.median(faults.faults[2:]),
            'precision': learn.precision.name}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.steps)))
        return
    machine(peaks=False)
    seen = {k: [] for k in SETTINGS}
    for r in range(a.rounds):
        for name in list(SETTINGS)[:: 1 if r % 2 == 0 else -1]:
            env = {k: v for k, v in os.environ.items() if k not in ('FINETUNE_MALLOPT',)}
            env.setdefault('FINETUNE_MALLOPT', '0')
            env.update(SETTINGS[name])
            cmd = [sys.executable, __file__, '--child', '--steps', str(a.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            seen[name].append(json.loads(out[out.rfind('{') :]))
            print(f'round {r}: {name}: {seen[name][-1]}', file=sys.stderr, flush=True)
    base = statistics.median(x['step_s'] for x in seen['glibc defaults'])
    print(f'\nLearner, SmolLM2-135M, seq_len {SEQ_LEN}, batch {BS}, {seen["glibc defaults"][0]["precision"]}, '
          f'{a.rounds} child runs per setting of {a.steps} steps\n')  # fmt: skip
    print('| malloc setting | s/step | speed vs defaults | minor page faults per step |\n|---|---|---|---|')
    for name, runs in seen.items():
        step = statistics.median(x['step_s'] for x in runs)
        faults = statistics.median(x['faults'] for x in runs)
        print(f'| {name} | {step:.2f} | {base / step:.2f}x | {faults:,.0f} |')


if __name__ == '__main__':
    main()
