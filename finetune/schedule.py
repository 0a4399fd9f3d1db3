"""`fine_tune`'s phases: when a frozen phase runs, what trains in it, and the discriminative LRs after it.

fastai's `fine_tune` comes from ULMFiT, where a frozen phase protects the pretrained body from the
gradients of a randomly initialised head. An LLM's head is pretrained, so here the phase runs only
when weights were initialised anew (`learn.new_params`: a head missing from the checkpoint,
resized embeddings) or when asked for; `bench/fine_tune_defaults.py` measured what it costs.
"""

from __future__ import annotations

import json
import warnings

from .checkpoint import find_checkpoint

FINE_TUNE_LR = 2e-4  # fine_tune's peak LR (the head group's; the blocks' spread below it), measured

__all__ = ['FINE_TUNE_LR', 'fine_tune_phases']


def fine_tune_phases(
    learn,
    epochs: int,
    base_lr: float | None,
    freeze_epochs: int | None,
    lr_mult: float,
    pct_start: float,
    div: float,
    gradual: bool,
    resume,
    force: bool,
    **kwargs,
):
    """The phases of `CausalLMLearner.fine_tune` (documented there), each a `fit_one_cycle`."""
    if base_lr is None:  # the head group at 2e-4, the blocks spread below it: see bench/fine_tune_defaults.py
        base_lr = learn.lr if learn.lr_given or learn.only is not None else FINE_TUNE_LR
    groups = learn.layer_groups()
    n = len(groups)
    if freeze_epochs is None:
        freeze_epochs = 1 if learn.new_params and not gradual and n >= 2 else 0
        if freeze_epochs:
            learn._say(
                f'new weights {learn.new_params[:3]}{" ..." if len(learn.new_params) > 3 else ""}: '
                'they train first, with the head group, for one epoch'
            )
    start = None
    if resume is not None:
        resume = find_checkpoint(resume, learn.run_dir)
        start = json.loads((resume / 'state.json').read_text())['fit'].get('phase')
        if start is None:
            raise ValueError(f'checkpoint {resume} was saved by a plain fit, not fine_tune: resume that fit instead')
    frozen = n >= 2 and (gradual or freeze_epochs > 0)
    last = n - 1 if gradual and n >= 2 else 1  # the full phase's number, whether a frozen phase runs or not
    planned = list(range(n - 1)) if gradual and n >= 2 else [0] if frozen else []
    if start is not None and start not in [*planned, last]:
        raise ValueError(
            f'checkpoint {resume} was saved in phase {start} of a fine_tune that this call does not have (its phases: '
            f'{[*planned, last]}): call fine_tune with the arguments of that run (freeze_epochs=, gradual=)'
        )

    def phase(k: int, n_epoch: int, lrs, freeze: int, **options):
        if start is not None and k < start:
            return  # done before the checkpoint
        learn.freeze_to(freeze) if freeze else learn.unfreeze()
        for p in learn._new_param_tensors() if freeze else ():
            p.requires_grad_(True)  # new weights outside the head group train in the frozen phase too
        learn._phase = k
        try:
            learn.fit_one_cycle(n_epoch, lrs, resume=resume if k == start else None, force=force, **options)
        finally:
            learn._phase = None

    if n < 2 and (gradual or freeze_epochs):
        warnings.warn('a single parameter group: skipping the frozen phase', stacklevel=3)
    elif gradual:
        for k in range(1, n):
            if start is None or k - 1 >= start:
                learn._say(f'gradual unfreezing: training the last {k} of {n} groups')
            phase(k - 1, 1, slice(base_lr / lr_mult, base_lr), -k, pct_start=0.99, **kwargs)
        base_lr /= 2
    elif frozen:
        if start is None or start == 0:
            learn._say(f'frozen phase: {freeze_epochs} epoch(s), only group {n - 1} ({groups[-1].name}) trains')
        phase(0, freeze_epochs, slice(base_lr), -1, pct_start=0.99, **kwargs)
        base_lr /= 2
    lrs = slice(base_lr / lr_mult, base_lr) if n > 1 else base_lr
    learn._say(
        f'{"unfrozen" if frozen else "every group trains"}: {epochs} epoch(s), '
        f'LRs from {base_lr / lr_mult if n > 1 else base_lr:.2g} to {base_lr:.2g}'
    )
    phase(last, epochs, lrs, 0, pct_start=pct_start, div=div, **kwargs)
