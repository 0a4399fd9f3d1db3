"""Training throughput on 1 and 2 processes (torchrun, gloo on CPU, NCCL on GPUs), the same global batch.

Each side is a `torchrun --standalone --nproc_per_node N` launch of this script as a worker:
SmolLM2-135M, seq_len 256, a global batch of 8 blocks (8 per process on 1, 4 per process on 2),
`fit_one_cycle(1)` over `--steps` optimizer steps; process 0 reports the median step time after the
first step. Sides alternate (1 2, 2 1, ...) and the table prints tokens/s and the ratio to 1 process.
On a 2-core CPU, 2 processes get one core each (torchrun sets OMP_NUM_THREADS=1) where 1 process
had both: the run shows that DDP works and what it costs, not a speed-up.

    python bench/ddp_throughput.py [--steps 8] [--rounds 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from common import machine, reference_dls, step_timer

SEQ_LEN, GLOBAL_BS = 256, 8


def worker(a) -> None:
    warnings.filterwarnings('ignore')
    from finetune import causal_lm_learner, load_model
    from finetune.distributed import local_main_first, rank, world_size

    with local_main_first():
        dls = reference_dls(a.steps * world_size(), SEQ_LEN, GLOBAL_BS // world_size())  # a.steps global steps
        model = load_model('smollm2-135m')
    timer = step_timer()
    learn = causal_lm_learner(dls, model, precision=a.precision, cbs=[timer])
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-4)
    if rank() == 0:
        median = statistics.median(timer.times)
        Path(a.report).write_text(json.dumps({'median_step_s': median, 'steps': len(timer.times) + 1}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=8, help='optimizer steps per launch')
    p.add_argument('--rounds', type=int, default=2, help='rounds of both sides')
    p.add_argument('--precision', choices=['bf16', 'fp32', 'auto'], default='fp32')
    p.add_argument('--report', help=argparse.SUPPRESS)  # set for the workers
    a = p.parse_args()
    if a.report:
        return worker(a)
    machine(peaks=False)
    print(f'SmolLM2-135M, seq_len {SEQ_LEN}, global batch {GLOBAL_BS}, {a.precision}')
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(a.rounds):
        for procs in (1, 2) if r % 2 == 0 else (2, 1):
            report = Path(tempfile.mkdtemp()) / 'report.json'
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}',
                   __file__, '--steps', str(a.steps), '--precision', a.precision, '--report', str(report)]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            times[procs].append(json.loads(report.read_text())['median_step_s'])
            print(f'  round {r + 1}, {procs} process(es): {times[procs][-1]:.2f} s per step', flush=True)
    base = statistics.median(times[1])
    print('| processes | batch per process | median step (s) | tokens/s | vs 1 process |')
    print('|---|---|---|---|---|')
    for procs in (1, 2):
        step = statistics.median(times[procs])
        print(
            f'| {procs} | {GLOBAL_BS // procs} | {step:.2f} | {GLOBAL_BS * SEQ_LEN / step:,.0f} | {base / step:.2f}x |'
        )


if __name__ == '__main__':
    main()
