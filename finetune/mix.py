"""Where the mix is decided: the mix a user asks for, the epoch it implies, and the sampler that draws it.

`CorpusMix` holds corpora with relative `weights` (in tokens) or target `share`s of each epoch's
training tokens. `pack_corpora` tokenizes and packs them (`packing.py`), then `plan_mix` turns the
mix into exact per-corpus block counts for an epoch. `MixSampler` draws those blocks: every block
of a corpus once per pass before any block twice (repeating a small corpus, subsampling a large one with a fresh subset
each epoch), interleaved across corpora, from its own seeded generator, and resumable mid-epoch
from `state_dict()`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from .corpora import Corpus
from .distributed import local_main_first
from .mix_report import mix_report
from .packing import PackedCorpora, split_corpora, trained_ratios

__all__ = [
    'CorpusMix',
    'shard_order',
    'shard_run',
    'MixPlan',
    'MixSampler',
    'plan_mix',
    'pack_corpora',
    'HARD_MAX_REPEATS',
]

HARD_MAX_REPEATS = 100  # a share that implies more repeats per epoch than this is an error unless forced


class CorpusMix:
    """Corpora and how to mix them: relative `weights` in tokens, or a `share` of each epoch's training tokens."""

    def __init__(
        self,
        corpora,  # Corpus objects with distinct names
        weights: dict[str, float] | None = None,  # relative weights in tokens, for every corpus without a share
        share: dict[str, float] | None = None,  # fraction of each epoch's training tokens, per corpus
        epoch_tokens: int | None = None,  # training tokens per epoch; default: every corpus's training tokens once
        seed: int | None = None,  # the sampler's seed; default: the seed given to `lm_dataloaders`
        stratified: bool = False,  # every batch holds the mix, not just every epoch
        force: bool = False,  # allow a share that repeats a corpus more than HARD_MAX_REPEATS times per epoch
    ):
        self.corpora = [corpora] if isinstance(corpora, Corpus) else list(corpora)
        if not self.corpora:
            raise ValueError('CorpusMix needs at least one corpus')
        for c in self.corpora:
            if not isinstance(c, Corpus):
                raise TypeError(
                    f'expected Corpus objects, got {type(c).__name__}: wrap paths in Corpus(path, name=...)'
                )
        self.names = [c.name for c in self.corpora]
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ValueError(f'corpus names must be distinct; repeated: {dupes}. Pass name= to Corpus')
        self.weights = _check_numbers('weights', weights or {}, self.names)
        self.share = _check_numbers('share', share or {}, self.names)
        both = sorted(set(self.weights) & set(self.share))
        if both:
            raise ValueError(f'{both} given both a weight and a share: give each corpus one or the other')
        for name, s in self.share.items():
            if s > 1:
                raise ValueError(f'share for {name!r} is {s}: a share is a fraction of training tokens, at most 1')
        total_share = sum(self.share.values())
        if total_share > 1 + 1e-9:
            raise ValueError(f'shares sum to {total_share:g}, more than 1: {self.share}')
        rest = [n for n in self.names if n not in self.share]
        missing = [n for n in rest if n not in self.weights]
        if self.weights and missing:
            raise ValueError(
                f'weights name {sorted(self.weights)} but not {missing}: give every corpus without a share a weight '
                '(0 leaves it out of training), or give no weights to split the rest by size'
            )
        if not rest and abs(total_share - 1) > 1e-9:
            raise ValueError(f'every corpus has a share, so the shares must sum to 1; they sum to {total_share:g}')
        if epoch_tokens is not None and (not isinstance(epoch_tokens, int) or epoch_tokens < 1):
            raise ValueError(f'epoch_tokens must be a positive whole number of tokens, got {epoch_tokens!r}')
        self.epoch_tokens, self.seed, self.stratified, self.force = epoch_tokens, seed, stratified, force

    def fractions(self, sizes: dict[str, int]) -> dict[str, float]:
        """Each corpus's fraction of an epoch's training tokens, given each corpus's training size."""
        total_share = sum(self.share.values())
        rest = [n for n in self.names if n not in self.share]
        base = {n: (self.weights[n] if self.weights else sizes[n]) for n in rest}
        base_total = sum(base.values())
        out = {}
        for n in self.names:
            if n in self.share:
                out[n] = self.share[n]
            else:
                out[n] = (1 - total_share) * base[n] / base_total if base_total > 0 else 0.0
        return out

    def report(self, tokenizer, seq_len: int = 512, valid_pct: float = 0.05, seed: int = 42, cache=None, **checks):
        """Tokenize (cached) and pack the corpora, then show what this mix means: see `finetune.mix_report`."""
        packed = pack_corpora(self, tokenizer, seq_len=seq_len, valid_pct=valid_pct, seed=seed, cache=cache)
        return mix_report(packed, **checks)

    def __repr__(self) -> str:
        how = f'weights={self.weights}' if self.weights else 'by size'
        if self.share:
            how = f'share={self.share}, rest {how}'
        return f'CorpusMix({self.names}, {how})'


def _check_numbers(what: str, values: dict, names: list[str]) -> dict[str, float]:
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f'{what} names {unknown}, which are not corpora; the corpora are {names}')
    out = {}
    for name, v in values.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f'{what}[{name!r}] must be a number, got {v!r}') from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f'{what}[{name!r}] is {v}: it must be a finite number >= 0')
        out[name] = v
    if what == 'weights' and out and all(v == 0 for v in out.values()):
        raise ValueError(f'all weights are zero ({values}): at least one corpus must train')
    return out


@dataclass
class MixPlan:
    """An epoch in blocks: how many each corpus supplies, from how many it has."""

    names: list[str]
    sizes: list[int]  # training blocks per corpus
    draws: list[int]  # blocks drawn per corpus per epoch
    fractions: list[float]  # the asked-for fraction of the epoch's trained tokens
    seq_len: int

    @property
    def epoch_blocks(self) -> int:
        return sum(self.draws)

    @property
    def repeats(self) -> list[float]:
        return [d / s if s else 0.0 for d, s in zip(self.draws, self.sizes)]


def plan_mix(mix: CorpusMix, sizes: list[int], seq_len: int, trained: list[float] | None = None) -> MixPlan:
    """Exact block counts per corpus for one epoch (largest-remainder rounding to the epoch size).

    Weights and shares are of *trained* tokens: `trained[i]` is the fraction of corpus i's tokens that
    carry a label (below 1 for a chat corpus trained on its replies only), so a chat corpus with
    half its tokens masked gets twice the blocks for the same share. Mixed by size, every block is
    drawn once per epoch either way.
    """
    trained = [1.0] * len(sizes) if trained is None else [max(r, 1e-9) for r in trained]
    by_trained = mix.fractions({n: s * r for n, s, r in zip(mix.names, sizes, trained)})
    blocks = {n: by_trained[n] / r for n, r in zip(mix.names, trained)}
    total = sum(blocks.values())
    block_share = {n: (b / total if total > 0 else 0.0) for n, b in blocks.items()}  # of the epoch's blocks
    epoch = mix.epoch_tokens // seq_len if mix.epoch_tokens else sum(sizes)
    if epoch < 1:
        raise ValueError(f'epoch_tokens={mix.epoch_tokens} is less than one block of seq_len={seq_len}')
    exact = [epoch * block_share[n] for n in mix.names]
    draws = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: draws[i] - exact[i])[: epoch - sum(draws)]:
        draws[i] += 1
    for name, d, s in zip(mix.names, draws, sizes):
        if d and not s:
            raise ValueError(f'corpus {name!r} has no training blocks but its share asks for {d}')
        if s and d / s > HARD_MAX_REPEATS and not mix.force:
            raise ValueError(
                f'corpus {name!r}: its share of {by_trained[name]:.1%} asks for {d:,} blocks per epoch from {s:,} '
                f'training blocks, {d / s:,.0f} repeats (limit {HARD_MAX_REPEATS}): lower its share or epoch_tokens, '
                'add documents, or pass force=True'
            )
    return MixPlan(list(mix.names), list(sizes), draws, [by_trained[n] for n in mix.names], seq_len)


def pack_corpora(
    corpora,  # a CorpusMix, a Corpus, or a list of them (mixed by size: every block once per epoch)
    tokenizer,  # a Hugging Face tokenizer (fast ones tokenize in Rust on all cores)
    seq_len: int = 512,  # tokens per training sequence
    valid_pct: float = 0.05,  # fraction of each corpus's documents held out for validation
    seed: int = 42,  # chooses the held-out documents
    cache: str | os.PathLike | None = None,  # the cache folder; default $FINETUNE_CACHE or ~/.cache/finetune
) -> PackedCorpora:
    """Tokenize (or load from cache) each corpus, hold out validation documents, pack blocks and plan the mix."""
    mix = corpora if isinstance(corpora, CorpusMix) else CorpusMix(corpora)
    with local_main_first():  # several processes: each machine's first builds the token stores, the others open them
        splits = split_corpora(mix.corpora, tokenizer, seq_len, valid_pct, seed, cache)
    plan = plan_mix(mix, [len(s.train) for s in splits], seq_len, trained_ratios(splits, seq_len))
    return PackedCorpora(splits, tokenizer, seq_len, mix, plan)


def shard_run(n: int, world: int, rank: int) -> tuple[int, int]:
    """Process `rank`'s run `[start, stop)` of `n` items cut as evenly as it goes (the first ones get one more)."""
    q, extra = divmod(n, world)
    start = rank * q + min(rank, extra)
    return start, start + q + (rank < extra)


def shard_order(order: np.ndarray, bs: int, world: int, rank: int) -> np.ndarray:
    """Process `rank`'s blocks of `order`, global batch (`bs * world` blocks) by global batch.

    Each global batch is cut into `world` consecutive runs, `bs` blocks each; a last, shorter one
    as evenly as it goes (sizes differ by one at most). So step k of every process together
    trains exactly the blocks of step k of one process with batch `bs * world`, nothing padded or
    dropped. A process left with no block of the last batch gets one stand-in, `-1 - b` for the
    batch's first block `b`: it runs with every label masked (no tokens, no gradient), so that
    every process takes the same number of steps.
    """
    if world == 1:
        return order
    g = bs * world
    full = len(order) // g * g
    mine = [order[:full].reshape(-1, world, bs)[:, rank].reshape(-1)]
    last = order[full:]
    if len(last):
        a, b = shard_run(len(last), world, rank)
        mine.append(last[a:b] if b > a else -1 - last[:1])
    return np.concatenate(mine)


@dataclass
class MixSampler:
    """Draws each epoch's training blocks as a `MixPlan` says; indices count from each corpus's `offsets` entry."""

    plan: MixPlan
    offsets: list[int]  # index of each corpus's first training block
    seed: int = 42
    stratified: bool = False
    epoch: int = 0  # epochs completed
    position: int = 0  # blocks already served in the current epoch
    _cache: tuple = field(default=(None, None), repr=False)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Every block index of `epoch` in the order training sees them (a pure function of seed and epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache[0] == epoch:
            return self._cache[1]
        corpus_ids, blocks = [], []
        for c, (n, size) in enumerate(zip(self.plan.draws, self.plan.sizes)):
            if n:
                blocks.append(self.offsets[c] + self._stream(c, size, epoch * n, n))
                corpus_ids.append(np.full(n, c))
        if not blocks:
            return np.zeros(0, dtype=np.int64)
        blocks, corpus_ids = np.concatenate(blocks), np.concatenate(corpus_ids)
        rng = np.random.default_rng([self.seed, 1, epoch])
        if self.stratified:
            # spread each corpus evenly over the epoch: its j-th draw sits at (j + u) / n, u random per corpus
            keys = (
                np.concatenate([(np.arange(n) + rng.random()) / n for n in self.plan.draws if n])
                + rng.random(len(blocks)) * 1e-9
            )
            order = np.argsort(keys, kind='stable')
        else:
            order = rng.permutation(len(blocks))
        result = blocks[order].astype(np.int64)
        self._cache = (epoch, result)
        return result

    def _stream(self, corpus: int, size: int, start: int, n: int) -> np.ndarray:
        """Items [start, start + n) of corpus's endless stream of fresh permutations of its blocks."""
        out, pos = [], start
        while pos < start + n:
            k, i = divmod(pos, size)
            perm = np.random.default_rng([self.seed, 0, corpus, k]).permutation(size)
            take = perm[i : i + (start + n - pos)]
            out.append(take)
            pos += len(take)
        return np.concatenate(out)

    def indices(self, bs: int = 1, world: int = 1, rank: int = 0) -> list[int]:
        """What is left of the current epoch; with `world` processes, process `rank`'s share (see `shard_order`)."""
        left = self.epoch_order()[self.position :]
        return (left if world == 1 else shard_order(left, bs, world, rank)).tolist()

    def step_blocks(self, bs: int, world: int = 1) -> int:
        """Blocks the next optimizer micro-step takes from the epoch, over all processes."""
        return min(bs * world, len(self))

    def __len__(self) -> int:
        return self.plan.epoch_blocks - self.position

    def advance(self, n: int) -> None:
        """Record that `n` more training blocks were consumed; roll over at the end of an epoch."""
        self.position += n
        if self.position >= self.plan.epoch_blocks:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            'seed': self.seed,
            'epoch': self.epoch,
            'position': self.position,
            'draws': list(self.plan.draws),
            'stratified': self.stratified,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state['draws']) != list(self.plan.draws):
            raise ValueError(
                f'sampler state is for per-corpus draws {state["draws"]}, this mix draws {self.plan.draws}: '
                'resume with the same corpora, mix and seq_len'
            )
        self.seed, self.epoch, self.position = state['seed'], state['epoch'], state['position']
        self.stratified = state.get('stratified', self.stratified)
        self._cache = (None, None)
