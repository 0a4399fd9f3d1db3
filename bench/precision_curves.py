"""The quickstart's loss curve in each precision: how far 'bf16', 'bf16-autocast' and 'bf16-true' stray from fp32.

The quickstart's data (the Python reference at half the trained tokens, stdlib docstrings, 10% chat
replay), SmolLM2-135M-Instruct, `learn.fine_tune(1)` with its defaults for `--steps` steps of 4 x 256
tokens; every precision starts from the same weights and trains on the same batches. It prints, per
precision, the seconds per step, the training loss (a 5-step moving average) at a few points of the
curve, the largest gap to fp32's curve after the first 5 steps (relative), and each corpus's validation
perplexity at the end.

    python bench/precision_curves.py [--steps 40] [--precisions fp32,bf16,bf16-autocast,bf16-true]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import machine

SEQ_LEN, BS = 256, 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--precisions', default='fp32,bf16,bf16-autocast,bf16-true')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    import torch

    from finetune import CorpusMix, causal_lm_learner, lm_dataloaders, load_model, load_tokenizer
    from finetune.quickstart import python_reference_corpus, stdlib_chat_corpus, stdlib_docstrings_corpus

    machine(peaks=False)
    root = Path(tempfile.mkdtemp())
    target = python_reference_corpus(root / 'reference')
    general, chat = stdlib_docstrings_corpus(root / 'docstrings'), stdlib_chat_corpus(root / 'chat')
    mix = CorpusMix([general, target, chat], share={target.name: 0.5, chat.name: 0.1},
                    epoch_tokens=a.steps * BS * SEQ_LEN, seed=42)  # fmt: skip
    dls = lm_dataloaders(mix, load_tokenizer('smollm2-135m'), seq_len=SEQ_LEN, bs=BS, valid_pct=0.05, seed=42,
                         max_valid_blocks=16, verbose=False)  # fmt: skip
    base = load_model('smollm2-135m')
    start = dls.train.sampler.state_dict()
    curves, rows = {}, []
    for prec in a.precisions.split(','):
        torch.manual_seed(0)
        dls.train.sampler.load_state_dict(start)
        learn = causal_lm_learner(dls, copy.deepcopy(base), precision=prec)
        t = time.perf_counter()
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune(1)
        seconds = (time.perf_counter() - t) / a.steps
        losses = [float(x) for x in learn.recorder.losses]
        curves[prec] = [statistics.mean(losses[max(0, i - 4) : i + 1]) for i in range(len(losses))]
        rows.append((prec, seconds, dict(zip(['all', *dls.packed.names], learn.recorder.values[-1][2:]))))
        print(f'{prec}: {seconds:.2f} s/step, final loss {curves[prec][-1]:.4f}', flush=True)
    ref = curves.get('fp32')
    marks = sorted({4, a.steps // 4, a.steps // 2, a.steps - 1})
    print(f'\nquickstart data, fine_tune(1) defaults, {a.steps} steps of {BS} x {SEQ_LEN}; training loss = 5-step '
          'moving average\n')  # fmt: skip
    names = list(rows[0][2])
    print('| precision | s/step | ' + ' | '.join(f'loss @{m + 1}' for m in marks) + ' | max gap to fp32 | '
          + ' | '.join(f'ppl {n}' for n in names) + ' |')  # fmt: skip
    print('|---' * (3 + len(marks) + len(names)) + '|')
    for prec, seconds, ppl in rows:
        gap = max(abs(x / y - 1) for x, y in zip(curves[prec][5:], ref[5:])) if ref else float('nan')
        print(f'| {prec} | {seconds:.2f} | ' + ' | '.join(f'{curves[prec][m]:.3f}' for m in marks)
              + f' | {gap:.1%} | ' + ' | '.join(f'{ppl[n]:.2f}' for n in names) + ' |')  # fmt: skip


if __name__ == '__main__':
    main()
