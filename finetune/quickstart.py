"""The quickstart: fine-tune the embedded SmolLM2-135M on Python's own documentation, on any machine.

Three corpora that every Python install has, written into the cache:
- target domain: the Python language reference (`pydoc_data.topics`, one document per topic);
- general text: the docstrings of standard-library modules, read from their source files with `ast`
  (importing every module would have side effects), one document per docstring;
- chat replay: questions about standard-library functions ("What does `json.dumps` do?") answered
  by the first paragraph of their docstrings, as `{"messages": [...]}` records, so that the
  instruct model keeps answering questions while it learns the domain (the loss is on the answers).

`run_quickstart` shows the mix report, each corpus's perplexity before and after training, and a
generation for the same prompt before and after, then saves the model. It is sized to finish in
about ten minutes on two CPU cores with bf16 autocast.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import time
import warnings
from pathlib import Path

from .cache import cache_dir
from .corpora import Corpus
from .mix import CorpusMix

__all__ = ['python_reference_corpus', 'stdlib_docstrings_corpus', 'stdlib_chat_corpus', 'run_quickstart', 'PROMPT']

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


def run_quickstart(
    out: str | os.PathLike = 'finetune-quickstart',  # where the fine-tuned model is saved
    steps: int = 80,  # optimizer steps of bs x seq_len tokens
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
    mix = CorpusMix(corpora, share=shares, epoch_tokens=steps * bs * seq_len, seed=seed)
    print('1. the corpora and the mix')
    dls = lm_dataloaders(
        mix, tok, seq_len=seq_len, bs=bs, valid_pct=0.05, seed=seed, cache=cache, max_valid_blocks=max_valid_blocks
    )
    print('\n2. the model: SmolLM2-135M-Instruct, embedded')
    learn = causal_lm_learner(dls, load_model('smollm2-135m'), precision=precision)
    names = dls.packed.names
    before = dict(zip(['all', *names], learn.validate()[1:]))
    text_before = learn.generate(PROMPT, max_new_tokens=40)
    print('\n3. training')
    learn.fine_tune(1, lr)
    after = dict(zip(['all', *names], learn.validate()[1:]))
    text_after = learn.generate(PROMPT, max_new_tokens=40)
    print('\n4. what changed')
    for name in names:
        change = after[name] / before[name] - 1
        print(f'   perplexity of {name:18s} {before[name]:8.2f} -> {after[name]:8.2f}  ({change:+.1%})')
    print(f'\n   before: {text_before!r}\n   after:  {text_after!r}')
    path = learn.save_pretrained(out)
    minutes = (time.time() - start) / 60
    print(f'\nsaved to {path} (AutoModelForCausalLM.from_pretrained loads it); {minutes:.1f} minutes in all')
    return {'before': before, 'after': after, 'text_before': text_before, 'text_after': text_after, 'minutes': minutes}
