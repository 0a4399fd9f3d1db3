"""Packing: each corpus's token store split into training and validation blocks, before any mixing.

`split_corpora` holds out a fraction of each corpus's *documents* for validation (so no validation
token is ever trained on, and every corpus has its own validation set) and cuts both token streams
into `PackedBlocks`. `PackedCorpora` holds the splits with the mix's epoch plan; its block numbers
are the items of the fastai `DataBlock` in `data.py`. `mix.pack_corpora` builds it: the mix is
planned on top of the packed corpora (it needs their sizes), so this module knows nothing of it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .corpora import Corpus
from .tokens import PackedBlocks, TokenStore, build_token_store

__all__ = ['IGNORE_INDEX', 'CorpusSplit', 'PackedCorpora', 'split_corpora', 'check_split_args', 'trained_ratios']

IGNORE_INDEX = -100  # Hugging Face's label for "no target here"


@dataclass
class CorpusSplit:
    """One corpus's token store, split into training and validation blocks."""

    name: str
    store: TokenStore
    train: PackedBlocks
    valid: PackedBlocks
    valid_doc_ids: np.ndarray  # the held-out documents; none when the stream's tail was held out instead
    note: str = ''  # how validation was chosen when the plain split could not be used

    @property
    def valid_docs(self) -> int:
        return len(self.valid_doc_ids)

    @property
    def dropped(self) -> int:
        return self.train.dropped + self.valid.dropped


def _split_corpus(
    store: TokenStore, name: str, seq_len: int, valid_pct: float, rng: np.random.Generator
) -> CorpusSplit:
    """Hold out `valid_pct` of the documents (at least one block's worth), else the tail of the stream."""
    n_docs, n_tokens, offsets, block = store.n_docs, store.n_tokens, store.offsets, seq_len + 1
    if n_tokens < 2 * block:
        raise ValueError(
            f'corpus {name!r} has {n_tokens:,} tokens, fewer than the {2 * block:,} needed for one training and one '
            f'validation block of seq_len={seq_len}: lower seq_len or add documents'
        )
    doc_lens = np.diff(offsets)
    order = rng.permutation(n_docs)
    want = max(1, round(n_docs * valid_pct))
    taken = np.cumsum(doc_lens[order])
    # the fewest documents that reach both the asked fraction and one whole block
    k = max(want, int(np.searchsorted(taken, block)) + 1)
    note = ''
    if n_docs >= 2 and k < n_docs and n_tokens - taken[k - 1] >= block:
        valid_ids = np.sort(order[:k])
        is_valid = np.zeros(n_docs, dtype=bool)
        is_valid[valid_ids] = True
        spans = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
        train = [s for s, v in zip(spans, is_valid) if not v]
        valid = [s for s, v in zip(spans, is_valid) if v]
        if k > want:
            note = f'held out {k} documents, not {want}, to fill one validation block of {block} tokens'
    else:
        valid_ids = np.zeros(0, dtype=np.int64)
        # at least one block on each side (n_tokens >= 2 blocks was checked above)
        cut = n_tokens - min(max(block, math.ceil(n_tokens * valid_pct)), n_tokens - block)
        train, valid = [(0, cut)], [(cut, n_tokens)]
        note = (
            f'{n_docs} document(s) are too few to hold any out: the last {n_tokens - cut:,} tokens of the stream '
            'are the validation set'
        )
    return CorpusSplit(
        name,
        store,
        PackedBlocks(store.ids, train, seq_len, store.mask),
        PackedBlocks(store.ids, valid, seq_len, store.mask),
        valid_ids,
        note,
    )


class PackedCorpora:
    """Several corpora, tokenized, split and packed, with the epoch plan of their mix.

    The items of the `DataBlock` (see `data.lm_datablock`) are block numbers: every training block
    of every corpus, then every validation block. Built by `pack_corpora`.
    """

    def __init__(self, splits: list[CorpusSplit], tokenizer, seq_len: int, mix, plan):
        self.splits, self.tokenizer, self.seq_len = splits, tokenizer, seq_len
        self.mix, self.plan = mix, plan  # the `CorpusMix` asked for, and the exact epoch (`MixPlan`) it implies
        self.names = [s.name for s in splits]
        self.train_offsets = np.concatenate([[0], np.cumsum([len(s.train) for s in splits])[:-1]]).astype(int).tolist()
        train = [(c, i) for c, s in enumerate(splits) for i in range(len(s.train))]
        valid = [(c, i) for c, s in enumerate(splits) for i in range(len(s.valid))]
        self.n_train = len(train)
        self._index = np.asarray(train + valid, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._index)

    def block(self, item: int) -> np.ndarray:
        """The `seq_len + 1` token ids of block number `item`."""
        c, i = self._index[item]
        split = self.splits[c]
        return split.train[int(i)] if item < self.n_train else split.valid[int(i)]

    def corpus_name(self, item: int) -> str:
        return self.names[self._index[item][0]]

    # --- the pieces of a DataBlock ---
    def items(self, _source=None) -> list[int]:
        return list(range(len(self)))

    def splitter(self, items, max_valid_blocks: int | None = None) -> tuple[list[int], list[int]]:
        """Training blocks | each corpus's validation blocks (at most `max_valid_blocks` of each)."""
        valid, start = [], self.n_train
        for split in self.splits:
            n = len(split.valid)
            valid += range(start, start + (n if max_valid_blocks is None else min(n, max_valid_blocks)))
            start += n
        return list(range(self.n_train)), valid

    def trained_ratios(self) -> list[float]:
        """Per corpus, the fraction of its training tokens that carry a label (1 but for chat corpora)."""
        return trained_ratios(self.splits, self.seq_len)

    def inputs(self, item: int) -> np.ndarray:
        return self.block(item)[:-1]

    def labels(self, item: int) -> np.ndarray:
        """The next token at each position; `IGNORE_INDEX` where a chat corpus's mask says not to train."""
        c, i = self._index[item]
        blocks = self.splits[c].train if item < self.n_train else self.splits[c].valid
        labels = blocks[int(i)][1:].astype(np.int64)
        mask = blocks.mask_window(int(i))
        if mask is not None:
            labels[mask[1:] == 0] = IGNORE_INDEX
        return labels

    def __repr__(self) -> str:
        parts = ', '.join(f'{s.name}: {len(s.train)}+{len(s.valid)}' for s in self.splits)
        return f'PackedCorpora(seq_len={self.seq_len}, train+valid blocks: {parts})'


def trained_ratios(splits: list[CorpusSplit], seq_len: int) -> list[float]:
    """Per corpus, the fraction of its training tokens that carry a label (1 but for chat corpora)."""
    return [s.train.n_trained / (len(s.train) * seq_len) if len(s.train) else 1.0 for s in splits]


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_split_args(seq_len, valid_pct, seed) -> None:
    """The packing arguments' types and ranges, checked before anything is tokenized."""
    if not _whole(seq_len) or seq_len < 1:
        raise ValueError(f'seq_len must be a whole number of tokens >= 1, got {seq_len!r}')
    if isinstance(valid_pct, bool) or not isinstance(valid_pct, (int, float)) or not 0 < valid_pct < 1:
        raise ValueError(f'valid_pct must be a number between 0 and 1 (exclusive), got {valid_pct!r}')
    if not _whole(seed) or seed < 0:
        raise ValueError(f'seed must be a whole number >= 0, got {seed!r}')


def split_corpora(
    corpora: list[Corpus], tokenizer, seq_len: int, valid_pct: float, seed: int, cache
) -> list[CorpusSplit]:
    """Tokenize (or load from cache) each corpus and hold out its validation documents."""
    check_split_args(seq_len, valid_pct, seed)
    splits = []
    for i, corpus in enumerate(corpora):
        store = build_token_store(corpus, tokenizer, cache)
        if store.n_docs == 0:
            raise ValueError(
                f'corpus {corpus.name!r} has no documents: every file or record under {corpus.source} is empty'
            )
        split = _split_corpus(store, corpus.name, seq_len, valid_pct, np.random.default_rng([seed, i]))
        if split.note:
            warnings.warn(f'corpus {corpus.name!r}: {split.note}', stacklevel=3)
        splits.append(split)
    return splits
