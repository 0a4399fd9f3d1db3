"""From token stores to fastai `DataLoaders` of packed causal-LM blocks, through a `DataBlock`.

`pack_corpora` holds out a fraction of each corpus's *documents* for validation (before any
packing, so no validation token is ever trained on) and cuts both streams into blocks.
`PackedCorpora.datablock()` is an ordinary fastai `DataBlock` built from `LMBlock` (token
windows) and a `CategoryBlock` of corpus names, so fastai users can compose their own;
`lm_dataloaders` is the one-call path. Each batch is `(input_ids, labels, corpus)`: labels are
the inputs shifted by one token, and `corpus` is each row's corpus index.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import Categorize
from fastai.torch_core import default_device
from fasttransform import Transform

from .display import show_table
from .mix import CorpusMix, MixSampler, plan_mix
from .tokens import PackedBlocks, TokenStore, build_token_store

__all__ = [
    'CorpusSplit',
    'PackedCorpora',
    'LMBlock',
    'LMDataLoader',
    'LMDataLoaders',
    'pack_corpora',
    'lm_dataloaders',
]


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
        PackedBlocks(store.ids, train, seq_len),
        PackedBlocks(store.ids, valid, seq_len),
        valid_ids,
        note,
    )


class PackedCorpora:
    """Several corpora, tokenized, split and packed; the items of the `DataBlock` are block numbers."""

    def __init__(self, splits: list[CorpusSplit], tokenizer, seq_len: int, mix: CorpusMix):
        self.splits, self.tokenizer, self.seq_len, self.mix = splits, tokenizer, seq_len, mix
        self.names = [s.name for s in splits]
        self.plan = plan_mix(self.mix, [len(s.train) for s in splits], seq_len)
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

    max_valid_blocks: int | None = None  # evaluate at most this many validation blocks per corpus

    def splitter(self, items) -> tuple[list[int], list[int]]:
        valid, start = [], self.n_train
        for split in self.splits:
            n = len(split.valid)
            valid += range(start, start + (n if self.max_valid_blocks is None else min(n, self.max_valid_blocks)))
            start += n
        return list(range(self.n_train)), valid

    def inputs(self, item: int) -> np.ndarray:
        return self.block(item)[:-1]

    def labels(self, item: int) -> np.ndarray:
        return self.block(item)[1:]

    def datablock(self) -> DataBlock:
        """A fastai `DataBlock` of (input_ids, labels, corpus) over these blocks."""
        return DataBlock(
            blocks=(LMBlock(self.tokenizer), LMBlock(self.tokenizer), CategoryBlock(vocab=self.names, sort=False)),
            # partials, not bound methods: fastcore would rebind those to the DataBlock
            get_items=partial(PackedCorpora.items, self),
            splitter=partial(PackedCorpora.splitter, self),
            get_x=partial(PackedCorpora.inputs, self),
            get_y=[partial(PackedCorpora.labels, self), partial(PackedCorpora.corpus_name, self)],
            n_inp=1,
        )

    # --- reporting ---
    def report(self):
        """Per corpus: documents, tokens, blocks, held-out documents and dropped tokens, as a DataFrame."""
        import pandas as pd

        rows = [
            {
                'corpus': s.name,
                'documents': s.store.n_docs,
                'tokens': s.store.n_tokens,
                'train blocks': len(s.train),
                'valid blocks': len(s.valid),
                'valid documents': s.valid_docs,
                'dropped tokens': s.dropped,
                'note': s.note,
            }
            for s in self.splits
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        parts = ', '.join(f'{s.name}: {len(s.train)}+{len(s.valid)}' for s in self.splits)
        return f'PackedCorpora(seq_len={self.seq_len}, train+valid blocks: {parts})'


def pack_corpora(
    corpora,  # a CorpusMix, a Corpus, or a list of them (mixed by size: every block once per epoch)
    tokenizer,  # a Hugging Face tokenizer (fast ones tokenize in Rust on all cores)
    seq_len: int = 512,  # tokens per training sequence
    valid_pct: float = 0.05,  # fraction of each corpus's documents held out for validation
    seed: int = 42,  # chooses the held-out documents
    cache: str | os.PathLike | None = None,  # the cache folder; default $FINETUNE_CACHE or ~/.cache/finetune
) -> PackedCorpora:
    """Tokenize (or load from cache) each corpus, hold out validation documents, and pack blocks."""
    mix = corpora if isinstance(corpora, CorpusMix) else CorpusMix(corpora)
    corpora = mix.corpora
    if not 0 < valid_pct < 1:
        raise ValueError(f'valid_pct must be between 0 and 1 (exclusive), got {valid_pct}')
    if seq_len < 1:
        raise ValueError(f'seq_len must be a positive number of tokens, got {seq_len}')
    splits = []
    for i, corpus in enumerate(corpora):
        store = build_token_store(corpus, tokenizer, cache)
        if store.n_docs == 0:
            raise ValueError(
                f'corpus {corpus.name!r} has no documents: every file or record under {corpus.source} is empty'
            )
        rng = np.random.default_rng([seed, i])
        split = _split_corpus(store, corpus.name, seq_len, valid_pct, rng)
        if split.note:
            warnings.warn(f'corpus {corpus.name!r}: {split.note}', stacklevel=2)
        splits.append(split)
    return PackedCorpora(splits, tokenizer, seq_len, mix)


class TokenIds(Transform):
    """Token ids (numpy) to a LongTensor; decodes back to text with the tokenizer."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def encodes(self, o: np.ndarray):
        return torch.from_numpy(o.astype(np.int64))

    def decodes(self, o: torch.Tensor):
        return self.tokenizer.decode(o.tolist())


class LMDataLoader(TfmdDL):
    """A `TfmdDL` that draws from a `MixSampler` when it has one, and shows decoded text with its corpus."""

    sampler: MixSampler | None = None

    @property
    def n(self):
        return len(self.sampler) if self.sampler is not None else self._n

    @n.setter
    def n(self, value):
        self._n = value

    def get_idxs(self):
        if self.sampler is None:
            return super().get_idxs()
        return self.sampler.indices()

    def show_batch(
        self, b=None, max_n: int = 6, ctxs=None, show: bool = True, unique: bool = False, trunc_at: int = 300
    ):
        """Show `max_n` rows of a batch as decoded text with their corpus; `show=False` returns the DataFrame."""
        import pandas as pd

        x, _, corpus = (self.one_batch() if b is None else b)[:3]
        names = self._find(Categorize).vocab
        tok = self._find(TokenIds).tokenizer
        rows = []
        for i in range(min(max_n, len(x))):
            text = tok.decode(x[i].tolist())
            rows.append(
                {'corpus': names[int(corpus[i])], 'text': text if len(text) <= trunc_at else text[:trunc_at] + '…'}
            )
        df = pd.DataFrame(rows)
        if not show:
            return df
        show_table(df)

    def _find(self, kind):
        for tfms in self.dataset.tfms:
            for t in tfms.fs:
                if isinstance(t, kind):
                    return t
        raise AttributeError(f'this DataLoader has no {kind.__name__} transform')


def LMBlock(tokenizer) -> TransformBlock:
    """A fastai block for packed causal-LM token windows (numpy ids in, LongTensor out, text when decoded)."""
    return TransformBlock(type_tfms=TokenIds(tokenizer), dl_type=LMDataLoader)


class LMDataLoaders(DataLoaders):
    """fastai `DataLoaders` that know their corpora, tokenizer and mix."""

    packed: PackedCorpora
    tokenizer = None
    seq_len: int

    @property
    def sampler(self) -> MixSampler:
        return self.train.sampler

    def mix_report(self, show: bool = True, **checks):
        """The mix report, with the tokens training has consumed from each corpus so far."""
        from .mix_report import mix_report

        return mix_report(self.packed, trained_tokens=self.trained_tokens, show=show, **checks)

    @property
    def trained_tokens(self) -> list[int]:
        return getattr(self, '_trained_tokens', [0] * len(self.packed.names))


def lm_dataloaders(
    corpora,  # a CorpusMix, a Corpus, a list of them, or a PackedCorpora already built
    tokenizer,  # a Hugging Face tokenizer
    seq_len: int = 512,  # tokens per training sequence
    bs: int = 8,  # sequences per batch
    valid_pct: float = 0.05,  # fraction of each corpus's documents held out for validation
    seed: int = 42,  # held-out documents, and the training order unless the CorpusMix has its own seed
    cache: str | os.PathLike | None = None,  # token cache folder
    num_workers: int = 0,  # blocks are memory-mapped slices: worker processes rarely pay off
    device=None,  # where batches go; default: fastai's default device
    verbose: bool = True,  # print the per-corpus table
    max_valid_blocks: int | None = None,  # evaluate at most this many validation blocks per corpus (faster)
    **kwargs,  # passed to `DataBlock.dataloaders`
) -> DataLoaders:
    """fastai `DataLoaders` of `(input_ids, labels, corpus)` blocks; `dls.packed` holds the corpora and report."""
    packed = (
        corpora
        if isinstance(corpora, PackedCorpora)
        else pack_corpora(corpora, tokenizer, seq_len, valid_pct, seed, cache)
    )
    if bs < 1:
        raise ValueError(f'bs must be at least 1, got {bs}')
    if max_valid_blocks is not None and max_valid_blocks < 1:
        raise ValueError(f'max_valid_blocks must be at least 1 (or None for all), got {max_valid_blocks}')
    packed.max_valid_blocks = max_valid_blocks
    target = torch.device(device) if device is not None else default_device()
    kwargs.setdefault('pin_memory', target.type == 'cuda')  # page-locked batches copy to a GPU faster
    dls = packed.datablock().dataloaders(None, bs=bs, num_workers=num_workers, device=device, drop_last=False, **kwargs)
    dls = LMDataLoaders(*dls.loaders, path=dls.path, device=dls.device)
    mix = packed.mix
    dls.train.sampler = MixSampler(
        packed.plan, packed.train_offsets, seed=seed if mix.seed is None else mix.seed, stratified=mix.stratified
    )
    dls.packed = packed
    dls.tokenizer = packed.tokenizer
    dls.seq_len = packed.seq_len
    dls.mix_report(show=verbose)  # the diagnosis always warns; the table shows when verbose
    return dls
