"""Token-weighted mixing: exact counts, interleaving, seeded and resumable order, accounting, per-corpus
perplexity, the report's diagnosis, and the bad inputs."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from finetune import Corpus, CorpusMix, causal_lm_learner, lm_dataloaders, pack_corpora
from finetune.mix import MixSampler, plan_mix


def unique_docs(folder, n, words, seed=0):
    """n distinct documents (each carries its number) of roughly equal length."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = ' '.join(rng.choice(words, 12))
        (folder / f'{i:04d}.txt').write_text(f'{body} number {i}.')
    return folder


@pytest.fixture
def two(tmp_path):
    general = unique_docs(tmp_path / 'general', 200, ['the', 'cat', 'sat', 'on', 'mat', 'and', 'ran'])
    legal = unique_docs(tmp_path / 'legal', 60, ['lessee', 'shall', 'pay', 'rent', 'the', 'term'], seed=1)
    return Corpus(general), Corpus(legal, target=True)


def names(*corpora):
    return [c.name for c in corpora]


# --- the plan: exact counts ---


def test_counts_by_size_are_every_block_once(two, tokenizer, cache):
    packed = pack_corpora(list(two), tokenizer, seq_len=16, cache=cache)
    sizes = [len(s.train) for s in packed.splits]
    assert packed.plan.draws == sizes and packed.plan.repeats == [1.0, 1.0]


def test_counts_by_weights():
    mix = CorpusMix(_fake(['a', 'b']), weights={'a': 1, 'b': 3})
    plan = plan_mix(mix, [100, 50], seq_len=8)
    assert plan.epoch_blocks == 150 and plan.draws == [38, 112]  # 150/4 = 37.5 -> 38, 112.5 -> 112


def test_counts_by_share_rest_by_size():
    mix = CorpusMix(_fake(['a', 'b', 'c']), share={'c': 0.5})
    plan = plan_mix(mix, [300, 100, 20], seq_len=8)
    # epoch = 420 blocks; c gets 210; a and b split 210 as 3:1
    assert plan.draws == [158, 52, 210] or plan.draws == [157, 53, 210]
    assert sum(plan.draws) == 420 and plan.repeats[2] == 10.5


def test_counts_with_epoch_tokens_and_shares_of_weights():
    mix = CorpusMix(_fake(['a', 'b', 'c']), share={'a': 0.2}, weights={'b': 1, 'c': 1}, epoch_tokens=800)
    plan = plan_mix(mix, [10, 1000, 1000], seq_len=8)
    assert plan.draws == [20, 40, 40]


def test_zero_weight_leaves_a_corpus_out_of_training():
    plan = plan_mix(CorpusMix(_fake(['a', 'b']), weights={'a': 1, 'b': 0}), [10, 10], seq_len=8)
    assert plan.draws == [20, 0]


def _fake(names):
    out = []
    for n in names:
        c = Corpus.__new__(Corpus)
        c.name, c.target = n, False
        out.append(c)
    return out


# --- the sampler: repeats, subsets, interleaving, seeds, resume ---


def sampler(draws, sizes, seed=0, stratified=False):
    from finetune.mix import MixPlan

    plan = MixPlan([str(i) for i in range(len(sizes))], sizes, draws, [0.0] * len(sizes), 8)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return MixSampler(plan, offsets, seed=seed, stratified=stratified)


def test_repeated_corpus_uses_every_block_before_any_twice():
    s = sampler([25, 10], [10, 10])
    counts = Counter(i for i in s.epoch_order() if i < 10)
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # 25 draws from 10 blocks: each twice, five three times
    assert len([i for i in s.epoch_order() if i >= 10]) == 10


def test_subsampled_corpus_gets_a_fresh_subset_each_epoch():
    s = sampler([4, 10], [10, 10])
    first = [i for i in s.epoch_order(0) if i < 10]
    second = [i for i in s.epoch_order(1) if i < 10]
    assert len(set(first)) == 4 and not set(first) & set(second)  # one pass through all blocks before repeats


def test_corpora_are_interleaved():
    order = sampler([50, 50], [50, 50]).epoch_order()
    switches = sum((a < 50) != (b < 50) for a, b in zip(order, order[1:]))
    assert switches > 30  # one corpus after the other would switch once


def test_stratified_batches_hold_the_mix():
    s = sampler([30, 90], [30, 90], stratified=True)
    order = s.epoch_order()
    for b in range(0, 120, 8):
        batch = order[b : b + 8]
        assert 1 <= sum(i < 30 for i in batch) <= 3  # a quarter of each batch of 8, give or take one


def test_same_seed_same_order_other_seed_other_order():
    a, b, c = sampler([40, 40], [40, 40], seed=1), sampler([40, 40], [40, 40], seed=1), sampler([40, 40], [40, 40], 2)
    assert a.epoch_order().tolist() == b.epoch_order().tolist() != c.epoch_order().tolist()
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()


def test_resume_mid_epoch_from_state_dict():
    s = sampler([30, 20], [10, 40], seed=3)
    full = s.epoch_order().tolist()
    s.advance(17)
    state = s.state_dict()
    fresh = sampler([30, 20], [10, 40], seed=99)
    fresh.load_state_dict(state)
    assert fresh.indices() == full[17:]
    s.advance(33)  # the epoch ends
    assert s.state_dict()['epoch'] == 1 and s.state_dict()['position'] == 0
    with pytest.raises(ValueError, match='resume with the same corpora'):
        sampler([31, 19], [10, 40]).load_state_dict(state)


def test_model_init_does_not_change_the_order(two, tokenizer, cache):
    def first_batches(draw_random):
        torch.manual_seed(0)
        dls = lm_dataloaders(list(two), tokenizer, seq_len=16, bs=8, cache=cache, verbose=False)
        if draw_random:
            tiny_llama(len(tokenizer))
            torch.rand(1000), np.random.rand(10)
            import random

            random.random()
        return [b[0] for b, _ in zip(dls.train, range(3))]

    for a, b in zip(first_batches(False), first_batches(True)):
        assert torch.equal(a, b)


# --- training: accounting, resume, lr_find, per-corpus perplexity ---


def test_training_counts_tokens_per_corpus_and_moves_the_sampler(two, tokenizer, cache):
    mix = CorpusMix(list(two), share={'legal': 0.5})
    dls = lm_dataloaders(mix, tokenizer, seq_len=16, bs=8, cache=cache, verbose=False)
    learn = causal_lm_learner(dls, tiny_llama(len(tokenizer)))
    learn.lr_find(num_it=5, show_plot=False)
    assert dls.sampler.state_dict()['epoch'] == 0 and dls.trained_tokens == [0, 0]  # lr_find moved nothing
    learn.fit(1, 1e-3)
    assert dls.trained_tokens == [d * 16 for d in dls.packed.plan.draws]
    assert dls.sampler.state_dict()['epoch'] == 1
    table = dls.mix_report(show=False).table
    assert table['trained tokens'].tolist() == dls.trained_tokens


def test_zero_weight_corpus_is_still_validated(two, tokenizer, cache):
    mix = CorpusMix(list(two), weights={'general': 1, 'legal': 0})
    dls = lm_dataloaders(mix, tokenizer, seq_len=16, bs=8, cache=cache, verbose=False)
    assert {int(c) for b in dls.train for c in b[2]} == {0}
    assert {int(c) for b in dls.valid for c in b[2]} == {0, 1}
    report = dls.mix_report(show=False)
    assert any("'legal' has weight 0" in n for n in report.notes)
    learn = causal_lm_learner(dls, tiny_llama(len(tokenizer)))
    assert [m.name for m in learn.metrics] == ['perplexity', 'ppl_general', 'ppl_legal']
    assert learn.validate()[2] > 0  # ppl_legal is measured


def test_per_corpus_perplexity_matches_a_hand_computation(two, tokenizer, cache):
    dls = lm_dataloaders(list(two), tokenizer, seq_len=16, bs=8, cache=cache, verbose=False)
    model = tiny_llama(len(tokenizer))
    learn = causal_lm_learner(dls, model)
    _, ppl, ppl_general, ppl_legal = learn.validate()
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for x, y, c in dls.valid:
            logits = model(x).logits
            row = F.cross_entropy(logits.transpose(1, 2), y, reduction='none').sum(1)
            for r, ci in zip(row.tolist(), c.tolist()):
                sums[ci] += r
                counts[ci] += y.shape[1]
    assert ppl_general == pytest.approx(math.exp(sums[0] / counts[0]), rel=1e-4)
    assert ppl_legal == pytest.approx(math.exp(sums[1] / counts[1]), rel=1e-4)
    assert ppl == pytest.approx(math.exp(sum(sums) / sum(counts)), rel=1e-4)


def test_fit_table_has_a_column_per_corpus(two, tokenizer, cache):
    dls = lm_dataloaders(list(two), tokenizer, seq_len=16, bs=8, cache=cache, verbose=False)
    learn = causal_lm_learner(dls, tiny_llama(len(tokenizer)))
    learn.fit(1, 1e-3)
    assert learn.recorder.metric_names[3:6] == ['perplexity', 'ppl_general', 'ppl_legal']
    assert all(v > 0 for v in learn.recorder.values[-1][2:])


# --- the report and its diagnosis ---


def findings(packed, **checks):
    from finetune.mix_report import MixChecks, diagnose

    return diagnose(packed, MixChecks(**checks))


def test_healthy_mix_is_silent(two, tokenizer, cache):
    general, legal = two
    packed = pack_corpora(CorpusMix([general, legal], share={'legal': 0.3}), tokenizer, seq_len=8, cache=cache)
    assert findings(packed, min_target_tokens=0) == []  # a tiny test corpus is small by any measure


def test_a_small_target_corpus_points_to_the_probe(two, tokenizer, cache):
    packed = pack_corpora(CorpusMix(list(two), share={'legal': 0.3}), tokenizer, seq_len=8, cache=cache)
    n = packed.splits[1].train.n_trained
    msgs = findings(packed, min_target_tokens=n + 1)
    assert any(f"target corpus 'legal' has {n:,} training tokens" in m and 'target_data_curve' in m for m in msgs)
    assert not any('target_data_curve' in m for m in findings(packed, min_target_tokens=n))


def test_no_target_marked(two, tokenizer, cache):
    general, legal = two
    legal.target = False
    msgs = findings(pack_corpora([general, legal], tokenizer, seq_len=8, cache=cache))
    assert any('no corpus is marked as the target' in m for m in msgs)


def test_target_share_too_small(two, tokenizer, cache):
    packed = pack_corpora(CorpusMix(list(two), share={'legal': 0.05}), tokenizer, seq_len=8, cache=cache)
    msgs = findings(packed)
    assert any("target domain ['legal'] supplies 5.0%" in m and 'share=' in m for m in msgs)
    assert not any('target domain' in m for m in findings(packed, min_target_share=0.01))


def test_too_many_repeats(two, tokenizer, cache):
    mix = CorpusMix(list(two), share={'legal': 0.5}, epoch_tokens=40_000)
    packed = pack_corpora(mix, tokenizer, seq_len=8, cache=cache)
    assert packed.plan.repeats[1] > 4
    assert any("'legal' is repeated" in m for m in findings(packed))


def test_duplicates_between_train_and_valid(tmp_path, tokenizer, cache):
    a = unique_docs(tmp_path / 'a', 100, ['the', 'cat', 'sat'])
    b = tmp_path / 'b'
    b.mkdir()
    for p in sorted(a.iterdir()):  # b is a copy of a: every validation document of b is in a's training
        (b / p.name).write_text(p.read_text())
    packed = pack_corpora([Corpus(a, target=True), Corpus(b)], tokenizer, seq_len=8, cache=cache)
    msgs = [m for m in findings(packed) if 'also appear in training' in m]
    assert len(msgs) == 2
    assert msgs[0].startswith("corpus 'a'") and "'b'" in msgs[0]  # found across corpora
    assert msgs[1].startswith("corpus 'b'") and "'a'" in msgs[1]


def test_small_validation_set(two, tokenizer, cache):
    packed = pack_corpora(list(two), tokenizer, seq_len=8, cache=cache)
    assert any('validation block' in m for m in findings(packed, min_valid_blocks=10_000))


def test_dominant_document(tmp_path, tokenizer, cache):
    d = unique_docs(tmp_path / 'dom', 20, ['the', 'cat'])
    (d / 'huge.txt').write_text('the cat sat on the mat. ' * 400)
    packed = pack_corpora(Corpus(d, target=True), tokenizer, seq_len=8, cache=cache)
    assert any('one document holds' in m for m in findings(packed))


def test_replacement_characters(tmp_path, tokenizer, cache):
    d = unique_docs(tmp_path / 'bad', 40, ['the', 'cat'])
    (d / 'broken.txt').write_bytes(b'the cat \xff\xfe\xfd sat ' * 20)
    with pytest.warns(UserWarning, match='replaced'):
        packed = pack_corpora(Corpus(d, errors='replace', target=True), tokenizer, seq_len=8, cache=cache)
    assert any('replaced characters' in m for m in findings(packed))


def test_report_table_and_warnings(two, tokenizer, cache, capsys):
    mix = CorpusMix(list(two), share={'legal': 0.05})
    with pytest.warns(UserWarning, match='target domain'):
        report = mix.report(tokenizer, seq_len=8, cache=cache)
    out = capsys.readouterr().out
    assert 'warning: the target domain' in out and 'legal' in out
    t = report.table
    assert list(t.corpus) == ['general', 'legal'] and t['epoch share'].sum() == pytest.approx(1)
    assert t['train tokens'].sum() + t['valid tokens'].sum() <= t['tokens'].sum()
    assert t.loc[1, 'asked'] == 'share 5%'
    ax = report.plot()
    assert len(ax.patches) == 4


# --- bad input ---


@pytest.mark.parametrize('bad', [-1, float('nan'), float('inf'), 'x'])
def test_bad_weights(bad):
    with pytest.raises(ValueError, match=r"weights\['a'\]"):
        CorpusMix(_fake(['a', 'b']), weights={'a': bad, 'b': 1})


def test_all_weights_zero():
    with pytest.raises(ValueError, match='all weights are zero'):
        CorpusMix(_fake(['a', 'b']), weights={'a': 0, 'b': 0})


def test_shares_over_one():
    with pytest.raises(ValueError, match='shares sum to 1.2'):
        CorpusMix(_fake(['a', 'b', 'c']), share={'a': 0.6, 'b': 0.6})
    with pytest.raises(ValueError, match='at most 1'):
        CorpusMix(_fake(['a', 'b']), share={'a': 1.5})


def test_unknown_name_lists_the_corpora():
    with pytest.raises(
        ValueError, match=r"share names \['legl'\], which are not corpora; the corpora are \['a', 'b'\]"
    ):
        CorpusMix(_fake(['a', 'b']), share={'legl': 0.5})


def test_weight_and_share_for_one_corpus():
    with pytest.raises(ValueError, match='both a weight and a share'):
        CorpusMix(_fake(['a', 'b']), weights={'a': 1, 'b': 1}, share={'a': 0.5})


def test_weights_must_cover_the_rest():
    with pytest.raises(ValueError, match=r"but not \['b'\]"):
        CorpusMix(_fake(['a', 'b', 'c']), weights={'a': 1}, share={'c': 0.2})


def test_share_with_too_many_repeats_needs_force():
    mix = CorpusMix(_fake(['a', 'b']), share={'b': 0.9})
    with pytest.raises(ValueError, match=r"'b'.*repeats \(limit 100\).*force=True"):
        plan_mix(mix, [10_000, 5], seq_len=8)
    forced = plan_mix(CorpusMix(_fake(['a', 'b']), share={'b': 0.9}, force=True), [10_000, 5], seq_len=8)
    assert forced.repeats[1] > 100


def test_duplicate_names_in_a_mix():
    with pytest.raises(ValueError, match='distinct'):
        CorpusMix(_fake(['a', 'a']))
