"""The data-scaling probe and the share sweep on a tiny model: the verdicts, the fits, what they leave untouched."""

import random

import numpy as np
import pytest
import torch
from conftest import WORDS, sentences, tiny_llama

from finetune import Corpus, CorpusMix
from finetune.probe import fit_mixing_law, fit_power_law, share_sweep, target_data_curve

FAST = dict(steps=30, seq_len=32, bs=8, lr=1e-2, precision='fp32', max_valid_blocks=4)


def write_docs(folder, docs):
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f'doc{i:03d}.txt').write_text(d)
    return folder


def facts(n_docs: int, per_doc: int = 6, seed: int = 0) -> list[str]:
    """Documents listing 'key key value.' facts from one fixed table of 400: more documents, more facts seen."""
    rng = random.Random(seed)
    table = {(a, b): rng.choice(WORDS) for a in WORDS for b in WORDS}
    keys = list(table)
    return [' '.join(f'{a} {b} {table[a, b]}.' for a, b in rng.sample(keys, per_doc)) for _ in range(n_docs)]


@pytest.fixture
def general(tmp_path):
    return Corpus(write_docs(tmp_path / 'cats', sentences(150, seed=3)), name='cats')


def test_a_target_that_keeps_teaching_says_gather_more(tmp_path, tokenizer, general, cache):
    target = Corpus(write_docs(tmp_path / 'facts', facts(400)), name='facts', target=True)
    mix = CorpusMix([general, target], share={'facts': 0.5})
    model = tiny_llama(len(tokenizer))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # long enough for the tiny model to learn the facts it sees (and overfit a small fraction's few)
    curve = target_data_curve(mix, model, tokenizer, cache=cache, **{**FAST, 'steps': 200, 'bs': 16, 'lr': 3e-2})
    ppl = curve.table['ppl facts'].to_numpy()
    assert ppl[-1] < ppl[0]  # more documents, lower perplexity
    assert curve.verdict.startswith('gather more target text: 2x is predicted to lower facts perplexity by')
    assert curve.predict(2 * curve.table['target tokens'].max()) < ppl[-1]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the model was not trained
    # whole documents, nested: each fraction keeps ceil(f * training documents), and more tokens with more of them
    n_train = curve.table['target docs'].iloc[-1]
    assert list(curve.table['target docs']) == [int(np.ceil(f * n_train)) for f in curve.table['fraction']]
    assert np.all(np.diff(curve.table['target tokens']) > 0)
    assert set(curve.before) == {'cats', 'facts'}


def test_one_text_repeated_gives_a_flat_curve(tmp_path, tokenizer, general, cache):
    same = 'the big red cat sat on the blue mat and then slept slowly.'
    target = Corpus(write_docs(tmp_path / 'same', [same] * 200), name='same', target=True)
    curve = target_data_curve(
        CorpusMix([general, target], share={'same': 0.5}),
        tiny_llama(len(tokenizer)),
        tokenizer,
        cache=cache,
        **{**FAST, 'steps': 100},
    )  # fmt: skip  (long enough to learn the text: then no fraction teaches more than another)
    assert curve.verdict.startswith('the curve is flat')


def test_every_run_sees_the_same_validation_blocks_and_the_same_target_share(
    tmp_path, tokenizer, general, cache, monkeypatch
):
    import finetune.probe as probe

    seen = []
    run = probe._Runs.run

    def spy(self, packed, train=True):
        valid = [np.stack([s.valid[i] for i in range(len(s.valid))]) for s in packed.splits]
        seen.append((valid, packed.plan.fractions))
        return run(self, packed, train)

    monkeypatch.setattr(probe._Runs, 'run', spy)
    target = Corpus(write_docs(tmp_path / 'facts', facts(120)), name='facts', target=True)
    curve = target_data_curve(
        [general, target],
        tiny_llama(len(tokenizer)),
        tokenizer,
        fractions=(0.25, 0.5, 1.0),
        cache=cache,
        **{**FAST, 'steps': None},
    )  # fmt: skip  (mixed by size: the full corpus's share is kept for the smaller fractions)
    assert len(seen) == 4
    for valid, fractions in seen[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(valid, seen[0][0]))
        assert fractions == pytest.approx(seen[0][1])
    # by default one pass over the whole target: the full fraction is drawn once per run
    assert 1.0 <= curve.table['repeats per epoch'].iloc[-1] < 1.1
    short = target_data_curve([general, target], tiny_llama(len(tokenizer)), tokenizer, fractions=(0.25, 0.5, 1.0),
                              cache=cache, **{**FAST, 'steps': 2})  # fmt: skip
    assert short.verdict.startswith('the runs are too short to tell')


def test_the_power_law_fit_recovers_known_parameters():
    d = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    fit = fit_power_law(d, 1.5 + 40.0 * d**-0.35)
    assert fit.E == pytest.approx(1.5, abs=0.02) and fit.alpha == pytest.approx(0.35, abs=0.01)
    assert fit.A == pytest.approx(40.0, rel=0.05) and fit.r2 > 0.999
    with pytest.raises(ValueError, match='3 or more points'):
        fit_power_law(d[:2], [1.0, 0.9])


def test_the_mixing_law_fit_recovers_known_parameters():
    s = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    law = fit_mixing_law(s, 2.0 + 0.5 * np.exp(-3.0 * s))
    assert law.t == pytest.approx(-3.0, abs=0.05) and law.c == pytest.approx(2.0, abs=0.02)


def test_share_sweep_has_a_row_per_share_and_every_corpus(tmp_path, tokenizer, general, cache):
    target = Corpus(write_docs(tmp_path / 'facts', facts(200)), name='facts', target=True)
    model = tiny_llama(len(tokenizer))
    sweep = share_sweep([general, target], model, tokenizer, shares=(0.2, 0.4, 0.6, 0.8), cache=cache, **FAST)
    assert list(sweep.table['share']) == [0.2, 0.4, 0.6, 0.8]
    assert {'ppl cats', 'ppl facts', 'cats within +5%'} <= set(sweep.table.columns)
    assert set(sweep.laws) == {'cats', 'facts'} and sweep.held_out_error is not None
    assert sweep.recommendation.startswith(('train at share', 'no share between'))


def test_the_recommendation_respects_the_tolerance():
    from finetune.probe import MixingLaw, _recommend

    before = {'target': 20.0, 'general': 10.0}
    target = MixingLaw(2.0, 1.0, -2.0, 0.0)  # the target's loss keeps falling as its share grows

    def recommend(general):
        return _recommend('target', [0.1, 0.9], before, {'target': target, 'general': general}, 0.05)

    share, _, text = recommend(MixingLaw(np.log(10), 0.0, 0.0, 0.0))  # general unchanged at every share
    assert share == pytest.approx(0.9) and text.startswith('train at share 0.90')
    # general rises with the share and reaches +5% (perplexity 10.5) at share 0.5
    share, at, _ = recommend(MixingLaw(np.log(10.5) - np.exp(0.5), 1.0, 1.0, 0.0))
    assert share == pytest.approx(0.5, abs=0.011) and at['general'] <= 10.5
    share, _, text = recommend(MixingLaw(np.log(11.0), 0.0, 0.0, 0.0))  # +10% at every share
    assert share is None and 'no share between 0.1 and 0.9 keeps every other corpus within +5%' in text
    assert "'general' is the one that suffers" in text


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(fractions=(0, 1)), r'fractions must be in \(0, 1\]'),
        (dict(target='nope'), "target 'nope' is not a corpus of the mix"),
    ],
)
def test_bad_probe_arguments(tmp_path, tokenizer, general, cache, kwargs, match):
    target = Corpus(write_docs(tmp_path / 'facts', facts(40)), name='facts', target=True)
    with pytest.raises(ValueError, match=match):
        target_data_curve([general, target], tiny_llama(len(tokenizer)), tokenizer, cache=cache, **{**FAST, **kwargs})


def test_a_probe_needs_one_marked_target(tokenizer, general, cache):
    with pytest.raises(ValueError, match='0 of'):
        target_data_curve([general], tiny_llama(len(tokenizer)), tokenizer, cache=cache, **FAST)
