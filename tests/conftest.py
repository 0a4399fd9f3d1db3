"""Tiny offline fixtures: a BPE tokenizer trained in memory, tiny random Llama and GPT-2 models,
and a small learnable synthetic corpus on disk."""

import os
import random

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')

WORDS = 'the cat dog sat ran on under a mat rug and then slept ate quickly slowly big small red blue'.split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Simple, learnable sentences: a fixed grammar over a small vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subj, verb, obj = rng.choice(['cat', 'dog']), rng.choice(['sat', 'ran', 'slept']), rng.choice(['mat', 'rug'])
        adj = rng.choice(['big', 'small', 'red', 'blue'])
        then, how = rng.choice(['ate', 'slept']), rng.choice(['quickly', 'slowly'])
        out.append(f'the {adj} {subj} {verb} on the {obj} and then {then} {how}.')
    return out


def tiny_tokenizer():
    """A byte-level BPE tokenizer (320 tokens) trained in memory on the synthetic sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences(500) + [' '.join(WORDS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>')


@pytest.fixture(scope='session')
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def fresh_tokenizer():
    """A new tokenizer the test may change (the session one gets a pad token from the first learner)."""
    return tiny_tokenizer()


def tiny_llama(vocab_size: int, **kw):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    kw = {'max_position_embeddings': 128, 'num_hidden_layers': 2, **kw}
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **kw
    )
    return AutoModelForCausalLM.from_config(cfg)


def tiny_gpt2(vocab_size: int, **kw):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture
def gpt2(tokenizer):
    return tiny_gpt2(len(tokenizer))


@pytest.fixture
def cache(tmp_path):
    """A private token cache for the test."""
    return tmp_path / 'cache'


@pytest.fixture
def cat_corpus_dir(tmp_path):
    """120 one-sentence-per-line documents as .txt files."""
    d = tmp_path / 'cats'
    d.mkdir()
    for i, s in enumerate(sentences(120, seed=1)):
        (d / f'doc{i:03d}.txt').write_text(s + '\n')
    return d
