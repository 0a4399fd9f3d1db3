"""What checkpoints cost (issue: under 5% of training time at every 50 steps), SmolLM2-135M, seq_len 256, batch 4.

Two sides in one process, alternating: the Learner without checkpoints, and the same Learner saving a
checkpoint every `--every` optimizer steps into a temporary run folder. Each save is timed on its
own (weights, optimizer state, RNG and JSON, SHA-256 manifest, fsync, rename, rotation), and so is
each training step between saves. The cost at every 50 steps is the median save over 50 median
steps. Prints the CPU, both sides' step medians, the save's median and size, and that ratio.

    python bench/checkpoint_cost.py [--steps 10] [--rounds 2] [--every 5] [--precision bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import machine, reference_dls, step_timer

SEQ_LEN, BS = 256, 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=10, help='optimizer steps per side per round')
    p.add_argument('--rounds', type=int, default=2, help='rounds after the warm-up round')
    p.add_argument('--every', type=int, default=5, help='checkpoint interval of the checkpointing side')
    p.add_argument('--precision', choices=['bf16', 'fp32', 'auto'], default='auto')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    from finetune import causal_lm_learner, load_model

    dls = reference_dls(a.steps, SEQ_LEN, BS)
    base = load_model('smollm2-135m')
    run = Path(tempfile.mkdtemp(prefix='checkpoint-cost-'))
    sides, saves = {}, []
    for name, options in (('no checkpoints', {}), (f'checkpoint every {a.every}', {'checkpoint_every': a.every})):
        timer = step_timer()
        folder = run / name.replace(' ', '-') if options else None
        learn = causal_lm_learner(dls, copy.deepcopy(base), precision=a.precision, cbs=[timer], run_dir=folder, keep=2,
                                  **options)  # fmt: skip
        if options:
            save = learn.save_checkpoint

            def timed(*args, _save=save, **kwargs):
                start = time.perf_counter()
                out = _save(*args, **kwargs)
                saves.append(time.perf_counter() - start)
                return out

            learn.save_checkpoint = timed
        sides[name] = (learn, timer)
    times = {k: [] for k in sides}
    for r in range(a.rounds + 1):
        for name, (learn, timer) in list(sides.items())[:: 1 if r % 2 else -1]:
            with learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(1, 1e-4)
            if r:
                times[name] += timer.times
        if r == 0:
            saves.clear()  # the warm-up round's saves are not counted either
    step = {k: statistics.median(v) for k, v in times.items()}
    save = statistics.median(saves)
    size = sum(f.stat().st_size for f in max(run.rglob('step-*'), key=lambda p: p.stat().st_mtime).iterdir())
    plain = step['no checkpoints']
    print(f'\ncheckpoint cost: SmolLM2-135M, seq_len {SEQ_LEN}, batch {BS}, precision {a.precision}')
    machine(peaks=False)
    print(f'{len(saves)} saves, {len(times["no checkpoints"])} timed steps per side\n')
    print('| side | median step | vs no checkpoints |\n|---|---|---|')
    for k, v in step.items():
        print(f'| {k} (steps between saves) | {v:.2f} s | {v / plain:.3f} |')
    print(f'\none checkpoint: median {save:.2f} s, {size / 2**20:.0f} MiB')
    for every in (50, a.every):
        print(f'every {every} steps: {save / (every * plain):.1%} of training time')


if __name__ == '__main__':
    main()
