"""Loading models and tokenizers: object, local folder, the hub cache (offline), bad names; pad tokens."""

import pytest
import torch
from conftest import tiny_llama

from finetune import load_model, load_tokenizer
from finetune.models import ensure_pad_token, model_context_length


def test_model_object_passes_through(llama):
    assert load_model(llama) is llama


def test_local_folder(tmp_path, llama, tokenizer):
    llama.save_pretrained(tmp_path / 'm')
    tokenizer.save_pretrained(tmp_path / 'm')
    model = load_model(tmp_path / 'm')
    assert type(model).__name__ == 'LlamaForCausalLM'
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, llama.eval()(x).logits)
    tok = load_tokenizer(str(tmp_path / 'm'))
    assert tok('the cat')['input_ids'] == tokenizer('the cat')['input_ids']
    assert tok.pad_token == tok.eos_token


def make_hub_cache(root, repo_id, model, tokenizer):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = 'a' * 40
    repo = root / ('models--' + repo_id.replace('/', '--'))
    snap = repo / 'snapshots' / commit
    model.save_pretrained(snap)
    tokenizer.save_pretrained(snap)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    return root


def test_hub_id_from_the_cache_offline(tmp_path, llama, tokenizer, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    hub = make_hub_cache(tmp_path / 'hub', 'tiny-org/tiny-llama', llama, tokenizer)
    model = load_model('tiny-org/tiny-llama', cache_dir=hub)
    assert model.config.hidden_size == 32
    tok = load_tokenizer('tiny-org/tiny-llama', cache_dir=hub)
    assert len(tok) == len(tokenizer)


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(
        OSError, match=r"(?s)could not load 'nobody/not-a-model'.*not an embedded model.*a local folder, or a hub id"
    ):
        load_model('nobody/not-a-model', cache_dir=tmp_path / 'empty')


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(str(tmp_path / 'nothing'))
    with pytest.raises(FileNotFoundError, match='model.gguf'):
        load_model('model.gguf')
    with pytest.raises(FileNotFoundError):
        load_tokenizer('./not/here')


def test_pad_token_is_eos_and_keeps_eos_labels(fresh_tokenizer):
    assert fresh_tokenizer.pad_token is None
    tok = ensure_pad_token(fresh_tokenizer)
    assert tok.pad_token_id == tok.eos_token_id
    # training blocks are never padded and labels never come from the pad id: an EOS label stays a label
    import numpy as np

    from finetune.tokens import PackedBlocks

    ids = np.array([5, 6, tok.eos_token_id, 7, 8, tok.eos_token_id], dtype=np.uint16)
    block = PackedBlocks(ids, [(0, 6)], seq_len=5)[0]
    assert block[1:].tolist()[-1] == tok.eos_token_id and -100 not in block.tolist()


def test_existing_pad_token_is_kept(fresh_tokenizer):
    fresh_tokenizer.add_special_tokens({'pad_token': '<pad>'})
    assert ensure_pad_token(fresh_tokenizer).pad_token == '<pad>'


def test_context_length(llama, gpt2):
    assert model_context_length(llama) == 128 and model_context_length(gpt2) == 128


def test_trust_remote_code_stays_off(tmp_path, monkeypatch):
    seen = {}
    import transformers

    def fake(source, **kwargs):  # as transformers' from_pretrained answers
        seen.update(kwargs)
        model = tiny_llama(16)
        return (model, {'missing_keys': [], 'unexpected_keys': []}) if kwargs.get('output_loading_info') else model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, 'from_pretrained', fake)
    load_model('some-org/some-model')
    assert seen['trust_remote_code'] is False


def test_gguf_file_becomes_an_ordinary_trainable_model(tmp_path, llama, tokenizer):
    from gguf_fixture import write_tiny_gguf
    from transformers import AutoModelForCausalLM

    path = tmp_path / 'tiny.gguf'
    write_tiny_gguf(path, llama, tokenizer)
    # transformers alone marks a GGUF model quantized, and then refuses to save it
    raw = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file='tiny.gguf')
    with pytest.raises(ValueError, match='not serializable'):
        raw.save_pretrained(tmp_path / 'raw')

    model = load_model(path)
    assert not getattr(model, 'is_quantized', False) and getattr(model, 'hf_quantizer', None) is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, llama.eval()(x).logits, atol=1e-5)
    tok = load_tokenizer(path)
    assert tok('the big cat sat')['input_ids'] == tokenizer('the big cat sat')['input_ids']
    assert tok.eos_token == tokenizer.eos_token and tok.pad_token is not None
    model.save_pretrained(tmp_path / 'out')  # an ordinary checkpoint now
    again = AutoModelForCausalLM.from_pretrained(tmp_path / 'out')
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
