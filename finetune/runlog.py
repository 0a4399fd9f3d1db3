"""Run logs: what a fit did, step by step, in `<run>/metrics.jsonl` and the trackers a user names; and its plot.

`MetricsLog` writes one JSON line every `log_every` optimizer steps (loss, learning rate per group,
gradient norm, epoch, tokens seen, tokens per second) and one per validation (loss, perplexity,
each corpus's perplexity). Keys follow the Hugging Face Trainer's names where one exists
(`train/loss`, `train/learning_rate`, `train/grad_norm`, `eval/loss`, `num_input_tokens_seen`).
Between log lines the figures are summed on the device: a log line is the only time the host
reads them, so logging adds no host sync per step. `report_to` sends the same figures to
TensorBoard, Weights & Biases, MLflow or trackio, each imported only when asked for. `lr_find`
writes nothing. `plot_run` draws the loss, learning-rate and per-corpus perplexity curves.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback

from .cache import atomic_write_text
from .distributed import all_reduce_sum, rank
from .loss import IGNORE_INDEX

__all__ = ['MetricsLog', 'REPORTERS', 'check_reporters', 'read_metrics', 'plot_run']

REPORTERS = {  # name: (module to import, pip package)
    'tensorboard': ('torch.utils.tensorboard', 'tensorboard'),
    'wandb': ('wandb', 'wandb'),
    'mlflow': ('mlflow', 'mlflow'),
    'trackio': ('trackio', 'trackio'),
}


def check_reporters(report_to) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = sorted(set(names) - set(REPORTERS))
    if unknown:
        raise ValueError(
            f'report_to={unknown}: known trackers are {sorted(REPORTERS)} (metrics.jsonl is always written)'
        )
    for name in names:
        module, package = REPORTERS[name]
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"report_to='{name}' needs the {package} package: pip install {package} ({e})") from e
    return names


class _Reporter:
    """One tracker: `log(figures, step)` and `close()`."""

    def __init__(self, name: str, run_dir: Path):
        self.name = name
        if name == 'tensorboard':
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / 'tensorboard'))
        elif name == 'wandb':
            import wandb

            self.run = wandb.init(dir=str(run_dir), name=run_dir.name, reinit='create_new')
        elif name == 'mlflow':
            import mlflow

            self.mlflow = mlflow
            self.run = mlflow.start_run(run_name=run_dir.name, nested=mlflow.active_run() is not None)
        elif name == 'trackio':
            import trackio

            self.trackio = trackio
            trackio.init(project='finetune', name=run_dir.name)

    def log(self, figures: dict, step: int) -> None:
        numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and k != 'step'}
        if self.name == 'tensorboard':
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        elif self.name == 'wandb':
            self.run.log(numbers, step=step)
        elif self.name == 'mlflow':
            self.mlflow.log_metrics(numbers, step=step)
        elif self.name == 'trackio':
            self.trackio.log(numbers, step=step)

    def close(self) -> None:
        if self.name == 'tensorboard':
            self.writer.close()
        elif self.name == 'wandb':
            self.run.finish()
        elif self.name == 'mlflow':
            self.mlflow.end_run()
        elif self.name == 'trackio':
            self.trackio.finish()


class MetricsLog(Callback):
    """Appends the fit's figures to `<run_dir>/metrics.jsonl` (and `report_to` trackers); see the module docstring."""

    order = 95  # after the recorder and the mix callback, before checkpoints
    name = 'metrics_log'

    def __init__(self, run_dir: str | os.PathLike, log_every: int = 10, report_to=None):
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f'log_every must be a whole number >= 1, got {log_every!r}')
        self.run_dir, self.log_every = Path(run_dir), log_every
        self.report_to = check_reporters(report_to)

    def before_fit(self):
        self.active = not hasattr(self.learn, 'lr_finder')
        self.procs = getattr(self.learn, 'world', 1)  # several processes: sums over all, process 0 writes
        self.writer = self.active and rank() == 0
        if self.active:
            self.names = list(getattr(self.dls, 'names', []))
            self._reset_window()
            self.seen = sum(getattr(self.dls, 'trained_tokens', [0]))
        if not self.writer:
            return
        if not self.run_dir.exists():
            print(f'this run writes its logs{" and checkpoints" if hasattr(self.learn, "checkpointer") else ""} '
                  f'to {self.run_dir}/')  # fmt: skip
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / 'metrics.jsonl'
        resumed = getattr(self.learn, '_resume', None)
        if resumed is not None and path.exists():  # lines the stopped run wrote after its checkpoint are redone
            kept = [line for line in read_metrics(path) if line['step'] <= resumed.step]
            atomic_write_text(path, ''.join(json.dumps(line) + '\n' for line in kept))
        self.file = open(path, 'a')
        self.reporters = [_Reporter(n, self.run_dir) for n in self.report_to]

    def _reset_window(self):
        self.loss_sum, self.batches, self.tokens = None, 0, None
        self.last_step, self.last_time = self.learn.opt_steps, time.perf_counter()

    def after_batch(self):
        if not (self.active and self.training) or not len(self.yb):
            return
        labels = self.yb[0]
        real = labels != IGNORE_INDEX
        if len(self.yb) > 1 and self.names:
            tokens = torch.zeros(len(self.names), dtype=torch.long, device=labels.device)
            tokens.index_add_(0, self.yb[1].long(), real.sum(-1))
        else:
            tokens = real.sum().reshape(1)
        loss = self.learn.loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.batches += 1
        steps = self.learn.opt_steps
        if steps != self.last_step and steps % self.log_every == 0:
            self._log_train()

    def _log_train(self):
        if self.tokens is None:
            return
        counts = all_reduce_sum(self.tokens) if self.procs > 1 else self.tokens
        tokens = counts.tolist()  # the host reads the device here, once per log line
        seconds = time.perf_counter() - self.last_time
        self.seen += sum(tokens)
        line = {
            'step': self.learn.opt_steps,
            'train/epoch': self.epoch + (self.iter + 1) / self.n_iter,
            'train/loss': float(self.loss_sum) / self.batches,
            'train/learning_rate': float(self.opt.hypers[-1]['lr']),
            **{f'train/learning_rate_group_{i}': float(h['lr']) for i, h in enumerate(self.opt.hypers)},
            'num_input_tokens_seen': self.seen,
            'train/tokens': sum(tokens),
            'train/tokens_per_second': sum(tokens) / seconds if seconds > 0 else None,
        }
        if len(tokens) == len(self.names):
            line.update({f'train/tokens_{n}': t for n, t in zip(self.names, tokens)})
        norm = getattr(self.learn.train_step, 'grad_norm', None)
        if norm is not None:
            line['train/grad_norm'] = float(norm)
        self._write(line)
        self.learn.train_step.check_finite()  # the host has read the device anyway: a NaN stops the fit here
        self._reset_window()

    def after_epoch(self):
        if not self.active:
            return
        self._log_train()  # the epoch's last steps, if they did not end on a log step
        names, values = self.recorder.metric_names[1:], self.recorder.log[1:]
        line = {'step': self.learn.opt_steps, 'train/epoch': self.epoch + 1}
        for name, value in zip(names, values):
            if name == 'valid_loss':
                line['eval/loss'] = _number(value)
            elif name == 'perplexity' or name.startswith('ppl_'):
                line[f'eval/{name}'] = _number(value)
        if len(line) > 2:
            self._write(line)

    def _write(self, line: dict) -> None:
        if not self.writer:
            return
        line = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
        self.file.write(json.dumps(line) + '\n')  # a NaN is written as null: strict JSON readers take it
        self.file.flush()
        for reporter in self.reporters:
            reporter.log(line, line['step'])

    def after_fit(self):  # also after a fit that failed: the lines written so far stay
        if getattr(self, 'writer', False) and not self.file.closed:
            self.file.close()
            for reporter in self.reporters:
                reporter.close()


def _number(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The lines of `<run>/metrics.jsonl` (or of that file itself)."""
    path = Path(run)
    path = path / 'metrics.jsonl' if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist: a fit writes it when the learner has a run_dir')
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f'{path} line {i + 1} is not JSON: {line[:80]!r}') from None
            # the last line of a process killed while writing it: dropped
    return out


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None):
    """Loss, learning rate and per-corpus validation perplexity against optimizer steps; saved to `out` if given."""
    import matplotlib.pyplot as plt

    lines = read_metrics(run)
    train = [r for r in lines if 'train/loss' in r]
    evals = [r for r in lines if any(k.startswith('eval/') for k in r)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([r['step'] for r in train], [r['train/loss'] for r in train])
    axes[0].set(title='training loss', xlabel='optimizer step')
    axes[1].plot([r['step'] for r in train], [r['train/learning_rate'] for r in train])
    axes[1].set(title='learning rate (last group)', xlabel='optimizer step')
    keys = sorted({k for r in evals for k in r if k.startswith('eval/p')})
    for key in keys:
        points = [(r['step'], r[key]) for r in evals if r.get(key) is not None]
        axes[2].plot(*zip(*points), marker='o', label=key[5:]) if points else None
    axes[2].set(title='validation perplexity', xlabel='optimizer step')
    if keys:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
