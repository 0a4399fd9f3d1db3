"""Writes the tutorial notebooks from the cells below; `python nbs/make_notebooks.py --execute` also runs
them and stores their outputs. The notebooks are documentation: the library's source is `finetune/`."""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

QUICKSTART = [
    new_markdown_cell(
        '# Quickstart: the five steps of domain fine-tuning\n\n'
        'Name corpora, tokenize and pack them, load a model, train it with a fastai `Learner`, then '
        'evaluate, generate and save. To run anywhere in a minute without downloads, this notebook '
        'builds a tiny randomly initialised Llama and a small tokenizer; for real work set `MODEL` '
        "to a hub id (`'HuggingFaceTB/SmolLM2-135M'`), a local folder or a `.gguf` file and use "
        '`load_tokenizer(MODEL)`.'
    ),
    new_code_cell(
        'import ast, sysconfig, tempfile\n'
        'from pathlib import Path\n'
        'from pydoc_data.topics import topics\n'
        'from finetune import Corpus, CorpusMix, causal_lm_learner, lm_dataloaders'
    ),
    new_markdown_cell(
        '## 1. Data gathering\n\n'
        'Two corpora that every Python install has: the target domain is the Python language reference '
        '(`pydoc_data.topics`); the general text is the docstrings of standard-library modules, read with `ast`.'
    ),
    new_code_cell(
        "data = Path(tempfile.mkdtemp()) / 'data'\n"
        "(data / 'reference').mkdir(parents=True)\n"
        'for name, text in topics.items():\n'
        "    (data / 'reference' / f'{name}.txt').write_text(text)\n"
        "(data / 'docstrings').mkdir()\n"
        "stdlib = Path(sysconfig.get_paths()['stdlib'])\n"
        "for path in sorted(stdlib.glob('[a-m]*.py'))[:60]:\n"
        '    tree = ast.parse(path.read_text(errors="replace"))\n'
        '    docs = [ast.get_docstring(n) for n in ast.walk(tree)\n'
        '            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]\n'
        "    (data / 'docstrings' / f'{path.stem}.txt').write_text('\\n\\n'.join(d for d in docs if d))\n"
        "reference = Corpus(data / 'reference', name='reference', target=True)\n"
        "general = Corpus(data / 'docstrings', name='general', doc_sep='\\n\\n')\n"
        "mix = CorpusMix([general, reference], share={'reference': 0.5})\n"
        'mix'
    ),
    new_markdown_cell('A tokenizer and a tiny model (replace with `load_tokenizer(MODEL)` and `MODEL` for real work):'),
    new_code_cell(
        'from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers\n'
        'from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n'
        'bpe = Tokenizer(models.BPE())\n'
        'bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()\n'
        "trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=['<|endoftext|>'],\n"
        '                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())\n'
        'bpe.train_from_iterator(list(reference.documents()) + list(general.documents()), trainer)\n'
        "tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>')\n"
        'model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,\n'
        '                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256))'
    ),
    new_markdown_cell(
        '## 2–3. Token store, mix report, DataLoaders\n\n'
        "Each corpus is tokenized once into a cached on-disk store. The mix report says what "
        "`share={'reference': 0.5}` means: the share of each epoch, tokens and repeats per epoch, and what "
        'looks wrong. 5% of each corpus\'s documents are held out for validation before packing.'
    ),
    new_code_cell('report = mix.report(tok, seq_len=128)'),
    new_code_cell('dls = lm_dataloaders(mix, tok, seq_len=128, bs=16, valid_pct=0.05, seed=42, verbose=False)'),
    new_code_cell('dls.show_batch(max_n=4)'),
    new_markdown_cell('## 4. Training with a fastai `Learner`'),
    new_code_cell('learn = causal_lm_learner(dls, model)\nbefore = learn.validate()  # [validation loss, perplexity]\nbefore'),
    new_code_cell('learn.lr_find()'),
    new_code_cell('learn.fit_one_cycle(1, 3e-3)'),
    new_code_cell('learn.recorder.plot_loss()'),
    new_markdown_cell('The tokens each corpus supplied to training:'),
    new_code_cell('dls.mix_report();'),
    new_markdown_cell('## 5. Evaluate, generate, save'),
    new_code_cell(
        'after = learn.validate()\n'
        "print(f'perplexity before {before[1]:,.0f}, after {after[1]:,.0f}')"
    ),
    new_markdown_cell(
        'A tiny model trained from scratch for one epoch has only begun to learn, so its text is rough; '
        'a pretrained model fine-tuned the same way continues prompts in the domain\'s style.'
    ),
    new_code_cell("learn.generate(['The for statement', 'A class definition'], max_new_tokens=20)"),
    new_code_cell(
        "out = learn.save_pretrained(Path(tempfile.mkdtemp()) / 'quickstart-model')\n"
        'from transformers import AutoModelForCausalLM\n'
        'AutoModelForCausalLM.from_pretrained(out).config.model_type'
    ),
]


def main(execute: bool = False):
    nb = new_notebook(cells=QUICKSTART, metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3'}})
    path = HERE / '00_quickstart.ipynb'
    if execute:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=600, resources={'metadata': {'path': str(HERE)}}).execute()
    nbformat.write(nb, path)
    print('wrote', path)


if __name__ == '__main__':
    main('--execute' in sys.argv)
