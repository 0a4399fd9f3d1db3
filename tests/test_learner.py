"""The Learner end to end on tiny models: loss, perplexity, fine_tune, lr_find, generate, save_pretrained."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from fastai.learner import Learner

from finetune import CausalLMLoss, Corpus, causal_lm_learner, lm_dataloaders


@pytest.fixture
def dls(cat_corpus_dir, tokenizer, cache):
    return lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=32, bs=8, cache=cache, verbose=False)


def test_loss_is_token_mean_cross_entropy():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    expected = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100, reduction='sum') / 5
    assert torch.allclose(CausalLMLoss()(logits, labels), expected)
    assert CausalLMLoss()(logits.bfloat16(), labels).dtype == torch.float32


def test_learner_is_a_fastai_learner_and_perplexity_matches_loss(dls, llama):
    learn = causal_lm_learner(dls, llama)
    assert isinstance(learn, Learner)
    valid_loss, ppl = learn.validate()
    # recompute the token-weighted loss over the validation set by hand
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, _ in dls.valid:
            logits = llama(x).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction='sum').item()
            count += y.numel()
    assert valid_loss == pytest.approx(total / count, rel=1e-4)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('make', [tiny_llama, tiny_gpt2])
def test_fine_tune_lowers_validation_loss(tmp_path, tokenizer, cache, make):
    from conftest import sentences

    folder = tmp_path / 'more'
    folder.mkdir()
    for i, s in enumerate(sentences(600, seed=5)):
        (folder / f'{i:04d}.txt').write_text(s + '\n')
    dls = lm_dataloaders(Corpus(folder), tokenizer, seq_len=32, bs=8, cache=cache, verbose=False)
    learn = causal_lm_learner(dls, make(len(tokenizer)))
    before = learn.validate()[0]
    learn.fine_tune(1, 1e-2, freeze_epochs=1)
    after = learn.validate()[0]
    assert after < before - 0.5, (before, after)
    assert len(learn.recorder.values) == 1 and learn.recorder.metric_names[-2] == 'perplexity'


def test_fit_one_cycle_and_lr_find_run(dls, llama):
    learn = causal_lm_learner(dls, llama)
    suggestion = learn.lr_find(num_it=10, show_plot=False)
    assert suggestion.valley > 0
    learn.fit_one_cycle(1, 1e-3)
    assert len(learn.recorder.losses) == len(dls.train)


def test_default_lr_is_sized_for_llms(dls, llama):
    learn = causal_lm_learner(dls, llama)
    assert learn.lr == 1e-4 and learn.wd == 0.0
    learn.create_opt()
    assert isinstance(learn.opt.opt, torch.optim.AdamW)


def test_generate_batched(dls, llama):
    learn = causal_lm_learner(dls, llama)
    one = learn.generate('the cat', max_new_tokens=5)
    assert isinstance(one, str) and one.startswith('the cat')
    many = learn.generate(['the cat sat', 'a'], max_new_tokens=4)
    assert len(many) == 2 and many[0].startswith('the cat sat') and many[1].startswith('a')
    # a left-padded batch continues each prompt exactly as it would alone
    assert many[0] == learn.generate('the cat sat', max_new_tokens=4)
    sampled = learn.generate('the', max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9)
    assert isinstance(sampled, str)
    assert learn.tokenizer.padding_side == 'right'  # restored


def test_generate_without_prompt(dls, llama):
    learn = causal_lm_learner(dls, llama)
    full = learn.generate('the cat', max_new_tokens=5)
    new = learn.generate('the cat', max_new_tokens=5, return_prompt=False)
    assert full.endswith(new) and len(new) < len(full)


def test_save_pretrained_reloads_with_identical_logits(dls, llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learn = causal_lm_learner(dls, llama)
    learn.fit(1, 1e-3)
    out = learn.save_pretrained(tmp_path / 'out')
    names = {p.name for p in out.iterdir()}
    assert {'model.safetensors', 'config.json', 'generation_config.json', 'tokenizer.json'} <= names
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, learn.model(x).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok('the cat')['input_ids'] == learn.tokenizer('the cat')['input_ids']


def test_save_pretrained_never_overwrites_by_accident(dls, llama, tmp_path):
    learn = causal_lm_learner(dls, llama)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        learn.save_pretrained(tmp_path / 'out')
    assert (tmp_path / 'out' / 'notes.txt').read_text() == 'mine'
    learn.save_pretrained(tmp_path / 'out', overwrite=True)
    assert (tmp_path / 'out' / 'model.safetensors').exists()


def test_seq_len_longer_than_context_is_an_error(cat_corpus_dir, tokenizer, cache):
    dls = lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=200, bs=2, cache=cache, verbose=False)
    with pytest.raises(ValueError, match=r'seq_len=200 is longer than the context window.*128 positions'):
        causal_lm_learner(dls, tiny_llama(len(tokenizer)))


def test_tokenizer_larger_than_model_vocab_is_an_error(dls):
    with pytest.raises(ValueError, match='the tokenizer has .* tokens but the model embeds only 100'):
        causal_lm_learner(dls, tiny_llama(100))


def test_learner_from_a_local_folder(dls, llama, tmp_path):
    llama.save_pretrained(tmp_path / 'm')
    learn = causal_lm_learner(dls, str(tmp_path / 'm'))
    assert type(learn.model).__name__ == 'LlamaForCausalLM' and learn.tokenizer is dls.tokenizer
