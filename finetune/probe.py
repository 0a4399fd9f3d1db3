"""How much target-domain data is enough, and which share to train at: answered by short measured runs.

`target_data_curve` trains short runs from the same starting weights on nested document subsets of
the target corpus (the other corpora, the share and every validation set unchanged) and fits the
target's validation loss against its training tokens with a saturating power law,
`loss = E + A * D**-alpha`: does gathering more target text pay off? `share_sweep` trains short runs
at several target shares and fits each corpus's loss against the share with the data mixing law of
Ye et al. (2024), `loss = c + k * exp(t * share)`: which share learns the domain while keeping
general ability?

Both leave the user's model and corpora untouched (every run trains a copy; the token stores are
built once and each run's data is a view on them), print their cost before they start and the time
a step takes once measured, and show one progress bar over all runs.

How the fits are done, and when not to trust them:
- power law: for each `alpha` on a grid (0.02 to 2), `E` and `A` are the non-negative least-squares
  solution; the `alpha` with the smallest squared error wins. It needs 3 or more fractions. When all
  of the target gives a loss no more than `FLAT_LOSS` nats (1% of perplexity) below the smallest
  fraction's, or doubling is predicted to gain less than 1%, the curve is called flat; when R^2 < 0.8
  it is called too noisy to extrapolate; when a run draws fewer target tokens than the largest
  fraction holds, the runs are called too short to tell.
- mixing law: for each `t` on a grid (-10 to 10), `c` and `k` by least squares. With 4 or more shares
  one share is left out of a second fit, and the error of its prediction is reported.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .build import causal_lm_learner
from .data import LMDataLoaders
from .display import show_table
from .mix import CorpusMix, pack_corpora, plan_mix
from .packing import PackedCorpora, trained_ratios
from .tokens import PackedBlocks

__all__ = [
    'target_data_curve',
    'share_sweep',
    'DataCurve',
    'ShareSweep',
    'PowerLaw',
    'MixingLaw',
    'fit_power_law',
    'fit_mixing_law',
    'LORA_ABOVE',
]

LORA_ABOVE = 1_000_000_000  # parameters: above this a probe trains LoRA adapters unless told otherwise
FLAT_LOSS = 0.01  # nats: measured losses closer than this (1% of perplexity) are a flat curve
FLAT_GAIN = 0.01  # a predicted perplexity change from doubling smaller than this is flat


# --- the fits ---


@dataclass
class PowerLaw:
    """`loss = E + A * D**-alpha`, fitted to measured (tokens, loss) points."""

    E: float
    A: float
    alpha: float
    r2: float  # the fit's coefficient of determination on the measured points
    rmse: float  # nats

    def __call__(self, tokens):
        return self.E + self.A * np.asarray(tokens, dtype=float) ** -self.alpha


def fit_power_law(tokens, losses) -> PowerLaw:
    """Fit `loss = E + A * D**-alpha` (E, A >= 0): a grid over alpha, E and A by least squares for each."""
    d, y = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    if len(d) < 3 or len(d) != len(y) or np.any(d <= 0):
        raise ValueError(f'a power law needs 3 or more points with positive token counts, got {len(d)}')
    scale = d.max()  # fitted on D / max(D) for conditioning, A rescaled at the end
    best = None
    for alpha in np.linspace(0.02, 2.0, 397):
        f = (d / scale) ** -alpha
        a, e = np.polyfit(f, y, 1) if np.ptp(f) > 0 else (0.0, y.mean())
        if a < 0:
            a, e = 0.0, y.mean()
        if e < 0:
            e, a = 0.0, max(0.0, float(f @ y / (f @ f)))
        sse = float(((e + a * f - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, e, a * scale**alpha, alpha)
    sse, e, a, alpha = best
    total = float(((y - y.mean()) ** 2).sum())
    return PowerLaw(float(e), float(a), float(alpha), 1 - sse / total if total > 0 else 1.0, math.sqrt(sse / len(y)))


@dataclass
class MixingLaw:
    """`loss = c + k * exp(t * share)`, one corpus's validation loss against the target's share."""

    c: float
    k: float
    t: float
    rmse: float

    def __call__(self, share):
        return self.c + self.k * np.exp(self.t * np.asarray(share, dtype=float))


def fit_mixing_law(shares, losses) -> MixingLaw:
    """Fit `loss = c + k * exp(t * share)`: a grid over t, c and k by least squares for each."""
    s, y = np.asarray(shares, dtype=float), np.asarray(losses, dtype=float)
    if len(s) < 3:
        raise ValueError(f'a mixing law needs 3 or more shares, got {len(s)}')
    best = None
    for t in np.linspace(-10, 10, 401):
        f = np.exp(t * s)
        k, c = np.polyfit(f, y, 1) if np.ptp(f) > 0 else (0.0, y.mean())
        sse = float(((c + k * f - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, c, k, t)
    sse, c, k, t = best
    return MixingLaw(float(c), float(k), float(t), math.sqrt(sse / len(y)))


# --- the runs ---


def _probe_mix(mix: CorpusMix, epoch_tokens: int, seed: int, share: dict | None = None) -> CorpusMix:
    """The user's mix with the probe's epoch (its steps), seed and, for a sweep, the target's share."""
    shares = {**mix.share, **{n: 0.0 for n, w in mix.weights.items() if w == 0}, **(share or {})}  # 0: validated only
    weights = {n: w for n, w in mix.weights.items() if n not in shares} or None
    return CorpusMix(
        mix.corpora,
        weights=weights,
        share=shares or None,
        epoch_tokens=epoch_tokens,
        seed=seed,
        stratified=mix.stratified,
        force=True,
    )  # fmt: skip  (a small fraction may repeat a lot)


def _target_name(mix: CorpusMix, target: str | None) -> str:
    if target is not None:
        if target not in mix.names:
            raise ValueError(f'target {target!r} is not a corpus of the mix; the corpora are {mix.names}')
        return target
    marked = [c.name for c in mix.corpora if c.target]
    if len(marked) != 1:
        raise ValueError(
            f'the probe needs one target corpus; {len(marked)} of {mix.names} are marked target=True: mark one '
            '(Corpus(..., target=True)) or pass target=NAME'
        )
    return marked[0]


class _Runs:
    """Short runs on copies of one model, each from the same starting weights, timed and summed up."""

    def __init__(self, what, model, tokenizer, n_runs, steps, bs, seq_len, lr, lora, precision, max_valid_blocks,
                 seed, learner_kwargs):  # fmt: skip
        self.model, self.tokenizer, self.steps, self.bs, self.seq_len = model, tokenizer, steps, bs, seq_len
        self.lr, self.precision, self.max_valid_blocks, self.seed = lr, precision, max_valid_blocks, seed
        self.kwargs = learner_kwargs
        n_params = sum(p.numel() for p in model.parameters())
        self.lora = n_params > LORA_ABOVE if lora is None else lora
        self.step_time = None
        tokens = n_runs * steps * bs * seq_len
        print(
            f'{what}: {n_runs} runs x {steps} steps x {bs} x {seq_len} tokens = {tokens:,} training tokens '
            f'({"LoRA" if self.lora else "all weights"}, {n_params / 1e6:,.1f}M parameters), and {n_runs + 1} '
            'validations'
        )
        self.n_runs, self.start = n_runs, time.time()

    def run(self, packed: PackedCorpora, train: bool = True) -> dict[str, float]:
        """Each corpus's validation perplexity after `steps` steps on `packed` (none: the starting model's)."""
        from fastai.callback.core import Callback

        dls = LMDataLoaders.from_packed(packed, bs=self.bs, seed=self.seed, max_valid_blocks=self.max_valid_blocks)
        model = copy.deepcopy(self.model)  # the user's model is never trained
        runs = self

        class Timer(Callback):
            order, _n, _t0 = 100, 0, 0.0

            def after_step(self):
                self._n += 1
                if runs.step_time is None and self._n == 4:  # timed from the end of the first step (warm-up)
                    runs.measured((time.perf_counter() - self._t0) / 3)

            def before_train(self):
                self._n = 0

            def after_batch(self):
                if self._n == 1 and self.training:
                    self._t0 = time.perf_counter()

            def after_train(self):
                if runs.step_time is None and self._n >= 2:  # a run shorter than 4 steps: what it measured
                    runs.measured((time.perf_counter() - self._t0) / (self._n - 1))

        learn = causal_lm_learner(
            dls, model, tokenizer=self.tokenizer, precision=self.precision, lora=self.lora or None, lr=self.lr,
            cbs=[Timer()], **self.kwargs,
        )  # fmt: skip
        learn._say = lambda message: None  # one summary for all runs, not each run's phases
        with learn.no_bar(), learn.no_logging():
            if train:
                learn.fine_tune(1, freeze_epochs=0)  # the steps printed; a new head trains with the rest here
            values = learn.validate()
        names = list(packed.names)
        out = dict(zip(names, values[2:])) if len(names) > 1 else {names[0]: values[1]}
        del learn, model
        gc.collect()
        return {n: float(v) for n, v in out.items()}

    def measured(self, step_time: float) -> None:
        self.step_time = step_time
        left = step_time * self.steps * self.n_runs
        print(f'measured {step_time:.2f} s a step: about {left / 60:.1f} minutes of training in all')

    def bar(self, n: int):
        from fastprogress.fastprogress import progress_bar

        return progress_bar(range(n), total=n)

    def done(self) -> float:
        return (time.time() - self.start) / 60


def _packed(packed: PackedCorpora, splits, mix: CorpusMix) -> PackedCorpora:
    """The same token stores and validation sets, other training documents or another mix."""
    seq_len = packed.seq_len
    plan = plan_mix(mix, [len(s.train) for s in splits], seq_len, trained_ratios(splits, seq_len))
    return PackedCorpora(splits, packed.tokenizer, seq_len, mix, plan)


def _train_docs(split, name: str) -> list[tuple[int, int]]:
    """The token spans of a corpus's training documents (its validation documents left out)."""
    if not split.valid_docs:
        raise ValueError(
            f'corpus {name!r} has {split.store.n_docs} document(s): too few to hold any out whole, so its training '
            'text cannot be subset by documents; split it into more documents (doc_sep=) to probe it'
        )
    offsets = split.store.offsets
    held = set(split.valid_doc_ids.tolist())
    return [(int(offsets[i]), int(offsets[i + 1])) for i in range(split.store.n_docs) if i not in held]


# --- how much target data ---


@dataclass
class DataCurve:
    """What `target_data_curve` measured: a row per fraction, the fitted power law and the verdict."""

    target: str
    table: object  # a pandas DataFrame
    before: dict[str, float]  # each corpus's perplexity before training
    fit: PowerLaw | None
    verdict: str
    minutes: float

    def predict(self, tokens) -> np.ndarray:
        """The target's predicted validation perplexity after training on `tokens` target tokens."""
        if self.fit is None:
            raise ValueError(f'no curve was fitted: {self.verdict}')
        return np.exp(self.fit(tokens))

    def plot(self, ax=None):
        """Measured target perplexity against target training tokens (log scale), and the fitted curve to 10x."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        d, ppl = self.table['target tokens'].to_numpy(float), self.table[f'ppl {self.target}'].to_numpy(float)
        ax.plot(d, ppl, 'o', label='measured')
        if self.fit is not None:
            grid = np.geomspace(d.min(), d.max() * 10, 100)
            ax.plot(grid, self.predict(grid), '-', label=f'E + A D^-{self.fit.alpha:.2f} (R² {self.fit.r2:.2f})')
            ax.axvline(d.max(), color='grey', ls=':', lw=1)
        ax.set_xscale('log')
        ax.set(xlabel=f'{self.target} training tokens', ylabel=f'{self.target} validation perplexity')
        ax.set_title(self.verdict, fontsize=9, wrap=True)
        ax.legend()
        return ax

    def show(self) -> None:
        show_table(self.table)
        print(self.verdict)

    def __repr__(self) -> str:
        return f'{self.table.to_string(index=False)}\n{self.verdict}'


def _verdict(target: str, tokens, losses, fit: PowerLaw | None, passes: float, one_pass: int) -> str:
    d_max = float(np.max(tokens))
    if passes < 1:  # every fraction above the run's draw trains on fresh text only: the curve is flat by design
        return (
            f'the runs are too short to tell: each trains on {passes:.0%} of the {d_max:,.0f} {target} training '
            f'tokens, so more of them could not change it; probe with steps={one_pass} (one pass over the target), '
            'or train longer before gathering more'
        )
    if losses[0] - losses[-1] < FLAT_LOSS:  # all of the text teaches no more than the smallest fraction of it
        return (
            f'the curve is flat: {d_max:,.0f} tokens of {target} give no lower perplexity than {np.min(tokens):,.0f} '
            "(within 1%); more of the same text will not help: look at the mix or the text's quality"
        )
    if fit is None:
        return 'too few fractions to fit a curve: measure 3 or more'
    if fit.r2 < 0.8:
        return (
            f'the measured points do not follow a power law (R² {fit.r2:.2f}): too noisy to extrapolate; train more '
            'steps per run or validate on more blocks (max_valid_blocks)'
        )
    now = float(fit(d_max))
    gain2, gain10 = 1 - math.exp(float(fit(2 * d_max)) - now), 1 - math.exp(float(fit(10 * d_max)) - now)
    if gain2 < FLAT_GAIN:
        return (
            f'the curve is flat: 2x the {target} text is predicted to lower its perplexity by {gain2:.1%}; more of '
            "the same text will not help: look at the mix or the text's quality"
        )
    return (
        f'gather more target text: 2x is predicted to lower {target} perplexity by {gain2:.0%} (10x: by {gain10:.0%})'
    )


def target_data_curve(
    mix,  # a CorpusMix (or a list of corpora) with one target corpus
    model,  # a loaded AutoModelForCausalLM (never trained itself: each run trains a copy)
    tokenizer,
    fractions=(0.125, 0.25, 0.5, 1.0),  # of the target's training documents, nested (a smaller is part of a larger)
    steps: int | None = None,  # optimizer steps of every run; default: one pass over the whole target at its share
    seq_len: int = 256,
    bs: int = 4,
    lr: float | None = None,  # default: the learner's (1e-4, or 2e-4 with LoRA)
    lora: bool | None = None,  # default: LoRA for models above LORA_ABOVE parameters
    precision: str = 'auto',
    target: str | None = None,  # default: the corpus marked target=True
    valid_pct: float = 0.05,
    max_valid_blocks: int | None = 8,  # validation blocks per corpus: more is slower and less noisy
    cache=None,
    seed: int = 42,
    **learner_kwargs,  # passed to causal_lm_learner
) -> DataCurve:
    """Would more target text help? Short runs on nested fractions of the target's documents, and a power law."""
    import pandas as pd

    mix = mix if isinstance(mix, CorpusMix) else CorpusMix(mix)
    target = _target_name(mix, target)
    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f'fractions must be in (0, 1], got {fractions}')
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f'steps must be a whole number >= 1, got {steps!r}')
    batch = bs * seq_len
    packed = pack_corpora(_probe_mix(mix, 1000 * batch, seed), tokenizer, seq_len, valid_pct, seed, cache)
    t = packed.names.index(target)
    split = packed.splits[t]
    if not packed.plan.draws[t]:
        raise ValueError(f'corpus {target!r} has a weight or share of 0: the probe needs a target that trains')
    one_pass = math.ceil(1000 * len(split.train) / packed.plan.draws[t])  # steps that draw every target block once
    steps = one_pass if steps is None else steps
    # every fraction trains the target at the share the whole corpus gets (a mix by size would shrink it)
    fixed = _probe_mix(mix, steps * batch, seed, {target: packed.plan.fractions[t]})
    docs = _train_docs(split, target)
    order = np.random.default_rng(seed).permutation(len(docs))
    subsets = []
    for f in fractions:
        k = max(1, math.ceil(f * len(docs)))
        train = PackedBlocks(split.store.ids, sorted(docs[i] for i in order[:k]), seq_len, split.store.mask)
        if not len(train):
            raise ValueError(
                f'fraction {f:g} of corpus {target!r} keeps {k} of its {len(docs)} training documents, '
                f'{train.n_tokens:,} tokens: fewer than one block of seq_len={seq_len} + 1; drop that fraction'
            )
        splits = [*packed.splits[:t], replace(split, train=train), *packed.splits[t + 1 :]]
        subsets.append((f, k, train, _packed(packed, splits, fixed)))
    runs = _Runs('target_data_curve', model, tokenizer, len(fractions), steps, bs, seq_len, lr, lora, precision,
                 max_valid_blocks, seed, learner_kwargs)  # fmt: skip
    before = runs.run(_packed(packed, packed.splits, fixed), train=False)
    rows = []
    for i in runs.bar(len(subsets)):
        f, k, train, sub = subsets[i]
        ppl = runs.run(sub)
        repeats = sub.plan.draws[t] / max(len(train), 1)
        rows.append({'fraction': f, 'target docs': k, 'target tokens': train.n_trained, 'repeats per epoch': repeats,
                     **{f'ppl {n}': v for n, v in ppl.items()}})  # fmt: skip
    table = pd.DataFrame(rows)
    tokens, losses = table['target tokens'].to_numpy(float), np.log(table[f'ppl {target}'].to_numpy(float))
    fit = fit_power_law(tokens, losses) if len(rows) >= 3 else None
    verdict = _verdict(target, tokens, losses, fit, float(table['repeats per epoch'].iloc[-1]), one_pass)
    return DataCurve(target, table, before, fit, verdict, runs.done())


# --- which share ---


@dataclass
class ShareSweep:
    """What `share_sweep` measured: a row per target share, each corpus's mixing law, and the recommendation."""

    target: str
    table: object  # a pandas DataFrame
    before: dict[str, float]
    laws: dict[str, MixingLaw]
    tolerance: float
    recommended: float | None  # the share to train at
    predicted: dict[str, float]  # each corpus's predicted perplexity there
    held_out_error: float | None  # the largest error (in perplexity) of a fit predicting a share it did not see
    recommendation: str
    minutes: float

    def plot(self, ax=None, general: str | None = None):
        """Target perplexity against a general corpus's (one point per share), the fitted trade-off and the limit."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        others = [n for n in self.before if n != self.target]
        general = general or others[0]
        x, y = self.table[f'ppl {general}'].to_numpy(float), self.table[f'ppl {self.target}'].to_numpy(float)
        ax.plot(x, y, 'o', label='measured')
        for share, a, b in zip(self.table['share'], x, y):
            ax.annotate(f'{share:g}', (a, b), textcoords='offset points', xytext=(4, 4), fontsize=8)
        if self.laws:
            grid = np.linspace(self.table['share'].min(), self.table['share'].max(), 100)
            ax.plot(np.exp(self.laws[general](grid)), np.exp(self.laws[self.target](grid)), '-', label='mixing law')
        ax.axvline(self.before[general] * (1 + self.tolerance), color='grey', ls=':',
                   label=f'{general} +{self.tolerance:.0%} over the untrained model')  # fmt: skip
        if self.recommended is not None:
            ax.plot(self.predicted[general], self.predicted[self.target], '*', ms=12,
                    label=f'recommended share {self.recommended:.2f}')  # fmt: skip
        ax.set(xlabel=f'{general} perplexity', ylabel=f'{self.target} perplexity')
        ax.legend(fontsize=8)
        return ax

    def show(self) -> None:
        show_table(self.table)
        print(self.recommendation)

    def __repr__(self) -> str:
        return f'{self.table.to_string(index=False)}\n{self.recommendation}'


def _recommend(target, shares, before, laws, tolerance) -> tuple[float | None, dict, str]:
    """The share with the lowest predicted target perplexity whose other corpora stay within the tolerance."""
    grid = np.round(np.arange(min(shares), max(shares) + 1e-9, 0.01), 2)
    pred = {n: np.exp(law(grid)) for n, law in laws.items()}
    others = [n for n in laws if n != target]
    ok = np.ones(len(grid), dtype=bool)
    for n in others:
        ok &= pred[n] <= before[n] * (1 + tolerance)
    if not ok.any():
        worst = max(others, key=lambda n: float(pred[n].min() / before[n]))
        text = (
            f'no share between {min(shares):g} and {max(shares):g} keeps every other corpus within '
            f'+{tolerance:.0%} of its untrained perplexity ({worst!r} is the one that suffers): add general text or '
            'chat replay to the mix, train fewer steps, or raise the tolerance'
        )
        return None, {}, text
    i = int(np.argmin(np.where(ok, pred[target], np.inf)))
    at = {n: float(p[i]) for n, p in pred.items()}
    kept = ', '.join(f'{n} {at[n]:.2f} ({at[n] / before[n] - 1:+.1%})' for n in others)
    text = (
        f'train at share {grid[i]:.2f}: {target} perplexity {at[target]:.2f} predicted '
        f'({at[target] / before[target] - 1:+.1%}), the others within +{tolerance:.0%}: {kept}'
    )
    return float(grid[i]), at, text


def share_sweep(
    corpora,  # a CorpusMix (the others keep their weights, or the proportions of their shares) or a list of corpora
    model,
    tokenizer,
    shares=(0.1, 0.3, 0.5, 0.7, 0.9),  # target shares of training tokens
    tolerance: float = 0.05,  # how much worse than the untrained model the other corpora may get (+5%)
    steps: int = 40,
    seq_len: int = 256,
    bs: int = 4,
    lr: float | None = None,
    lora: bool | None = None,
    precision: str = 'auto',
    target: str | None = None,
    valid_pct: float = 0.05,
    max_valid_blocks: int | None = 8,
    cache=None,
    seed: int = 42,
    **learner_kwargs,
) -> ShareSweep:
    """Which target share? Short runs at each share, a mixing law per corpus, the best share within the tolerance."""
    import pandas as pd

    mix = corpora if isinstance(corpora, CorpusMix) else CorpusMix(corpora)
    target = _target_name(mix, target)
    if len(mix.corpora) < 2:
        raise ValueError('a share sweep needs the target and at least one other corpus')
    idle = [n for n in mix.names if n != target and (mix.share.get(n) == 0 or mix.weights.get(n) == 0)]
    if len(idle) == len(mix.names) - 1:
        raise ValueError(f'every corpus but the target ({idle}) has a weight or share of 0: nothing to sweep against')
    if all(n in mix.share for n in mix.names if n != target):  # the target's share must come from somewhere:
        others = {n: v for n, v in mix.share.items() if n != target}  # the others keep their proportions
        weights = {**others, target: max(0.0, 1 - sum(others.values()))}
        mix = CorpusMix(mix.corpora, weights=weights, seed=mix.seed, stratified=mix.stratified)
    fixed = sum(v for n, v in mix.share.items() if n != target)
    shares = sorted(float(s) for s in shares)
    if not shares or shares[0] <= 0 or shares[-1] > 1 - fixed + 1e-9:
        raise ValueError(
            f'shares must be in (0, {1 - fixed:g}]: the other corpora hold fixed shares summing to {fixed:g}; '
            f'got {shares}'
        )
    if not tolerance >= 0:
        raise ValueError(f'tolerance must be a fraction >= 0 (0.05: +5%), got {tolerance!r}')
    epoch = steps * bs * seq_len
    packed = pack_corpora(_probe_mix(mix, epoch, seed), tokenizer, seq_len, valid_pct, seed, cache)
    runs = _Runs('share_sweep', model, tokenizer, len(shares), steps, bs, seq_len, lr, lora, precision,
                 max_valid_blocks, seed, learner_kwargs)  # fmt: skip
    before = runs.run(packed, train=False)
    rows = []
    for i in runs.bar(len(shares)):
        sub = _packed(packed, packed.splits, _probe_mix(mix, epoch, seed, {target: shares[i]}))
        ppl = runs.run(sub)
        rows.append({'share': shares[i], **{f'ppl {n}': v for n, v in ppl.items()}})
    table = pd.DataFrame(rows)
    for n in packed.names:
        if n != target:
            table[f'{n} within +{tolerance:.0%}'] = table[f'ppl {n}'] <= before[n] * (1 + tolerance)
    laws, error = {}, None
    if len(shares) >= 3:
        losses = {n: np.log(table[f'ppl {n}'].to_numpy(float)) for n in packed.names}
        laws = {n: fit_mixing_law(shares, y) for n, y in losses.items()}
        if len(shares) >= 4:  # leave the middle share out, predict it
            m = len(shares) // 2
            keep = [j for j in range(len(shares)) if j != m]
            error = max(
                abs(math.exp(float(fit_mixing_law(np.take(shares, keep), y[keep])(shares[m])) - y[m]) - 1)
                for y in losses.values()
            )
        recommended, predicted, text = _recommend(target, shares, before, laws, tolerance)
        if error is not None:
            text += f'; the fit predicts a share it did not see within {error:.1%} of the measured perplexity'
    else:
        recommended, predicted = None, {}
        text = 'too few shares to fit the mixing law (3 or more): read the table'
    return ShareSweep(target, table, before, laws, tolerance, recommended, predicted, error, text, runs.done())
