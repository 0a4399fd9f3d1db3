"""Tiny offline fixtures: a BPE tokenizer trained in memory, tiny random models of eight architectures,
a small learnable synthetic corpus on disk and DataLoaders over it."""

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


ARCHS = {
    'llama': ('LlamaConfig', dict(tie_word_embeddings=True)),
    'mistral': ('MistralConfig', {}),
    'qwen2': ('Qwen2Config', {}),
    'gemma': ('GemmaConfig', dict(head_dim=8)),
    'gpt2': ('GPT2Config', {}),
    'gpt_neox': ('GPTNeoXConfig', {}),
    'phi': ('PhiConfig', {}),
    'opt': ('OPTConfig', dict(ffn_dim=64, word_embed_proj_dim=32)),
}


def tiny(arch, vocab=100, layers=4):
    """A 4-layer random model of architecture `arch` (a key of ARCHS), hidden size 32."""
    import torch
    import transformers

    name, extra = ARCHS[arch]
    cfg_cls = getattr(transformers, name)
    if arch == 'gpt2':
        cfg = cfg_cls(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4)
        if arch != 'opt':
            kw['intermediate_size'] = 64
        if arch in ('llama', 'mistral', 'qwen2', 'gemma'):
            kw['num_key_value_heads'] = 2
        cfg = cfg_cls(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.fixture
def dls(cat_corpus_dir, tokenizer, cache):
    """DataLoaders of 32-token blocks, 8 a batch, over the cat corpus."""
    from finetune import Corpus, lm_dataloaders

    return lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=32, bs=8, cache=cache, verbose=False)


@pytest.fixture(autouse=True)
def fp32_unless_asked(monkeypatch):
    """`precision='auto'` means fp32 in every test, whatever this CPU has; tests of bf16 ask for it by name."""
    import finetune.precision

    monkeypatch.setattr(finetune.precision, 'cpu_has_native_bf16', lambda: False)
