"""A token cache that cannot lie: damaged entries are found, named and rebuilt; `finetune cache ls/verify/clear`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from finetune import Corpus, build_token_store
from finetune.cli import main
from finetune.tokens import DamagedTokenStore, TokenStore, token_stores


@pytest.fixture
def built(cat_corpus_dir, tokenizer, cache):
    store = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    return store.path, store.ids.copy()


def _rewrite_ids(path, change):
    ids = np.fromfile(path / 'ids.bin', dtype=json.loads((path / 'meta.json').read_text())['dtype'])
    (path / 'ids.bin').write_bytes(change(ids).tobytes())


def _swap_two_ids(ids):
    ids = ids.copy()
    ids[[0, 1]] = ids[[1, 0]] if ids[0] != ids[1] else (ids[0] + 1, ids[1])
    return ids


DAMAGES = {
    'ids changed to other valid ids': (lambda p: _rewrite_ids(p, _swap_two_ids), 'checksum'),
    'ids beyond the vocabulary': (lambda p: _rewrite_ids(p, lambda ids: ids + 5000), 'beyond the vocabulary'),
    'ids.bin truncated': (lambda p: _rewrite_ids(p, lambda ids: ids[:-3]), 'ids.bin has'),
    'meta.json cut': (lambda p: (p / 'meta.json').write_text((p / 'meta.json').read_text()[:40]), 'meta.json'),
    'offsets.npy deleted': (lambda p: (p / 'offsets.npy').unlink(), 'offsets.npy is missing'),
    'offsets.npy rewritten': (lambda p: np.save(p / 'offsets.npy', np.load(p / 'offsets.npy')[::-1]), 'offsets'),
    'checksums dropped from meta.json': (
        lambda p: (p / 'meta.json').write_text(json.dumps({**json.loads((p / 'meta.json').read_text()), 'files': {}})),
        'does not record the size and checksum of ids.bin',
    ),
}


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_a_damaged_entry_is_named_and_rebuilt(built, damage, cat_corpus_dir, tokenizer, cache):
    path, good = built
    spoil, problem = DAMAGES[damage]
    spoil(path)
    verify = damage == 'ids changed to other valid ids'  # the one damage only a checksum can see
    with pytest.raises(DamagedTokenStore, match=problem) as e:
        TokenStore.load(path, vocab_size=len(tokenizer), verify=verify)
    assert str(path) in str(e.value) and 'finetune cache clear' in str(e.value)
    with pytest.warns(UserWarning, match=f"corpus 'cats'.*{problem}.*{path.name}.*tokenizing again"):
        store = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache, verify=verify)
    assert store.path == path and np.array_equal(store.ids, good)
    assert TokenStore.load(path, vocab_size=len(tokenizer), verify=True).n_tokens == len(good)


def test_changed_ids_load_without_verify_but_verify_and_the_command_find_them(built, cache, capsys):
    path, _ = built
    _rewrite_ids(path, _swap_two_ids)
    TokenStore.load(path)  # sizes and range are fine: only the checksum can tell
    assert [r['status'] for r in token_stores(cache)] == ['ok']
    assert token_stores(cache, verify=True)[0]['status'].startswith('damaged: ids.bin does not match')
    assert main(['cache', 'verify', '--cache', str(cache)]) == 1
    assert f'finetune cache clear {path.name}' in capsys.readouterr().err
    assert main(['cache', 'clear', path.name, '--cache', str(cache)]) == 0
    assert not path.exists() and token_stores(cache) == []


def test_cache_ls_shows_entries_and_clear_frees_them_and_leftovers(built, cache, capsys, tmp_path):
    path, ids = built
    assert main(['cache', 'ls', '--cache', str(cache)]) == 0
    out = capsys.readouterr().out
    assert path.name in out and 'cats' in out and 'ok' in out
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    leftover = (
        cache
        / 'tokens'
        / f'.{path.name}x.tmp-{os.uname().nodename.replace("-", "_").replace(".", "_")}-{dead.stdout.strip()}-1'
    )
    leftover.mkdir()
    assert main(['cache', 'clear', 'nonexistent', '--cache', str(cache)]) == 2
    assert 'no token store' in capsys.readouterr().err and path.exists()  # nothing removed on a bad key
    assert main(['cache', 'clear', '--cache', str(cache)]) == 0
    assert list((cache / 'tokens').iterdir()) == []


def test_a_killed_builds_leftover_is_removed_by_the_next_build(cat_corpus_dir, tmp_path, tokenizer, cache):
    (cache / 'tokens').mkdir(parents=True)
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    host = os.uname().nodename.replace('-', '_').replace('.', '_')
    leftover = cache / 'tokens' / f'.0123abcd.tmp-{host}-{dead.stdout.strip()}-x'
    (leftover / 'ids.bin').parent.mkdir()
    (leftover / 'ids.bin').write_bytes(b'\0' * 1000)
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'a.txt').write_text('the cat sat on the mat')
    build_token_store(Corpus(other), tokenizer, cache)  # another corpus: still sweeps the folder
    assert not leftover.exists()
