"""What a frozen step of a tied-embedding model costs against a full step (SmolLM2-135M, seq_len 256, batch 4).

Three sides, alternating A B C, C B A: every group training; only the head group (norm + tied
embedding/head) training, with the embeddings' output detached (finetune's frozen phase); the same
frozen phase with the detach switched off (before: the backward pass runs through every block). Prints the
CPU and the median step of each side, and the frozen steps' ratios to the full step.

    python bench/frozen_step.py [--steps 6] [--rounds 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from common import machine, reference_dls, step_timer

SEQ_LEN, BS = 256, 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=6, help='optimizer steps per side per round')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--precision', choices=['bf16', 'fp32', 'auto'], default='auto')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    import finetune.callbacks as callbacks
    from finetune import causal_lm_learner, load_model

    dls = reference_dls(a.steps, SEQ_LEN, BS)
    timer = step_timer()
    learn = causal_lm_learner(dls, load_model('smollm2-135m'), precision=a.precision, cbs=[timer])
    detach = callbacks.HFCausalLMCallback._detach_frozen_body
    sides = {'all groups train': [], 'frozen, detached (now)': [], 'frozen, not detached (before)': []}

    def run(name):
        learn.unfreeze() if name == 'all groups train' else learn.freeze()
        callbacks.HFCausalLMCallback._detach_frozen_body = (lambda self: None) if 'before' in name else detach
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-5)
        sides[name].append(statistics.median(timer.times))

    machine(peaks=False)
    print(f'SmolLM2-135M (tied embeddings), seq_len {SEQ_LEN}, batch {BS}, {a.precision}')
    names = list(sides)
    run(names[0])  # warm-up
    for sides_list in sides.values():
        sides_list.clear()
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            run(name)
    full = statistics.median(sides[names[0]])
    for name, times in sides.items():
        step = statistics.median(times)
        print(f'{name:32s} median step {step:6.2f} s   {step / full:5.2f}x the full step')


if __name__ == '__main__':
    main()
