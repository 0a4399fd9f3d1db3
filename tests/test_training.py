"""Training the ULMFiT way on any causal LM: groups, freezing, discriminative LRs, fine_tune, lr_find,
mixed precision, accumulation, clipping, LoRA, memory-safe predictions."""

import random
import warnings

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny, tiny_gpt2, tiny_llama
from fastai.callback.core import Callback, CancelStepException
from torch import nn

from finetune import Corpus, causal_lm_learner, lm_dataloaders
from finetune.master_weights import MasterWeightsCallback
from finetune.precision import Precision, resolve_precision
from finetune.splitter import decoder_groups, is_norm


def four_layer_llama(tokenizer):
    """Tied embeddings, like SmolLM2: groups are blocks 0-1 | blocks 2-3 | norm + head."""
    return tiny_llama(len(tokenizer), num_hidden_layers=4, tie_word_embeddings=True)


# --- the splitter ---


@pytest.mark.parametrize('arch', ARCHS)
def test_groups_cover_every_parameter_once(arch):
    model = tiny(arch)
    groups = decoder_groups(model, n_groups=2)
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g.name for g in groups][-3:] == ['blocks 0-1', 'blocks 2-3', 'norm + head']
    head = groups[-1]
    assert any(is_norm(m) for n, m in model.named_modules() if any(n and n in d for d in head.modules))
    assert any(p is model.get_output_embeddings().weight for p in head.params)  # the LM head is in the head group
    if not model.config.tie_word_embeddings:
        assert groups[0].name == 'embeddings' and model.get_input_embeddings().weight is groups[0].params[0]


def test_rmsnorm_is_a_norm(llama):
    norms = [n for n, m in llama.named_modules() if is_norm(m)]
    assert 'model.norm' in norms and 'model.layers.0.input_layernorm' in norms


def test_unsplittable_model_falls_back_to_one_group_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match='one group'):
        groups = decoder_groups(model)
    assert len(groups) == 1 and len(groups[0].params) == 4


@pytest.mark.parametrize('n', [0, 3, -1, 2.5])
def test_bad_n_groups(dls, llama, n):
    with pytest.raises(ValueError, match=r'n_groups=.*2 decoder blocks, so use 1 to 2'):
        causal_lm_learner(dls, llama, n_groups=n)


# --- freezing ---


def trainable_by_group(learn):
    return [[p.requires_grad for p in g.params] for g in learn.layer_groups()]


def test_freeze_really_freezes(dls, tokenizer):
    learn = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2, precision='fp32')
    learn.freeze()
    flags = trainable_by_group(learn)
    assert all(not any(f) for f in flags[:-1]) and all(flags[-1])
    table = learn.groups()
    assert list(table.name) == ['blocks 0-1', 'blocks 2-3', 'norm + head']
    assert (table.trainable == [0, 0, table.params[2]]).all()
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit(1, 1e-2)
    frozen = [n for n in before if n.startswith('model.layers.')]
    assert all(torch.equal(before[n], dict(learn.model.named_parameters())[n]) for n in frozen)
    assert not torch.equal(before['model.norm.weight'], learn.model.model.norm.weight)
    learn.unfreeze()
    assert all(all(f) for f in trainable_by_group(learn))
    learn.freeze_to(1)
    assert [any(f) for f in trainable_by_group(learn)] == [False, True, True]


def test_train_bn_keeps_norms_and_biases_trainable(dls, tokenizer):
    learn = causal_lm_learner(dls, tiny_gpt2(len(tokenizer)), n_groups=2, train_bn=True)
    learn.freeze()
    frozen_group = learn.layer_groups()[1]
    names = {id(p): n for n, p in learn.model.named_parameters()}
    trainable = sorted(names[id(p)] for p in frozen_group.params if p.requires_grad)
    assert trainable and all(('ln_' in n) or n.endswith('bias') for n in trainable)


@pytest.mark.parametrize('n', [4, -4, 10])
def test_freeze_to_out_of_range(dls, llama, n):
    learn = causal_lm_learner(dls, llama, n_groups=2)  # untied: embeddings | block 0 | block 1 | norm + head
    with pytest.raises(ValueError, match=r'4 parameter groups, so n must be in -3..3'):
        learn.freeze_to(n)


# --- learning rates, fine_tune ---


class RecordLRs(Callback):
    """The peak LR of each group and which groups train, per fit."""

    def before_fit(self):
        self.learn._fits = getattr(self.learn, '_fits', [])
        self.learn._fits.append({'lr': [0.0] * len(self.opt.hypers), 'trains': trainable_by_group(self.learn)})

    def before_step(self):
        peaks = self.learn._fits[-1]['lr']
        for i, h in enumerate(self.opt.hypers):
            peaks[i] = max(peaks[i], h['lr'])


def test_discriminative_lrs_spread_over_groups(dls, tokenizer):
    learn = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2)
    learn.fit(1, slice(1e-5, 1e-3))
    assert np.allclose(learn.groups().lr, [1e-5, 1e-4, 1e-3])
    with pytest.raises(ValueError, match='4 learning rates for 3 parameter groups'):
        learn.fit(1, [1e-3] * 4)
    with pytest.raises(ValueError, match='learning rates for 3 parameter groups'):
        learn.fit_one_cycle(1, np.array([1e-3, 1e-3]))


def test_fine_tune_runs_both_phases_with_the_lrs_it_reports(dls, tokenizer, capsys):
    learn = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2, cbs=[RecordLRs()])
    learn.fine_tune(1, base_lr=1e-3, freeze_epochs=1, lr_mult=10)
    frozen, unfrozen = learn._fits
    assert [any(f) for f in frozen['trains']] == [False, False, True]
    assert 0.9e-3 < frozen['lr'][-1] <= 1e-3  # one-cycle with pct_start=0.99 nearly reaches its peak
    assert all(all(f) for f in unfrozen['trains'])
    assert np.allclose(unfrozen['lr'], [5e-5, 5e-5 * 10**0.5, 5e-4], rtol=1e-2)  # base_lr / 2, spread over 10x
    out = capsys.readouterr().out
    assert 'frozen phase: 1 epoch(s), only group 2 (norm + head) trains' in out
    assert 'LRs from 5e-05 to 0.0005' in out


def test_fine_tune_without_new_weights_trains_every_group_from_the_first_step(dls, tokenizer, capsys):
    learn = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2, cbs=[RecordLRs()])
    assert learn.new_params == []  # a model object: nothing is known to be new
    learn.fine_tune(1)
    (fit,) = learn._fits  # no frozen phase: the LM head is pretrained, there is nothing to protect the body from
    assert all(all(f) for f in fit['trains'])
    # the measured defaults: the head group peaks at 2e-4, the first group at 2e-4 / 3, not halved
    assert np.allclose(fit['lr'], [2e-4 / 3, 2e-4 / 3**0.5, 2e-4], rtol=1e-2)
    assert 'every group trains: 1 epoch(s), LRs from 6.7e-05 to 0.0002' in capsys.readouterr().out
    given = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2, lr=1e-3, cbs=[RecordLRs()])
    given.fine_tune(1, lr_mult=10)
    assert np.allclose(given._fits[0]['lr'], [1e-4, 1e-4 * 10**0.5, 1e-3], rtol=1e-2)  # the learner's lr, as asked


def test_a_head_missing_from_the_checkpoint_gets_a_frozen_phase(dls, tokenizer, tmp_path, capsys):
    base = tiny_llama(len(tokenizer), num_hidden_layers=4, tie_word_embeddings=False)
    base.model.save_pretrained(tmp_path)  # the body alone, as a base model without an LM head is published
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = causal_lm_learner(dls, tmp_path, n_groups=2, cbs=[RecordLRs()])
    assert learn.new_params == ['lm_head.weight']
    learn.fine_tune(1, base_lr=1e-3)
    frozen, unfrozen = learn._fits
    assert [any(f) for f in frozen['trains']] == [False, False, False, True]  # embeddings | 2 block groups | head
    assert all(all(f) for f in unfrozen['trains'])
    assert "new weights ['lm_head.weight']" in capsys.readouterr().out


def test_new_weights_outside_the_head_group_train_in_the_frozen_phase(dls, tokenizer):
    model = tiny_llama(len(tokenizer), num_hidden_layers=4, tie_word_embeddings=False)
    embed = model.model.embed_tokens.weight.detach().clone()
    block = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    learn = causal_lm_learner(dls, model, n_groups=2, new_params=['model.embed_tokens.weight'])
    learn.fine_tune(0, base_lr=1e-3)  # the frozen phase alone
    assert not torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, block)
    with pytest.raises(ValueError, match=r"new_params names \['model.embed'\], which are not parameters"):
        causal_lm_learner(dls, tiny_llama(len(tokenizer)), new_params=['model.embed'])


def test_gradual_unfreezing_adds_one_group_per_epoch(dls, tokenizer):
    learn = causal_lm_learner(dls, four_layer_llama(tokenizer), n_groups=2, cbs=[RecordLRs()])
    learn.fine_tune(1, base_lr=1e-3, gradual=True)
    assert [[any(f) for f in fit['trains']] for fit in learn._fits] == [
        [False, False, True],
        [False, True, True],
        [True, True, True],
    ]


def test_lr_find_has_no_side_effects(dls, llama):
    learn = causal_lm_learner(dls, llama)
    learn.fit(1, 1e-3)  # optimizer state and a moved sampler to preserve
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_state = {k: v.clone() for k, v in learn.opt.opt.state[next(iter(learn.opt.opt.state))].items()}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rng = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    sampler = dls.train.sampler.state_dict()
    order = dls.train.sampler.indices()
    learn.lr_find(num_it=8, show_plot=False)
    assert all(torch.equal(weights[k], v) for k, v in learn.model.state_dict().items())
    after = learn.opt.opt.state[next(iter(learn.opt.opt.state))]
    assert all(torch.equal(opt_state[k], after[k]) for k in opt_state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == rng
    assert dls.train.sampler.state_dict() == sampler and dls.train.sampler.indices() == order


# --- mixed precision ---


def activation_dtypes(learn):
    seen = []
    learn.create_opt()  # finding the groups runs a tiny fp32 forward pass; keep it out of the record
    layer = learn.model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        learn.fit(1, 1e-4)
    finally:
        handle.remove()
    return set(seen)


class SeenAtStep(Callback):
    """The dtypes of the weights and gradients the optimizer steps on, and whether autocast was on in the forward."""

    order = 30  # after MasterWeightsCallback and TrainStepCallback

    def before_fit(self):
        self.weights, self.grads, self.autocast = set(), set(), set()

    def before_batch(self):  # after TrainStepCallback's, which enters autocast
        self.autocast.add(torch.is_autocast_enabled('cpu'))

    def before_step(self):
        params = [p for p in self.learn.model.parameters() if p.grad is not None]
        self.weights |= {p.dtype for p in params}
        self.grads |= {p.grad.dtype for p in params}


def test_bf16_trains_a_bf16_copy_of_fp32_master_weights(dls, llama, monkeypatch):
    seen = SeenAtStep()
    learn = causal_lm_learner(dls, llama, precision='bf16', accum_steps=2, cbs=[seen])
    before = [p.detach().clone() for p in llama.parameters()]
    refreshed = []
    master = next(cb for cb in learn.cbs if isinstance(cb, MasterWeightsCallback))
    monkeypatch.setattr(master, '_refresh', lambda f=master._refresh: (refreshed.append(learn.opt_steps), f()))
    assert activation_dtypes(learn) == {torch.bfloat16}  # the whole forward computes in bf16 ...
    assert seen.autocast == {False}  # ... without autocast
    assert seen.weights == {torch.float32} and seen.grads == {torch.float32}  # the optimizer sees fp32 only
    assert all(p.dtype == torch.float32 for p in llama.parameters())  # fp32 again after the fit
    assert refreshed == sorted(set(refreshed)) and len(refreshed) == learn.opt_steps + 1  # once per optimizer step
    assert all(not torch.equal(a, p) for a, p in zip(before, llama.parameters()))
    assert learn.recorder.values[-1][0] > 0  # loss and metrics computed


def test_bf16_autocast_keeps_fp32_weights_and_casts_in_the_forward(dls, llama):
    seen = SeenAtStep()
    learn = causal_lm_learner(dls, llama, precision='bf16-autocast', cbs=[seen])
    assert activation_dtypes(learn) == {torch.bfloat16} and seen.autocast == {True}
    assert seen.weights == {torch.float32} and seen.grads == {torch.float32}


def test_bf16_true_trains_in_bf16_end_to_end(dls, llama):
    seen = SeenAtStep()
    learn = causal_lm_learner(dls, llama, precision='bf16-true', cbs=[seen])
    assert all(p.dtype == torch.bfloat16 for p in llama.parameters())  # cast when the learner is built
    assert all(b.dtype == torch.float32 for b in llama.buffers() if b.is_floating_point())  # RoPE's inv_freq kept
    assert 'bf16-true' in repr(learn) and 'without an fp32 copy' not in repr(learn)
    assert activation_dtypes(learn) == {torch.bfloat16} and seen.autocast == {False}
    assert seen.weights == {torch.bfloat16} and seen.grads == {torch.bfloat16}
    state = [s for s in learn.opt.opt.state.values() if 'exp_avg' in s]
    assert state and all(s['exp_avg'].dtype == torch.bfloat16 for s in state)


def test_master_weights_keep_the_updates_bf16_true_loses(dls, tokenizer):
    """An AdamW step of 1e-5 is far below half a bf16 step of a weight near 0.5: fp32 masters keep it."""
    moved = {}
    for precision in ('bf16', 'bf16-true'):
        model = tiny_llama(len(tokenizer))
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.fill_(0.5)
        learn = causal_lm_learner(dls, model, precision=precision, lr=1e-5)
        learn.fit(1)
        moved[precision] = (model.model.layers[0].mlp.down_proj.weight.float() != 0.5).float().mean().item()
    assert moved['bf16'] > 0.9 and moved['bf16-true'] == 0


def test_bf16_and_autocast_train_alike(dls, tokenizer):
    losses, sampler_start = {}, dls.train.sampler.state_dict()
    for precision in ('fp32', 'bf16', 'bf16-autocast'):
        torch.manual_seed(0)
        learn = causal_lm_learner(dls, tiny_llama(len(tokenizer)), precision=precision)
        dls.train.sampler.load_state_dict(sampler_start)
        learn.fit(2, 1e-3)
        losses[precision] = learn.recorder.values[-1][1]
    assert losses['bf16'] == pytest.approx(losses['fp32'], rel=0.03)
    assert losses['bf16-autocast'] == pytest.approx(losses['fp32'], rel=0.03)


def test_fp32_means_no_autocast(dls, llama):
    assert activation_dtypes(causal_lm_learner(dls, llama, precision='fp32')) == {torch.float32}


def test_auto_precision(monkeypatch):
    import finetune.precision as cb

    monkeypatch.setattr(cb, 'cpu_has_native_bf16', lambda: True)
    assert resolve_precision('auto', torch.device('cpu')) == Precision('bf16', master=True)
    monkeypatch.setattr(cb, 'cpu_has_native_bf16', lambda: False)
    assert resolve_precision('auto', torch.device('cpu')) == Precision('fp32')


def test_bf16_on_a_cpu_without_it_says_so_and_what_auto_picks(dls, llama):
    with pytest.warns(UserWarning, match="no bf16 instructions.*precision='auto' picks 'fp32'"):
        learn = causal_lm_learner(dls, llama, precision='bf16')
    assert learn.precision.name == 'bf16'  # asked for by name: done, slowly


def test_fp16_on_cpu_is_a_clear_error(dls, llama):
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA GPU"):
        causal_lm_learner(dls, llama, precision='fp16')
    with pytest.raises(ValueError, match='precision='):
        causal_lm_learner(dls, llama, precision='int8')


# --- accumulation and clipping ---


class CaptureGrads(Callback):
    order = 90  # after TrainStepCallback has divided and clipped

    def before_step(self):
        self.learn._grads = {n: p.grad.clone() for n, p in self.learn.model.named_parameters() if p.grad is not None}
        raise CancelStepException()


def one_step_grads(tokenizer, cache, folder, bs, accum_steps, n_batches):
    # shuffle=False: the training loader goes through the blocks in order, to compare equal data
    dls = lm_dataloaders(Corpus(folder), tokenizer, seq_len=16, bs=bs, cache=cache, verbose=False, shuffle=False)
    dls.train.n = bs * n_batches
    learn = causal_lm_learner(
        dls, tiny_llama(len(tokenizer)), precision='fp32', accum_steps=accum_steps, clip=None, cbs=[CaptureGrads()]
    )
    learn.fit(1, 0.0)
    return learn._grads


def test_accumulated_gradient_equals_the_large_batch_gradient(cat_corpus_dir, tokenizer, cache):
    big = one_step_grads(tokenizer, cache, cat_corpus_dir, bs=8, accum_steps=1, n_batches=1)
    small = one_step_grads(tokenizer, cache, cat_corpus_dir, bs=2, accum_steps=4, n_batches=4)
    assert big.keys() == small.keys()
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=1e-4), name


def test_clipping_bounds_the_gradient_norm(dls, llama):
    cap = CaptureGrads()
    learn = causal_lm_learner(dls, llama, precision='fp32', clip=0.01, cbs=[cap])
    learn.fit(1, 1e-3)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in learn._grads.values()]))
    assert norm <= 0.01 * 1.001


def test_bad_accumulation_and_clip(dls, llama):
    with pytest.raises(ValueError, match='accum_steps'):
        causal_lm_learner(dls, llama, accum_steps=0)
    with pytest.raises(ValueError, match='clip'):
        causal_lm_learner(dls, llama, clip=-1)


def test_gradient_checkpointing_trains(dls, llama):
    learn = causal_lm_learner(dls, llama, grad_checkpointing=True)
    assert learn.model.is_gradient_checkpointing
    learn.fit(1, 1e-3)
    assert learn.recorder.values


@pytest.mark.parametrize('wd_bn_bias', [False, True])
def test_no_weight_decay_on_norms_and_biases(dls, tokenizer, wd_bn_bias):
    learn = causal_lm_learner(dls, tiny_gpt2(len(tokenizer)), wd=0.5, precision='fp32', wd_bn_bias=wd_bn_bias)
    block = learn.model.transformer.h[0]
    watched = {'norm': block.ln_1.weight, 'bias': block.mlp.c_fc.bias, 'matrix': block.mlp.c_fc.weight}
    before = {k: p.detach().clone() for k, p in watched.items()}
    learn.create_opt()
    learn.opt.set_hypers(lr=0.1, wd=0.5)
    for p in learn.model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is 0: only the decoupled decay moves weights
    learn.opt.step()
    for k, p in watched.items():
        decayed = before[k] * (1 - 0.1 * 0.5)
        expected = decayed if (k == 'matrix' or wd_bn_bias) else before[k]
        assert torch.allclose(p, expected), k


def test_the_optimizer_is_torchs_fused_adamw_and_steps_like_it(dls, llama):
    from finetune.learner import AdamW

    learn = causal_lm_learner(dls, llama, precision='fp32', wd=0.1)
    learn.create_opt()
    assert learn.opt.opt.defaults['fused'] is True  # CPU float parameters: the one-pass kernel
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(7, 5)) for _ in range(2)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    ours = AdamW(params, lr=1e-2, weight_decay=0.1)
    assert ours.defaults['fused'] is True
    ref = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        ours.step()
        ref.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, atol=1e-6)
    assert AdamW([nn.Parameter(torch.zeros(2, dtype=torch.float64))], fused=False).defaults['fused'] is False


# --- predictions ---


def test_get_preds_never_holds_full_vocab_logits(dls, llama):
    learn = causal_lm_learner(dls, llama)
    preds, targets, losses = learn.get_preds(with_loss=True)
    n = len(dls.valid_ds)
    assert preds.shape == (n, 32) and preds.dtype == torch.int64  # token ids, not (n, 32, vocab) logits
    assert targets[0].shape == (n, 32) and losses.shape == (n,)
    assert losses.mean().item() == pytest.approx(learn.validate()[0], rel=0.05)


# --- LoRA ---


def test_lora_trains_only_adapters_and_saves_both_ways(dls, llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_copy = tiny_llama(llama.config.vocab_size)
    learn = causal_lm_learner(dls, llama, lora=True, n_groups=2)
    trainable = [n for n, p in learn.model.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n in trainable)
    assert learn.lr == 2e-4
    assert list(learn.groups().name) == ['block 0', 'block 1']  # adapters only: no embeddings or head
    learn.freeze()
    assert [any(f) for f in trainable_by_group(learn)] == [False, True]
    learn.unfreeze()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-2)
    x = dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad():
        expected = learn.model(x).logits
    adapter = learn.save_pretrained(tmp_path / 'adapter')
    assert (adapter / 'adapter_config.json').exists() and (adapter / 'adapter_model.safetensors').exists()
    reloaded = PeftModel.from_pretrained(base_copy, adapter).eval()
    merged = learn.save_pretrained(tmp_path / 'merged', merged=True)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, expected, atol=1e-5)
        assert torch.allclose(plain(x).logits, expected, atol=1e-4)
    assert 'lora' not in ' '.join(n for n, _ in plain.named_parameters())
    assert any('lora_' in n for n, _ in learn.model.named_parameters())  # the learner keeps its adapters


def test_lora_in_bf16_trains_adapters_on_a_bf16_copy_and_leaves_the_base_fp32(dls, llama, monkeypatch):
    seen = SeenAtStep()
    learn = causal_lm_learner(dls, llama, lora=True, precision='bf16', cbs=[seen])
    base = {n: p.detach().clone() for n, p in learn.model.named_parameters() if not p.requires_grad}
    master = next(cb for cb in learn.cbs if isinstance(cb, MasterWeightsCallback))
    copied = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, '_foreach_copy_', lambda dst, src: (copied.append(len(dst)), real(dst, src)))
    out = []
    mlp = learn.model.get_base_model().model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: out.append(o.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3)
    handle.remove()
    assert set(out) == {torch.bfloat16}
    adapters = sum(p.requires_grad for p in learn.model.parameters())
    assert copied and set(copied) == {adapters}  # after the first copy, only the adapters are refreshed
    assert seen.weights == {torch.float32} and seen.grads == {torch.float32}
    after = dict(learn.model.named_parameters())
    assert all(torch.equal(after[n], p) and after[n].dtype == torch.float32 for n, p in base.items())
    assert master.params == []  # nothing held after the fit


def test_lora_bad_target_modules_lists_linear_layers(dls, llama):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"\['qkv'\] are not linear layers.*'down_proj'.*'q_proj'"):
        causal_lm_learner(dls, llama, lora=LoraConfig(target_modules=['qkv', 'q_proj']))


# --- host syncs ---

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__float__}
SYNCS |= {torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__format__}


class CountSyncs(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values made by fastai's or finetune's code between before_batch and after_batch."""

    def __init__(self):
        super().__init__()
        self.in_batch, self.seen = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.in_batch and func in SYNCS:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-1] if '/torch/overrides' not in f.filename]
            caller = frames[-1].filename.replace('\\', '/')
            if any(part in caller for part in ('/fastai/', '/fastcore/', '/finetune/')):
                self.seen.append(f'{func.__name__} at {caller}:{frames[-1].lineno}')
        return func(*args, **(kwargs or {}))


class BatchBounds(Callback):
    def __init__(self, mode, last):
        self.mode, self.order = mode, 1000 if last else -1000

    def before_batch(self):
        if self.order < 0:
            self.mode.in_batch = True

    def after_batch(self):
        if self.order > 0:
            self.mode.in_batch = False


def test_no_host_sync_in_any_training_batch(dls, llama, monkeypatch):
    from finetune.callbacks import SyncFreeProgressCallback

    monkeypatch.setattr(SyncFreeProgressCallback, 'interval', float('inf'))  # its comment reads the loss: never here
    mode = CountSyncs()
    learn = causal_lm_learner(dls, llama, accum_steps=2, cbs=[BatchBounds(mode, False), BatchBounds(mode, True)])
    assert isinstance(learn.progress, SyncFreeProgressCallback)
    with mode:
        learn.fit(1, 1e-4)
    assert mode.seen == []
    with learn.no_bar():
        assert not hasattr(learn, 'progress')
    assert isinstance(learn.progress, SyncFreeProgressCallback)  # fastai's no_bar would put its own back


def test_a_frozen_step_of_a_tied_model_runs_no_backward_through_the_blocks(dls, tokenizer):
    model = tiny_llama(len(tokenizer), tie_word_embeddings=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    learn = causal_lm_learner(dls, model, precision='fp32')
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0].requires_grad))
    head = model.lm_head.weight.detach().clone()
    learn.freeze()
    with learn.no_bar():
        learn.fit(1, 1e-3)
    frozen, seen[:] = list(seen), []
    assert not any(frozen)  # no activation of a frozen block is part of the graph: backward stops at the norm
    assert not torch.equal(model.lm_head.weight, head)  # the tied head still trains
    assert all(p.grad is None for p in model.model.layers.parameters())
    learn.unfreeze()
    with learn.no_bar():
        learn.fit(1, 1e-3)
    handle.remove()
    assert any(seen)  # unfrozen, the blocks are in the graph again
    assert not model.get_input_embeddings()._forward_hooks  # nothing left behind


MALLINFO = """
import ctypes, sys
import finetune.allocator as allocator
class Info(ctypes.Structure):
    names = 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = Info
done = [allocator.keep_freed_memory(), allocator.keep_freed_memory()]
before = libc.mallinfo2().hblks
block = ctypes.create_string_buffer(8 << 20)
print(done, libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize('env, expected', [({}, '[True, True] 0'), ({'FINETUNE_MALLOPT': '0'}, '[False, False] 1')])
def test_the_first_fit_keeps_freed_memory_in_the_heap(env, expected):
    """With finetune's thresholds an 8 MiB block comes from the heap (kept when freed), not from its own mmap."""
    import os
    import subprocess
    import sys

    run_env = {**os.environ, 'FINETUNE_MALLOPT': '1', **env}
    out = subprocess.run([sys.executable, '-c', MALLINFO], capture_output=True, text=True, env=run_env, check=True)
    assert out.stdout.strip() == expected


def test_a_fit_sets_the_malloc_thresholds(dls, llama, monkeypatch):
    import finetune.callbacks

    calls = []
    monkeypatch.setattr(finetune.callbacks, 'keep_freed_memory', lambda: calls.append(1))
    causal_lm_learner(dls, llama, precision='fp32').fit(1, 1e-4)
    assert calls
