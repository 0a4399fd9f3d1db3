"""The README's notebook example runs as written, on a tiny local model instead of a hub id."""

import re
from pathlib import Path

import matplotlib
import pytest
from conftest import sentences, tiny_llama

README = Path(__file__).parent.parent / 'README.md'


def readme_example() -> str:
    text = README.read_text()
    section = text.split('## The five steps in a notebook', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, tokenizer, cache):
    matplotlib.use('Agg')
    model_dir = tmp_path / 'tiny-model'
    model = tiny_llama(len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for folder, texts in {
        'data/general': sentences(200, seed=2),
        'data/contracts': [
            f'The lessee shall pay the rent of {i} dollars on the first day of each month.' for i in range(100)
        ],
    }.items():
        (tmp_path / folder).mkdir(parents=True)
        for i, t in enumerate(texts):
            (tmp_path / folder / f'{i:04d}.txt').write_text(t)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('FINETUNE_CACHE', str(cache))
    code = readme_example()
    assert "MODEL = 'HuggingFaceTB/SmolLM2-135M'" in code
    code = code.replace("MODEL = 'HuggingFaceTB/SmolLM2-135M'", f'MODEL = {str(model_dir)!r}')
    scope: dict = {}
    exec(compile(code, str(README), 'exec'), scope)
    learn = scope['learn']
    assert learn.recorder.values  # fine_tune ran
    assert (tmp_path / 'out' / 'legal-model' / 'model.safetensors').exists()
    dls = scope['dls']
    assert dls.packed.names == ['general', 'legal']
    general_draws, legal_draws = dls.packed.plan.draws
    assert abs(general_draws - legal_draws) <= 1  # share={'legal': 0.5}
    assert all(dls.trained_tokens)
    assert learn.recorder.metric_names[-3:-1] == ['ppl_general', 'ppl_legal']
