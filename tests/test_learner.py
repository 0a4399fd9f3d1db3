"""The Learner end to end on tiny models: loss, perplexity, fine_tune, lr_find, generate, save_pretrained."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from fastai.callback.core import Callback
from fastai.learner import Learner
from transformers import AutoModelForCausalLM

from finetune import CausalLMLoss, Corpus, causal_lm_learner, lm_dataloaders
from finetune.learner import AdamW


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
    assert type(learn.opt.opt) is AdamW and learn.opt.opt.defaults['fused'] and not learn.opt.opt.decay_1d


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


# --- a fit that is safe to interrupt ---


class OutOfMemory(Exception):
    pass


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('error', [OutOfMemory, KeyboardInterrupt])
@pytest.mark.parametrize('phase', ['train', 'valid'])
def test_an_interrupted_fit_leaves_the_model_as_it_was(dls, tokenizer, tmp_path, precision, error, phase):
    """An exception inside a forward pass (here a hook that raises) must not leave the head bypassed,
    autocast entered, the KV cache off or gradients behind: the next fit, generate and export work."""
    model = tiny_llama(len(tokenizer), tie_word_embeddings=False)  # untied: an export without the head loses it
    learn = causal_lm_learner(dls, model, precision=precision)
    assert learn.fused_head
    head, use_cache = model.lm_head, model.config.use_cache
    seen = []

    def hook(module, args, output):
        if module.training == (phase == 'train'):
            seen.append(1)
            if len(seen) == (2 if phase == 'train' else 1):
                raise error('raised inside the forward pass')

    handle = model.model.layers[1].register_forward_hook(hook)
    with pytest.raises(error):
        learn.fit(1, 1e-3)
    handle.remove()
    assert model.lm_head is head and model.config.use_cache == use_cache
    assert not torch.is_autocast_enabled('cpu')
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())  # bf16: the masters again
    assert learn.pred is None and learn.xb == (None,)  # nothing of the failed batch is held in memory

    learn.fit(1, 1e-3)
    assert model.lm_head is head and model.config.use_cache == use_cache
    prompt = tokenizer('the cat', return_tensors='pt').input_ids
    with torch.no_grad():
        expected = model.eval().generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert learn.generate('the cat', max_new_tokens=4) == tokenizer.decode(expected[0], skip_special_tokens=True)
    path = learn.save_pretrained(tmp_path / 'out')
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_lr_find_writes_nothing_in_the_working_directory(dls, llama, tmp_path, monkeypatch):
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    learn = causal_lm_learner(dls, llama, precision='fp32')
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    learn.lr_find(num_it=5, show_plot=False)
    assert list(work.iterdir()) == []
    assert list((tmp_path / 'cache' / 'tmp').iterdir()) == []  # its temporary folder is gone too
    assert all(torch.equal(before[n], p) for n, p in llama.named_parameters())


def test_an_interrupted_lr_find_puts_the_weights_back(dls, llama, monkeypatch, tmp_path):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    learn = causal_lm_learner(dls, llama, precision='fp32')
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    steps = []

    class Interrupt(Callback):
        def after_step(self):
            steps.append(1)
            if len(steps) == 3:
                raise KeyboardInterrupt

    learn.add_cb(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=10, show_plot=False)
    assert len(steps) == 3
    assert all(torch.equal(before[n], p) for n, p in llama.named_parameters())


@pytest.mark.parametrize('padding_side', ['right', 'left'])
def test_generate_leaves_the_tokenizer_alone(fresh_tokenizer, padding_side):
    """A tokenizer without a pad token works, and neither its pad token nor its padding side change."""
    from finetune import generate

    fresh_tokenizer.padding_side = padding_side
    model = tiny_llama(len(fresh_tokenizer))
    assert fresh_tokenizer.pad_token is None
    alone = [generate(model, fresh_tokenizer, p, max_new_tokens=5) for p in ('the cat sat on', 'a')]
    batched = generate(model, fresh_tokenizer, ['the cat sat on', 'a'], max_new_tokens=5)
    assert batched == alone  # left padding under the attention mask changes nothing
    assert fresh_tokenizer.pad_token is None and fresh_tokenizer.padding_side == padding_side


def test_eval_mode_restores_each_module_however_the_block_ends(llama):
    from finetune.models import eval_mode

    llama.train()
    llama.model.layers[0].eval()  # a mixed state, as after freezing with train_bn
    with pytest.raises(RuntimeError), eval_mode(llama):
        assert not any(m.training for m in llama.modules())
        raise RuntimeError
    assert llama.training and not llama.model.layers[0].training and llama.model.layers[1].training
