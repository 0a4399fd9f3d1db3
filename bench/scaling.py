"""How training throughput and peak memory grow with seq_len and model size (finetune's Learner).

Each configuration runs alone in a child process (so its peak RSS is its own): a SmolLM2-shaped
model, batch 4, `--precision` (default 'auto'), `fit` over `--steps` batches of the Python language reference;
tokens/s is the median step after the first. The seq_len sweep runs SmolLM2-135M with the fused
head and without it (full logits), to show what the fused head saves as batches grow; the model
sweep adds SmolLM2-360M's shape (random weights: the speed does not depend on their values).

    python bench/scaling.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from common import machine, peak_of, peak_rss_gib, reference_dls, run_child, step_timer

BS = 4
SHAPES = {  # SmolLM2's published configurations
    '135M': dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    '360M': dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
}  # fmt: skip


def one(seq_len: int, model: str, fused: bool, steps: int, precision: str) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune import causal_lm_learner, load_model

    dls = reference_dls(steps, seq_len, BS, max_valid_blocks=1)
    if model == '135M':
        net = load_model('smollm2-135m')
    else:
        cfg = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                          rope_theta=100000.0, **SHAPES[model])  # fmt: skip
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(cfg)
    timer = step_timer()
    learn = causal_lm_learner(dls, net, precision=precision, fused_head=fused, cbs=[timer])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-5)
    n_params = sum(p.numel() for p in net.parameters())
    tok_s = BS * seq_len / statistics.median(timer.times)
    return {'tok_s': tok_s, 'flops': 6 * n_params * tok_s, 'rss_gib': peak_rss_gib(), 'params': n_params,
            'precision': learn.precision.name}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--precision', choices=['auto', 'bf16', 'bf16-autocast', 'bf16-true', 'fp32'], default='auto')
    p.add_argument('--seq-lens', default='128,256,512,1024')
    p.add_argument('--one', help=argparse.SUPPRESS)
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    if a.one:
        print(json.dumps(one(**json.loads(a.one), steps=a.steps, precision=a.precision)))
        return
    runs = [dict(seq_len=s, model='135M', fused=f) for s in map(int, a.seq_lens.split(',')) for f in (True, False)]
    runs += [dict(seq_len=256, model='360M', fused=True)]
    report = machine()
    print(f'\nfinetune Learner, batch {BS}, precision {a.precision}, CPU ({torch.get_num_threads()} threads), '
          f'median of {a.steps - 1} steps, each configuration alone in a process\n')  # fmt: skip
    print('| model | seq_len | head | tokens/s | MFU | peak RSS |\n|---|---|---|---|---|---|')
    for run in runs:
        out = run_child(__file__, '--one', json.dumps(run), '--steps', str(a.steps), '--precision', a.precision)
        head = 'fused' if run['fused'] else 'full logits'
        mfu = out['flops'] / peak_of(report, out['precision'])
        print(f"| SmolLM2-{run['model']} ({out['params'] / 1e6:.0f}M) | {run['seq_len']} | {head} | "
              f"{out['tok_s']:.0f} | {mfu:.1%} | {out['rss_gib']:.2f} GiB |", flush=True)  # fmt: skip


if __name__ == '__main__':
    main()
