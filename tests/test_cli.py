"""The `finetune` command: errors before any model loads, help with defaults, and train/eval/generate on a
tiny local model. The quickstart's corpora come from this Python's own files."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import sentences, tiny_llama
from transformers import AutoModelForCausalLM

import finetune.cli as cli
from finetune import Corpus, corpus_perplexity, load_tokenizer
from finetune.quickstart import (
    MARGIN,
    RESERVE_S,
    WARMUP_STEPS,
    python_reference_corpus,
    size_run,
    stdlib_docstrings_corpus,
)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load a model or tokenizer."""
    import finetune.models as models

    def refuse(*a, **k):
        raise AssertionError('a model was loaded before the arguments were checked')

    monkeypatch.setattr(models, 'load_model', refuse)
    monkeypatch.setattr(models, 'load_tokenizer', refuse)


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    path = tmp_path / 'tiny-model'
    model = tiny_llama(len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpora(tmp_path):
    for name, texts in {
        'general': sentences(200, seed=3),
        'legal': [f'the lessee shall pay {i}.' for i in range(80)],
    }.items():
        (tmp_path / name).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / name / f'{i}.txt').write_text(t)
    return tmp_path


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_config_key_names_it_and_the_allowed_ones(tmp_path, no_model_loading, capsys):
    config = tmp_path / 'c.toml'
    config.write_text('model = "x"\nlearning_rate = 0.1\n[[corpus]]\nname = "a"\npath = "a"\n')
    code, _, err = run(['train', str(config)], capsys)
    assert code == 2 and "unknown config key(s) ['learning_rate']" in err and "'lr'" in err


def test_unknown_corpus_key(tmp_path, no_model_loading, capsys):
    config = tmp_path / 'c.toml'
    config.write_text('[[corpus]]\nname = "a"\npath = "a"\nweigth = 2\n')
    code, _, err = run(['train', str(config)], capsys)
    assert code == 2 and "unknown key(s) ['weigth'] in [[corpus]] number 1" in err


def test_missing_corpus_path_fails_before_the_model(tmp_path, no_model_loading, capsys):
    code, _, err = run(['train', '--corpus', f'legal={tmp_path / "nope"}'], capsys)
    assert code == 2 and 'nope' in err and 'does not exist' in err


def test_share_for_an_unknown_corpus(corpora, no_model_loading, capsys):
    argv = ['train', '--corpus', f'legal={corpora / "legal"}', '--share', 'legl=0.5']
    code, _, err = run(argv, capsys)
    assert code == 2 and "['legl'], which are not corpora; the corpora are ['legal']" in err


def test_share_for_an_unknown_corpus_in_a_config(tmp_path, corpora, no_model_loading, capsys):
    config = tmp_path / 'c.toml'
    config.write_text(f'[[corpus]]\nname = "legal"\npath = "{corpora / "legal"}"\nshare = 1.5\n')
    code, _, err = run(['train', str(config)], capsys)
    assert code == 2 and 'share = 1.5: must be a number in [0, 1]' in err


def test_bad_values(tmp_path, corpora, no_model_loading, capsys):
    code, _, err = run(['train', '--corpus', f'legal={corpora / "legal"}', '--bs', '0'], capsys)
    assert code == 2 and 'bs = 0: must be a whole number >= 1' in err
    code, _, err = run(['train', '--corpus', 'legal'], capsys)
    assert code == 2 and 'write NAME=VALUE' in err
    code, _, err = run(['train'], capsys)
    assert code == 2 and 'no corpora' in err
    with pytest.raises(SystemExit):
        cli.main(['train', '--precision', 'int4'])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


CORPUS = '[[corpus]]\nname = "legal"\npath = "{legal}"\n'
BAD_CONFIGS = {  # a TOML config (with one good corpus unless it says otherwise) -> what the error says
    'lr = "fast"': "lr = 'fast': must be a number > 0, or absent",
    'valid_pct = "x"': "valid_pct = 'x': must be a number in (0, 1)",
    'valid_pct = 1': 'valid_pct = 1.0: must be a number in (0, 1)',
    'out = 5': 'out = 5: must be a non-empty string',
    'out = ""': "out = '': must be a non-empty string",
    'lora = "yes"': "lora = 'yes': must be true or false",
    'compile = 1': 'compile = 1: must be true or false',
    'model = 5': 'model = 5: must be a non-empty string',
    'bs = true': 'bs = True: must be a whole number >= 1',
    'seq_len = 32.0': 'seq_len = 32.0: must be a whole number >= 1',
    'seed = "x"': "seed = 'x': must be a whole number >= 0",
    'seed = -1': 'seed = -1: must be a whole number >= 0',
    'epoch_tokens = 0': 'epoch_tokens = 0: must be a whole number >= 1, or absent',
    'report_to = "tensorbored"': "report_to=['tensorbored']: known trackers are",
    'precision = "int4"': "precision = 'int4': must be one of",
    'corpus = "data/legal"': 'corpora are tables, one per corpus',
    '[[corpus]]\nname = "legal"\npath = "{legal}"\ndoc_sep = 5': 'doc_sep = 5: must be a string, or absent',
    '[[corpus]]\nname = "legal"\npath = "{legal}"\ntarget = "yes"': "target = 'yes': must be true or false",
    '[[corpus]]\nname = "legal"\npath = "{legal}"\nweight = -1': 'weight = -1.0: must be a number >= 0, or absent',
    '[[corpus]]\nname = "legal"\npath = "{legal}"\nformat = "csv"': "format = 'csv': must be one of",
    '[[corpus]]\nname = ""\npath = "{legal}"': "name = '': must be a non-empty string",
    '[[corpus]]\nname = "a"\npath = "{legal}"\n[[corpus]]\nname = "a"\npath = "{legal}"': "names must differ: ['a']",
}


@pytest.mark.parametrize('line', list(BAD_CONFIGS))
def test_every_bad_value_is_named_before_any_model_loads(line, tmp_path, corpora, no_model_loading, capsys):
    config = tmp_path / 'c.toml'
    own = line.startswith(('[[corpus]]', 'corpus'))
    text = line.format(legal=corpora / 'legal') + '\n'
    config.write_text(text if own else text + CORPUS.format(legal=corpora / 'legal'))
    code, _, err = run(['train', str(config)], capsys)
    assert code == 2 and BAD_CONFIGS[line] in err, err


def test_seq_len_beyond_the_models_context_is_refused_before_tokenizing(
    tmp_path, corpora, tokenizer, monkeypatch, capsys
):
    import finetune.models as models
    import finetune.tokens as tokens

    path = tmp_path / 'short-model'
    tiny_llama(len(tokenizer), max_position_embeddings=64).save_pretrained(path)
    tokenizer.save_pretrained(path)

    def refuse(*a, **k):
        raise AssertionError('loaded or tokenized before seq_len was checked')

    monkeypatch.setattr(models, 'load_model', refuse)
    monkeypatch.setattr(tokens, '_encode_batch', refuse)
    argv = ['train', '--model', str(path), '--corpus', f'legal={corpora / "legal"}', '--seq-len', '128']
    code, _, err = run(argv, capsys)
    assert code == 2 and 'seq_len=128 is longer than the context window' in err and '(64 positions)' in err
    assert '--seq-len' in err


def test_the_readme_lists_every_config_key_with_its_values():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / 'README.md').read_text()
    assert cli.config_reference() in readme


@pytest.mark.parametrize('command', ['quickstart', 'train', 'eval', 'generate', 'probe'])
def test_help_shows_defaults(command):
    out = subprocess.run([sys.executable, '-m', 'finetune.cli', command, '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'usage: finetune' in out.stdout
    if command in ('quickstart', 'eval', 'generate'):
        assert 'default:' in out.stdout
    assert '(default: None)' not in out.stdout and 'default none (default' not in out.stdout


@pytest.mark.slow
def test_train_eval_generate_on_a_tiny_model(tmp_path, corpora, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    config = tmp_path / 'run.toml'
    config.write_text(
        f'model = "{tiny_model_dir}"\nseq_len = 32\nbs = 8\nepochs = 1\nlr = 0.003\nprecision = "fp32"\n'
        f'out = "{tmp_path / "out"}"\n'
        f'[[corpus]]\nname = "general"\npath = "{corpora / "general"}"\n'
        f'[[corpus]]\nname = "legal"\npath = "{corpora / "legal"}"\nshare = 0.5\ntarget = true\n'
    )
    code, out, err = run(['train', str(config), '--epochs', '1'], capsys)
    assert code == 0, err
    report = out[out.index('epoch share') :]
    assert re.search(r'legal\s+True.*share 50%\s+50\.0%', report), report  # the share asked for, and got
    assert 'ppl_general' in out and 'ppl_legal' in out
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / 'out' / 'model')
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert len(moved) == len(list(start.parameters())), 'every weight trains (no LoRA, no freezing)'
    model = tmp_path / 'out' / 'model'
    code, out, err = run(['eval', str(model), '--corpus', f'legal={corpora / "legal"}', '--seq-len', '16'], capsys)
    assert code == 0, err
    expected = corpus_perplexity(trained, load_tokenizer(model), Corpus(corpora / 'legal', name='legal'), seq_len=16,
                                 precision='fp32').perplexity[0]  # fmt: skip
    shown = float(re.search(r'legal\s+\d+\s+([\d.]+)', out).group(1))
    assert shown == pytest.approx(expected, rel=1e-3)
    code, out, err = run(['generate', str(tmp_path / 'out' / 'model'), 'the lessee', '--max-new-tokens', '5'], capsys)
    text = out.rstrip('\n').split('\r')[-1]
    assert code == 0 and text.startswith('the lessee') and len(text) > len('the lessee')


@pytest.mark.slow
def test_train_checkpoints_and_resumes_to_the_same_model(tmp_path, corpora, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    out = tmp_path / 'run'
    flags = [
        'train',
        '--model',
        str(tiny_model_dir),
        '--corpus',
        f'general={corpora / "general"}',
        '--corpus',
        f'legal={corpora / "legal"}',
        '--seq-len',
        '32',
        '--bs',
        '4',
        '--epochs',
        '2',
        '--lr',
        '3e-3',
        '--precision',
        'fp32',
        '--out',
        str(out),
        '--checkpoint-every',
        '3',
        '--keep',
        '1000',
        '--log-every',
        '2',
    ]
    code, _, err = run(flags, capsys)  # fmt: skip
    assert code == 0, err
    first = AutoModelForCausalLM.from_pretrained(out / 'model')
    steps = sorted(int(p.name[5:]) for p in (out / 'checkpoints').iterdir())
    assert steps[:2] == [3, 6] and (out / 'metrics.jsonl').exists()
    code, _, err = run(flags, capsys)
    assert code == 2 and 'pass --resume to continue' in err
    code, printed, err = run([*flags, '--resume', str(out / 'checkpoints' / 'step-3')], capsys)
    assert code == 0, err
    assert 'resuming from' in printed
    second = AutoModelForCausalLM.from_pretrained(out / 'model')
    assert all(torch.equal(p, second.get_parameter(n)) for n, p in first.named_parameters())
    code, printed, err = run(['plot', str(out)], capsys)
    assert code == 0 and (out / 'curves.png').exists()


def test_quickstart_corpora_come_from_this_python(tmp_path):
    reference = python_reference_corpus(tmp_path / 'ref')
    docs = list(reference.documents())
    assert len(docs) > 50 and any('with' in d for d in docs) and reference.target
    general = stdlib_docstrings_corpus(tmp_path / 'doc', max_modules=20)
    texts = list(general.documents())
    assert len(texts) > 20 and all(len(t) > 0 for t in texts)


@pytest.fixture
def stand_in_zoo(tmp_path, tiny_model_dir, monkeypatch):
    """A tiny model stands in for the embedded SmolLM2; the quickstart's corpora go to a fresh cache."""
    import finetune.models as models

    monkeypatch.setattr(models, 'zoo_model_dir', lambda name: tiny_model_dir)
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))


@pytest.mark.slow
def test_quickstart_runs_on_a_stand_in_model(tmp_path, stand_in_zoo, capsys):
    """The quickstart's whole path, with a tiny model standing in for the embedded SmolLM2."""
    from finetune.quickstart import run_quickstart

    result = run_quickstart(out=tmp_path / 'qs', steps=6, seq_len=32, bs=4, lr=3e-3, precision='fp32')
    out = capsys.readouterr().out
    assert 'perplexity of python_reference' in out and 'before:' in out and 'after:' in out
    assert result['after']['python_reference'] < result['before']['python_reference']
    assert (tmp_path / 'qs' / 'model.safetensors').exists()


@pytest.mark.slow
def test_quickstart_sizes_its_run_to_the_time_budget(tmp_path, stand_in_zoo, capsys):
    from finetune.quickstart import run_quickstart

    result = run_quickstart(out=tmp_path / 'qs', minutes=0.5, seq_len=32, bs=4, lr=3e-3, precision='fp32')
    out = capsys.readouterr().out
    plan = re.search(r'the plan: fp32 on this CPU: [\d,]+ tokens/s; (\d+) steps of 4 x 32 tokens and (\d+) valid', out)
    assert plan and int(plan[1]) == result['steps'] > WARMUP_STEPS and int(plan[2]) == result['valid_blocks']
    with pytest.raises(ValueError, match=r'--minutes 0.01 is too short on this machine: one training step takes'):
        run_quickstart(out=tmp_path / 'qs2', minutes=0.01, seq_len=32, bs=4, precision='fp32')
    assert not (tmp_path / 'qs2').exists()
    code, _, err = run(['quickstart', '--minutes', '0', '--out', str(tmp_path / 'qs3')], capsys)
    assert code == 2 and 'the time budget must be a positive number of minutes' in err


def test_a_run_is_sized_to_what_is_left_of_the_budget():
    size = size_run(600, step_s=4.0, block_s=0.5, n_corpora=3)
    usable = 600 * (1 - MARGIN) - RESERVE_S
    validation = 2 * 3 * 0.5 * size.valid_blocks
    assert size.valid_blocks == 16 and size.steps * 4.0 + validation <= usable < (size.steps + 1) * 4.0 + validation
    slow_valid = size_run(300, step_s=1.0, block_s=5.0, n_corpora=3)  # validation would take most of the budget
    assert slow_valid.valid_blocks == 2 and slow_valid.steps == int(300 * (1 - MARGIN) - RESERVE_S - 60)
    tight = size_run(126.3, step_s=90.0, block_s=0.25, n_corpora=2)  # fewer validation blocks, so that a step fits
    assert tight.steps == 1 and 2 <= tight.valid_blocks < 16
    with pytest.raises(
        ValueError, match=r'one training step takes 40.0 s \(0.67 minutes\).*raise it by at least 1 minute'
    ):
        size_run(50, step_s=40.0, block_s=0.5, n_corpora=2, what='--minutes 1')


def test_switches_in_a_config_are_not_undone_by_absent_flags(tmp_path, corpora):
    config = tmp_path / 'c.toml'
    config.write_text(f'lora = true\ncompile = true\n[[corpus]]\nname = "legal"\npath = "{corpora / "legal"}"\n')
    loaded = cli.train_config(cli.parser().parse_args(['train', str(config)]))
    assert loaded.lora is True and loaded.compile is True
    flags = cli.train_config(cli.parser().parse_args(['train', '--corpus', f'legal={corpora / "legal"}', '--compile']))
    assert flags.compile is True and flags.lora is False


def test_eval_refuses_a_seq_len_beyond_the_models_context(tiny_model_dir, corpora, capsys):
    argv = ['eval', str(tiny_model_dir), '--corpus', f'legal={corpora / "legal"}', '--seq-len', '1024']
    code, _, err = run(argv, capsys)
    assert code == 2 and 'seq_len=1024 is longer than the context window' in err and '(512 positions)' in err


def test_probe_runs_the_data_curve_and_the_share_sweep(tmp_path, corpora, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    flags = ['--model', str(tiny_model_dir), '--corpus', f'general={corpora / "general"}', '--corpus',
             f'legal={corpora / "legal"}', '--target', 'legal', '--seq-len', '16', '--bs', '4', '--precision', 'fp32',
             '--steps', '2']  # fmt: skip
    code, out, err = run(['probe', *flags, '--fractions', '0.5', '1', '--plot', str(tmp_path / 'curve.png')], capsys)
    assert code == 0, err
    assert 'target_data_curve: 2 runs x 2 steps x 4 x 16 tokens' in out and 'ppl legal' in out
    assert (tmp_path / 'curve.png').stat().st_size > 0
    code, out, err = run(['probe', *flags, '--shares', '0.3', '0.5', '0.7'], capsys)
    assert code == 0, err
    assert 'share_sweep: 3 runs' in out and ('train at share' in out or 'no share between' in out)
    code, out, err = run(['probe', *flags, '--shares', '0.3', '1.5'], capsys)
    assert code == 2 and 'shares must be in (0, 1]' in err
