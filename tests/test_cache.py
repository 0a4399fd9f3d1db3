"""The cache folder and `atomic_folder`: a folder is either all there, old or new, or not there."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from finetune.cache import atomic_folder, cache_folder


def test_a_new_folder_appears_whole_with_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / 'out') as tmp:
            (tmp / 'a.txt').write_text('a')
            assert not (tmp_path / 'out').exists()
    finally:
        os.umask(old)
    assert (tmp_path / 'out' / 'a.txt').read_text() == 'a'
    assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ['out']


def test_an_error_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'old.txt').write_text('old')
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / 'out', overwrite=True) as tmp:
        (tmp / 'new.txt').write_text('new')
        raise RuntimeError('killed halfway')
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['old.txt']
    assert [p.name for p in tmp_path.iterdir()] == ['out']


def test_overwrite_replaces_and_refusal_keeps(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'old.txt').write_text('old')
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / 'out') as tmp:
        (tmp / 'new.txt').write_text('new')
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['old.txt']
    with atomic_folder(tmp_path / 'out', overwrite=True) as tmp:
        (tmp / 'new.txt').write_text('new')
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['new.txt']
    assert [p.name for p in tmp_path.iterdir()] == ['out']


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    from finetune.cache import _HOST

    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    leftover = tmp_path / f'.out.tmp-{_HOST}-{int(dead.stdout)}-abc'
    leftover.mkdir()
    (leftover / 'model.safetensors').write_bytes(b'half')
    mine = tmp_path / f'.out.tmp-{_HOST}-{os.getpid()}-live'  # a live writer's folder stays
    other = tmp_path / '.out.tmp-another_host-1-xyz'  # another machine's (a shared cache): not judged by pid
    mine.mkdir()
    other.mkdir()
    with atomic_folder(tmp_path / 'out') as tmp:
        (tmp / 'a').write_text('a')
    assert not leftover.exists() and mine.exists() and other.exists()


def test_an_old_version_moved_aside_before_a_kill_is_put_back(tmp_path):
    """No atomic swap, and a kill between the two renames: the old export waits aside; the next write restores it."""
    from finetune.cache import _HOST

    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    aside = tmp_path / f'.out.tmp-{_HOST}-{int(dead.stdout)}-old-abc' / 'old'
    aside.mkdir(parents=True)
    (aside / 'config.json').write_text('{}')
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / 'out') as tmp:
        (tmp / 'new').write_text('new')
    assert (tmp_path / 'out' / 'config.json').exists() and [p.name for p in tmp_path.iterdir()] == ['out']


def test_cache_folder_names_what_to_set(tmp_path):
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    with pytest.raises(OSError, match=r'cannot write the cache under .*a-file/tokens.*FINETUNE_CACHE'):
        cache_folder('tokens', cache=blocker)


@pytest.mark.parametrize('exchange', [True, False])  # False: a file system without an atomic swap
def test_a_crash_at_any_step_of_an_overwrite_leaves_old_or_new(tmp_path, monkeypatch, exchange):
    """Stop the commit at each of its file-system steps in turn: `path` always holds one whole version."""
    import finetune.cache as cache

    if not exchange:
        monkeypatch.setattr(cache, 'exchange', lambda a, b: False)
    real = {'rename': os.rename, 'rmtree': cache.shutil.rmtree, 'exchange': cache.exchange}

    def version(path):
        files = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        return {('a', 'b'): 'old', ('c', 'd'): 'new'}.get(tuple(files or ()), files)

    step = 0
    while True:
        step += 1
        out = tmp_path / f'run{step}' / 'out'
        out.mkdir(parents=True)
        for name in 'ab':
            (out / name).write_text(name)
        calls = []

        def counted(kind, calls=calls, step=step):
            def call(*args, **kwargs):
                calls.append(kind)
                if len(calls) == step:
                    raise KeyboardInterrupt(f'killed at {kind}')
                return real[kind](*args, **kwargs)

            return call

        monkeypatch.setattr(cache.os, 'rename', counted('rename'))
        monkeypatch.setattr(cache.shutil, 'rmtree', counted('rmtree'))
        if exchange:
            monkeypatch.setattr(cache, 'exchange', counted('exchange'))
        try:
            with atomic_folder(out, overwrite=True) as tmp:
                for name in 'cd':
                    (tmp / name).write_text(name)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(cache, 'exchange', lambda a, b: False)
        if exchange or finished:
            assert version(out) in ('old', 'new'), (step, calls)  # whole, never mixed, never missing
        else:
            # without an atomic swap there is one moment with nothing at `path`: the old version waits aside
            assert version(out) in ('old', 'new') or calls[step - 1] == 'rename', (step, calls)
        if finished:
            assert version(out) == 'new'
            break
    assert step > 2


SAVER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_tokenizer, tiny_llama
    from finetune import CausalLMLearner
    from fastai.data.core import DataLoaders

    tok = tiny_tokenizer()
    models = [tiny_llama(len(tok), tie_word_embeddings=False) for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(1.0)
    learners = [CausalLMLearner(DataLoaders(), m, tokenizer=tok) for m in models]
    learners[0].save_pretrained({path!r}, overwrite=True)
    print('ready', flush=True)
    i = 0
    while True:
        i += 1
        learners[i % 2].save_pretrained({path!r}, overwrite=True)
    """
)


@pytest.mark.slow
def test_save_pretrained_killed_at_random_moments_always_leaves_a_whole_export(tmp_path, tokenizer):
    """SIGKILL during `save_pretrained(overwrite=True)`, again and again: `path` always loads, old or new."""
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / 'export'
    script = tmp_path / 'saver.py'
    script.write_text(SAVER.format(tests=str(Path(__file__).parent), path=str(path)))
    a = tiny_llama(len(tokenizer), tie_word_embeddings=False)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = [a(x).logits, a(x).logits]
        for p in a.parameters():
            p.add_(1.0)
        expected[1] = a(x).logits
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert 'ready\n' in iter(proc.stdout.readline, '')  # reads up to the line, or fails at the end of output
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = AutoModelForCausalLM.from_pretrained(path)
        assert AutoTokenizer.from_pretrained(path)('the cat')['input_ids'] == tokenizer('the cat')['input_ids']
        with torch.no_grad():
            logits = model(x).logits
        assert any(torch.equal(logits, e) for e in expected), 'the export is neither the old nor the new model'
        visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith('.')]
        assert sorted(visible) == ['export', 'saver.py']  # leftovers are hidden, never mistaken for an export
