"""One training run for the resume tests, in its own process: `python resume_run.py OUT [options]`.

It builds the same data and tiny model every time (GPT-2 with dropout, two corpora, accum_steps=2),
trains with a checkpoint after every optimizer step, records every training batch (inputs, loss,
learning rate) and writes `OUT/record.json` and `OUT/final.safetensors` (weights and optimizer).
"""

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sentences, tiny_gpt2, tiny_tokenizer  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from finetune import Corpus, CorpusMix, causal_lm_learner, lm_dataloaders  # noqa: E402
from finetune.checkpoint import optimizer_state  # noqa: E402


def corpora(root: Path) -> list[Corpus]:
    """Two small corpora of distinct documents, written once."""
    for name, n, seed in (('cats', 40, 1), ('dogs', 24, 2)):
        folder = root / name
        if not folder.exists():
            folder.mkdir(parents=True)
            for i, s in enumerate(sentences(n, seed=seed)):
                (folder / f'{i:03d}.txt').write_text(f'{name} {i}: {s}\n')
    return [Corpus(root / 'cats'), Corpus(root / 'dogs', target=True)]


class Record(Callback):
    order = 200  # after everything, checkpoints included

    def before_fit(self):
        self.rows = getattr(self, 'rows', [])

    def after_batch(self):
        if self.training and not hasattr(self.learn, 'lr_finder'):
            digest = hashlib.sha256(self.xb[0].cpu().numpy().tobytes()).hexdigest()[:16]
            self.rows.append([digest, self.learn.loss.item(), float(self.opt.hypers[-1]['lr']), self.learn.opt_steps])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('out')
    p.add_argument('--data', required=True)
    p.add_argument('--resume')
    p.add_argument('--how', choices=['fit_one_cycle', 'fine_tune', 'lora', 'bf16'], default='fit_one_cycle')
    a = p.parse_args(argv)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    out = Path(a.out)
    tok = tiny_tokenizer()
    mix = CorpusMix(corpora(Path(a.data)), share={'dogs': 0.5})
    dls = lm_dataloaders(mix, tok, seq_len=16, bs=4, cache=Path(a.data) / 'cache', verbose=False)
    model = tiny_gpt2(len(tok), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    record = Record()
    precision = 'bf16' if a.how == 'bf16' else 'fp32'
    learn = causal_lm_learner(
        dls, model, precision=precision, accum_steps=2, n_groups=2, run_dir=out / 'run', checkpoint_every=1,
        lora=True if a.how == 'lora' else None, cbs=[record],
    )  # fmt: skip
    with learn.no_bar(), learn.no_logging():
        if a.how == 'fine_tune':
            learn.fine_tune(1, 3e-3, freeze_epochs=1, resume=a.resume)
        else:
            learn.fit_one_cycle(2, 3e-3, resume=a.resume)
    weights = {f'model.{n}': p.detach() for n, p in learn.model.named_parameters()}
    _, opt = optimizer_state(learn.opt.opt)
    save_file({**weights, **{f'opt.{k}': v for k, v in opt.items()}}, out / 'final.safetensors')
    values = [[float(v) if v is not None else None for v in row] for row in learn.recorder.values]
    (out / 'record.json').write_text(json.dumps({'rows': record.rows, 'values': values,
                                                 'trained_tokens': dls.trained_tokens}))  # fmt: skip


if __name__ == '__main__':
    main()
