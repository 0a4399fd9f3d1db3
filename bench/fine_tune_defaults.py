"""Which training call and defaults to use: a grid of `fit_one_cycle` / `fine_tune` settings at equal steps.

The embedded SmolLM2-135M-Instruct, two domains assembled from text every Python install has, each
mixed as the quickstart mixes (target share 0.5, chat replay 0.1, stdlib docstrings as the general
corpus):
- `reference`: the Python language reference (the quickstart's target);
- `code`: Python source of standard-library modules that the docstring corpus does not read, with
  their docstrings stripped (`ast.unparse`), so the target and the general text share no document.
Every setting starts from the same weights and trains the same number of optimizer steps of
bs x seq_len tokens on the same batches (the sampler is put back before each); a setting with a
frozen phase spends half of them frozen (fastai's `fine_tune` with one frozen epoch of half the
length, so its two half epochs draw their own batches). After each run: the validation
perplexity of the target, the general corpus and the chat replay, and of a held-out corpus that no
setting trains on (IDLE's documentation and change logs, prose about Python). `lr_find`'s
suggestions are measured on each domain too, and one setting trains at its `valley`.

    python bench/fine_tune_defaults.py [--steps 40] [--domains reference code] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

from common import machine

SEQ_LEN, BS = 256, 4

# name: (call, keyword arguments); 'fine_tune' runs learn.fine_tune(1, **kwargs), 'fit' learn.fit_one_cycle(1, **kwargs)
SETTINGS = {
    'fit_one_cycle lr 1e-4': ('fit', dict(lr_max=1e-4)),
    'fit_one_cycle lr 3e-4': ('fit', dict(lr_max=3e-4)),
    'fine_tune before: frozen half, halved, lr_mult 10, 1e-4': ('fine_tune', dict(base_lr=1e-4, freeze_epochs=1)),
    'no frozen phase, lr_mult 10, 3e-4': ('fine_tune', dict(base_lr=3e-4, freeze_epochs=0)),
    'no frozen phase, lr_mult 3, 3e-4': ('fine_tune', dict(base_lr=3e-4, freeze_epochs=0, lr_mult=3)),
    'no frozen phase, lr_mult 3, 2e-4': ('fine_tune', dict(base_lr=2e-4, freeze_epochs=0, lr_mult=3)),
    'no frozen phase, lr_mult 3, 3e-4, pct_start 0.1': (
        'fine_tune',
        dict(base_lr=3e-4, freeze_epochs=0, lr_mult=3, pct_start=0.1),
    ),
    'no frozen phase, lr_mult 3, lr_find valley': ('fine_tune', dict(base_lr='valley', freeze_epochs=0, lr_mult=3)),
}


def code_corpus(folder: Path, skip: int = 400, n_modules: int = 150):
    """Standard-library source without docstrings, from modules the docstring corpus (its first 400) does not read."""
    from finetune import Corpus
    from finetune.quickstart import _parse

    stdlib = Path(sysconfig.get_paths()['stdlib'])
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(
        p for p in stdlib.rglob('*.py') if not {'test', 'tests', 'idlelib', 'site-packages'} & set(p.parts)
    )
    for path in sources[skip : skip + n_modules]:
        tree = _parse(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            body = getattr(node, 'body', None)
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        text = ast.unparse(tree)
        if len(text) > 200:
            (folder / (str(path.relative_to(stdlib)).replace('/', '.') + '.txt')).write_text(text)
    return Corpus(folder, name='stdlib_code', target=True)


def held_out_corpus(folder: Path):
    """IDLE's documentation and change logs (prose about Python), split into paragraphs; trained by no setting."""
    from finetune import Corpus

    idle = Path(sysconfig.get_paths()['stdlib']) / 'idlelib'
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(idle.glob('*.txt')):
        (folder / path.name).write_text(path.read_text(encoding='utf-8', errors='replace'))
    return Corpus(folder, name='idle_docs')


def domain(name: str, root: Path, steps: int, tok):
    """The mix of one domain, as DataLoaders with `steps` and `steps // 2` batches per epoch (same validation)."""
    from finetune import CorpusMix, lm_dataloaders
    from finetune.quickstart import python_reference_corpus, stdlib_chat_corpus, stdlib_docstrings_corpus

    data = root / 'quickstart'
    general = stdlib_docstrings_corpus(data / 'stdlib_docstrings')
    chat = stdlib_chat_corpus(data / 'stdlib_chat')
    target = python_reference_corpus(data / 'python_reference') if name == 'reference' else code_corpus(root / 'code')
    out = []
    for n in (steps, steps // 2):
        mix = CorpusMix(
            [general, target, chat], share={target.name: 0.5, chat.name: 0.1}, epoch_tokens=n * BS * SEQ_LEN, seed=0
        )
        out.append(
            lm_dataloaders(mix, tok, seq_len=SEQ_LEN, bs=BS, valid_pct=0.05, seed=0, max_valid_blocks=8, verbose=False)
        )
    return target.name, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=40, help='optimizer steps of every setting')
    p.add_argument('--domains', nargs='+', default=['reference', 'code'], choices=['reference', 'code'])
    p.add_argument('--settings', nargs='+', default=list(SETTINGS), help='names from SETTINGS')
    p.add_argument('--precision', choices=['bf16', 'fp32', 'auto'], default='auto')
    p.add_argument('--out', default=None, help='append one JSON line per measured setting here')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    import torch

    from finetune import causal_lm_learner, corpus_perplexity, load_model, load_tokenizer
    from finetune.precision import resolve_precision

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    tok = load_tokenizer('smollm2-135m')
    model = load_model('smollm2-135m')
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    held = held_out_corpus(root / 'held_out')
    precision = resolve_precision(a.precision, torch.device('cpu'))
    machine(peaks=False)
    print(f'SmolLM2-135M-Instruct, {a.steps} steps of {BS} x {SEQ_LEN} tokens, {precision.says}')
    rows = []

    def record(dom, setting, learn, names, seconds, **extra):
        with learn.no_bar():
            values = learn.validate()[2:]
        ppl = dict(zip(names, values))
        ppl['idle_docs (held out)'] = float(
            corpus_perplexity(learn.model, tok, held, seq_len=SEQ_LEN, bs=BS, max_blocks=8, precision=a.precision)[
                'perplexity'
            ][0]
        )
        row = {'domain': dom, 'setting': setting, 'seconds': round(seconds), 'perplexity': ppl, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, 'a') as f:
                f.write(json.dumps(row) + '\n')

    for dom in a.domains:
        target, (dls, half) = domain(dom, root, a.steps, tok)
        learn = causal_lm_learner(dls, model, precision=a.precision)
        names = list(dls.names)
        record(dom, 'untrained', learn, names, 0)
        valley = None
        orders = {id(d): d.train.sampler.state_dict() for d in (dls, half)}  # every setting: the same batches
        for setting in a.settings:
            call, kwargs = SETTINGS[setting]
            model.load_state_dict(start)
            learn.opt, learn.dls = None, (half if kwargs.get('freeze_epochs') else dls)
            learn.dls.train.sampler.load_state_dict(orders[id(learn.dls)])
            kwargs = dict(kwargs)
            t0 = time.time()
            if kwargs.get('base_lr') == 'valley':
                with learn.no_bar():
                    found = learn.lr_find(num_it=60, show_plot=False)
                valley = found.valley
                kwargs['base_lr'] = valley
                learn.opt = None
            with learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(1, **kwargs) if call == 'fit' else learn.fine_tune(1, **kwargs)
            record(dom, setting, learn, names, time.time() - t0, lr_find_valley=valley)
        model.load_state_dict(start)
        learn.dls = dls
    print(table(rows))


def table(rows) -> str:
    """A markdown table: each corpus's perplexity change from the untrained model, per domain and setting."""
    out = []
    for dom in dict.fromkeys(r['domain'] for r in rows):
        mine = [r for r in rows if r['domain'] == dom]
        base = mine[0]['perplexity']
        names = list(base)
        out.append(f'\n{dom}: untrained ' + ', '.join(f'{n} {v:.2f}' for n, v in base.items()))
        out.append('| setting | ' + ' | '.join(names) + ' | seconds |')
        out.append('|---|' + '---|' * (len(names) + 1))
        for r in mine[1:]:
            if r['setting'] == 'untrained':  # measured again by a later run of the script
                continue
            cells = [f'{r["perplexity"][n]:.2f} ({r["perplexity"][n] / base[n] - 1:+.1%})' for n in names]
            label = r['setting'] + (f' ({r["lr_find_valley"]:.2g})' if r.get('lr_find_valley') else '')
            out.append(f'| {label} | ' + ' | '.join(cells) + f' | {r["seconds"]} |')
    return '\n'.join(out)


if __name__ == '__main__':
    main()
