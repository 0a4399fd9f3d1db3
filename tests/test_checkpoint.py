"""Checkpoints: exact resume in a fresh process, atomic writes, damage detected, no pickle, clear refusals."""

import json
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from fastai.callback.core import Callback
from safetensors.torch import load_file

from finetune import Corpus, causal_lm_learner, lm_dataloaders
from finetune.checkpoint import MANIFEST, checkpoints_in, find_checkpoint, read_checkpoint

RUN = Path(__file__).parent / 'resume_run.py'


def run(out: Path, data: Path, how: str, resume: Path | None = None) -> dict:
    """One `resume_run.py` training in a fresh process; its record and final weights and optimizer tensors."""
    cmd = [sys.executable, str(RUN), str(out), '--data', str(data), '--how', how]
    if resume is not None:
        cmd += ['--resume', str(resume)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads((out / 'record.json').read_text()), 'final': load_file(out / 'final.safetensors')}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('resume')
    cache = {}

    def get(how: str):
        if how not in cache:
            cache[how] = (run(root / how, root / 'data', how), root / how / 'run' / 'checkpoints', root)
        return cache[how]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    'how, step, where',
    [
        ('fit_one_cycle', 5, 'the middle of epoch 1'),
        ('fit_one_cycle', 10, 'the end of epoch 1'),
        ('fine_tune', 4, 'the frozen phase'),
        ('lora', 7, 'the middle of epoch 1'),
        ('bf16', 5, 'the middle of epoch 1'),  # fp32 master weights, a bf16 copy: the masters are what is saved
    ],
)
def test_a_resumed_run_is_the_uninterrupted_run(uninterrupted, how, step, where):
    """GPT-2 with dropout, two corpora, accum_steps=2: from a checkpoint, in a new process, every later batch's
    inputs, loss and LR, the final weights and every optimizer tensor equal the run that was never stopped."""
    full, checkpoints, root = uninterrupted(how)
    checkpoint = checkpoints / f'step-{step}'
    state = json.loads((checkpoint / 'state.json').read_text())
    assert (state['position']['iter'] == 0) == (where == 'the end of epoch 1')
    assert (state['fit']['phase'] == 0) == (how == 'fine_tune')
    resumed = run(root / f'{how}-from-{step}', root / 'data', how, checkpoint)
    n = len(resumed['rows'])
    assert 0 < n < len(full['rows'])
    assert resumed['rows'] == full['rows'][-n:]  # same blocks (input hashes), same losses and LRs, bit for bit
    assert resumed['rows'][0][3] == step  # the first resumed batch starts after the checkpoint's step
    assert resumed['final'].keys() == full['final'].keys()
    assert all(torch.equal(resumed['final'][k], full['final'][k]) for k in full['final'])
    assert resumed['values'] == full['values'] and resumed['trained_tokens'] == full['trained_tokens']


@pytest.fixture
def two(tmp_path, tokenizer):
    from resume_run import corpora

    return lm_dataloaders(corpora(tmp_path / 'data'), tokenizer, seq_len=16, bs=4, cache=tmp_path / 'c', verbose=False)


def test_checkpoints_rotate_and_count_optimizer_steps(two, tokenizer, tmp_path):
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', accum_steps=2,
                              run_dir=tmp_path / 'run', checkpoint_every=3, keep=2)  # fmt: skip
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-3)
    kept = checkpoints_in(tmp_path / 'run' / 'checkpoints')
    steps = learn.opt_steps
    expected = [s for s in range(3, steps + 1, 3)][-2:]
    assert [p.name for p in kept] == [f'step-{s}' for s in expected]
    assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == sorted(p.name for p in kept)
    files = sorted(p.name for p in kept[-1].iterdir())
    assert files == ['manifest.json', 'model.safetensors', 'optimizer.safetensors', 'rng.safetensors', 'state.json']


def test_checkpoints_without_a_run_dir_go_to_runs_in_the_working_directory(two, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', checkpoint_every=100)
    assert learn.run_dir.parent == Path('runs')
    nothing = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32')
    with nothing.no_bar():
        nothing.fit(1, 1e-3)
    assert nothing.run_dir is None and not (tmp_path / 'runs').exists()  # no checkpoints asked: no files


@pytest.fixture
def saved(two, tokenizer, tmp_path):
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=tmp_path / 'run',
                              checkpoint_every=2)  # fmt: skip
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-3)
    return checkpoints_in(tmp_path / 'run' / 'checkpoints')


def test_a_flipped_byte_is_detected_and_named(saved):
    path = saved[-1] / 'optimizer.safetensors'
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r'optimizer\.safetensors does not match its manifest'):
        read_checkpoint(saved[-1])


def test_a_pickle_in_a_checkpoint_never_executes(saved, tmp_path):
    """Neither a stray pickle file nor a pickle disguised as a listed file (manifest updated to match) runs."""
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = saved[-1]
    (folder / 'extra.pkl').write_bytes(pickle.dumps(Evil()))
    (folder / 'optimizer.pt').write_bytes(pickle.dumps(Evil()))
    read_checkpoint(folder)  # unlisted files are never opened
    (folder / 'rng.safetensors').write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((folder / MANIFEST).read_text())
    import hashlib

    manifest['rng.safetensors'] = hashlib.sha256((folder / 'rng.safetensors').read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r'(?i)header|safetensor|invalid'):  # not a safetensors file: refused
        read_checkpoint(folder)
    assert not marker.exists()


def test_a_new_fit_will_not_write_over_another_runs_checkpoints(saved, two, tokenizer):
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=saved[-1].parent.parent,
                              checkpoint_every=2)  # fmt: skip
    with pytest.raises(FileExistsError, match=r'holds checkpoints of another run, up to step-\d+: resume it'):
        learn.fit_one_cycle(1, 1e-3)
    learn.validate()  # validation alone is no fit: nothing to refuse
    with pytest.raises(ValueError, match='checkpoints are taken during fit_one_cycle and fine_tune'):
        causal_lm_learner(two, tiny_llama(len(tokenizer)), run_dir=saved[-1].parent.parent / 'other',
                          checkpoint_every=2).fit(1, 1e-3)  # fmt: skip


def test_latest_skips_an_incomplete_checkpoint_with_a_warning(saved):
    run_dir = saved[-1].parent.parent
    half = run_dir / 'checkpoints' / 'step-99999'
    half.mkdir()
    (half / 'model.safetensors').write_bytes(b'half a file')
    with pytest.warns(UserWarning, match='skipping incomplete checkpoint.*step-99999'):
        assert find_checkpoint('latest', run_dir) == saved[-1]


def test_resuming_with_other_data_model_or_batch_size_is_refused(saved, two, tokenizer, tmp_path, cat_corpus_dir):
    checkpoint = saved[-1]
    other_bs = lm_dataloaders(two.packed, tokenizer, bs=2, verbose=False)
    learn = causal_lm_learner(other_bs, tiny_llama(len(tokenizer)), precision='fp32')
    with pytest.raises(ValueError, match=r"does not match this learner: \{'bs': \(4, 2\)\}.*force=True"):
        learn.fit_one_cycle(1, 1e-3, resume=checkpoint)
    other_data = lm_dataloaders(
        Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, cache=tmp_path / 'c', verbose=False
    )
    learn = causal_lm_learner(other_data, tiny_llama(len(tokenizer)), precision='fp32')
    with pytest.raises(ValueError, match=r"does not match this learner: \{'data'"):
        learn.fit_one_cycle(1, 1e-3, resume=checkpoint)
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer), num_hidden_layers=3), precision='fp32')
    with pytest.raises(ValueError, match=r"'model'"):
        learn.fit_one_cycle(1, 1e-3, resume=checkpoint)
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32')
    with pytest.raises(ValueError, match=r'saved by a different fit.*n_epoch'):
        learn.fit_one_cycle(2, 1e-3, resume=checkpoint)
    with pytest.raises(ValueError, match="resume='latest' needs the learner's run_dir"):
        learn.fit_one_cycle(1, 1e-3, resume='latest')


def test_resuming_on_a_count_of_processes_that_cannot_share_the_global_batch_is_refused(
    saved, two, tokenizer, monkeypatch
):
    from finetune.learner import CausalLMLearner

    monkeypatch.setattr(CausalLMLearner, 'world', property(lambda self: 3))  # as if launched on 3 processes
    one = lm_dataloaders(two.packed, tokenizer, bs=1, verbose=False)
    learn = causal_lm_learner(one, tiny_llama(len(tokenizer)), precision='fp32')
    before = {n: p.clone() for n, p in learn.model.named_parameters()}
    with pytest.raises(ValueError, match=r'global batch of 4 blocks, which 3 processes cannot share.*divides 4'):
        learn.fit_one_cycle(1, 1e-3, resume=saved[-1])
    assert all(torch.equal(p, before[n]) for n, p in learn.model.named_parameters())  # nothing loaded


class PoisonLoss(Callback):
    """Makes the loss of one batch NaN, as an overflow would."""

    order = 10  # after the loss, before TrainStepCallback reads it

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def after_loss(self):
        if self.training:
            self.seen += 1
            if self.seen == self.at:
                self.learn.loss_grad = self.learn.loss_grad * float('nan')
                self.learn.loss = self.learn.loss * float('nan')


def test_a_nan_loss_stops_the_fit_naming_step_and_corpus_and_keeps_the_last_good_checkpoint(two, tokenizer, tmp_path):
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer)), precision='fp32', run_dir=tmp_path / 'run',
                              checkpoint_every=2, cbs=[PoisonLoss(at=5)])  # fmt: skip
    with pytest.raises(
        FloatingPointError, match=r"NaN or infinite at optimizer step 5, on a batch of corpus '(cats|dogs)'"
    ):
        with learn.no_bar():
            learn.fit_one_cycle(1, 1e-3)
    assert [p.name for p in checkpoints_in(tmp_path / 'run' / 'checkpoints')] == ['step-2', 'step-4']


SAVER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_llama, tiny_tokenizer
from resume_run import corpora
from finetune import causal_lm_learner, lm_dataloaders
tok = tiny_tokenizer()
from pathlib import Path
dls = lm_dataloaders(corpora(Path({data!r})), tok, seq_len=16, bs=4, cache={cache!r}, verbose=False)
learn = causal_lm_learner(dls, tiny_llama(len(tok)), precision='fp32', run_dir={run!r}, checkpoint_every=1, keep=3)
print('ready', flush=True)
started = (Path({run!r}) / 'checkpoints').exists()
with learn.no_bar():
    learn.fit_one_cycle(50, 1e-3, resume='latest' if started else None)  # each kill, then resumed
"""


@pytest.mark.slow
def test_killed_while_saving_the_latest_complete_checkpoint_loads_and_resumes(tmp_path, tokenizer):
    script = tmp_path / 'saver.py'
    run_dir = tmp_path / 'run'
    script.write_text(SAVER.format(tests=str(Path(__file__).parent), data=str(tmp_path / 'data'),
                                   cache=str(tmp_path / 'c'), run=str(run_dir)))  # fmt: skip
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert 'ready\n' in iter(proc.stdout.readline, '')
        deadline = time.time() + 60
        while not checkpoints_in(run_dir / 'checkpoints') and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = find_checkpoint('latest', run_dir)
        read_checkpoint(latest)  # every file matches its manifest
        visible = [p.name for p in (run_dir / 'checkpoints').iterdir() if not p.name.startswith('.')]
        assert all((run_dir / 'checkpoints' / v / MANIFEST).exists() for v in visible), visible
    from resume_run import corpora

    dls = lm_dataloaders(corpora(tmp_path / 'data'), tokenizer, seq_len=16, bs=4, cache=tmp_path / 'c', verbose=False)
    learn = causal_lm_learner(dls, tiny_llama(len(tokenizer)), precision='fp32', run_dir=run_dir)
    step = read_checkpoint(latest).step
    with learn.no_bar():
        learn.fit_one_cycle(50, 1e-3, resume='latest')
    assert learn.opt_steps > step and learn.epoch == 49


def test_resuming_fine_tune_in_a_phase_this_call_lacks_is_refused(two, tokenizer, tmp_path):
    learn = causal_lm_learner(two, tiny_llama(len(tokenizer), num_hidden_layers=4), precision='fp32', n_groups=2,
                              run_dir=tmp_path / 'run', checkpoint_every=2)  # fmt: skip
    with learn.no_bar():
        learn.fine_tune(1, 1e-3, freeze_epochs=1)  # the frozen phase asked for: phase 0, then phase 1
    frozen = [
        p for p in checkpoints_in(tmp_path / 'run' / 'checkpoints') if read_checkpoint(p).state['fit']['phase'] == 0
    ]
    assert frozen
    with pytest.raises(
        ValueError, match=r'saved in phase 0 of a fine_tune that this call does not have \(its phases: \[1\]\)'
    ):
        learn.fine_tune(1, 1e-3, resume=frozen[0])  # no new weights: this call has no frozen phase
