"""Opt-in torch.compile of the decoder blocks: same results, recompiled (not stale) when groups freeze."""

import pytest
import torch
from conftest import tiny_llama

from finetune import causal_lm_learner


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_compiled_blocks_train_like_eager_ones_and_respect_freezing(dls, tokenizer):
    learners, start = {}, dls.train.sampler.state_dict()
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_llama(len(tokenizer), num_hidden_layers=4, tie_word_embeddings=True)
        learn = causal_lm_learner(dls, model, precision='fp32', compile=compiled, n_groups=2)
        learners[compiled] = learn
        layer = model.model.layers[0]
        learn.freeze()  # only norm + head train: the blocks' compiled code must not update them
        before = snapshot(model)
        dls.train.sampler.load_state_dict(start)
        learn.fit(1, 1e-3)
        assert changed(before, model) and not any(n.startswith('model.layers') for n in changed(before, model))
        assert layer._compiled_call_impl is None  # eager again outside the fit
        learn.unfreeze()
        before = snapshot(model)
        dls.train.sampler.load_state_dict(start)
        learn.fit(1, 1e-3)
        assert any(n.startswith('model.layers.0') for n in changed(before, model))
    eager, compiled = (dict(learners[k].model.named_parameters()) for k in (False, True))
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-4), name
    assert learners[True].recorder.values[-1][1] == pytest.approx(learners[False].recorder.values[-1][1], rel=1e-3)
