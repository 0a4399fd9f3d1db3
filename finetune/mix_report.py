"""The mix report: what a mix of corpora means for training, and what is wrong with it.

The one report on a mix, before training (`CorpusMix.report`, `lm_dataloaders`) and after
(`dls.mix_report()`, which adds the tokens trained). Per corpus: documents, tokens, training and
validation tokens, held-out documents, the weight or share asked for, the share of each epoch it
really gets, tokens and repeats per epoch, and the tokens dropped by packing. The diagnosis checks
the mix against `MixChecks` thresholds and says what to do; each finding is also raised as a
`UserWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .display import in_notebook, show_table

__all__ = ['MixChecks', 'MixReport', 'mix_report', 'diagnose']


@dataclass
class MixChecks:
    """Thresholds of the diagnosis."""

    min_target_share: float = 0.10  # the target domain should supply at least this share of training tokens
    max_repeats: float = 4.0  # repeating a corpus more often than this per epoch risks memorising it
    min_valid_blocks: int = 8  # fewer validation blocks than this give a noisy perplexity
    max_doc_share: float = 0.5  # one document holding more of a corpus's tokens than this dominates it
    max_bad_rate: float = 0.001  # unknown tokens plus replaced characters per token
    min_target_tokens: int = 100_000  # a target corpus with fewer training tokens is small: probe it

    def __post_init__(self):
        for name in ('min_target_share', 'max_doc_share', 'max_bad_rate'):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f'{name} is a fraction between 0 and 1, got {v}')
        if self.max_repeats <= 0 or self.min_valid_blocks < 0 or self.min_target_tokens < 0:
            raise ValueError('max_repeats must be positive, min_valid_blocks and min_target_tokens at least 0')


@dataclass
class MixReport:
    """The report's table, its findings, and notes about intended choices (such as zero weights)."""

    table: object  # a pandas DataFrame, one row per corpus
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def show(self) -> None:
        shown = self.table.copy()
        shown['epoch share'] = shown['epoch share'].map('{:.1%}'.format)
        shown['repeats'] = shown['repeats'].map('{:.2f}'.format)
        show_table(shown)
        if in_notebook():
            import matplotlib.pyplot as plt

            self.plot()
            plt.show()
        for line in self.notes:
            print('note:', line)
        for line in self.warnings:
            print('warning:', line)
        if not self.warnings:
            print('mix check: no problems found')

    def plot(self, ax=None):
        """Bars: each corpus's share of the training data beside its share of each epoch, with repeats."""
        import matplotlib.pyplot as plt

        t = self.table
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.6 * len(t) + 1.2))
        y = np.arange(len(t))
        data_share = t['train tokens'] / max(t['train tokens'].sum(), 1)
        ax.barh(y + 0.2, data_share, height=0.4, label='share of training data', color='#bbbbbb')
        ax.barh(y - 0.2, t['epoch share'], height=0.4, label='share of each epoch', color='#1f77b4')
        for i, r in enumerate(t['repeats']):
            ax.text(t['epoch share'].iloc[i], i - 0.2, f'  ×{r:.2g}', va='center', fontsize=8)
        ax.set_yticks(y, [f'{n} (target)' if tg else n for n, tg in zip(t['corpus'], t['target'])])
        ax.set_xlim(0, 1.1)
        ax.invert_yaxis()
        ax.set_xlabel('fraction of training tokens')
        ax.legend(loc='lower right', fontsize=8)
        ax.set_title('corpus mix')
        return ax


def _asked(mix, name: str) -> str:
    if name in mix.share:
        return f'share {mix.share[name]:.0%}'
    if mix.weights:
        return f'weight {mix.weights[name]:g}'
    return 'by size'


def mix_report(
    packed, trained_tokens: list[int] | None = None, show: bool = True, warn: bool = True, **checks
) -> MixReport:
    """Report on `packed` (a `PackedCorpora`); `checks` override `MixChecks` thresholds. Warns on each finding
    (unless `warn=False`: the findings stay in `report.warnings`)."""
    import pandas as pd

    mix, plan, seq_len = packed.mix, packed.plan, packed.seq_len
    ratio = packed.trained_ratios()
    epoch = max(sum(d * r for d, r in zip(plan.draws, ratio)), 1e-9)  # trained tokens per epoch, in blocks
    chat = any(s.store.mask is not None for s in packed.splits)
    rows = []
    for i, (s, c) in enumerate(zip(packed.splits, mix.corpora)):
        row = {
            'corpus': s.name,
            'target': bool(getattr(c, 'target', False)),
            'documents': s.store.n_docs,
            'tokens': s.store.n_tokens,
            'train tokens': s.train.n_tokens,
            'valid tokens': s.valid.n_tokens,
            'valid documents': s.valid_docs,
            'asked': _asked(mix, s.name),
            'epoch share': plan.draws[i] * ratio[i] / epoch,  # of the tokens the loss is taken on
            'tokens/epoch': plan.draws[i] * seq_len,
            'repeats': plan.repeats[i],
            'dropped tokens': s.dropped,
        }
        if chat:  # conversations: the loss is on the replies only
            row['format'] = getattr(c, 'format', 'text')
            row['loss tokens/epoch'] = round(plan.draws[i] * seq_len * ratio[i])
        if trained_tokens is not None and any(trained_tokens):
            row['trained tokens'] = trained_tokens[i]
        rows.append(row)
    table = pd.DataFrame(rows)
    notes = [
        f'corpus {n!r} has weight 0 (or no share left for it): it is left out of training and only validated'
        for n, d in zip(plan.names, plan.draws)
        if d == 0
    ]
    notes += [f'corpus {s.name!r}: {s.note}' for s in packed.splits if s.note]
    report = MixReport(table, diagnose(packed, MixChecks(**checks)), notes)
    for line in report.warnings if warn else []:
        warnings.warn(line, stacklevel=2)
    if show:
        report.show()
    return report


def diagnose(packed, checks: MixChecks) -> list[str]:
    """What is wrong with this mix, each finding with what to do about it."""
    mix, plan = packed.mix, packed.plan
    out = []
    ratio = packed.trained_ratios()
    epoch = max(sum(d * r for d, r in zip(plan.draws, ratio)), 1e-9)
    if getattr(packed.tokenizer, 'chat_template', None) and all(s.store.mask is None for s in packed.splits):
        out.append(
            'the tokenizer has a chat template (an instruct model) and no chat corpus is in the mix: fine-tuning it on '
            'raw text alone erodes how it follows instructions; add some conversations (a .jsonl of {"messages": '
            '[...]} records) with share=0.1 to 0.2 and watch their perplexity'
        )
    targets = [i for i, c in enumerate(mix.corpora) if getattr(c, 'target', False)]
    if not targets and len(mix.corpora) > 1:
        out.append(
            'no corpus is marked as the target domain: mark it with Corpus(..., target=True) so its share of '
            'training can be checked'
        )
    elif targets:
        share = sum(plan.draws[i] * ratio[i] for i in targets) / epoch
        if share < checks.min_target_share:
            names = [plan.names[i] for i in targets]
            out.append(
                f'the target domain {names} supplies {share:.1%} of training tokens, less than '
                f'{checks.min_target_share:.0%}: give it a share (share={{{names[0]!r}: 0.3}}) or a larger weight; '
                f'finetune.probe.share_sweep measures which share learns the domain without losing the rest'
            )
        for i in targets:
            n = packed.splits[i].train.n_trained
            if n < checks.min_target_tokens:
                out.append(
                    f'target corpus {plan.names[i]!r} has {n:,} training tokens, fewer than '
                    f'{checks.min_target_tokens:,}: run finetune.probe.target_data_curve to see whether more target '
                    'text would help before training on it'
                )
    for name, r in zip(plan.names, plan.repeats):
        if r > checks.max_repeats:
            out.append(
                f'corpus {name!r} is repeated {r:.1f} times per epoch (more than {checks.max_repeats:g}): the model '
                'may memorise it; lower its share or epoch_tokens, or add documents'
            )
    out += _duplicates(packed)
    for s in packed.splits:
        if len(s.valid) < checks.min_valid_blocks:
            out.append(
                f'corpus {s.name!r} has {len(s.valid)} validation block(s), fewer than {checks.min_valid_blocks}: its '
                'perplexity will be noisy; raise valid_pct or add documents'
            )
        meta = s.store.meta
        if s.store.n_docs > 1 and meta.get('max_doc_tokens', 0) > checks.max_doc_share * s.store.n_tokens:
            out.append(
                f"one document holds {meta['max_doc_tokens'] / s.store.n_tokens:.0%} of corpus {s.name!r}'s tokens: "
                'it dominates the corpus; split it (doc_sep=) or check that it belongs there'
            )
        bad = meta.get('n_unk', 0) + meta.get('read_stats', {}).get('replacements', 0)
        if s.store.n_tokens and bad > checks.max_bad_rate * s.store.n_tokens:
            out.append(
                f'corpus {s.name!r}: {bad:,} unknown tokens or replaced characters in {s.store.n_tokens:,} tokens '
                f"({bad / s.store.n_tokens:.2%}): check the files' encoding and that the tokenizer fits this text"
            )
    return out


def _duplicates(packed) -> list[str]:
    """Validation documents whose exact content also appears in training, in the same or another corpus."""
    train_hashes = []  # per corpus, the content hashes of its training documents
    for s in packed.splits:
        h = s.store.doc_hashes
        if not s.valid_docs and len(h):  # tail split: no document is wholly held out, none counts as training
            train_hashes.append(h[:0])
        else:
            train_hashes.append(np.delete(h, s.valid_doc_ids))
    out = []
    for s in packed.splits:
        if not s.valid_docs:
            continue
        valid = s.store.doc_hashes[s.valid_doc_ids]
        hits = [np.isin(valid, t) for t in train_hashes]
        found = int(np.logical_or.reduce(hits).sum())
        if found:
            where = [other.name for other, hit in zip(packed.splits, hits) if hit.any()]
            out.append(
                f'corpus {s.name!r}: {found} of {s.valid_docs} validation documents also appear in training '
                f'(in {where}): its perplexity is optimistic; remove the duplicates from the corpora'
            )
    return out
