"""Import time (BENCH.md workload 4): `import finetune` vs importing fastai's learner and transformers.

Each side is a fresh interpreter, alternating (A B A B ...); medians of wall time.

    python bench/import_time.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

SIDES = {
    'import finetune': 'import finetune',
    'import fastai.learner, transformers': 'import fastai.learner, transformers',
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=7)
    a = p.parse_args()
    times = {k: [] for k in SIDES}
    for _ in range(a.runs):
        for name, code in SIDES.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, '-W', 'ignore', '-c', code], check=True)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med['import finetune']
    print(f'\nworkload 4: median wall time of {a.runs} fresh interpreters per side\n')
    print('| side | seconds | finetune / side |\n|---|---|---|')
    for k, v in med.items():
        print(f'| {k} | {v:.2f} | {ours / v:.2f} |')


if __name__ == '__main__':
    main()
