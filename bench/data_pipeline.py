"""Data pipeline throughput (BENCH.md workload 2): corpus text -> packed blocks ready for the DataLoader.

The corpus is this Python's standard library source (about 31 MB of .py files, on every machine),
tokenized with SmolLM2's tokenizer. Three sides, alternating (A B C A B C ...), medians over rounds:
- finetune: `pack_corpora` into a fresh cache (stream the files, tokenize, write the token store, split,
  pack blocks of 512 + 1);
- the `run_clm.py` recipe: `datasets.load_dataset('text')`, `.map(tokenize, batched=True, num_proc=2)`,
  `.map(group_texts, batched=True, num_proc=2)`;
- the ceiling: the tokenizer's own `encode_batch_fast` over the same documents, already in memory.
Then finetune's cached second run, and peak RSS of finetune at 1x and 4x the corpus (each in a child
process, from VmHWM).

    python bench/data_pipeline.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

from common import peak_rss_gib, run_child

SEQ_LEN = 512


def stdlib_files() -> list[Path]:
    """The stdlib's .py files that are valid UTF-8 (a few test files are deliberately not)."""
    root = Path(sysconfig.get_paths()['stdlib'])
    out = []
    for f in sorted(root.rglob('*.py')):
        if 'site-packages' not in f.parts:
            try:
                f.read_bytes().decode('utf-8')
            except UnicodeDecodeError:
                continue
            out.append(f)
    return out


def copies(n: int) -> Path:
    """A folder holding the stdlib source `n` times (for the RSS-versus-size check)."""
    folder = Path(tempfile.mkdtemp()) / f'stdlib-x{n}'
    root = Path(sysconfig.get_paths()['stdlib'])
    for i in range(n):
        for f in stdlib_files():
            out = folder / str(i) / f.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
    return folder


def finetune_side(tok, files):
    from finetune import Corpus, pack_corpora

    corpus = Corpus(str(Path(sysconfig.get_paths()['stdlib']) / '**' / '*.py'), name='stdlib')
    corpus.files = files  # exactly the benchmark's files

    def run():
        cache = tempfile.mkdtemp()
        start = time.perf_counter()
        packed = pack_corpora(corpus, tok, seq_len=SEQ_LEN, cache=cache)
        took = time.perf_counter() - start
        shutil.rmtree(cache)
        return took, packed.splits[0].store.n_tokens

    return run, corpus


def datasets_side(tok, files):
    import datasets

    datasets.disable_progress_bars()

    def tokenize(batch):
        return tok(batch['text'])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = len(concatenated['input_ids']) // SEQ_LEN * SEQ_LEN
        result = {k: [t[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}
        result['labels'] = result['input_ids'].copy()
        return result

    def run():
        cache = tempfile.mkdtemp()
        start = time.perf_counter()
        raw = datasets.load_dataset('text', data_files=[str(f) for f in files], cache_dir=cache, split='train')
        tokenized = raw.map(tokenize, batched=True, num_proc=2, remove_columns=['text'])
        blocks = tokenized.map(group_texts, batched=True, num_proc=2)
        took = time.perf_counter() - start
        n = len(blocks) * SEQ_LEN
        shutil.rmtree(cache)
        return took, n

    return run


def raw_side(tok, files):
    texts = [f.read_text(encoding='utf-8', errors='replace') for f in files]

    def run():
        start = time.perf_counter()
        n = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False))
        return time.perf_counter() - start, n

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--rss-only', type=int, help=argparse.SUPPRESS)
    p.add_argument('--side', help=argparse.SUPPRESS)
    p.add_argument('--cached', help=argparse.SUPPRESS)
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    from finetune import Corpus, load_tokenizer, pack_corpora

    tok = load_tokenizer('smollm2-135m')
    if a.rss_only:
        folder = copies(a.rss_only)
        cache = tempfile.mkdtemp()
        start = time.perf_counter()
        corpus = Corpus(str(folder / '**' / '*.py'), name='x', errors='replace')
        packed = pack_corpora(corpus, tok, seq_len=SEQ_LEN, cache=cache)
        took = time.perf_counter() - start
        mb = sum(f.stat().st_size for f in folder.rglob('*.py')) / 1e6
        print(json.dumps({'rss_gib': peak_rss_gib(), 'mb': mb, 'tokens': packed.splits[0].store.n_tokens, 's': took}))
        return
    files = stdlib_files()
    if a.side:
        make = {'finetune pack_corpora': lambda: finetune_side(tok, files)[0],
                'datasets map + group_texts': lambda: datasets_side(tok, files),
                'raw encode_batch_fast': lambda: raw_side(tok, files)}[a.side]  # fmt: skip
        took, n = make()()
        print(json.dumps({'s': took, 'tokens': n}))
        return
    if a.cached:  # time a second pack_corpora over a warm cache
        corpus = finetune_side(tok, files)[1]
        pack_corpora(corpus, tok, seq_len=SEQ_LEN, cache=a.cached)
        start = time.perf_counter()
        pack_corpora(corpus, tok, seq_len=SEQ_LEN, cache=a.cached)
        print(json.dumps({'s': time.perf_counter() - start}))
        return
    mb = sum(f.stat().st_size for f in files) / 1e6
    names = ['finetune pack_corpora', 'datasets map + group_texts', 'raw encode_batch_fast']
    rates = {k: [] for k in names}
    for r in range(a.rounds):
        for name in names:  # each in a fresh interpreter: once `datasets` forks workers, the tokenizers
            # library turns its own parallelism off for the rest of that process
            result = run_child(__file__, '--side', name)
            rates[name].append(result['tokens'] / result['s'])
        print(f'round {r}: ' + ', '.join(f'{k} {v[-1] / 1e6:.2f} M tok/s' for k, v in rates.items()), file=sys.stderr)
    cache = tempfile.mkdtemp()
    cached = [run_child(__file__, '--cached', cache)['s'] for _ in range(3)]
    rss1, rss4 = run_child(__file__, '--rss-only', '1'), run_child(__file__, '--rss-only', '4')
    med = {k: statistics.median(v) for k, v in rates.items()}
    ours_rate = med['finetune pack_corpora']
    print(f'\nworkload 2: {mb:.1f} MB of stdlib source, SmolLM2 tokenizer, seq_len {SEQ_LEN}, 2 cores, '
          f'median of {a.rounds} rounds\n')  # fmt: skip
    print('| side | M tokens/s | finetune / side |\n|---|---|---|')
    for k, v in med.items():
        print(f'| {k} | {v / 1e6:.2f} | {ours_rate / v:.2f} |')
    print(f'\ncached second run (no tokenization): median {statistics.median(cached):.2f} s')
    print(f'peak RSS, finetune: {rss1["rss_gib"]:.2f} GiB at {rss1["mb"]:.0f} MB, {rss4["rss_gib"]:.2f} GiB at '
          f'{rss4["mb"]:.0f} MB ({rss4["rss_gib"] / rss1["rss_gib"]:.2f}x)')  # fmt: skip


if __name__ == '__main__':
    main()
