"""The token store and packing: each corpus tokenized once, on disk, cut into fixed-length blocks.

A `TokenStore` is a flat memory-mapped array of token ids (uint16 when the vocabulary fits, else
uint32), with the end-of-sequence token after every document, plus the offset where each document
starts. It is built with the tokenizer's batch API (Rust, all cores) and cached under a key of
the corpus's contents, the tokenizer and `FORMAT_VERSION`; entries are written through
`cache.atomic_folder`, so a killed build never leaves half an entry.

`PackedBlocks` cuts a stream of token spans into windows of `seq_len + 1` tokens (inputs and
shifted targets) with a stride of `seq_len`, so every token but the first is a target exactly once;
only the final partial window is dropped, and `dropped` counts its tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import atomic_folder, cache_dir, cache_folder
from .corpora import Corpus, ReadStats

__all__ = [
    'FORMAT_VERSION',
    'TokenStore',
    'PackedBlocks',
    'build_token_store',
    'tokenizer_fingerprint',
]

FORMAT_VERSION = 2  # 2: per-document content hashes, unknown-token count
BATCH_CHARS = 1 << 22  # characters handed to the tokenizer per batch call
PROGRESS_BYTES = 1 << 22  # corpora larger than this show a progress bar while they are tokenized


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes the ids it produces."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts`, without special tokens, through the fastest batch API the tokenizer has."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        encode = getattr(backend, 'encode_batch_fast', backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)['input_ids']


@dataclass
class TokenStore:
    """One corpus's token ids on disk: `ids[offsets[i]:offsets[i+1]]` is document `i` followed by EOS."""

    path: Path
    ids: np.ndarray  # memory-mapped, read only
    offsets: np.ndarray  # int64, n_docs + 1
    meta: dict

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        meta = json.loads((path / 'meta.json').read_text())
        n = meta['n_tokens']
        ids = (
            np.memmap(path / 'ids.bin', dtype=meta['dtype'], mode='r', shape=(n,)) if n else np.zeros(0, meta['dtype'])
        )
        return cls(path, ids, np.load(path / 'offsets.npy'), meta)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def doc_hashes(self) -> np.ndarray:
        """A 64-bit content hash of each document's token ids (equal documents, equal hashes)."""
        return np.load(self.path / 'doc_hashes.npy')

    def __repr__(self) -> str:
        return f'TokenStore({self.meta["corpus"]!r}: {self.n_docs:,} documents, {self.n_tokens:,} tokens, {self.path})'


def build_token_store(
    corpus: Corpus,
    tokenizer,
    cache: str | os.PathLike | None = None,  # the cache folder; default $FINETUNE_CACHE or ~/.cache/finetune
    progress: bool = True,  # show a progress bar (in MB of text) for corpora over 4 MB
) -> TokenStore:
    """Tokenize `corpus` into the cache, or load it from there if these inputs were tokenized before."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f'tokenizer {type(tokenizer).__name__} has no eos_token: documents need one between them')
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, corpus.fingerprint(), tokenizer_fingerprint(tokenizer)]).encode()
    ).hexdigest()[:32]
    final = cache_dir(cache) / 'tokens' / key
    if (final / 'meta.json').exists():
        store = TokenStore.load(final)
        corpus.stats = ReadStats(**store.meta['read_stats'])
        return store
    cache_folder('tokens', cache=cache)
    try:
        with atomic_folder(final) as tmp:
            _write_store(corpus, tokenizer, tmp, progress)
    except FileExistsError:  # another process finished the same entry first: the same content
        if not (final / 'meta.json').exists():
            raise
    return TokenStore.load(final)


def _write_store(corpus: Corpus, tokenizer, folder: Path, progress: bool) -> None:
    eos = tokenizer.eos_token_id
    nbytes = corpus.nbytes if progress else 0
    bar = None
    if nbytes > PROGRESS_BYTES:
        from fastprogress.fastprogress import progress_bar

        total_mb = max(1, round(nbytes / 1e6))
        bar = progress_bar(range(total_mb))
        bar.comment = f'tokenizing {corpus.name!r} (MB)'  # the console bar takes no comment argument
        bar.update(0)
    done = 0
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    offsets, n_tokens = [0], 0
    with open(folder / 'ids.bin', 'wb') as out:
        texts: list[str] = []
        ends: list[bool] = []
        size = 0

        def flush():
            nonlocal n_tokens
            if not texts:
                return
            chunks = []
            for ids, end in zip(_encode_batch(tokenizer, texts), ends):
                chunks.append(np.asarray(ids, dtype=dtype))
                n_tokens += len(ids)
                if end:
                    chunks.append(np.asarray([eos], dtype=dtype))
                    n_tokens += 1
                    offsets.append(n_tokens)
            out.write(np.concatenate(chunks).tobytes())
            texts.clear()
            ends.clear()

        for text, end in corpus.segments():
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH_CHARS:
                flush()
                done, size = done + size, 0
                if bar is not None:
                    bar.update(min(int(done / 1e6), bar.total - 1))
        flush()
        if bar is not None:
            bar.update(bar.total)
    offsets = np.asarray(offsets, dtype=np.int64)
    np.save(folder / 'offsets.npy', offsets)
    ids = np.memmap(folder / 'ids.bin', dtype=dtype, mode='r', shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    np.save(folder / 'doc_hashes.npy', _doc_hashes(ids, offsets))
    unk = tokenizer.unk_token_id
    n_unk = int(np.count_nonzero(ids == unk)) if unk is not None and unk != eos and n_tokens else 0
    del ids
    stats = corpus.stats
    meta = {
        'format': FORMAT_VERSION,
        'corpus': corpus.name,
        'source': str(corpus.source),
        'n_tokens': n_tokens,
        'n_docs': len(offsets) - 1,
        'dtype': np.dtype(dtype).name,
        'eos_token_id': eos,
        'n_unk': n_unk,
        'max_doc_tokens': int(np.diff(offsets).max()) if len(offsets) > 1 else 0,
        'tokenizer': getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__,
        'read_stats': {k: getattr(stats, k) for k in ReadStats.__dataclass_fields__},
    }
    (folder / 'meta.json').write_text(json.dumps(meta, indent=1))


def _doc_hashes(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    for i in range(len(out)):
        digest = hashlib.blake2b(ids[offsets[i] : offsets[i + 1]].tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, 'little')
    return out


class PackedBlocks:
    """Windows of `seq_len + 1` tokens cut with stride `seq_len` from the concatenation of `spans` of `ids`."""

    def __init__(self, ids: np.ndarray, spans: list[tuple[int, int]], seq_len: int):
        if seq_len < 1:
            raise ValueError(f'seq_len must be at least 1, got {seq_len}')
        self.ids, self.seq_len = ids, seq_len
        self.spans = _merge_spans(spans)
        starts = np.asarray([s for s, _ in self.spans], dtype=np.int64)
        lengths = np.asarray([e - s for s, e in self.spans], dtype=np.int64)
        self._starts, self._cum = starts, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self._cum[-1])
        self.n_blocks = max(0, (self.n_tokens - 1) // seq_len)
        self.dropped = self.n_tokens - (self.n_blocks * seq_len + 1) if self.n_blocks else self.n_tokens

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(f'block {i} out of range for {self.n_blocks} blocks')
        a = (i % self.n_blocks) * self.seq_len
        b = a + self.seq_len + 1
        if len(self.spans) == 1:
            s = self._starts[0]
            return np.asarray(self.ids[s + a : s + b])
        pos = np.arange(a, b, dtype=np.int64)
        span = np.searchsorted(self._cum, pos, side='right') - 1
        return np.asarray(self.ids[self._starts[span] + pos - self._cum[span]])

    def __repr__(self) -> str:
        return f'PackedBlocks({self.n_blocks:,} blocks of {self.seq_len}+1 tokens, {self.dropped} dropped)'


def _merge_spans(spans) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if e <= s:
            continue
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((int(s), int(e)))
    return merged
