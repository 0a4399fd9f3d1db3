"""Checkpoints of a run: everything a fit needs to go on exactly where it stopped, in safetensors and JSON only.

A checkpoint is a folder `<run>/checkpoints/step-N/` (N counts optimizer steps) holding:
- `model.safetensors`: the trainable state (every weight, or only the LoRA adapters' with LoRA);
- `optimizer.safetensors` + the `optimizer` entry of `state.json`: the optimizer's tensors and the
  rest of its state dict (param groups, fastai's per-parameter flags);
- `rng.safetensors`: torch's CPU and CUDA generator states;
- `state.json`: where the fit is (fit arguments, epoch, batches done in it, optimizer steps,
  `pct_train`), Python's and numpy's generator states, the mix sampler's state, the recorder's
  history and smoothed loss, trained tokens per corpus, the fp16 scaler, and what must match to
  resume (token-store hashes, model, batch size, library versions);
- `manifest.json`: the SHA-256 of every file above; written last of all, it marks the checkpoint
  complete.

The folder is written through `cache.atomic_folder`, so a process killed while saving leaves no
half-written `step-N`. Loading checks every file against the manifest first and reads no pickle.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from safetensors.torch import load_file, save_file

from .cache import atomic_folder, remove_folder, sha256_file, sweep
from .callbacks import MixCallback
from .data import LMDataLoaders
from .distributed import rank

__all__ = [
    'Checkpoint',
    'SaveCheckpoint',
    'ResumeCallback',
    'save_checkpoint',
    'read_checkpoint',
    'find_checkpoint',
    'checkpoints_in',
    'learner_state',
    'restore_learner',
    'learner_identity',
    'jsonable',
    'new_run_dir',
    'MANIFEST',
]

MANIFEST = 'manifest.json'
FILES = ('model.safetensors', 'optimizer.safetensors', 'rng.safetensors', 'state.json')
FORMAT = 1


@dataclass
class Checkpoint:
    """A complete checkpoint read back: tensors by file, and the JSON state."""

    path: Path
    state: dict
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.state['position']['step']


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python's, numpy's and torch's generator states: the JSON part and the tensor part."""
    version, values, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f'cuda.{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    plain = {
        'python': [version, list(values), gauss],
        'numpy': [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, values, gauss = plain['python']
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = plain['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors['torch'])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith('cuda.'))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """A torch optimizer's state dict split into JSON (groups, flags) and tensors (moments, step counts)."""
    sd = opt.state_dict()
    tensors, plain_state = {}, {}
    for idx, entry in sd['state'].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f'{idx}.{name}'] = value.detach().contiguous().cpu()
            else:
                plain_state.setdefault(str(idx), {})[name] = value
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd['param_groups']]
    return {'param_groups': groups, 'state': plain_state}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split('.', 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in plain['state'].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: (tuple(v) if k == 'betas' else v) for k, v in g.items()} for g in plain['param_groups']]
    opt.load_state_dict({'state': state, 'param_groups': groups})  # casts and moves tensors to each parameter


def _plain(v):
    """numpy and torch scalars as Python numbers (also `json.dumps`'s fallback for anything else it meets)."""
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, float, str, bool, dict)) or v is None:
        return v
    raise TypeError(f'{type(v).__name__} cannot be stored in a checkpoint')


def save_checkpoint(
    folder: Path, state: dict, model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], keep: int | None
) -> Path:
    """Write checkpoint `folder` atomically (manifest last), then delete all but the `keep` newest complete ones."""
    plain_rng, rng_tensors = rng_state()
    state = {**state, 'format': FORMAT, 'rng': plain_rng}
    with atomic_folder(folder, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, tmp / 'model.safetensors')
        save_file(optimizer, tmp / 'optimizer.safetensors')
        save_file(rng_tensors, tmp / 'rng.safetensors')
        (tmp / 'state.json').write_text(json.dumps(state, indent=1, default=_plain))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({name: sha256_file(tmp / name) for name in files}, indent=1))
    sweep(folder.parent)  # what killed saves and deletions left behind
    if keep is not None:
        for old in checkpoints_in(folder.parent)[:-keep]:
            remove_folder(old)  # hidden first: a kill never leaves a half-deleted step-N in view
    return folder


def checkpoints_in(folder: Path) -> list[Path]:
    """The complete checkpoints (`step-N` with a manifest) in `folder`, oldest first."""
    found = []
    for p in Path(folder).glob('step-*'):
        m = re.fullmatch(r'step-(\d+)', p.name)
        if m and (p / MANIFEST).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(where: str | Path, run_dir: Path | None) -> Path:
    """`'latest'`: the newest complete checkpoint of the run (incomplete ones skipped with a warning); else a path."""
    if where != 'latest':
        path = Path(where).expanduser()
        if path.name == MANIFEST:
            path = path.parent
        if not (path / MANIFEST).exists():
            found = checkpoints_in(path / 'checkpoints') or checkpoints_in(path)
            if not found:
                raise FileNotFoundError(
                    f'{path} is not a complete checkpoint (no {MANIFEST}), nor a run folder with one'
                )
            return found[-1]
        return path
    if run_dir is None:
        raise ValueError("resume='latest' needs the learner's run_dir: pass run_dir= to causal_lm_learner")
    folder = Path(run_dir) / 'checkpoints'
    incomplete = [p.name for p in folder.glob('step-*') if not (p / MANIFEST).exists()] if folder.is_dir() else []
    if incomplete:
        warnings.warn(f'skipping incomplete checkpoint(s) {sorted(incomplete)} in {folder}', stacklevel=3)
    found = checkpoints_in(folder)
    if not found:
        raise FileNotFoundError(f'no complete checkpoint in {folder}')
    return found[-1]


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint, after checking each file's SHA-256 against the manifest (no pickle is ever loaded)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    missing = sorted(set(FILES) - set(manifest))
    if missing:
        raise ValueError(f'checkpoint {path}: its manifest does not list {missing}; it is not a complete checkpoint')
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f'checkpoint {path}: {name} is listed in its manifest but missing')
        actual = sha256_file(file)
        if actual != digest:
            raise ValueError(
                f'checkpoint {path}: {name} does not match its manifest (SHA-256 {actual[:12]}..., expected '
                f'{digest[:12]}...): the file is damaged; resume from another checkpoint'
            )
    state = json.loads((path / 'state.json').read_text())
    if state.get('format') != FORMAT:
        raise ValueError(f'checkpoint {path} has format {state.get("format")}, this library reads {FORMAT}')
    return Checkpoint(
        path,
        state,
        load_file(path / 'model.safetensors'),
        load_file(path / 'optimizer.safetensors'),
        load_file(path / 'rng.safetensors'),
    )


class SaveCheckpoint(Callback):
    """Save a checkpoint of the learner every `every_n_steps` optimizer steps, keeping the `keep` newest.

    Saves happen only at optimizer-step boundaries (never inside gradient accumulation), after every
    other callback has finished the batch (the sampler has moved, the recorder has the loss). A step
    that ends an epoch is saved after the epoch's validation, so a resumed run starts the next epoch.
    `lr_find` never saves.
    """

    order = 100
    name = 'checkpointer'  # `learn.checkpointer`; fastai's default name would hide `learn.save_checkpoint`

    def __init__(self, every_n_steps: int, keep: int | None = None):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f'every_n_steps must be a whole number >= 1, got {every_n_steps!r}')
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f'keep must be a whole number >= 1 (or None: keep all), got {keep!r}')
        self.every_n_steps, self.keep = every_n_steps, keep

    def before_fit(self):
        self.active = self.learn.fitting and not hasattr(self.learn, 'lr_finder')  # not validate(), not lr_find
        self._due = False
        if not self.active:
            return
        learn = self.learn
        if learn._fit_plan is None:
            raise ValueError(
                'checkpoints are taken during fit_one_cycle and fine_tune, which can resume; this fit could not: '
                'use learn.fit_one_cycle(...), or a learner without checkpoint_every'
            )
        if not hasattr(learn.opt, 'opt'):
            raise ValueError("checkpoints need a torch optimizer behind fastai's OptimWrapper (the default adamw)")
        folder = learn.run_dir / 'checkpoints'
        later = [p for p in checkpoints_in(folder) if int(p.name[5:]) > learn.opt_steps]
        if later and learn._resume is None:
            raise FileExistsError(
                f"{folder} holds checkpoints of another run, up to {later[-1].name}: resume it (resume='latest') "
                'or give this run its own run_dir'
            )
        if not folder.exists() and rank() == 0:
            print(f'checkpoints every {self.every_n_steps} optimizer steps go to {folder}/')

    def before_batch(self):
        self._steps_before = self.learn.opt_steps

    def after_batch(self):
        if not (self.active and self.training) or self.learn.opt_steps == self._steps_before:
            return
        if self.learn.opt_steps % self.every_n_steps:
            return
        if self.iter == self.n_iter - 1:
            self._due = True  # the epoch's last step: saved once the epoch is validated
        else:
            self.learn.train_step.check_finite()  # never a checkpoint of weights trained on a NaN loss
            self.learn.save_checkpoint(keep=self.keep)

    def after_epoch(self):
        if self._due:
            self._due = False
            self.learn.train_step.check_finite()
            self.learn.save_checkpoint(keep=self.keep, epoch_done=True)


class ResumeCallback(Callback):
    """Puts a fit back where a checkpoint left it: the recorder, the schedule's position, the batch count, the RNG.

    The learner has already loaded the weights, the optimizer and the sampler, and starts the fit at
    the checkpoint's epoch; this callback does what must happen inside the fit: after fastai's own
    callbacks have reset the recorder and the one-cycle position, it sets them to the checkpoint's
    values; within the resumed epoch it counts batches from where the epoch stopped (so the
    schedule, accumulation and the epoch's end are where they were), and it restores the random
    generators just before the first resumed batch (creating the data iterator may draw from them).
    """

    order = -5  # after TrainEvalCallback's before_train, before the forward pass of every batch

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        position = checkpoint.state['position']
        self.epoch, self.done = position['epoch'], position['iter']
        self.first_batch, self.in_epoch = True, False

    def before_train(self):
        self.in_epoch = self.epoch == self.learn.epoch and self.first_batch
        if not self.in_epoch:
            return
        state = self.checkpoint.state
        restore_recorder(self.learn, state['recorder'])
        self.learn.train_iter = state['position']['train_iter']
        if self.done:
            self.learn.pct_train = state['position']['pct_train']
            self.full = state['position']['n_iter']
        else:  # saved after an epoch: the generators as they were before the next epoch's data iterator
            self._restore_rng()

    def before_batch(self):
        if not self.training:
            return
        if self.in_epoch and self.done:
            self.learn.iter, self.learn.n_iter = self.iter + self.done, self.full
        self._restore_rng()  # saved after a batch: as they were before the next one

    def _restore_rng(self):
        if self.first_batch:
            self.first_batch = False
            set_rng_state(self.checkpoint.state['rng'], self.checkpoint.rng)

    def after_train(self):
        self.in_epoch = False

    def after_fit(self):
        if self.first_batch and self.epoch >= self.learn.n_epoch:  # a fit that had ended: nothing ran, restore
            restore_recorder(self.learn, self.checkpoint.state['recorder'])
            self._restore_rng()


def _scheduler(learn) -> ParamScheduler | None:
    """The one-cycle schedule of the fit in progress (its `hps` are the recorder's schedule history)."""
    return next((cb for cb in learn.cbs if isinstance(cb, ParamScheduler)), None)


def recorder_state(learn) -> dict:
    rec = learn.recorder
    smooth = rec.smooth_loss
    scheduler = _scheduler(learn)
    return {
        'lrs': [float(x) for x in rec.lrs],
        'losses': [float(x) for x in rec.losses],
        'iters': list(rec.iters),
        'values': [[_plain(v) for v in row] for row in rec.values],
        'smooth_loss': {'count': smooth.count, 'val': float(smooth.val)},
        'hps': {k: [_plain(x) for x in v] for k, v in (getattr(scheduler, 'hps', None) or {}).items()},
    }


def restore_recorder(learn, state: dict) -> None:
    rec = learn.recorder
    rec.lrs, rec.iters, rec.values = list(state['lrs']), list(state['iters']), [list(v) for v in state['values']]
    rec.losses = [torch.tensor(x) for x in state['losses']]
    rec.smooth_loss.count = state['smooth_loss']['count']
    rec.smooth_loss.val = torch.tensor(state['smooth_loss']['val'])
    scheduler = _scheduler(learn)
    if scheduler is not None and state['hps']:
        scheduler.hps = {k: list(v) for k, v in state['hps'].items()}


def learner_state(learn, epoch_done: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a checkpoint of `learn` holds now: the JSON state, the weights to save, the optimizer's tensors.

    Called at an optimizer-step boundary: after a batch (the epoch goes on at the next one) or, with
    `epoch_done`, after the epoch's validation (the next epoch starts from its beginning).
    """
    position = {
        'step': learn.opt_steps,
        'epoch': learn.epoch + 1 if epoch_done else learn.epoch,
        'iter': 0 if epoch_done else learn.iter + 1,  # batches of the epoch done
        'n_iter': learn.n_iter,
        'train_iter': learn.train_iter,
        'pct_train': learn.pct_train,
        'n_epoch': learn.n_epoch,
    }
    optimizer, optimizer_tensors = optimizer_state(learn.opt.opt)
    state = {
        'position': position,
        'fit': learn._fit_plan,
        'frozen_idx': learn.opt.frozen_idx,
        'optimizer': optimizer,
        'recorder': recorder_state(learn),
        'scaler': learn.train_step.scaler_state(),
        'identity': learner_identity(learn),
    }
    if isinstance(learn.dls, LMDataLoaders):
        state['sampler'] = learn.dls.sampler.state_dict()
        trained = list(learn.dls.trained_tokens)
        mix = next((cb for cb in learn.cbs if isinstance(cb, MixCallback)), None)
        now = mix.trained() if mix is not None else None  # what this fit has trained so far, not yet recorded
        if now is not None:
            trained = [a + int(b) for a, b in zip(trained, now)]
        state['trained_tokens'] = trained
    weights = {n: p for n, p in learn.model.named_parameters() if learn.only is None or id(p) in learn.only}
    return state, weights, optimizer_tensors


OLD_PRECISION_NAMES = {'bfloat16': 'bf16-autocast', 'float16': 'fp16'}  # stored before the precision names


def restore_learner(learn, ckpt: Checkpoint, force: bool = False) -> None:
    """Put `ckpt`'s weights, optimizer, frozen groups, sampler, trained tokens and step count into `learn`.

    Everything is checked first (data, model, batch size, training settings, weights, sampler), so
    a refused checkpoint changes nothing.
    """
    mine, saved = learner_identity(learn), ckpt.state['identity']
    training = saved.get('training') or {}
    if training.get('precision') in OLD_PRECISION_NAMES:  # written before the names; 'bfloat16' was autocast
        saved = {**saved, 'training': {**training, 'precision': OLD_PRECISION_NAMES[training['precision']]}}
    differ = {
        k: (saved.get(k), mine.get(k)) for k in ('data', 'model', 'bs', 'training') if saved.get(k) != mine.get(k)
    }
    world = getattr(learn, 'world', 1)
    if 'bs' in differ and saved.get('bs') and saved['bs'] % world:
        raise ValueError(
            f'checkpoint {ckpt.path} was trained with a global batch of {saved["bs"]} blocks, which {world} processes '
            f'cannot share equally: resume on a number of processes that divides {saved["bs"]}, with bs = '
            f'{saved["bs"]} / processes'
        )
    if differ and not force:
        raise ValueError(
            f'checkpoint {ckpt.path} does not match this learner: {differ} (checkpoint, learner); resume with '
            'the same corpora, model, global batch (bs x processes) and training settings, or pass force=True'
        )
    params = dict(learn.model.named_parameters())
    unknown = sorted(set(ckpt.model) - set(params))
    if unknown:
        raise ValueError(f'checkpoint {ckpt.path} holds weights this model lacks: {unknown[:5]}')
    sampler = learn.dls.sampler if isinstance(learn.dls, LMDataLoaders) and 'sampler' in ckpt.state else None
    if sampler is not None and list(ckpt.state['sampler']['draws']) != list(sampler.plan.draws):
        raise ValueError(
            f'checkpoint {ckpt.path} is for per-corpus draws {ckpt.state["sampler"]["draws"]} per epoch, these '
            f'DataLoaders draw {sampler.plan.draws}: resume with the same corpora, mix and seq_len'
        )
    with torch.no_grad():
        for name, tensor in ckpt.model.items():
            params[name].copy_(tensor)
    if learn.opt is None:
        learn.create_opt()
    learn.freeze_to(ckpt.state['frozen_idx']) if ckpt.state['frozen_idx'] else learn.unfreeze()
    load_optimizer_state(learn.opt.opt, ckpt.state['optimizer'], ckpt.optimizer)
    if sampler is not None:
        sampler.load_state_dict(ckpt.state['sampler'])
        learn.dls.trained_tokens = list(ckpt.state['trained_tokens'])
    learn.train_step.load_scaler_state(ckpt.state['scaler'])
    learn.opt_steps = ckpt.step


def learner_identity(learn) -> dict:
    """What a checkpoint must share with the learner that resumes it, and the versions it was made with."""
    import fastai
    import transformers

    from . import __version__

    model = learn.model
    bs = getattr(learn.dls.train, 'bs', None)
    data = [s.store.path.name for s in learn.dls.packed.splits] if isinstance(learn.dls, LMDataLoaders) else None
    return {
        'data': data,  # token-store keys: a hash of each corpus's contents and the tokenizer
        'model': [type(model).__name__, sum(p.numel() for p in model.parameters())],
        'bs': bs * getattr(learn, 'world', 1) if bs else bs,  # the global batch: bs x processes
        'training': {
            'accum_steps': learn.train_step.accum_steps,
            'clip': learn.train_step.clip,
            'precision': learn.precision.name,
        },
        'versions': {
            'finetune': __version__,
            'torch': torch.__version__,
            'transformers': transformers.__version__,
            'fastai': fastai.__version__,
        },
    }


def jsonable(value):
    """A fit argument as JSON: numbers, lists, and `slice(a, b)` as {'slice': [a, b]}."""
    if isinstance(value, slice):
        return {'slice': [jsonable(value.start), jsonable(value.stop)]}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def new_run_dir() -> Path:
    """`runs/<date-time>`, with a suffix if a run of the same second has it already."""
    base = Path('runs') / datetime.now().strftime('%Y-%m-%d_%H-%M-%S')
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f'{base.name}-{n}')
    return path
