"""Several processes: the sharding of the mix (no processes needed) and two-process gloo fits against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.mix import MixPlan, MixSampler, shard_order

HERE = Path(__file__).parent


def plan(draws, sizes):
    total = sum(draws)
    names = [f'c{i}' for i in range(len(draws))]
    return MixPlan(names=names, sizes=list(sizes), draws=list(draws), fractions=[d / total for d in draws], seq_len=16)


@pytest.mark.parametrize('world', [1, 2, 3, 8, 64])
@pytest.mark.parametrize('bs', [1, 4])
def test_shard_order_covers_the_epoch_once(world, bs):
    sampler = MixSampler(plan([37, 20], [30, 9]), offsets=[0, 30], seed=3)
    order = sampler.epoch_order()
    shards = [shard_order(order, bs, world, r) for r in range(world)]
    steps = -(-len(order) // (bs * world))
    got = []
    for r, shard in enumerate(shards):
        assert len(shard) == min(len(shard), steps * bs)
        assert -(-len(shard) // bs) == steps, f'rank {r} takes a different number of steps'
        got.append(shard)
    # step by step, the ranks' real rows, in rank order, are the one-process batch of bs * world
    for k in range(steps):
        mine = [s[k * bs : (k + 1) * bs] for s in got]
        real = np.concatenate([m[m >= 0] for m in mine])
        np.testing.assert_array_equal(real, order[k * bs * world : (k + 1) * bs * world])
        assert all(len(m) >= 1 for m in mine)  # a rank with nothing in the last batch has a stand-in
        for m in mine:
            if (m < 0).any():
                assert len(m) == 1 and -1 - m[0] in order[k * bs * world :]
    every = np.concatenate([s[s >= 0] for s in got])
    assert sorted(every.tolist()) == sorted(order.tolist())
    counts = np.bincount((every >= 30).astype(int), minlength=2)
    assert counts.tolist() == [37, 20]


def test_sampler_shards_what_is_left_of_the_epoch():
    sampler = MixSampler(plan([10, 7], [10, 7]), offsets=[0, 10], seed=1)
    order = sampler.epoch_order()
    sampler.advance(8)  # a checkpoint after one global batch of 2 x 4
    left = [sampler.indices(4, 2, r) for r in range(2)]
    assert left[0] == order[8:12].tolist() + order[16:17].tolist()
    assert left[1] == order[12:16].tolist() + [-1 - int(order[16])]
    assert sampler.step_blocks(4, 2) == 8
    sampler.advance(8)
    assert sampler.step_blocks(4, 2) == 1  # the last, short global batch


def test_loader_shard_masks_stand_in_rows(dls):
    train = dls.train
    n = len(dls.sampler)
    world = n  # as many processes as blocks, plus one with only a stand-in
    world += 1
    train.shard = (world - 1, world)
    try:
        (x, y, corpus), *rest = list(train)
        assert not rest and len(x) == 1
        assert (y == -100).all()  # trained on nothing
        train.shard = (0, world)
        (x0, y0, _), *rest = list(train)
        assert len(x0) == 1 and (y0 != -100).all()
        assert torch.equal(x, x0)  # the stand-in repeats the batch's first block
    finally:
        train.shard = None
    valid = dls.valid
    valid.shard = (1, 2)
    try:
        assert valid.get_idxs() == list(range((valid._n + 1) // 2, valid._n))
    finally:
        valid.shard = None
    assert valid.get_idxs() == list(range(valid._n))


@pytest.mark.parametrize('setting', ['ACCELERATE_USE_FSDP', 'ACCELERATE_USE_DEEPSPEED'])
def test_sharded_training_is_refused_saying_what_to_do(setting, monkeypatch):
    from finetune.distributed import check_supported, init_distributed

    monkeypatch.setenv(setting, 'true')
    with pytest.raises(NotImplementedError, match=r'not supported.*lora=True.*grad_checkpointing=True'):
        check_supported()
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(NotImplementedError):  # before joining any process group
        init_distributed()


def _run(out: Path, data: Path, name: str, procs: int, *extra: str) -> None:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    script = [str(HERE / 'ddp_run.py'), str(out), '--data', str(data), '--name', name, *extra]
    if procs > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', *script]
    else:
        cmd = [sys.executable, *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _load(out: Path, name: str, rank: int = 0):
    return json.loads((out / f'{name}-r{rank}.json').read_text()), load_file(out / f'{name}-r{rank}.safetensors')


def _close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f'{k}: max diff {(a[k] - b[k]).abs().max():.2e}'


def _steps(record: dict) -> list[dict]:
    """Micro-batches grouped per optimizer step count after them."""
    return record['steps']


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'out'
    _run(out, data, 'two', 2, '--checkpoint-every', '3')
    _run(out, data, 'two-accum', 2, '--accum', '2')
    _run(out, data, 'one', 1)
    _run(out, data, 'one-accum', 1, '--accum', '2')
    _run(out, data, 'resume-on-one', 1, '--resume', str(out / 'run-two' / 'checkpoints' / 'step-3'))
    _run(out, data, 'resume-on-two', 2, '--resume', str(out / 'run-two' / 'checkpoints' / 'step-3'))

    for two, one in (('two', 'one'), ('two-accum', 'one-accum')):
        (r0, w0), (r1, w1) = _load(out, two, 0), _load(out, two, 1)
        ref, w_ref = _load(out, one)
        assert r0['world'] == 2 and ref['world'] == 1
        for k in w0:
            assert torch.equal(w0[k], w1[k]), f'{two}: {k} differs between the ranks'
        _close(w0, w_ref)
        assert len(r0['steps']) == len(r1['steps']) == len(ref['steps'])
        for a, b, single in zip(r0['steps'], r1['steps'], ref['steps']):
            assert a['rows'] + b['rows'] == single['rows']  # disjoint, together the one-process batch, in order
            assert not set(map(tuple, a['rows'])) & set(map(tuple, b['rows']))
            assert abs(a['loss'] - single['loss']) <= 1e-6 * abs(single['loss']) and a['loss'] == b['loss']
        steps = [s['step'] for s in ref['steps']]
        ends = [steps[i] != (steps[i - 1] if i else 0) for i in range(len(steps))]  # the optimizer stepped after it
        assert [s['reduces'] > 0 for s in r0['steps']] == ends  # gradients all-reduced on window ends only
        assert sum(ends) < len(ends) if two == 'two-accum' else all(ends)
        last = r0['steps'][-1]['rows'] + r1['steps'][-1]['rows']
        assert len(last) < 2  # the epoch's last global batch had fewer blocks than ranks
        assert r0['trained_tokens'] == r1['trained_tokens'] == ref['trained_tokens']
        assert ref['trained_tokens'] == [2 * d * 16 for d in ref['draws']]  # two epochs of the plan, every token
        np.testing.assert_allclose(np.array(r0['values'], float), np.array(ref['values'], float), rtol=1e-6)
        assert r0['values'] == r1['values']

    full = _load(out, 'two')[1]
    for name in ('resume-on-one', 'resume-on-two'):
        record, weights = _load(out, name)
        _close(weights, full)
        assert record['trained_tokens'] == _load(out, 'two')[0]['trained_tokens']
