"""From packed corpora to fastai `DataLoaders`, through an ordinary fastai `DataBlock`.

`lm_datablock(packed)` is a `DataBlock` built from `LMBlock` (token windows that decode to text)
and a `CategoryBlock` of corpus names, so fastai users can compose their own; `lm_dataloaders` is
the one-call path from corpora to `LMDataLoaders`. Each batch is `(input_ids, labels, corpus)`:
labels are the inputs shifted by one token, and `corpus` is each row's corpus index. The training
loader draws its order from the mix's `MixSampler`, given to it when it is built and kept by
fastai's `new()`.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import Categorize
from fastai.torch_core import default_device
from fasttransform import Transform

from .display import show_table
from .distributed import init_distributed, rank
from .mix import MixSampler, pack_corpora, shard_run
from .mix_report import mix_report
from .packing import IGNORE_INDEX, PackedCorpora, check_split_args

__all__ = ['LMBlock', 'LMDataLoader', 'LMDataLoaders', 'lm_datablock', 'lm_dataloaders']


class TokenIds(Transform):
    """Token ids (numpy) to a LongTensor; decodes back to text with the tokenizer."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def encodes(self, o: np.ndarray):
        return torch.from_numpy(o.astype(np.int64))

    def decodes(self, o: torch.Tensor):
        return self.tokenizer.decode([t for t in o.tolist() if t != IGNORE_INDEX])


class LMDataLoader(TfmdDL):
    """A `TfmdDL` whose shuffled order comes from a `MixSampler`; shows decoded text with its corpus.

    The sampler is a constructor argument that `new()` keeps, so the copies fastai makes (for
    `one_batch`, `show_batch`) share it; an unshuffled copy (`get_preds`, `new(shuffle=False)`)
    goes through every block in order instead.
    """

    def __init__(self, dataset=None, sampler: MixSampler | None = None, **kwargs):
        self.sampler = sampler
        self.shard = None  # (rank, world) while a multi-process fit runs: this process's share of each batch
        super().__init__(dataset, **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):
        if dataset is None:  # a copy over the same blocks (fastai's one_batch, get_preds, ...) keeps the sampler
            kwargs.setdefault('sampler', self.sampler)
        return super().new(dataset, cls, **kwargs)

    @property
    def _drawn(self) -> bool:
        return self.sampler is not None and self.shuffle

    @property
    def n(self):
        if self.shard is not None:
            return len(self.get_idxs())
        return len(self.sampler) if self._drawn else self._n

    @n.setter
    def n(self, value):
        self._n = value

    def get_idxs(self):
        rank, world = self.shard or (0, 1)
        if self._drawn:  # the rows of each global batch that are this process's (see `mix.shard_order`)
            return self.sampler.indices(self.bs, world, rank)
        if self.shard is None:
            return super().get_idxs()
        return list(range(*shard_run(self._n, world, rank)))  # a run of the blocks, in order

    def create_item(self, s):
        if s is not None and s < 0:  # a stand-in row of a sharded last batch: a real block, every label masked
            x, y, *rest = super().create_item(-1 - s)
            return (x, torch.full_like(y, IGNORE_INDEX), *rest)
        return super().create_item(s)

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


def lm_datablock(packed: PackedCorpora, max_valid_blocks: int | None = None) -> DataBlock:
    """A fastai `DataBlock` of (input_ids, labels, corpus) over the blocks of `packed`."""
    tok = packed.tokenizer
    return DataBlock(
        blocks=(LMBlock(tok), LMBlock(tok), CategoryBlock(vocab=packed.names, sort=False)),
        # partials, not bound methods: fastcore would rebind those to the DataBlock
        get_items=partial(PackedCorpora.items, packed),
        splitter=partial(PackedCorpora.splitter, packed, max_valid_blocks=max_valid_blocks),
        get_x=partial(PackedCorpora.inputs, packed),
        get_y=[partial(PackedCorpora.labels, packed), partial(PackedCorpora.corpus_name, packed)],
        n_inp=1,
    )


class LMDataLoaders(DataLoaders):
    """fastai `DataLoaders` over packed corpora: they know their corpora, tokenizer, mix and trained tokens."""

    def __init__(self, *loaders, packed: PackedCorpora, path='.', device=None):
        super().__init__(*loaders, path=path, device=device)
        self.packed = packed
        self.trained_tokens = [0] * len(packed.names)  # per corpus, summed over every fit

    @classmethod
    def from_packed(
        cls,
        packed: PackedCorpora,
        bs: int = 8,  # sequences per batch
        seed: int = 42,  # the training order, unless the mix has its own seed
        max_valid_blocks: int | None = None,  # evaluate at most this many validation blocks per corpus
        num_workers: int = 0,
        device=None,  # where batches go; default: fastai's default device
        **kwargs,  # passed to `DataBlock.dataloaders`
    ) -> LMDataLoaders:
        """Training order from the mix's sampler; validation in order, every corpus's blocks."""
        _check_bs(bs)
        if max_valid_blocks is not None and max_valid_blocks < 1:
            raise ValueError(f'max_valid_blocks must be at least 1 (or None for all), got {max_valid_blocks}')
        mix = packed.mix
        sampler = MixSampler(
            packed.plan, packed.train_offsets, seed=seed if mix.seed is None else mix.seed, stratified=mix.stratified
        )
        init_distributed()  # one of several processes: join them now, so that each uses its own GPU
        target = torch.device(device) if device is not None else default_device()
        kwargs.setdefault('pin_memory', target.type == 'cuda')  # page-locked batches copy to a GPU faster
        dls = lm_datablock(packed, max_valid_blocks).dataloaders(
            None, bs=bs, num_workers=num_workers, device=device, drop_last=False,
            dl_kwargs=[{'sampler': sampler}, {'sampler': None}], **kwargs,
        )  # fmt: skip
        return cls(*dls.loaders, packed=packed, path=dls.path, device=dls.device)

    def new_empty(self):
        loaders = [dl.new(dl.dataset.new_empty()) for dl in self.loaders]
        return type(self)(*loaders, packed=self.packed, path=self.path, device=self.device)

    @property
    def tokenizer(self):
        return self.packed.tokenizer

    @property
    def seq_len(self) -> int:
        return self.packed.seq_len

    @property
    def names(self) -> list[str]:
        """The corpus names, in the order of the `corpus` column of every batch."""
        return self.packed.names

    @property
    def sampler(self) -> MixSampler:
        return self.train.sampler

    def record_trained(self, counts: list[int]) -> None:
        """Add tokens trained per corpus (what `MixCallback` reports at the end of a fit)."""
        if len(counts) != len(self.trained_tokens):
            raise ValueError(f'{len(counts)} counts for {len(self.trained_tokens)} corpora')
        self.trained_tokens = [a + int(b) for a, b in zip(self.trained_tokens, counts)]

    def mix_report(self, show: bool = True, warn: bool = True, **checks):
        """The mix report, with the tokens training has consumed from each corpus so far."""
        return mix_report(self.packed, trained_tokens=self.trained_tokens, show=show, warn=warn, **checks)


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
    verbose: bool = True,  # print the mix report's table
    max_valid_blocks: int | None = None,  # evaluate at most this many validation blocks per corpus (faster)
    **kwargs,  # passed to `DataBlock.dataloaders`
) -> LMDataLoaders:
    """fastai `DataLoaders` of `(input_ids, labels, corpus)` blocks; `dls.packed` holds the corpora."""
    _check_bs(bs)  # before any tokenizing
    if not isinstance(corpora, PackedCorpora):
        check_split_args(seq_len, valid_pct, seed)
    packed = (
        corpora
        if isinstance(corpora, PackedCorpora)
        else pack_corpora(corpora, tokenizer, seq_len, valid_pct, seed, cache)
    )
    dls = LMDataLoaders.from_packed(
        packed, bs=bs, seed=seed, max_valid_blocks=max_valid_blocks, num_workers=num_workers, device=device, **kwargs
    )
    if rank() == 0:  # one report for several processes
        dls.mix_report(show=verbose)  # the diagnosis always warns; the table shows when verbose
    return dls


def _check_bs(bs) -> None:
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ValueError(f'bs must be a whole number >= 1, got {bs!r}')
