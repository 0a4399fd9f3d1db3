"""Chat and prompt/completion corpora: rendering with the tokenizer's template, the replies-only mask, packing,
mixing by trained tokens, a chat corpus's own perplexity, and every bad record named before training."""

import json
import math

import numpy as np
import pytest
from conftest import sentences, tiny_llama, tiny_tokenizer

from finetune import Corpus, CorpusMix, build_token_store, causal_lm_learner, lm_dataloaders
from finetune.tokens import render_record

CHATML = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)
MARKED = (  # the same template, with transformers' markers around each reply
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


def chat_tokenizer(template=CHATML):
    tok = tiny_tokenizer()
    tok.add_special_tokens({'additional_special_tokens': ['<|im_start|>', '<|im_end|>']})
    tok.chat_template = template
    return tok


CONVERSATION = [
    {'role': 'system', 'content': 'the cat is kind.'},
    {'role': 'user', 'content': 'where sat the cat?'},
    {'role': 'assistant', 'content': 'the cat sat on the mat.'},
    {'role': 'user', 'content': 'and the dog?'},
    {'role': 'assistant', 'content': 'the dog ran under a rug.'},
]


def test_the_mask_is_exactly_the_replies_token_by_token():
    tok = chat_tokenizer()
    ids, mask = render_record(tok, {'messages': CONVERSATION}, 'chat')
    assert (
        ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)['input_ids']
    )  # rendered with the tokenizer's own template
    trained = [i for i, m in zip(ids, mask) if m]
    replies = [tok(m['content'] + '<|im_end|>\n', add_special_tokens=False)['input_ids'] for m in CONVERSATION[2::2]]
    assert trained == replies[0] + replies[1]
    runs = np.flatnonzero(np.diff([0, *mask, 0]))  # where masked runs start and end
    assert len(runs) == 4  # two replies, each one run
    assert tok.decode(ids[runs[0] : runs[1]]) == 'the cat sat on the mat.<|im_end|>\n'
    assert render_record(tok, {'messages': CONVERSATION}, 'chat', train_on='all')[1] == [1] * len(ids)


def test_templates_with_generation_markers_use_them_and_agree():
    plain = render_record(chat_tokenizer(), {'messages': CONVERSATION}, 'chat')
    marked = render_record(chat_tokenizer(MARKED), {'messages': CONVERSATION}, 'chat')
    assert marked == plain


def test_prompt_completion_trains_on_the_completion():
    tok = tiny_tokenizer()
    ids, mask = render_record(tok, {'prompt': 'the cat sat on', 'completion': ' the mat.'}, 'prompt_completion')
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == ' the mat.'
    assert tok.decode(ids) == 'the cat sat on the mat.'


def write_chat(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def conversations(n, seed=0):
    s = sentences(3 * n, seed=seed)
    return [{'messages': [{'role': 'user', 'content': s[3 * i]},
                          {'role': 'assistant', 'content': s[3 * i + 1] + ' ' + s[3 * i + 2]}]}
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    'record, problem',
    [
        ({'text': 'hello'}, r"line 2: no 'messages' list of turns \(the record has \['text'\]\)"),
        ({'messages': [{'content': 'hi'}]}, "line 2: message 0 is not a {'role': ..., 'content': ...}"),
        ({'messages': [{'role': 'user', 'content': 'hi'}]}, 'line 2: the conversation has no assistant turn'),
        ({'messages': [{'role': 'wizard', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]},
         'line 2: the chat template cannot render it: unknown role wizard'),
    ],
)  # fmt: skip
def test_bad_records_are_named_with_file_and_line(record, problem, tmp_path, cache):
    path = write_chat(tmp_path / 'qa.jsonl', [conversations(1)[0], record])
    corpus = Corpus(path, format='chat')
    with pytest.raises(ValueError, match=problem) as e:
        build_token_store(corpus, chat_tokenizer(), cache)
    assert str(path) in str(e.value) and "corpus 'qa'" in str(e.value)


def test_a_chat_corpus_needs_a_chat_template(tmp_path, cache):
    corpus = Corpus(write_chat(tmp_path / 'qa.jsonl', conversations(3)))
    assert corpus.format == 'chat'  # found from the records
    with pytest.raises(ValueError, match="corpus 'qa' holds conversations, but tokenizer .* has no chat template"):
        build_token_store(corpus, tiny_tokenizer(), cache)


@pytest.fixture
def mixed(tmp_path, cache):
    tok = chat_tokenizer()
    (tmp_path / 'docs').mkdir()
    for i, s in enumerate(sentences(120, seed=5)):
        (tmp_path / 'docs' / f'{i}.txt').write_text(s)
    chat = Corpus(write_chat(tmp_path / 'qa.jsonl', conversations(120, seed=9)), name='chat')
    mix = CorpusMix([Corpus(tmp_path / 'docs', target=True), chat], share={'chat': 0.5})
    return tok, lm_dataloaders(mix, tok, seq_len=24, bs=4, valid_pct=0.1, cache=cache, verbose=False)


def test_packed_labels_follow_the_mask_across_blocks(mixed):
    tok, dls = mixed
    packed = dls.packed
    split = packed.splits[1]
    store = split.store
    assert store.mask is not None and 0 < store.n_trained < store.n_tokens
    stream = np.concatenate([store.mask[a:b] for a, b in split.train.spans])
    ids = np.concatenate([store.ids[a:b] for a, b in split.train.spans])
    first = packed.train_offsets[1]
    for k in range(len(split.train)):
        labels = packed.labels(first + k)
        window = slice(k * 24 + 1, (k + 1) * 24 + 1)
        assert np.array_equal(labels == -100, stream[window] == 0)  # masked exactly where the mask is off
        assert np.array_equal(labels[labels != -100], ids[window][stream[window] == 1])
    spans = np.flatnonzero(np.diff(stream.astype(int)))
    assert any(s // 24 != e // 24 for s, e in zip(spans[::2], spans[1::2]))  # some reply crosses a block boundary


def test_shares_are_of_trained_tokens(mixed):
    _, dls = mixed
    report = dls.mix_report(show=False, warn=False)
    table = report.table.set_index('corpus')
    assert table.loc['chat', 'epoch share'] == pytest.approx(0.5, abs=0.03)  # of the tokens the loss is on
    plan = dls.packed.plan
    assert plan.draws[1] / plan.epoch_blocks > 0.55  # so more of the blocks: half their tokens are masked
    assert table.loc['chat', 'format'] == 'chat' and table.loc['docs', 'format'] == 'text'
    assert table.loc['chat', 'loss tokens/epoch'] < table.loc['chat', 'tokens/epoch']


def test_a_chat_corpus_has_its_own_perplexity_on_its_replies(mixed):
    tok, dls = mixed
    learn = causal_lm_learner(dls, tiny_llama(len(tok)), precision='fp32')
    names = [m.name for m in learn.metrics]
    assert names == ['perplexity', 'ppl_docs', 'ppl_chat']
    with learn.no_bar(), learn.no_logging():
        learn.validate()
    chat = learn.metrics[2]
    labelled = sum(int((dls.packed.labels(i) != -100).sum()) for i in dls.valid_ds.items
                   if dls.packed.corpus_name(i) == 'chat')  # fmt: skip
    assert int(chat.count) == labelled and math.isfinite(chat.value)


def test_an_instruct_model_on_raw_text_alone_is_warned(tmp_path, cache):
    (tmp_path / 'docs').mkdir()
    for i, s in enumerate(sentences(60)):
        (tmp_path / 'docs' / f'{i}.txt').write_text(s)
    with pytest.warns(UserWarning, match='chat template .* no chat corpus is in the mix'):
        lm_dataloaders(Corpus(tmp_path / 'docs'), chat_tokenizer(), seq_len=16, cache=cache, verbose=False)


def test_corpus_perplexity_of_a_chat_corpus_is_on_its_replies(mixed, tmp_path, cache):
    from finetune import corpus_perplexity
    from finetune.tokens import PackedBlocks

    tok, dls = mixed
    corpus = Corpus(tmp_path / 'qa.jsonl', name='chat')
    table = corpus_perplexity(tiny_llama(len(tok)), tok, corpus, seq_len=24, cache=cache, precision='fp32')
    store = build_token_store(corpus, tok, cache)
    blocks = PackedBlocks(store.ids, [(0, store.n_tokens)], 24, store.mask)
    assert table.tokens[0] == blocks.n_trained < len(blocks) * 24


def test_prompt_completion_trains_the_eos_after_the_completion(tmp_path, cache):
    tok = tiny_tokenizer()
    path = write_chat(tmp_path / 'pc.jsonl', [{'prompt': 'the cat sat on', 'completion': ' the mat.'}] * 3)
    corpus = Corpus(path)
    assert corpus.format == 'prompt_completion'
    store = build_token_store(corpus, tok, cache)
    ends = store.offsets[1:] - 1
    assert (store.ids[ends] == tok.eos_token_id).all() and (store.mask[ends] == 1).all()  # it learns to stop
    assert store.n_trained == int(store.mask.sum())


def test_a_saved_dataset_of_conversations_is_found_to_be_chat(tmp_path):
    import datasets

    datasets.Dataset.from_list(conversations(4)).save_to_disk(str(tmp_path / 'saved'))
    assert Corpus(tmp_path / 'saved').format == 'chat'
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'folder' / 'empty.jsonl').write_text('')
    write_chat(tmp_path / 'folder' / 'qa.jsonl', conversations(2))
    assert Corpus(tmp_path / 'folder').format == 'chat'  # decided by the first file that holds records
