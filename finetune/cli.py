"""The `finetune` command: a thin layer over the Python API for scripted runs.

    finetune quickstart                       fine-tune the embedded SmolLM2 on Python's docs
    finetune train config.toml [--flags]      corpora, mix, model, training, save (--resume: continue)
    finetune plot RUN                         the curves of a run, from its metrics.jsonl
    finetune eval MODEL --corpus NAME=PATH    per-corpus perplexity
    finetune generate MODEL "prompt"

Every argument and config key is checked, and every corpus path resolved, before a model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from .precision import PRECISIONS

__all__ = ['main', 'TrainConfig', 'CorpusSpec', 'load_config', 'validate', 'config_reference']


def _key(
    default=MISSING,
    help: str = '',
    lo=None,
    hi=None,
    above: bool = False,
    below: bool = False,
    choices=None,
    nonempty: bool = False,
    **kwargs,
):
    """A config key: its default, what it means and the values it takes (checked by `validate`, shown in --help)."""
    rule = {'help': help, 'lo': lo, 'hi': hi, 'above': above, 'below': below, 'choices': choices, 'nonempty': nonempty}
    return field(default=default, metadata=rule, **kwargs)


@dataclass
class CorpusSpec:
    """One `[[corpus]]` table: a name, a path, and optionally a weight or a share."""

    name: str = _key(help='the corpus name (reports, metrics)', nonempty=True)
    path: str = _key(help='a file, folder, glob, .jsonl/.csv/.parquet, or a saved dataset', nonempty=True)
    weight: float | None = _key(None, 'relative weight in trained tokens (0: validated only)', lo=0)
    share: float | None = _key(None, "fraction of each epoch's trained tokens", lo=0, hi=1)
    target: bool = _key(False, 'a target-domain corpus')
    text_field: str = _key('text', 'the text column of JSONL/Parquet/datasets', nonempty=True)
    doc_sep: str | None = _key(None, 'split files into documents at this string')
    format: str = _key('auto', 'what the records are', choices=['auto', 'text', 'chat', 'prompt_completion'])
    train_on: str = _key('assistant', 'chat corpora: the loss on the replies, or on every token',
                         choices=['assistant', 'all'])  # fmt: skip

    def __post_init__(self):
        validate(self, f'[[corpus]] {self.name!r}: ' if isinstance(self.name, str) else '[[corpus]]: ')
        if self.weight is not None and self.share is not None:
            raise ValueError(f'corpus {self.name!r} has both a weight and a share: give one')


@dataclass
class TrainConfig:
    """What `finetune train` does; the TOML keys and the flags have these names."""

    model: str = _key('smollm2-135m', 'embedded name, hub id, folder or .gguf', nonempty=True)
    corpus: list[CorpusSpec] = _key(help='[[corpus]] tables, or --corpus NAME=PATH flags', default_factory=list)
    seq_len: int = _key(512, 'tokens per training sequence', lo=1)
    bs: int = _key(8, 'sequences per batch, per process', lo=1)
    epochs: int = _key(1, 'epochs of the mix', lo=1)
    lr: float | None = _key(None, "peak learning rate; none: fine_tune's 2e-4 (head group), or 2e-4 with LoRA", lo=0,
                            above=True)  # fmt: skip
    precision: str = _key('auto', 'mixed precision (README, Mixed precision)', choices=list(PRECISIONS))
    lora: bool = _key(False, 'train LoRA adapters instead of all weights')
    compile: bool = _key(False, 'torch.compile the decoder blocks')
    out: str = _key('finetune-out', 'the run folder: metrics.jsonl, checkpoints/, model/', nonempty=True)
    seed: int = _key(42, 'held-out documents and the training order', lo=0)
    valid_pct: float = _key(0.05, "fraction of each corpus's documents held out", lo=0, hi=1, above=True, below=True)
    epoch_tokens: int | None = _key(None, 'tokens per epoch; none: every block once', lo=1)
    accum_steps: int = _key(1, 'micro-batches per optimizer step', lo=1)
    checkpoint_every: int | None = _key(None, 'optimizer steps between checkpoints in out/checkpoints/', lo=1)
    keep: int | None = _key(None, 'checkpoints kept, the newest; none keeps all', lo=1)
    log_every: int = _key(10, 'optimizer steps between lines of out/metrics.jsonl', lo=1)
    report_to: str | None = _key(None, 'trackers, comma-separated: tensorboard, wandb, mlflow, trackio', nonempty=True)

    def __post_init__(self):
        if not isinstance(self.corpus, list) or not all(isinstance(c, CorpusSpec) for c in self.corpus):
            raise ValueError('corpus: give [[corpus]] tables (name, path, ...) or --corpus NAME=PATH flags')
        if not self.corpus:
            raise ValueError('no corpora: add [[corpus]] tables to the config or --corpus NAME=PATH flags')
        validate(self)
        names = [c.name for c in self.corpus]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f'corpus names must differ: {repeated} appear more than once')


_KINDS = {int: 'a whole number', float: 'a number', str: 'a string', bool: 'true or false'}


def describe(cls, f) -> str:
    """The values key `f` of config class `cls` takes, in words: type, range or choices, and if it may be absent."""
    kind, optional = _kind(cls, f)
    rule = f.metadata
    if rule.get('choices'):
        text = f'one of {rule["choices"]}'
    else:
        text = _KINDS.get(kind, 'tables')
        lo, hi = rule.get('lo'), rule.get('hi')
        if lo is not None and hi is not None:
            text += f' in {"(" if rule["above"] else "["}{lo}, {hi}{")" if rule["below"] else "]"}'
        elif lo is not None:
            text += f' {">" if rule["above"] else ">="} {lo}'
        if rule.get('nonempty') and kind is str:
            text = 'a non-empty string'
    return text + (', or absent' if optional else '')


def _kind(cls, f):
    hint = get_type_hints(cls)[f.name]
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    return (args[0] if optional else hint), optional


def validate(obj, where: str = '') -> None:
    """Check every field of a config dataclass against its type and range; the error names the key and value."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        kind, optional = _kind(type(obj), f)
        if get_origin(hint) is list or (value is None and optional):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(obj, f.name, value)
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        rule = f.metadata
        if fits and rule.get('choices'):
            fits = value in rule['choices']
        if fits and kind in (int, float):
            lo, hi = rule.get('lo'), rule.get('hi')
            fits = (lo is None or (value > lo if rule['above'] else value >= lo)) and (
                hi is None or (value < hi if rule['below'] else value <= hi)
            )
        if fits and rule.get('nonempty'):
            fits = bool(value.strip())
        if not fits:
            raise ValueError(f'{where}{f.name} = {value!r}: must be {describe(type(obj), f)}')


def config_reference() -> str:
    """Every config key with its type, range and default, as the README's Markdown table."""
    rows = ['| key | values | default | what it sets |', '|---|---|---|---|']
    for cls, prefix in ((TrainConfig, ''), (CorpusSpec, '[[corpus]] ')):
        for f in fields(cls):
            if f.name == 'corpus':
                continue
            default = 'required' if f.default is MISSING else 'none' if f.default is None else json.dumps(f.default)
            rows.append(f'| `{prefix}{f.name}` | {describe(cls, f)} | {default} | {f.metadata["help"]} |')
    return '\n'.join(rows)


def _keys(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """A `TrainConfig` from a TOML file and flag overrides; unknown keys are errors that list the allowed ones."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f'config file {path} does not exist')
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f'{path} is not valid TOML: {e}') from None
    unknown = sorted(set(raw) - set(_keys(TrainConfig)))
    if unknown:
        raise ValueError(f'unknown config key(s) {unknown} in {path}; allowed: {_keys(TrainConfig)}')
    corpora, tables = [], raw.pop('corpus', [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(
            f'corpus = {tables!r} in {path}: corpora are tables, one per corpus: [[corpus]] then name = "..." and '
            'path = "..." on their own lines'
        )
    for i, table in enumerate(tables):
        bad = sorted(set(table) - set(_keys(CorpusSpec)))
        if bad:
            raise ValueError(f'unknown key(s) {bad} in [[corpus]] number {i + 1}; allowed: {_keys(CorpusSpec)}')
        missing = [k for k in ('name', 'path') if k not in table]
        if missing:
            raise ValueError(f'[[corpus]] number {i + 1} lacks {missing}')
        corpora.append(CorpusSpec(**table))
    raw.update({k: v for k, v in overrides.items() if v is not None and k != 'corpus'})
    corpora += overrides.get('corpus') or []
    return TrainConfig(corpus=corpora, **raw)


def _pairs(values: list[str] | None, what: str, convert=str) -> dict:
    out = {}
    for item in values or []:
        name, sep, value = item.partition('=')
        if not sep or not name or not value:
            raise ValueError(f'{what} {item!r}: write NAME=VALUE')
        try:
            out[name] = convert(value)
        except ValueError:
            raise ValueError(f'{what} {item!r}: {value!r} is not a number') from None
    return out


def _corpora_from_flags(a) -> list[CorpusSpec]:
    paths = _pairs(a.corpus, '--corpus')
    weights, shares = _pairs(a.weight, '--weight', float), _pairs(a.share, '--share', float)
    for what, given in (('--weight', weights), ('--share', shares), ('--target', dict.fromkeys(a.target or []))):
        unknown = sorted(set(given) - set(paths))
        if unknown and paths:
            raise ValueError(f'{what} names {unknown}, which are not corpora; the corpora are {sorted(paths)}')
    return [CorpusSpec(n, p, weights.get(n), shares.get(n), n in (a.target or [])) for n, p in paths.items()]


def build_mix(config: TrainConfig):
    """Corpora and their mix from the config: paths are checked and names validated here, before any model."""
    from .corpora import Corpus
    from .mix import CorpusMix

    corpora = []
    for spec in config.corpus:
        corpora.append(
            Corpus(
                spec.path,
                name=spec.name,
                text_field=spec.text_field,
                doc_sep=spec.doc_sep,
                target=spec.target,
                format=spec.format,
                train_on=spec.train_on,
            )  # fmt: skip
        )
    weights = {s.name: s.weight for s in config.corpus if s.weight is not None}
    share = {s.name: s.share for s in config.corpus if s.share is not None}
    return CorpusMix(corpora, weights=weights or None, share=share or None, epoch_tokens=config.epoch_tokens)


def train_config(a) -> TrainConfig:
    """The config of `finetune train`: the TOML file, then the flags given (an absent flag changes nothing)."""
    overrides = {k: getattr(a, k) for k in _keys(TrainConfig) if k != 'corpus' and getattr(a, k, None) is not None}
    overrides['corpus'] = _corpora_from_flags(a)
    return load_config(a.config, overrides)


def cmd_train(a) -> None:
    config = train_config(a)
    mix = build_mix(config)
    from .build import causal_lm_learner
    from .data import lm_dataloaders
    from .distributed import local_main_first, rank
    from .models import check_seq_len, load_model, load_tokenizer
    from .runlog import check_reporters

    out = Path(config.out)  # the run folder: metrics.jsonl, checkpoints/, and the model in model/
    if a.resume is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f'{out} exists and is not empty: choose another out, or pass --resume to continue its run'
        )
    if a.resume is not None and not out.is_dir():
        raise FileNotFoundError(f'--resume: the run folder {out} does not exist')
    report_to = [r.strip() for r in config.report_to.split(',')] if config.report_to else None
    check_reporters(report_to)  # before any model loads
    check_seq_len(config.model, config.seq_len, fix='pass --seq-len (or seq_len in the config) with')
    with local_main_first():  # several processes: one converts the embedded model, the others then load it
        tok, model = load_tokenizer(config.model), load_model(config.model)
    check_seq_len(model, config.seq_len, fix='pass --seq-len (or seq_len in the config) with')  # before tokenizing
    dls = lm_dataloaders(mix, tok, seq_len=config.seq_len, bs=config.bs, valid_pct=config.valid_pct, seed=config.seed)
    learn = causal_lm_learner(
        dls, model, precision=config.precision, lora=config.lora or None,
        accum_steps=config.accum_steps, lr=config.lr, compile=config.compile, run_dir=out,
        checkpoint_every=config.checkpoint_every, keep=config.keep, log_every=config.log_every, report_to=report_to,
    )  # fmt: skip
    learn.fine_tune(config.epochs, resume=a.resume)  # every group trains, discriminative LRs (measured defaults)
    saved = learn.save_pretrained(out / 'model', overwrite=True)
    if rank() == 0:
        dls.mix_report(warn=False)  # its findings were said before training; now with the tokens trained
        print(f'saved to {saved}')


def cmd_probe(a) -> None:
    config = train_config(a)
    mix = build_mix(config)
    from .models import check_seq_len, load_model, load_tokenizer
    from .probe import share_sweep, target_data_curve

    if a.steps is not None and a.steps < 1:
        raise ValueError(f'--steps must be at least 1, got {a.steps}')
    check_seq_len(config.model, config.seq_len, fix='pass --seq-len (or seq_len in the config) with')
    tok, model = load_tokenizer(config.model), load_model(config.model)
    common = dict(seq_len=config.seq_len, bs=config.bs, lr=config.lr, precision=config.precision,
                  lora=config.lora or None, valid_pct=config.valid_pct, seed=config.seed)  # fmt: skip
    if a.shares:
        result = share_sweep(mix, model, tok, shares=a.shares, tolerance=a.tolerance, steps=a.steps or 40, **common)
    else:
        result = target_data_curve(mix, model, tok, fractions=a.fractions, steps=a.steps, **common)
    print(result)
    if a.plot:
        import matplotlib

        matplotlib.use('Agg')
        result.plot().figure.savefig(a.plot, dpi=120, bbox_inches='tight')
        print(f'wrote {a.plot}')


def cmd_plot(a) -> None:
    from .runlog import plot_run

    out = Path(a.out) if a.out else Path(a.run) / 'curves.png'
    plot_run(a.run, out)
    print(f'wrote {out}')


def cmd_eval(a) -> None:
    from .corpora import Corpus
    from .display import show_table
    from .evaluate import corpus_perplexity
    from .models import load_model, load_tokenizer

    paths = _pairs(a.corpus, '--corpus')
    if not paths:
        raise ValueError('give at least one --corpus NAME=PATH')
    corpora = [Corpus(p, name=n) for n, p in paths.items()]
    model, tok = load_model(a.model), load_tokenizer(a.model)
    show_table(corpus_perplexity(model, tok, corpora, seq_len=a.seq_len, bs=a.bs, precision=a.precision,
                                 max_blocks=a.max_blocks))  # fmt: skip


def cmd_generate(a) -> None:
    from .generate import generate
    from .models import load_model, load_tokenizer

    model, tok = load_model(a.model), load_tokenizer(a.model)
    for text in generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                         temperature=a.temperature, top_p=a.top_p):  # fmt: skip
        print(text)


def cmd_quickstart(a) -> None:
    from .quickstart import run_quickstart

    run_quickstart(out=a.out, minutes=a.minutes, steps=a.steps, seq_len=a.seq_len, bs=a.bs, lr=a.lr,
                   precision=a.precision)  # fmt: skip


def cmd_cache(a) -> int:
    from .cache import cache_dir, remove_folder, sweep
    from .display import show_table
    from .tokens import token_stores

    root = cache_dir(a.cache)
    rows = token_stores(root, verify=a.action == 'verify')
    if a.action == 'clear':
        keys = set(a.keys)
        unknown = sorted(keys - {r['key'] for r in rows})
        if unknown:
            raise ValueError(f'no token store {unknown} in {root / "tokens"}: `finetune cache ls` lists them')
        freed = 0
        for row in rows:
            if not keys or row['key'] in keys:
                remove_folder(root / 'tokens' / row['key'])
                freed += row['bytes']
        for folder in ('tokens', 'tmp'):
            if (root / folder).is_dir():
                sweep(root / folder)  # what killed writers left behind
        print(f'removed {len(keys) or len(rows)} token store(s), {freed / 1e6:,.1f} MB, from {root / "tokens"}')
        return 0
    import pandas as pd

    if not rows:
        print(f'no token stores in {root / "tokens"}')
        return 0
    table = pd.DataFrame(rows)
    table['MB'] = (table.pop('bytes') / 1e6).round(1)
    show_table(table)
    others = {p.name: sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) for p in root.iterdir() if p.is_dir()}
    print(f'{root}: ' + ', '.join(f'{name} {size / 1e6:,.1f} MB' for name, size in sorted(others.items())))
    damaged = [r['key'] for r in rows if r['status'].startswith('damaged')]
    if damaged:
        print(f'{len(damaged)} damaged: `finetune cache clear {" ".join(damaged)}` removes them', file=sys.stderr)
    return 1 if damaged and a.action == 'verify' else 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _config_args(t) -> None:
    """The corpus flags and one flag per config key (train and probe read the same config)."""
    t.add_argument('--corpus', action='append', metavar='NAME=PATH', help='a corpus (repeat for several)')
    t.add_argument('--weight', action='append', metavar='NAME=W', help='relative weight in tokens')
    t.add_argument('--share', action='append', metavar='NAME=S', help="fraction of each epoch's tokens")
    t.add_argument('--target', action='append', metavar='NAME', help='mark a corpus as the target domain')
    for f in fields(TrainConfig):  # one flag per config key, its help from the key's own rule
        if f.name == 'corpus':
            continue
        kind, _ = _kind(TrainConfig, f)
        default = 'none' if f.default is None else json.dumps(f.default)
        help = f'{f.metadata["help"]}: {describe(TrainConfig, f)} (default {default})'
        flag = '--' + f.name.replace('_', '-')
        if kind is bool:
            t.add_argument(flag, dest=f.name, action='store_true', default=None, help=help)
        else:
            t.add_argument(flag, dest=f.name, type=kind, choices=f.metadata['choices'], help=help)


def parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = argparse.ArgumentParser(prog='finetune', description='Domain fine-tuning of causal LMs.', formatter_class=fmt)
    sub = p.add_subparsers(dest='command', required=True)

    q = sub.add_parser('quickstart', help="fine-tune the embedded SmolLM2-135M on Python's docs", formatter_class=fmt)
    q.add_argument('--out', default='finetune-quickstart', help='folder for the fine-tuned model')
    q.add_argument('--minutes', type=float, default=10, help='time budget for the whole run; steps are sized to it')
    q.add_argument('--steps', type=int, help='a fixed number of optimizer steps instead of the time budget')
    q.add_argument('--seq-len', dest='seq_len', type=int, default=256)
    q.add_argument('--bs', type=int, default=4)
    q.add_argument('--lr', type=float, help="fine_tune's peak LR (default: its own, 2e-4)")
    q.add_argument('--precision', choices=PRECISIONS, default='auto')
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser('train', help='train on corpora from flags or a TOML config',
                       description='Flags override the config file; the README lists every key.')  # fmt: skip
    t.add_argument('config', nargs='?', help='a TOML file with these keys and [[corpus]] tables')
    _config_args(t)
    t.add_argument('--resume', nargs='?', const='latest', metavar='CHECKPOINT',
                   help="continue the run in --out from its latest checkpoint (or the one named)")  # fmt: skip
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser('probe', help='would more target text help? which target share? short measured runs',
                        description='Reads the same config and flags as train (model, corpora, seq_len, bs, lr, '
                        'precision, lora, seed); the corpus marked target is probed.')  # fmt: skip
    pr.add_argument('config', nargs='?', help='a TOML file, as for train')
    _config_args(pr)
    pr.add_argument('--shares', nargs='+', type=float, metavar='S',
                    help='run a share sweep at these target shares instead of the data curve')  # fmt: skip
    pr.add_argument('--fractions', nargs='+', type=float, default=[0.125, 0.25, 0.5, 1.0], metavar='F',
                    help="fractions of the target's training documents (the data curve)")  # fmt: skip
    pr.add_argument('--steps', type=int,
                    help='steps of every run (default: one pass over the target; 40 for a sweep)')  # fmt: skip
    pr.add_argument('--tolerance', type=float, default=0.05, help='share sweep: how much worse the others may get')
    pr.add_argument('--plot', metavar='PNG', help='also write the plot here')
    pr.set_defaults(func=cmd_probe)

    pl = sub.add_parser('plot', help="a run's loss, learning-rate and perplexity curves, as a PNG", formatter_class=fmt)
    pl.add_argument('run', help='a run folder (with metrics.jsonl)')
    pl.add_argument('--out', help='the PNG to write (default RUN/curves.png)')
    pl.set_defaults(func=cmd_plot)

    e = sub.add_parser('eval', help='per-corpus perplexity of a model', formatter_class=fmt)
    e.add_argument('model', help='embedded name, hub id, folder or .gguf')
    e.add_argument('--corpus', action='append', metavar='NAME=PATH', required=True)
    e.add_argument(
        '--seq-len', dest='seq_len', type=int, default=512, help="tokens per block (at most the model's context)"
    )
    e.add_argument('--bs', type=int, default=8, help='blocks per forward pass')
    e.add_argument('--max-blocks', dest='max_blocks', type=int, default=None, help='blocks per corpus (none: all)')
    e.add_argument('--precision', choices=PRECISIONS, default='auto', help='evaluated under autocast to its dtype')
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser('generate', help='continue prompts', formatter_class=fmt)
    g.add_argument('model', help='embedded name, hub id, folder or .gguf')
    g.add_argument('prompt', nargs='+')
    g.add_argument(
        '--max-new-tokens',
        dest='max_new_tokens',
        type=int,
        help="tokens to add (default: the generation config's, else 64)",
    )
    g.add_argument('--sample', action='store_true', default=None,
                   help="sample (default: as the model's generation config says, else greedy)")  # fmt: skip
    g.add_argument('--greedy', dest='sample', action='store_false', help='greedy decoding, whatever the config says')
    g.add_argument('--temperature', type=float, help="sampling temperature (default: the model's generation config)")
    g.add_argument('--top-p', dest='top_p', type=float, help="nucleus sampling mass (default: the generation config's)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser('cache', help='list, verify or clear the token cache', formatter_class=fmt)
    c.add_argument('action', choices=['ls', 'verify', 'clear'],
                   help='ls: entries with sizes; verify: also check every checksum; clear: remove entries')  # fmt: skip
    c.add_argument('keys', nargs='*', help='clear: only these entries (default: every token store)')
    c.add_argument('--cache', help='the cache folder (default $FINETUNE_CACHE or ~/.cache/finetune)')
    c.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'finetune {args.command}: error: {e}', file=sys.stderr)
        return 2
    return code or 0


if __name__ == '__main__':
    sys.exit(main())
