"""Training throughput (BENCH.md workload 1): finetune's Learner vs a plain PyTorch loop vs the HF Trainer.

SmolLM2-135M (the embedded default), seq_len 256, batch 4, AdamW, the same token blocks for every
side. The three sides run in one process, alternating (A B C C B A ...), each for `--steps` steps
per round; a step's time is the wall time between consecutive optimizer-step ends (data loading,
forward, backward, step and callbacks included). The first round warms up and is not counted.
Medians over the counted steps; MFU = 6 x parameters x tokens/s / peak FLOP/s of the precision.
Peak RSS comes from running each side alone in a child process (`--rss-only SIDE`).

    python bench/train_throughput.py                  # bf16 autocast on CPU
    python bench/train_throughput.py --precision fp32
    python bench/train_throughput.py --variants       # plus each fast path switched off / on
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch
from common import peak_rss_gib, plain_loop, reference_dls, run_child, step_timer

SEQ_LEN, BS = 256, 4
PEAK_FLOPS = {'bf16': 900e9, 'fp32': 200e9}  # 2-core CPU peak matmul, BENCH.md


def data(steps: int):
    """finetune's DataLoaders over the Python language reference, and the same blocks as tensors for the other sides."""
    dls = reference_dls(steps, SEQ_LEN, BS)
    order = dls.train.sampler.epoch_order(0)
    batches = torch.stack([torch.from_numpy(dls.packed.block(int(i))[:-1].astype('int64')) for i in order])
    return dls, dls.tokenizer, batches.view(steps, BS, SEQ_LEN)


def finetune_side(model, dls, precision, **options):
    """`learn.fit_one_cycle(1)` through finetune's own DataLoaders (one epoch = `steps` steps)."""
    from finetune import causal_lm_learner

    timer = step_timer()
    learn = causal_lm_learner(dls, model, precision=precision, cbs=[timer], **options)

    def run(steps):
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, 1e-4)
        return timer.times

    return run


def plain_side(model, batches, precision):
    """The plain loop; a step's time runs from one step's end to the next one's, as for the other sides."""
    loop = plain_loop(model, batches, precision, lr=1e-4)

    def run(steps):
        ends = [t[-1] for t in loop(steps)]
        return [b - a for a, b in zip(ends, ends[1:])]

    return run


def trainer_side(model, batches, precision):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{'input_ids': x, 'labels': x} for x in batches.view(-1, SEQ_LEN)]
    out = tempfile.mkdtemp()

    class Times(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.times, self.last = [], None

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    timer = Times()

    def run(steps):
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BS, max_steps=steps, learning_rate=1e-4,
            bf16=precision == 'bf16', use_cpu=True, report_to=[], save_strategy='no', logging_strategy='no',
            disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data[: steps * BS], callbacks=[timer]).train()
        return timer.times

    return run


SIDES = {  # name: (how it is built, in the default table)
    'finetune Learner': (lambda m, dls, b, p: finetune_side(m, dls, p), True),
    'plain PyTorch loop': (lambda m, dls, b, p: plain_side(m, b, p), True),
    'HF Trainer': (lambda m, dls, b, p: trainer_side(m, b, p), True),
    'finetune, fused_head=False': (lambda m, dls, b, p: finetune_side(m, dls, p, fused_head=False), False),
    'finetune, foreach AdamW': (lambda m, dls, b, p: finetune_side(m, dls, p, opt_func=foreach_adamw), False),
    'finetune, compile=True': (lambda m, dls, b, p: finetune_side(m, dls, p, compile=True), False),
}


def foreach_adamw(params, **kwargs):
    from finetune.learner import adamw

    return adamw(params, fused=False, **kwargs)


def make_sides(precision, steps, names):
    from finetune import load_model

    dls, tok, batches = data(steps)
    base = load_model('smollm2-135m')
    sides = {name: SIDES[name][0](copy.deepcopy(base), dls, batches, precision) for name in names}
    return sides, sum(p.numel() for p in base.parameters())


def rss_of(side: str, precision: str, steps: int) -> float:
    """Peak RSS (GiB) of one side running alone, in a child process."""
    return run_child(__file__, '--rss-only', side, '--precision', precision, '--steps', str(steps))['rss_gib']


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16')
    p.add_argument(
        '--steps', type=int, default=4, help='steps per side per round (the first step of each is not timed)'
    )
    p.add_argument('--rounds', type=int, default=3, help='rounds after the warm-up round')
    p.add_argument(
        '--variants',
        action='store_true',
        help="also finetune's fast paths one by one: unfused head, foreach AdamW, compiled blocks",
    )
    p.add_argument('--rss-only', help=argparse.SUPPRESS)
    p.add_argument('--no-rss', action='store_true', help='skip the peak-RSS child processes')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    torch.manual_seed(0)
    if a.rss_only:
        sides, _ = make_sides(a.precision, a.steps, [a.rss_only])
        run = next(iter(sides.values()))
        run(a.steps)
        run(a.steps)
        print(json.dumps({'rss_gib': peak_rss_gib()}))
        return
    names = [k for k, (_, default) in SIDES.items() if default or a.variants]
    sides, n_params = make_sides(a.precision, a.steps, names)
    times = {k: [] for k in sides}
    for r in range(a.rounds + 1):  # round 0 warms up
        # A B C, then C B A: a side that always runs first (or last) was measured up to 8% off here
        for name, run in list(sides.items())[:: 1 if r % 2 else -1]:
            t = run(a.steps)
            if r:
                times[name] += t
        print(f'round {r}: ' + ', '.join(f'{k} {statistics.median(v):.2f}s/step' for k, v in times.items() if v),
              file=sys.stderr, flush=True)  # fmt: skip
    rss = {k: (None if a.no_rss else rss_of(k, a.precision, a.steps)) for k in sides}
    tok_s = {k: BS * SEQ_LEN / statistics.median(v) for k, v in times.items()}
    ours = tok_s['finetune Learner']
    n = len(times['finetune Learner'])
    print(f'\nworkload 1: SmolLM2-135M, seq_len {SEQ_LEN}, batch {BS}, {a.precision}, AdamW, CPU '
          f'({torch.get_num_threads()} threads), median of {n} steps per side\n')  # fmt: skip
    print('| side | tokens/s | MFU | finetune / side | peak RSS |\n|---|---|---|---|---|')
    for k in sides:
        mfu = 6 * n_params * tok_s[k] / PEAK_FLOPS[a.precision]
        mem = f'{rss[k]:.2f} GiB' if rss[k] is not None else 'n/a'
        print(f'| {k} | {tok_s[k]:.0f} | {mfu:.1%} | {ours / tok_s[k]:.2f} | {mem} |')


if __name__ == '__main__':
    main()
