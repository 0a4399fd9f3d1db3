"""Training throughput (BENCH.md workload 1): finetune's Learner vs a plain PyTorch loop vs the HF Trainer.

SmolLM2-135M (the embedded default), seq_len 256, batch 4, AdamW, the same token blocks for every
side. Every side runs in one process, alternating (A B C C B A ...), each for `--steps` steps per
round; a step's time is the wall time between consecutive optimizer-step ends (data loading,
forward, backward, step and callbacks included). The first round warms up and is not counted.
Each side is named with its precision: the Learner at every precision it offers; the plain loop
and the HF Trainer with bf16 autocast (what `bf16=True` means for the Trainer) and in bf16 end to
end (the model cast to bf16). Medians over the counted steps; MFU = 6 x parameters x tokens/s /
the matmul peak of that precision measured at the start of the same run (fp32 or bf16).
Peak RSS comes from running each side alone in a child process (`--rss-only SIDE`).

    python bench/train_throughput.py                       # the precisions 'auto' chooses among here
    python bench/train_throughput.py --precisions fp32     # e.g. on a CPU without bf16
    python bench/train_throughput.py --variants            # plus each fast path switched off / on
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
from common import machine, peak_of, peak_rss_gib, plain_loop, reference_dls, run_child, step_timer

SEQ_LEN, BS = 256, 4


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
    """The HF Trainer: `bf16=True` for 'bf16-autocast', the model cast to bf16 for 'bf16-true'."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if precision == 'bf16-true':
        from finetune.precision import cast_parameters

        cast_parameters(model, torch.bfloat16)

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
            bf16=precision == 'bf16-autocast', use_cpu=True, report_to=[], save_strategy='no', logging_strategy='no',
            disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data[: steps * BS], callbacks=[timer]).train()
        return timer.times

    return run


def sides_for(precisions: list[str], variants: bool) -> dict:
    """name: (tool, precision, how it is built); the Learner at each precision, the others at what they offer."""
    out = {}
    for prec in precisions:
        out[f'finetune Learner, {prec}'] = ('finetune', prec, lambda m, dls, b, p: finetune_side(m, dls, p))
    others = [p for p in precisions if p != 'bf16']  # the others have no fp32-master bf16: autocast and true
    for prec in others:
        out[f'plain PyTorch loop, {prec}'] = ('plain', prec, lambda m, dls, b, p: plain_side(m, b, p))
    for prec in others:
        out[f'HF Trainer, {prec}'] = ('trainer', prec, lambda m, dls, b, p: trainer_side(m, b, p))
    if variants:
        prec = precisions[0]
        out[f'finetune, fused_head=False, {prec}'] = (
            'variant',
            prec,
            lambda m, dls, b, p: finetune_side(m, dls, p, fused_head=False),
        )
        out[f'finetune, foreach AdamW, {prec}'] = (
            'variant',
            prec,
            lambda m, dls, b, p: finetune_side(m, dls, p, opt_func=foreach_adamw),
        )
        out[f'finetune, compile=True, {prec}'] = (
            'variant',
            prec,
            lambda m, dls, b, p: finetune_side(m, dls, p, compile=True),
        )
    return out  # fmt: skip


def default_precisions() -> list[str]:
    from finetune.precision import cpu_has_native_bf16

    return ['bf16', 'bf16-autocast', 'bf16-true'] if cpu_has_native_bf16() else ['fp32']


def foreach_adamw(params, **kwargs):
    from finetune.learner import adamw

    return adamw(params, fused=False, **kwargs)


def make_sides(table: dict, steps: int, names: list[str]):
    from finetune import load_model

    dls, tok, batches = data(steps)
    base = load_model('smollm2-135m')
    sides = {name: table[name][2](copy.deepcopy(base), dls, batches, table[name][1]) for name in names}
    return sides, sum(p.numel() for p in base.parameters())


def rss_of(side: str, precisions: list[str], steps: int) -> float:
    """Peak RSS (GiB) of one side running alone, in a child process."""
    args = ['--rss-only', side, '--precisions', ','.join(precisions), '--steps', str(steps)]
    return run_child(__file__, *args)['rss_gib']


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--precisions', help="comma-separated, from 'bf16', 'bf16-autocast', 'bf16-true', 'fp32' "
                   "(default: the three bf16 ones on a CPU with bf16 instructions, else fp32)")  # fmt: skip
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
    precisions = a.precisions.split(',') if a.precisions else default_precisions()
    table = sides_for(precisions, a.variants)
    if a.rss_only:
        sides, _ = make_sides(table, a.steps, [a.rss_only])
        run = next(iter(sides.values()))
        run(a.steps)
        run(a.steps)
        print(json.dumps({'rss_gib': peak_rss_gib()}))
        return
    report = machine()
    sides, n_params = make_sides(table, a.steps, list(table))
    times = {k: [] for k in sides}
    for r in range(a.rounds + 1):  # round 0 warms up
        # A B C, then C B A: a side that always runs first (or last) was measured up to 8% off here
        for name, run in list(sides.items())[:: 1 if r % 2 else -1]:
            t = run(a.steps)
            if r:
                times[name] += t
        print(f'round {r}: ' + ', '.join(f'{k} {statistics.median(v):.2f}s/step' for k, v in times.items() if v),
              file=sys.stderr, flush=True)  # fmt: skip
    rss = {k: (None if a.no_rss else rss_of(k, precisions, a.steps)) for k in sides}
    tok_s = {k: BS * SEQ_LEN / statistics.median(v) for k, v in times.items()}
    learner = {table[k][1]: tok_s[k] for k in sides if table[k][0] == 'finetune'}
    n = len(times[next(iter(sides))])
    print(f'\nworkload 1: SmolLM2-135M, seq_len {SEQ_LEN}, batch {BS}, AdamW, median of {n} steps per side; MFU '
          'against the measured matmul peak of the precision\n')  # fmt: skip
    print('| side | precision | tokens/s | MFU | Learner at this precision / side | peak RSS |')
    print('|---|---|---|---|---|---|')
    for k in sides:
        prec = table[k][1]
        mfu = 6 * n_params * tok_s[k] / peak_of(report, prec)
        mem = f'{rss[k]:.2f} GiB' if rss[k] is not None else 'n/a'
        ratio = f'{learner[prec] / tok_s[k]:.2f}' if prec in learner else ''
        print(f'| {k.rsplit(", ", 1)[0]} | {prec} | {tok_s[k]:.0f} | {mfu:.1%} | {ratio} | {mem} |')
    if 'bf16' in learner:  # auto's pick against what the other tools call bf16
        for k in sides:
            if table[k][0] in ('plain', 'trainer') and table[k][1] == 'bf16-autocast':
                print(f"Learner 'bf16' (fp32 master weights) / {k}: {learner['bf16'] / tok_s[k]:.2f}")


if __name__ == '__main__':
    main()
