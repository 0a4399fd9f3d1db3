"""What fastai and Hugging Face users type first: predict, show_results, get_preds, Interpretation, summary,
to_fp16, swapping dls, export; generate's sequences, generation config and empty prompts; model loading options."""

import pandas as pd
import pytest
import torch
from conftest import sentences, tiny_gpt2, tiny_llama
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.interpret import Interpretation

from finetune import Corpus, causal_lm_learner, corpus_perplexity, generate, lm_dataloaders, load_model
from finetune.evaluate import default_metrics
from finetune.inference import CausalLMInterpretation


@pytest.fixture
def two(tmp_path, tokenizer):
    for name, seed in (('cats', 1), ('dogs', 2)):
        (tmp_path / 'two' / name).mkdir(parents=True)
        for i, s in enumerate(sentences(60, seed=seed)):
            (tmp_path / 'two' / name / f'{i}.txt').write_text(f'{name} {s}')
    corpora = [Corpus(tmp_path / 'two' / 'cats'), Corpus(tmp_path / 'two' / 'dogs')]
    return lm_dataloaders(corpora, tokenizer, seq_len=16, bs=4, valid_pct=0.2, cache=tmp_path / 'c', verbose=False)


@pytest.fixture
def learn(two, tokenizer):
    return causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32')


def test_predict_continues_a_text_or_a_row_of_ids(learn, two):
    text = learn.predict('the cat sat', max_new_tokens=5)
    assert isinstance(text, str) and text.startswith('the cat sat') and len(text) > len('the cat sat')
    ids = two.valid_ds[0][0]
    start = learn.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert learn.predict(ids, n_words=3).startswith(start)
    with pytest.raises(TypeError, match='a text or a row of token ids'):
        learn.predict(3.5)


def test_show_results_shows_corpus_input_target_and_prediction(learn, capsys):
    table = learn.show_results(max_n=3, show=False)
    assert list(table.columns) == ['corpus', 'input', 'target', 'prediction'] and len(table) == 3
    assert set(table.corpus) <= {'cats', 'dogs'} and all(isinstance(t, str) and t for t in table.input)
    learn.show_results(max_n=2)
    assert 'prediction' in capsys.readouterr().out


def test_get_preds_decoded_losses_and_act(learn, two):
    preds, (targs, corpus), decoded, losses = learn.get_preds(with_decoded=True, with_loss=True)
    n = len(two.valid_ds)
    assert preds.shape == targs.shape == (n, 16) and not preds.is_floating_point()
    assert set(corpus.tolist()) == {0, 1}  # the targets are the labels and each row's corpus
    assert decoded == [learn.tokenizer.decode(r) for r in preds.tolist()]
    assert losses.shape == (n,) and (losses > 0).all()
    assert torch.exp(losses.mean()) == pytest.approx(learn.validate()[1], rel=0.05)  # rows hold equal tokens
    top, _ = learn.get_preds(act=lambda logits: logits.softmax(-1).max(-1).values)
    assert top.is_floating_point() and top.shape == (n, 16) and ((top > 0) & (top <= 1)).all()


def test_interpretation_ranks_rows_by_loss(learn):
    plain = Interpretation.from_learner(learn)
    losses, idx = plain.top_losses(3)
    assert (losses[:-1] >= losses[1:]).all() and len(idx) == 3
    interp = CausalLMInterpretation.from_learner(learn)
    table = interp.plot_top_losses(4, show=False)
    assert list(table.columns) == ['corpus', 'loss', 'perplexity', 'text'] and len(table) == 4
    assert table.loss.is_monotonic_decreasing and table.loss.iloc[0] == pytest.approx(float(losses[0]))
    dogs = interp.plot_top_losses(2, corpus='dogs', show=False)
    assert set(dogs.corpus) == {'dogs'}


def test_summary_works_with_the_fused_head(learn):
    assert learn.fused_head
    text = learn.summary()
    assert 'LlamaForCausalLM' in str(text) and 'Total params' in str(text)


def test_fastais_precision_switches_map_onto_precision(learn, two, tokenizer):
    with pytest.raises(ValueError, match='fp16'):
        learn.to_fp16()  # no CUDA here
    assert learn.to_bf16() is learn and learn.precision.name == 'bf16' and learn.precision.master
    assert learn.to_fp32().precision.name == 'fp32'
    with pytest.raises(ValueError, match="precision= .*'bf16'"):
        causal_lm_learner(two, tiny_llama(len(tokenizer)), cbs=MixedPrecision())
    for fastai_cb, ours in ((GradientAccumulation(8), 'accum_steps='), (GradientClip(0.5), 'clip=')):
        with pytest.raises(ValueError, match=f'{type(fastai_cb).__name__} callback does not apply here.*{ours}'):
            causal_lm_learner(two, tiny_llama(len(tokenizer)), cbs=fastai_cb)


def test_swapped_dls_bring_their_own_corpus_metrics(learn, two, tokenizer, tmp_path, cat_corpus_dir):
    assert [m.name for m in learn.metrics] == ['perplexity', 'ppl_cats', 'ppl_dogs']
    (tmp_path / 'news').mkdir()
    for i, s in enumerate(sentences(30, seed=7)):
        (tmp_path / 'news' / f'{i}.txt').write_text(f'news {s}')
    other = lm_dataloaders([Corpus(tmp_path / 'news'), Corpus(cat_corpus_dir, name='cats')], tokenizer, seq_len=16,
                           bs=4, cache=tmp_path / 'c', verbose=False)  # fmt: skip
    learn.dls = other
    assert [m.name for m in learn.metrics] == ['perplexity', 'ppl_news', 'ppl_cats']
    mine = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', metrics=default_metrics(two))
    with pytest.raises(ValueError, match=r"\['ppl_cats', 'ppl_dogs'\].*\['news', 'cats'\]"):
        mine.dls = other
    assert mine.dls is two  # nothing changed


def test_export_is_refused_naming_save_pretrained(learn):
    with pytest.raises(NotImplementedError, match='save_pretrained'):
        learn.export()


def test_generate_returns_every_sequence_asked_for(learn):
    three = learn.generate('the cat', max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert isinstance(three, list) and len(three) == 3 and all(t.startswith('the cat') for t in three)
    both = learn.generate(['the cat', 'a dog'], max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert [len(x) for x in both] == [2, 2] and both[1][0].startswith('a dog')


def test_generate_follows_the_models_generation_config(tokenizer):
    model = tiny_llama(len(tokenizer))
    greedy = [generate(model, tokenizer, 'the cat', max_new_tokens=8) for _ in range(2)]
    assert greedy[0] == greedy[1]
    model.generation_config.max_new_tokens = 3
    assert generate(model, tokenizer, 'the cat') == generate(model, tokenizer, 'the cat', max_new_tokens=3)
    assert len(greedy[0]) > len(generate(model, tokenizer, 'the cat'))
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0  # an instruct model's own
    sampled = set()
    for seed in range(4):
        torch.manual_seed(seed)
        sampled.add(generate(model, tokenizer, 'the cat', max_new_tokens=8))
    assert len(sampled) > 1  # it samples, as model.generate would
    torch.manual_seed(0)
    assert generate(model, tokenizer, 'the cat', max_new_tokens=8, do_sample=False) == greedy[0]


def test_an_empty_prompt_starts_from_bos_or_eos(tokenizer):
    model = tiny_llama(len(tokenizer))
    text = generate(model, tokenizer, '', max_new_tokens=4)
    assert isinstance(text, str) and text
    assert len(generate(model, tokenizer, ['', 'the'], max_new_tokens=3)) == 2


def test_model_loading_options_go_through_model_kwargs(two, tokenizer, tmp_path):
    path = tmp_path / 'm'
    tiny_llama(len(tokenizer)).save_pretrained(path)
    assert next(load_model(path, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"\['device_map'\].*model_kwargs"):
        causal_lm_learner(two, path, device_map='cpu')
    learn = causal_lm_learner(two, path, model_kwargs={'dtype': torch.bfloat16}, precision='fp32')
    assert next(learn.model.parameters()).dtype == torch.bfloat16
    assert 'weights in bfloat16: trained without an fp32 copy' in repr(learn)
    assert 'precision fp32' in repr(causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32'))


def test_corpus_perplexity_refuses_a_seq_len_beyond_the_context(tokenizer, cat_corpus_dir):
    model = tiny_gpt2(len(tokenizer))  # 128 positions: past them GPT-2 fails with an IndexError
    with pytest.raises(ValueError, match=r'seq_len=256 is longer than the context window of GPT2LMHeadModel'):
        corpus_perplexity(model, tokenizer, Corpus(cat_corpus_dir), seq_len=256)
    assert isinstance(corpus_perplexity(model, tokenizer, Corpus(cat_corpus_dir), seq_len=16), pd.DataFrame)
