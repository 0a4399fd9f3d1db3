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
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .precision import PRECISIONS

__all__ = ['main', 'TrainConfig', 'load_config']


@dataclass
class CorpusSpec:
    """One `[[corpus]]` table: a name, a path, and optionally a weight or a share."""

    name: str
    path: str
    weight: float | None = None
    share: float | None = None
    target: bool = False
    text_field: str = 'text'
    doc_sep: str | None = None


@dataclass
class TrainConfig:
    """What `finetune train` does; the TOML keys and the flags have these names."""

    model: str = 'smollm2-135m'
    corpus: list[CorpusSpec] = field(default_factory=list)
    seq_len: int = 512
    bs: int = 8
    epochs: int = 1
    lr: float | None = None
    precision: str = 'auto'
    lora: bool = False
    compile: bool = False
    out: str = 'finetune-out'
    seed: int = 42
    valid_pct: float = 0.05
    epoch_tokens: int | None = None
    accum_steps: int = 1
    checkpoint_every: int | None = None  # optimizer steps between checkpoints in out/checkpoints/
    keep: int | None = None  # checkpoints kept (the newest)
    log_every: int = 10  # optimizer steps between lines of out/metrics.jsonl
    report_to: str | None = None  # also log to these trackers (comma-separated): tensorboard, wandb, mlflow, trackio

    def __post_init__(self):
        if not self.corpus:
            raise ValueError('no corpora: add [[corpus]] tables to the config or --corpus NAME=PATH flags')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision={self.precision!r}: allowed values are {list(PRECISIONS)}')
        for key in ('seq_len', 'bs', 'epochs', 'accum_steps', 'log_every', 'checkpoint_every', 'keep'):
            value = getattr(self, key)
            if value is None and key in ('checkpoint_every', 'keep'):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{key}={value!r}: must be a whole number >= 1')
        for spec in self.corpus:
            if spec.weight is not None and spec.share is not None:
                raise ValueError(f'corpus {spec.name!r} has both a weight and a share: give one')


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
    corpora = []
    for i, table in enumerate(raw.pop('corpus', [])):
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
            Corpus(spec.path, name=spec.name, text_field=spec.text_field, doc_sep=spec.doc_sep, target=spec.target)
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
    from .data import lm_dataloaders
    from .distributed import local_main_first, rank
    from .learner import causal_lm_learner
    from .models import load_model, load_tokenizer

    out = Path(config.out)  # the run folder: metrics.jsonl, checkpoints/, and the model in model/
    if a.resume is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f'{out} exists and is not empty: choose another out, or pass --resume to continue its run'
        )
    if a.resume is not None and not out.is_dir():
        raise FileNotFoundError(f'--resume: the run folder {out} does not exist')
    report_to = [r.strip() for r in config.report_to.split(',')] if config.report_to else None
    with local_main_first():  # several processes: one converts the embedded model, the others then load it
        tok, model = load_tokenizer(config.model), load_model(config.model)
    dls = lm_dataloaders(mix, tok, seq_len=config.seq_len, bs=config.bs, valid_pct=config.valid_pct, seed=config.seed)
    learn = causal_lm_learner(
        dls, model, precision=config.precision, lora=config.lora or None,
        accum_steps=config.accum_steps, lr=config.lr, compile=config.compile, run_dir=out,
        checkpoint_every=config.checkpoint_every, keep=config.keep, log_every=config.log_every, report_to=report_to,
    )  # fmt: skip
    learn.fit_one_cycle(config.epochs, resume=a.resume)
    saved = learn.save_pretrained(out / 'model', overwrite=True)
    if rank() == 0:
        dls.mix_report()
        print(f'saved to {saved}')


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

    run_quickstart(out=a.out, steps=a.steps, seq_len=a.seq_len, bs=a.bs, lr=a.lr, precision=a.precision)


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog='finetune', description='Domain fine-tuning of causal LMs.', formatter_class=fmt)
    sub = p.add_subparsers(dest='command', required=True)

    q = sub.add_parser('quickstart', help="fine-tune the embedded SmolLM2-135M on Python's docs", formatter_class=fmt)
    q.add_argument('--out', default='finetune-quickstart', help='folder for the fine-tuned model')
    q.add_argument('--steps', type=int, default=80, help='optimizer steps')
    q.add_argument('--seq-len', dest='seq_len', type=int, default=256)
    q.add_argument('--bs', type=int, default=4)
    q.add_argument('--lr', type=float, default=1e-4)
    q.add_argument('--precision', choices=PRECISIONS, default='auto')
    q.set_defaults(func=cmd_quickstart)

    keys = ', '.join(_keys(TrainConfig))
    t = sub.add_parser('train', help='train on corpora from flags or a TOML config', formatter_class=fmt,
                       description=f'Flags override the config file. Keys: {keys}')  # fmt: skip
    t.add_argument('config', nargs='?', help='a TOML file with these keys and [[corpus]] tables')
    t.add_argument('--model', help=f'embedded name, hub id, folder or .gguf (default {TrainConfig.model})')
    t.add_argument('--corpus', action='append', metavar='NAME=PATH', help='a corpus (repeat for several)')
    t.add_argument('--weight', action='append', metavar='NAME=W', help='relative weight in tokens')
    t.add_argument('--share', action='append', metavar='NAME=S', help="fraction of each epoch's tokens")
    t.add_argument('--target', action='append', metavar='NAME', help='mark a corpus as the target domain')
    for key, typ in (('seq_len', int), ('bs', int), ('epochs', int), ('lr', float), ('seed', int),
                     ('valid_pct', float), ('epoch_tokens', int), ('accum_steps', int), ('checkpoint_every', int),
                     ('keep', int), ('log_every', int)):  # fmt: skip
        t.add_argument('--' + key.replace('_', '-'), dest=key, type=typ,
                       help=f'default {getattr(TrainConfig, key, None)}')  # fmt: skip
    t.add_argument('--precision', choices=PRECISIONS, help="default 'auto'")
    t.add_argument('--lora', action='store_true', default=None, help='train LoRA adapters (default: all weights)')
    t.add_argument(
        '--compile', action='store_true', default=None, help='torch.compile the decoder blocks (faster after ~20 s)'
    )
    t.add_argument(
        '--report-to', dest='report_to', help='trackers, comma-separated: tensorboard, wandb, mlflow, trackio'
    )
    t.add_argument('--out', help=f'the run folder: metrics.jsonl, checkpoints/, model/ (default {TrainConfig.out})')
    t.add_argument('--resume', nargs='?', const='latest', metavar='CHECKPOINT',
                   help="continue the run in --out from its latest checkpoint (or the one named)")  # fmt: skip
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser('plot', help="a run's loss, learning-rate and perplexity curves, as a PNG", formatter_class=fmt)
    pl.add_argument('run', help='a run folder (with metrics.jsonl)')
    pl.add_argument('--out', help='the PNG to write (default RUN/curves.png)')
    pl.set_defaults(func=cmd_plot)

    e = sub.add_parser('eval', help='per-corpus perplexity of a model', formatter_class=fmt)
    e.add_argument('model', help='embedded name, hub id, folder or .gguf')
    e.add_argument('--corpus', action='append', metavar='NAME=PATH', required=True)
    e.add_argument('--seq-len', dest='seq_len', type=int, default=512)
    e.add_argument('--bs', type=int, default=8)
    e.add_argument('--max-blocks', dest='max_blocks', type=int, default=None, help='blocks per corpus (default all)')
    e.add_argument('--precision', choices=PRECISIONS, default='auto')
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser('generate', help='continue prompts', formatter_class=fmt)
    g.add_argument('model', help='embedded name, hub id, folder or .gguf')
    g.add_argument('prompt', nargs='+')
    g.add_argument('--max-new-tokens', dest='max_new_tokens', type=int, default=64)
    g.add_argument('--sample', action='store_true', help='sample instead of greedy decoding')
    g.add_argument('--temperature', type=float, default=1.0)
    g.add_argument('--top-p', dest='top_p', type=float, default=1.0)
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'finetune {args.command}: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
