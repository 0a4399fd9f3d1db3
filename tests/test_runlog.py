"""Run logs: metrics.jsonl with the Trainer's key names, token counts that add up, TensorBoard, the plot."""

import pytest
from conftest import tiny_llama

from finetune import causal_lm_learner, lm_dataloaders
from finetune.runlog import plot_run, read_metrics


@pytest.fixture
def two(tmp_path, tokenizer):
    from resume_run import corpora

    return lm_dataloaders(corpora(tmp_path / 'data'), tokenizer, seq_len=16, bs=4, cache=tmp_path / 'c', verbose=False)


def test_metrics_jsonl_has_the_documented_keys_and_its_tokens_add_up(two, tokenizer, tmp_path):
    run = tmp_path / 'run'
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=run, log_every=3)
    with learn.no_bar():
        learn.lr_find(num_it=5, show_plot=False)
        assert not (run / 'metrics.jsonl').exists() or read_metrics(run) == []  # lr_find logs nothing
        learn.fit_one_cycle(2, 1e-3)
    lines = read_metrics(run)
    train = [r for r in lines if 'train/loss' in r]
    evals = [r for r in lines if 'eval/loss' in r]
    steps = learn.opt_steps
    logged = [r['step'] for r in train]
    assert set(range(3, steps + 1, 3)) <= set(logged) and logged == sorted(set(logged))
    assert logged[-1] == steps and len(set(logged) - set(range(3, steps + 1, 3))) <= 2  # plus each epoch's last step
    assert {'train/loss', 'train/learning_rate', 'train/grad_norm', 'num_input_tokens_seen', 'train/epoch',
            'train/tokens_per_second', 'train/learning_rate_group_0'} <= set(train[0])  # fmt: skip
    assert len(evals) == 2 and {'eval/perplexity', 'eval/ppl_cats', 'eval/ppl_dogs'} <= set(evals[-1])
    assert evals[-1]['eval/perplexity'] == pytest.approx(learn.recorder.values[-1][2], rel=1e-5)
    for i, name in enumerate(['cats', 'dogs']):
        assert sum(r[f'train/tokens_{name}'] for r in train) == two.trained_tokens[i]
    assert train[-1]['num_input_tokens_seen'] == sum(two.trained_tokens)
    assert train[0]['train/learning_rate'] < max(r['train/learning_rate'] for r in train)  # the one-cycle warm-up


def test_tensorboard_holds_the_same_scalars(two, tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / 'run'
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=run, log_every=2,
                              report_to='tensorboard')  # fmt: skip
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-3)
    events = EventAccumulator(str(run / 'tensorboard'))
    events.Reload()
    lines = [r for r in read_metrics(run) if 'train/loss' in r]
    logged = [(e.step, e.value) for e in events.Scalars('train/loss')]
    assert logged == [(r['step'], pytest.approx(r['train/loss'], rel=1e-6)) for r in lines]
    assert 'eval/ppl_dogs' in events.Tags()['scalars']


def test_a_tracker_that_is_not_installed_names_the_pip_install(two, tokenizer, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == 'wandb':
            raise ImportError('No module named wandb')
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_wandb)
    with pytest.raises(ImportError, match="report_to='wandb' needs the wandb package: pip install wandb"):
        causal_lm_learner(two, tiny_llama(len(tokenizer)), run_dir=tmp_path / 'run', report_to='wandb')
    with pytest.raises(ValueError, match=r"report_to=\['tensorbored'\]: known trackers"):
        causal_lm_learner(two, tiny_llama(len(tokenizer)), run_dir=tmp_path / 'run', report_to=['tensorbored'])


def test_plot_run_draws_the_three_curves(two, tokenizer, tmp_path):
    import matplotlib

    matplotlib.use('Agg')
    run = tmp_path / 'run'
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=run, log_every=2)
    with learn.no_bar():
        learn.fit_one_cycle(2, 1e-3)
    fig = plot_run(run, tmp_path / 'curves.png')
    loss, lr, ppl = fig.axes
    assert len(loss.lines[0].get_xdata()) == len([r for r in read_metrics(run) if 'train/loss' in r])
    assert {line.get_label() for line in ppl.lines} == {'perplexity', 'ppl_cats', 'ppl_dogs'}
    assert (tmp_path / 'curves.png').stat().st_size > 10_000
