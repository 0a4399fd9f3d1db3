"""The quickstart: fine-tune the embedded SmolLM2-135M on Python's own documentation, on any machine.

Three corpora that every Python install has, written into the cache:
- target domain: the Python language reference (`pydoc_data.topics`, one document per topic);
- general text: the docstrings of standard-library modules, read from their source files with `ast`
  (importing every module would have side effects), one document per docstring;
- chat replay: questions about standard-library functions ("What does `json.dumps` do?") answered
  by the first paragraph of their docstrings, as `{"messages": [...]}` records, so that the
  instruct model keeps answering questions while it learns the domain (the loss is on the answers).

`run_quickstart` shows the mix report, each corpus's perplexity before and after training, and a
generation for the same prompt before and after, then saves the model. It fits a time budget
(`minutes`, 10 by default) on whatever machine runs it: a few warm-up steps on a throwaway copy
of the model are timed, with a validation pass, and `size_run` turns what is left of the budget
into training steps and validation blocks; the plan is printed before training. `steps=` fixes
the number of steps instead.
"""

from __future__ import annotations

import ast
import copy
import gc
import math
import os
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir
from .corpora import Corpus
from .mix import CorpusMix

__all__ = [
    'python_reference_corpus',
    'stdlib_docstrings_corpus',
    'stdlib_chat_corpus',
    'run_quickstart',
    'size_run',
    'RunSize',
    'PROMPT',
]

PROMPT = 'The with statement is used to'
DOC_SEP = '\x1e'  # ASCII record separator between docstrings: it never occurs inside one


def python_reference_corpus(folder: Path) -> Corpus:
    """The language reference topics of this Python, one file per topic (target domain)."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        path = folder / f'{name}.txt'
        if not path.exists():
            path.write_text(text)
    return Corpus(folder, name='python_reference', target=True)


def _parse(path: Path) -> ast.Module | None:
    """A stdlib source file's syntax tree (None for one this Python cannot parse), without its warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return ast.parse(path.read_text(encoding='utf-8', errors='replace'))
    except (SyntaxError, ValueError):
        return None


def stdlib_docstrings_corpus(folder: Path, max_modules: int = 400) -> Corpus:
    """Docstrings of standard-library modules, classes and functions, parsed with `ast` (general text)."""
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(
        p for p in stdlib.rglob('*.py') if not {'test', 'tests', 'idlelib', 'site-packages'} & set(p.parts)
    )
    seen: set[str] = set()  # the same docstring in several modules would leak into validation
    for path in sources[:max_modules]:
        out = folder / (str(path.relative_to(stdlib)).replace(os.sep, '.') + '.txt')
        tree = _parse(path)
        if tree is None:
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        docs = []
        for doc in (ast.get_docstring(n) for n in nodes):
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
        if docs and not out.exists():
            out.write_text(DOC_SEP.join(docs))
    return Corpus(folder, name='stdlib_docstrings', doc_sep=DOC_SEP)


def stdlib_chat_corpus(folder: Path, max_pairs: int = 1500) -> Corpus:
    """Question/answer conversations about stdlib functions and classes: the question names it, the answer is the
    first paragraph of its docstring (`qa.jsonl`, `{"messages": [user, assistant]}` records)."""
    import json

    path = folder / 'qa.jsonl'
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        stdlib = Path(sysconfig.get_paths()['stdlib'])
        lines, seen = [], set()
        for source in sorted(p for p in stdlib.glob('*.py') if not p.stem.startswith('_')):
            tree = _parse(source)
            for node in tree.body if tree is not None else []:
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith('_'):
                    continue
                doc = (ast.get_docstring(node) or '').split('\n\n')[0].strip()
                if len(doc) < 40 or doc in seen:
                    continue
                seen.add(doc)
                kind = 'class' if isinstance(node, ast.ClassDef) else 'function'
                question = f'What does the {kind} `{source.stem}.{node.name}` do?'
                turns = [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': doc}]
                lines.append(json.dumps({'messages': turns}))
        tmp = path.with_suffix('.tmp')
        tmp.write_text('\n'.join(lines[:max_pairs]) + '\n')
        tmp.replace(path)
    return Corpus(path, name='stdlib_chat')


WARMUP_STEPS = 4  # timed on a throwaway copy of the model; the first one (allocation, threads) is not counted
RESERVE_S = 20.0  # two generations, saving the model, building the loaders: measured at 5 to 12 s here
MARGIN = 0.05  # of the budget, for the noise in the step time


@dataclass
class RunSize:
    """A run sized to a time budget: training steps and validation blocks per corpus."""

    steps: int
    valid_blocks: int
    seconds: float  # what the plan is expected to take from here


def size_run(left_s: float, step_s: float, block_s: float, n_corpora: int, max_valid_blocks: int = 16,
             what: str = 'the budget') -> RunSize:  # fmt: skip
    """The most training steps that fit in `left_s` seconds with two validations (before and after) and saving.

    Validation gets at most a fifth of what is left (fewer blocks per corpus, at least 2); an error
    says how long one step takes when not even one fits.
    """
    usable = left_s * (1 - MARGIN) - RESERVE_S
    per_block = 2 * n_corpora * block_s  # one more block per corpus in each of the two validations
    blocks = max_valid_blocks if per_block * max_valid_blocks <= usable / 5 else int(usable / 5 // per_block)
    blocks = max(2, min(max_valid_blocks, blocks, int((usable - step_s) // per_block)))  # room for a step first
    steps = int((usable - per_block * blocks) // step_s)
    if steps < 1:
        need = max(60.0, (step_s + per_block * 2 + RESERVE_S) / (1 - MARGIN) - left_s)
        raise ValueError(
            f'{what} is too short on this machine: one training step takes {step_s:.1f} s ({step_s / 60:.2f} minutes), '
            f'two validations of {2 * n_corpora} blocks {per_block * 2:.0f} s and generating and saving about '
            f'{RESERVE_S:.0f} s; raise it by at least {math.ceil(need / 60)} minute(s), or pass a fixed --steps'
        )
    return RunSize(steps, blocks, (steps * step_s + per_block * blocks + RESERVE_S))


def _timed_warmup(corpora, shares, tok, model, precision, seq_len, bs, seed, cache):
    """Seconds per training step and per validation block, from a short fit of a throwaway copy of `model`."""
    from fastai.callback.core import Callback

    from .build import causal_lm_learner
    from .data import lm_dataloaders

    class Clock(Callback):
        order = 100

        def before_fit(self):
            self.steps, self.last, self.valid = [], None, 0.0

        def after_step(self):
            now = time.perf_counter()
            if self.last is not None:
                self.steps.append(now - self.last)
            self.last = now

        def before_validate(self):
            self.started = time.perf_counter()

        def after_validate(self):
            self.valid = time.perf_counter() - self.started

    mix = CorpusMix(corpora, share=shares, epoch_tokens=WARMUP_STEPS * bs * seq_len, seed=seed)
    dls = lm_dataloaders(mix, tok, seq_len=seq_len, bs=bs, valid_pct=0.05, seed=seed, cache=cache,
                         max_valid_blocks=2, verbose=False)  # fmt: skip
    clock = Clock()
    learn = causal_lm_learner(dls, copy.deepcopy(model), precision=precision, lr=1e-9, cbs=[clock])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    blocks = dls.valid.n  # validation blocks, every corpus's
    step_s, block_s = sorted(clock.steps)[len(clock.steps) // 2], clock.valid / max(1, blocks)
    name = learn.precision.name
    del learn, dls
    gc.collect()
    return step_s, block_s, name


def run_quickstart(
    out: str | os.PathLike = 'finetune-quickstart',  # where the fine-tuned model is saved
    minutes: float = 10,  # the whole run's time budget on this machine: steps and validation are sized to it
    steps: int | None = None,  # a fixed number of optimizer steps of bs x seq_len tokens instead of the budget
    seq_len: int = 256,
    bs: int = 4,
    lr: float | None = None,  # fine_tune's peak LR; default: its measured default
    share: float = 0.5,  # the target domain's share of training tokens
    chat_share: float = 0.1,  # the chat replay's share (0: none; the model then drifts from answering questions)
    precision: str = 'auto',
    max_valid_blocks: int = 16,  # validation blocks per corpus (fewer: a faster but noisier perplexity)
    cache: str | os.PathLike | None = None,
    seed: int = 42,
) -> dict:
    """Fine-tune `smollm2-135m` on the Python reference mixed with stdlib docstrings; return the figures."""
    from .build import causal_lm_learner
    from .data import lm_dataloaders
    from .models import load_model, load_tokenizer

    start = time.time()
    if steps is None and not minutes > 0:
        raise ValueError(f'--minutes {minutes:g}: the time budget must be a positive number of minutes')
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f'--steps {steps}: a whole number of optimizer steps >= 1')
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f'{out} exists and is not empty: pass another --out folder')
    data = cache_dir(cache) / 'quickstart'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the stdlib has empty and odd files; the report still shows them
        target = python_reference_corpus(data / 'python_reference')
        general = stdlib_docstrings_corpus(data / 'stdlib_docstrings')
        chat = stdlib_chat_corpus(data / 'stdlib_chat')
    tok = load_tokenizer('smollm2-135m')
    if chat_share and not getattr(tok, 'chat_template', None):  # a stand-in tokenizer (tests): no replay
        print('this tokenizer has no chat template: no chat replay')
        chat_share = 0
    corpora, shares = [general, target], {target.name: share}
    if chat_share:
        corpora, shares = [general, target, chat], {target.name: share, chat.name: chat_share}
    model = load_model('smollm2-135m')
    if steps is None:
        step_s, block_s, name = _timed_warmup(corpora, shares, tok, model, precision, seq_len, bs, seed, cache)
        what = f'--minutes {minutes:g}'
        size = size_run(minutes * 60 - (time.time() - start), step_s, block_s, len(corpora), max_valid_blocks, what)
        steps, max_valid_blocks = size.steps, size.valid_blocks
        print(f'the plan: {name} on this {_device_name()}: {bs * seq_len / step_s:,.0f} tokens/s; {steps} steps of '
              f'{bs} x {seq_len} tokens and {max_valid_blocks} validation blocks per corpus, about '
              f'{(time.time() - start + size.seconds) / 60:.1f} of {minutes:g} minutes\n')  # fmt: skip
    mix = CorpusMix(corpora, share=shares, epoch_tokens=steps * bs * seq_len, seed=seed)
    print('1. the corpora and the mix')
    dls = lm_dataloaders(
        mix, tok, seq_len=seq_len, bs=bs, valid_pct=0.05, seed=seed, cache=cache, max_valid_blocks=max_valid_blocks
    )
    print('\n2. the model: SmolLM2-135M-Instruct, embedded')
    learn = causal_lm_learner(dls, model, precision=precision)
    names = dls.packed.names
    before = dict(zip(['all', *names], learn.validate()[1:]))
    text_before = learn.generate(PROMPT, max_new_tokens=40)
    print('\n3. training')
    learn.fine_tune(1, lr)
    after = dict(zip(['all', *names], learn.recorder.values[-1][2:]))  # the fit's own validation, at its end
    text_after = learn.generate(PROMPT, max_new_tokens=40)
    print('\n4. what changed')
    for name in names:
        change = after[name] / before[name] - 1
        print(f'   perplexity of {name:18s} {before[name]:8.2f} -> {after[name]:8.2f}  ({change:+.1%})')
    print(f'\n   before: {text_before!r}\n   after:  {text_after!r}')
    path = learn.save_pretrained(out)
    minutes = (time.time() - start) / 60
    print(f'\nsaved to {path} (AutoModelForCausalLM.from_pretrained loads it); {minutes:.1f} minutes in all')
    return {'before': before, 'after': after, 'text_before': text_before, 'text_after': text_after, 'minutes': minutes,
            'steps': steps, 'valid_blocks': max_valid_blocks}  # fmt: skip


def _device_name() -> str:
    import torch

    return f'GPU ({torch.cuda.get_device_name()})' if torch.cuda.is_available() else 'CPU'
