"""The process group of a multi-process launch (`torchrun`, `accelerate launch`, `notebook_launcher`), in one place.

A process knows it is one of several from the launcher's environment (`WORLD_SIZE`, `RANK`,
`LOCAL_RANK`, as fastai reads them); it joins the process group through accelerate's
`PartialState` (gloo on CPU, NCCL on CUDA, the device of its local rank) the first time it needs
to talk to the others. In a single process every helper here is a no-op, so the rest of the code
calls them unconditionally. The training side (DDP around the forward pass, the sharded sampler,
the reductions of losses and metrics) is `ddp.DDPTrainer`.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.torch_core import num_distrib, rank_distrib

__all__ = [
    'world_size',
    'rank',
    'init_distributed',
    'check_supported',
    'local_main_first',
    'barrier',
    'all_reduce_sum',
    'broadcast_object',
    'single_process',
]


def world_size() -> int:
    """How many processes train together: the launcher's `WORLD_SIZE`, or 1."""
    return max(num_distrib(), 1)


def rank() -> int:
    """This process's place among them (0 writes the files)."""
    return rank_distrib() if world_size() > 1 else 0


def check_supported() -> None:
    """Refuse the launcher settings that `finetune` cannot honour, before any work, saying what to do instead."""
    for setting, what in (('ACCELERATE_USE_FSDP', 'FSDP'), ('ACCELERATE_USE_DEEPSPEED', 'DeepSpeed')):
        if os.environ.get(setting, '').lower() in ('1', 'true', 'yes'):
            raise NotImplementedError(
                f'{what} (sharded parameters and optimizer state) is not supported: finetune trains with data '
                'parallelism (DDP), each process holding the whole model. For a model that does not fit one '
                "device, use LoRA (lora=True) and grad_checkpointing=True; launch with plain 'accelerate launch' "
                'or torchrun. README, "Several devices", says what sharded training would need'
            )


def init_distributed():
    """Join the launch's process group (once; through accelerate); None in a single process."""
    if world_size() < 2:
        return None
    check_supported()
    from accelerate import PartialState

    joined = dist.is_initialized()
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU: gloo; CUDA: NCCL on the local rank's GPU
    if not joined and dist.is_initialized():
        atexit.register(_leave)  # a process group left to static destruction can abort the process at exit
    return state


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def local_main_first():
    """Inside, each machine's first process works alone, then the others (to open what it built, not race it)."""
    state = init_distributed()
    if state is None:
        yield
        return
    with state.local_main_process_first():
        yield


def barrier() -> None:
    """Wait until every process has come here."""
    if init_distributed() is not None:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every process (a new tensor on `tensor`'s device); `tensor` itself in one process."""
    if init_distributed() is None:
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def broadcast_object(obj):
    """Process 0's `obj`, in every process (any picklable object)."""
    if init_distributed() is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


@contextmanager
def single_process():
    """Inside, this process behaves as if it ran alone (fastai and finetune read WORLD_SIZE and RANK)."""
    saved = {k: os.environ.get(k) for k in ('WORLD_SIZE', 'RANK')}
    os.environ.update(WORLD_SIZE='1', RANK='0')
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
