"""The fused LM head + cross-entropy: the same loss and gradients as the ordinary path, without full logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, tiny, tiny_llama
from fastai.callback.core import Callback, CancelStepException
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import finetune.loss as hl
from finetune import CausalLMLoss, Corpus, causal_lm_learner
from finetune.loss import HeadInput, head_bypass, linear_cross_entropy, supports_head_bypass


def reference(hidden, head, labels):
    token = F.cross_entropy(head(hidden).float().flatten(0, -2), labels.flatten(), reduction='none')
    return token.sum(), token.view(labels.shape)


@pytest.mark.parametrize('bias', [False, True])
def test_matches_cross_entropy_in_fp32_over_several_chunks(monkeypatch, bias):
    monkeypatch.setattr(hl, 'CHUNK_ELEMENTS', 50 * 16)  # 16 rows per chunk: 45 rows make 3 chunks
    torch.manual_seed(0)
    head = nn.Linear(24, 50, bias=bias)
    hidden = torch.randn(3, 15, 24, requires_grad=True)
    labels = torch.randint(0, 50, (3, 15))
    labels[0, :4] = labels[2, -1] = -100
    total, token = linear_cross_entropy(hidden, head, labels)
    total.mul(0.37).backward()  # a scale, as a mean, accumulation or loss scaling puts on it
    got = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone() if bias else None
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    ref_total, ref_token = reference(hidden, head, labels)
    ref_total.mul(0.37).backward()
    assert torch.allclose(total, ref_total, rtol=1e-5)
    assert torch.allclose(token, ref_token, atol=1e-5) and (token[0, :4] == 0).all()
    assert not token.requires_grad
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], head.weight.grad, atol=1e-6)
    if bias:
        assert torch.allclose(got[2], head.bias.grad, atol=1e-6)


def test_bf16_matches_the_autocast_path_and_frozen_weights_get_no_gradient():
    torch.manual_seed(0)
    head = nn.Linear(32, 64, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 32, requires_grad=True)
    labels = torch.randint(0, 64, (40,))
    total, _ = linear_cross_entropy(hidden, head, labels, torch.bfloat16)
    total.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(hidden)
    ref = F.cross_entropy(logits.float(), labels, reduction='sum')
    ref.backward()
    assert head.weight.grad is None
    assert torch.allclose(total, ref, rtol=1e-3)
    assert torch.allclose(got, hidden.grad, rtol=0.05, atol=2e-3)


def test_without_grad_mode_no_gradient_is_computed():
    head = nn.Linear(8, 20)
    hidden = torch.randn(5, 8, requires_grad=True)
    with torch.no_grad():
        total, token = linear_cross_entropy(hidden, head, torch.arange(5))
    assert not total.requires_grad and token.shape == (5,)


@pytest.mark.parametrize('arch', list(ARCHS))
def test_every_tested_architecture_can_bypass_its_head(arch):
    model = tiny(arch)
    head = model.get_output_embeddings()
    assert supports_head_bypass(model)
    assert model.get_output_embeddings() is head  # put back
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad(), head_bypass(model):
        hidden = model(input_ids=ids).logits
    assert hidden.shape == (1, 4, head.in_features)
    assert model.get_output_embeddings() is head


def test_models_that_change_logits_after_the_head_keep_the_ordinary_path(dls, tokenizer):
    model = tiny_llama(len(tokenizer))
    forward = model.forward

    def capped(*args, **kwargs):  # like Gemma 2's final logit soft-capping
        out = forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.forward = capped
    assert not supports_head_bypass(model)
    assert causal_lm_learner(dls, model).fused_head is False
    with pytest.raises(ValueError, match='soft-capping'):
        causal_lm_learner(dls, model, fused_head=True)


def test_a_custom_loss_gets_logits(dls, llama):
    learn = causal_lm_learner(dls, llama, loss_func=lambda logits, labels, *_: logits.float().mean())
    assert learn.fused_head is False
    with pytest.raises(ValueError, match='needs CausalLMLoss'):
        causal_lm_learner(dls, llama, loss_func=lambda *a: 0, fused_head=True)
    assert causal_lm_learner(dls, llama, loss_func=CausalLMLoss()).fused_head is True


class FirstStepGrads(Callback):
    order = 90

    def after_pred(self):
        self.learn._pred_type = type(self.pred)

    def before_step(self):
        self.learn._grads = {n: p.grad.clone() for n, p in self.learn.model.named_parameters() if p.grad is not None}
        raise CancelStepException()


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_learner_gradients_and_metrics_match_the_unfused_path(dls, tokenizer, precision):
    runs, start = {}, dls.train.sampler.state_dict()
    for fused in (True, False):
        dls.train.sampler.load_state_dict(start)  # the same batches for both
        model = tiny_llama(len(tokenizer), tie_word_embeddings=True)
        learn = causal_lm_learner(dls, model, precision=precision, fused_head=fused, cbs=[FirstStepGrads()])
        learn.fit(1, 1e-3)
        runs[fused] = learn
    assert runs[True]._pred_type is HeadInput and runs[False]._pred_type is torch.Tensor
    tol = dict(atol=1e-6, rtol=1e-4) if precision == 'fp32' else dict(atol=1e-3, rtol=0.05)
    for name, grad in runs[False]._grads.items():
        assert torch.allclose(runs[True]._grads[name], grad, **tol), name
    valid = [[float(v) for v in r.recorder.values[-1][1:]] for r in (runs[True], runs[False])]  # loss, perplexity
    assert valid[0] == pytest.approx(valid[1], rel=1e-4 if precision == 'fp32' else 1e-2)
    assert runs[True].model.get_output_embeddings() is runs[True].model.lm_head  # the head is back


class LargestLogits(TorchDispatchMode):
    """Records the largest number of elements of any tensor (or view) whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_a_fused_fit_never_holds_full_logits(dls, tokenizer, monkeypatch):
    vocab = len(tokenizer)
    monkeypatch.setattr(hl, 'CHUNK_ELEMENTS', vocab * 16)  # 16 rows per chunk; a batch has 8 x 32 = 256
    runs = {}
    for fused in (True, False):
        learn = causal_lm_learner(dls, tiny_llama(vocab), precision='fp32', fused_head=fused)
        learn.create_opt()
        with LargestLogits(vocab) as mode:
            learn.fit(1, 1e-3)
        runs[fused] = mode.largest
    assert runs[False] >= 256 * vocab  # the ordinary path makes the whole batch's logits
    assert runs[True] <= max(16 * vocab, vocab * 32)  # a chunk, or the head weight's transposed view


def test_corpus_perplexity_is_the_same_without_full_logits(cat_corpus_dir, tokenizer, cache, monkeypatch):
    import finetune.evaluate as ev

    model = tiny_llama(len(tokenizer))
    corpus = Corpus(cat_corpus_dir)
    fused = ev.corpus_perplexity(model, tokenizer, corpus, seq_len=16, bs=4, precision='fp32', cache=cache)
    monkeypatch.setattr(ev, 'supports_head_bypass', lambda m: False)
    with LargestLogits(len(tokenizer)) as mode:
        plain = ev.corpus_perplexity(model, tokenizer, corpus, seq_len=16, bs=4, precision='fp32', cache=cache)
    assert mode.largest >= 4 * 16 * len(tokenizer)  # the monkeypatch took effect: full logits on that path
    assert fused['perplexity'][0] == pytest.approx(plain['perplexity'][0], rel=1e-5)
    assert fused['tokens'][0] == plain['tokens'][0] > 0
    assert model.get_output_embeddings() is model.lm_head


def test_fp16_weight_gradient_sums_do_not_overflow():
    torch.manual_seed(0)
    head = nn.Linear(8, 12, bias=False)
    hidden = (torch.rand(3000, 8) * 60 + 40).requires_grad_()  # every row pushes the same column: sums of ~1.5e5
    labels = torch.full((3000,), 5)
    total, _ = linear_cross_entropy(hidden, head, labels, torch.float16)
    total.backward()
    got = head.weight.grad.clone()
    head.zero_grad(set_to_none=True)
    reference(hidden, head, labels)[0].backward()
    assert torch.isfinite(got).all() and got.abs().max() > 65504  # beyond fp16's range, and still right
    assert torch.allclose(got, head.weight.grad, rtol=1e-2, atol=1.0)
