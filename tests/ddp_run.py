"""One fit for the multi-process tests, in one process or as one of several (`torchrun ... ddp_run.py OUT ...`).

The data, the tiny Llama (no dropout) and the order are the same every time; the batch per process
is `global_bs / processes`. Each process writes `OUT/<name>-r<rank>.json` (per optimizer step: the
rows of every micro-batch it trained and the global batch's loss; the validation values, trained
tokens, the plan's per-corpus draws) and `OUT/<name>-r<rank>.safetensors` (final weights).
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sentences, tiny, tiny_tokenizer  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from finetune import Corpus, CorpusMix, causal_lm_learner, lm_dataloaders  # noqa: E402

GLOBAL_BS = 8


def corpora(root: Path) -> list[Corpus]:
    """Two small corpora of distinct documents (written by whichever process comes first; same bytes)."""
    for name, n, seed in (('cats', 40, 1), ('dogs', 24, 2)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(sentences(n, seed=seed)):
            path = folder / f'{i:03d}.txt'
            if not path.exists():
                tmp = path.with_suffix(f'.tmp{os.getpid()}')
                tmp.write_text(f'{name} {i}: {s}\n')
                tmp.replace(path)
    return [Corpus(root / 'cats'), Corpus(root / 'dogs', target=True)]


class Record(Callback):
    """Each training micro-batch's rows (token ids) and the loss the learner reports for it."""

    order = 200

    def before_fit(self):
        self.steps = getattr(self, 'steps', [])
        self.reduces = 0
        trainer = getattr(self.learn, 'ddp_trainer', None)
        if trainer is not None and trainer.ddp is not None:  # count DDP's gradient all-reduces (one per bucket)
            trainer.ddp.register_comm_hook(None, self.count_reduce)

    def count_reduce(self, group, bucket):
        self.reduces += 1
        return allreduce_hook(group, bucket)

    def after_batch(self):
        if self.training and not hasattr(self.learn, 'lr_finder'):
            real = (self.yb[0] != -100).any(-1)  # a stand-in row (every label masked) is not a trained block
            rows = self.xb[0][real].tolist()
            loss = float(self.learn.loss.detach())
            self.steps.append({'rows': rows, 'loss': loss, 'step': self.learn.opt_steps, 'reduces': self.reduces})
            self.reduces = 0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('out')
    p.add_argument('--data', required=True)
    p.add_argument('--name', required=True)
    p.add_argument('--accum', type=int, default=1)
    p.add_argument('--checkpoint-every', type=int)
    p.add_argument('--resume')
    a = p.parse_args(argv)
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    mix = CorpusMix(corpora(Path(a.data)), share={'dogs': 0.5}, epoch_tokens=16 * 33)
    dls = lm_dataloaders(mix, tok, seq_len=16, bs=GLOBAL_BS // world, cache=Path(a.data) / 'cache', verbose=False)
    model = tiny('llama', vocab=len(tok), layers=2)
    record = Record()
    learn = causal_lm_learner(
        dls, model, precision='fp32', accum_steps=a.accum, n_groups=2, cbs=[record], fused_head=True,
        run_dir=out / f'run-{a.name}' if a.checkpoint_every or a.resume else None,
        checkpoint_every=a.checkpoint_every,
    )  # fmt: skip
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 3e-3, resume=a.resume)
    weights = {n: t.detach().contiguous() for n, t in learn.model.named_parameters()}  # tied ones once
    save_file(weights, out / f'{a.name}-r{rank}.safetensors')
    values = [[float(v) if v is not None else None for v in row] for row in learn.recorder.values]
    result = {
        'steps': record.steps,
        'values': values,
        'trained_tokens': dls.trained_tokens,
        'draws': list(dls.packed.plan.draws),
        'epoch_blocks': dls.packed.plan.epoch_blocks,
        'world': learn.world,
    }
    (out / f'{a.name}-r{rank}.json').write_text(json.dumps(result))


if __name__ == '__main__':
    main()
