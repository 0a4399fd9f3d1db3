"""Where one training step's time goes: data, forward, loss, backward, clipping, optimizer, callbacks.

finetune's Learner (SmolLM2-135M, seq_len 256, batch 4, as in workload 1) is timed phase by phase
with two callbacks that stamp the clock first and last at every fastai event; the plain PyTorch loop
is timed the same way around its own lines. Medians over `--steps` steps after one warm-up step,
both sides alternating. `--ops` adds torch.profiler's top operators for one Learner step.

    python bench/step_profile.py
    python bench/step_profile.py --precision fp32 --ops
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections import defaultdict

import torch
from common import PLAIN_PHASES, machine, plain_loop
from train_throughput import BS, SEQ_LEN, data

EVENTS = ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step')
EVENTS += ('after_step', 'after_batch')


def stamper(first: bool):
    from fastai.callback.core import Callback

    class Stamp(Callback):
        order = -1000 if first else 1000

    def method(event):
        def stamp(self):
            self.learn._stamps[(event, first)] = time.perf_counter()
            if event == 'after_batch' and not first and self.training:
                self.learn._steps.append(dict(self.learn._stamps))

        return stamp

    for event in EVENTS:
        setattr(Stamp, event, method(event))
    return Stamp()


def learner_phases(steps: dict) -> dict:
    """Phase durations of one step from the stamps (first/last callback at each event)."""

    def t(event, first):
        return steps[(event, first)]

    return {
        'callbacks before the forward': t('before_batch', False) - t('before_batch', True),
        'forward': t('after_pred', True) - t('before_batch', False),
        'loss (head + cross-entropy when fused)': t('after_loss', True) - t('after_pred', True),
        'backward': t('after_backward', True) - t('before_backward', False),
        'clipping (+ accumulation)': t('before_step', False) - t('before_step', True),
        'optimizer step': t('after_step', True) - t('before_step', False),
        'zero_grad + callbacks after the step': t('after_batch', False) - t('after_step', True),
    }


def profile_learner(model, dls, precision, steps):
    from finetune import causal_lm_learner

    learn = causal_lm_learner(dls, model, precision=precision, cbs=[stamper(True), stamper(False)])
    learn._stamps, learn._steps = {}, []

    def run():
        learn._steps = []
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-5)
        out = []
        for prev, cur in zip(learn._steps, learn._steps[1:]):  # data: from one batch's end to the next's start
            phases = learner_phases(cur)
            data_s = cur[('before_batch', True)] - prev[('after_batch', False)]
            phases = {'data (next batch, to device)': data_s, **phases}
            out.append(phases)
        return out

    return learn, run


def profile_plain(model, batches, precision, steps):
    loop = plain_loop(model, batches, precision, lr=1e-5)
    names = (*PLAIN_PHASES[:-1], 'zero_grad + callbacks after the step')

    def run():
        return [{n: b - a for n, a, b in zip(names, t, t[1:])} for t in loop(steps)][1:]

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16')
    p.add_argument('--steps', type=int, default=6, help='steps per side per round')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--ops', action='store_true', help="also torch.profiler's top operators over one Learner epoch")
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    machine(peaks=False)
    from finetune import load_model

    dls, _, batches = data(a.steps)
    base = load_model('smollm2-135m')
    learn, run_learner = profile_learner(copy.deepcopy(base), dls, a.precision, a.steps)
    run_plain = profile_plain(copy.deepcopy(base), batches, a.precision, a.steps)
    sides = {'finetune Learner': defaultdict(list), 'plain loop': defaultdict(list)}
    for r in range(a.rounds + 1):
        pair = (('finetune Learner', run_learner), ('plain loop', run_plain))
        for name, run in pair[:: 1 if r % 2 else -1]:  # neither side always first
            steps = run()
            if r:
                for step in steps:
                    for phase, seconds in step.items():
                        sides[name][phase].append(seconds)
    print(f'\none step, SmolLM2-135M, seq_len {SEQ_LEN}, batch {BS}, {a.precision}, CPU '
          f'({torch.get_num_threads()} threads); median ms per phase\n')  # fmt: skip
    phases = list(dict.fromkeys([*sides['finetune Learner'], *sides['plain loop']]))
    print('| phase | finetune Learner | share | plain loop |\n|---|---|---|---|')
    totals = {k: sum(statistics.median(v) for v in ph.values()) for k, ph in sides.items()}
    for phase in phases:
        cells = [sides[k].get(phase) for k in sides]
        ours = statistics.median(cells[0]) * 1e3 if cells[0] else None
        plain = statistics.median(cells[1]) * 1e3 if cells[1] else None
        share = f'{ours / 1e3 / totals["finetune Learner"]:.1%}' if ours is not None else ''
        ours_ms, plain_ms = ('' if v is None else f'{v:.0f}' for v in (ours, plain))
        print(f'| {phase} | {ours_ms} | {share} | {plain_ms} |')
    print(f'| **total** | {totals["finetune Learner"] * 1e3:.0f} | 100% | {totals["plain loop"] * 1e3:.0f} |')
    if a.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-5)
        print('\n' + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))


if __name__ == '__main__':
    main()
