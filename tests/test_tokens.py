"""The token store (EOS placement, dtype, cache hits and invalidation, atomic writes) and packing."""

import numpy as np
import pytest

import finetune.tokens as tokens
from finetune import Corpus, PackedBlocks, build_token_store


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = tokens._encode_batch

    def counting(tok, texts):
        calls.append(len(texts))
        return real(tok, texts)

    monkeypatch.setattr(tokens, '_encode_batch', counting)
    return calls


def test_store_holds_each_document_then_eos(tmp_path, tokenizer, cache):
    (tmp_path / 'a.txt').write_text('the cat sat')
    (tmp_path / 'b.txt').write_text('the dog ran')
    store = build_token_store(Corpus(tmp_path, name='x'), tokenizer, cache)
    eos = tokenizer.eos_token_id
    a = tokenizer('the cat sat', add_special_tokens=False)['input_ids']
    b = tokenizer('the dog ran', add_special_tokens=False)['input_ids']
    assert store.ids.tolist() == a + [eos] + b + [eos]
    assert store.offsets.tolist() == [0, len(a) + 1, len(a) + len(b) + 2]
    assert store.document(1).tolist() == b + [eos]
    assert store.ids.dtype == np.uint16  # 320 tokens fit
    assert isinstance(store.ids, np.memmap)


def test_long_document_pieces_get_one_eos(tmp_path, tokenizer, cache, monkeypatch):
    import finetune.corpora as corpora

    monkeypatch.setattr(corpora, 'CHUNK_CHARS', 32)
    text = 'the cat sat on the mat\n' * 20
    (tmp_path / 'a.txt').write_text(text)
    store = build_token_store(Corpus(tmp_path / 'a.txt'), tokenizer, cache)
    assert store.n_docs == 1
    assert store.ids.tolist().count(tokenizer.eos_token_id) == 1 and store.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(store.ids[:-1].tolist()) == text


def test_uint32_when_vocab_does_not_fit(tmp_path, tokenizer, cache, monkeypatch):
    (tmp_path / 'a.txt').write_text('the cat')
    monkeypatch.setattr(type(tokenizer), '__len__', lambda self: 70_000)
    store = build_token_store(Corpus(tmp_path), tokenizer, cache)
    assert store.ids.dtype == np.uint32


def test_second_build_tokenizes_nothing(cat_corpus_dir, tokenizer, cache, count_encodes):
    first = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    assert count_encodes  # the first build tokenized
    n = len(count_encodes)
    second = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    assert len(count_encodes) == n  # the second did not
    assert second.path == first.path and second.ids.tolist() == first.ids.tolist()


def test_changed_file_invalidates(cat_corpus_dir, tokenizer, cache, count_encodes):
    first = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    n = len(count_encodes)
    (cat_corpus_dir / 'doc000.txt').write_text('a changed document\n')
    second = build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    assert len(count_encodes) > n and second.path != first.path


def test_other_tokenizer_invalidates(cat_corpus_dir, tokenizer, cache, count_encodes):
    import copy

    build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    n = len(count_encodes)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(['<new>'])
    build_token_store(Corpus(cat_corpus_dir), other, cache)
    assert len(count_encodes) > n


def test_cache_env_var(cat_corpus_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'envcache'))
    store = build_token_store(Corpus(cat_corpus_dir), tokenizer)
    assert (tmp_path / 'envcache') in store.path.parents


def test_killed_build_leaves_no_entry(cat_corpus_dir, tokenizer, cache, monkeypatch):
    def boom(tok, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens, '_encode_batch', boom)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(Corpus(cat_corpus_dir), tokenizer, cache)
    assert list((cache / 'tokens').iterdir()) == []  # neither a final entry nor a temp folder


def test_unwritable_cache_is_a_clear_error(cat_corpus_dir, tokenizer, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.raises(OSError, match='cannot write the cache under .*tokens'):
        build_token_store(Corpus(cat_corpus_dir), tokenizer, blocker)


# --- packing: literal ids in, literal blocks out ---


def test_pack_windows_overlap_by_one():
    ids = np.array([1, 2, 3, 0, 4, 5, 0, 6, 7, 0], dtype=np.uint16)
    pb = PackedBlocks(ids, [(0, 10)], seq_len=3)
    assert len(pb) == 3
    assert [pb[i].tolist() for i in range(3)] == [[1, 2, 3, 0], [0, 4, 5, 0], [0, 6, 7, 0]]
    assert pb.dropped == 0


def test_pack_reports_dropped_tail():
    ids = np.arange(12, dtype=np.uint16)
    pb = PackedBlocks(ids, [(0, 12)], seq_len=4)
    assert [pb[i].tolist() for i in range(len(pb))] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert pb.dropped == 3  # 9, 10, 11 are never targets
    assert pb.n_tokens == 12


def test_pack_across_spans():
    ids = np.arange(100, 120, dtype=np.uint16)
    pb = PackedBlocks(ids, [(0, 3), (10, 13), (13, 15), (18, 20)], seq_len=4)
    stream = [100, 101, 102, 110, 111, 112, 113, 114, 118, 119]
    assert pb.spans == [(0, 3), (10, 15), (18, 20)]  # adjacent spans merge
    assert [pb[i].tolist() for i in range(len(pb))] == [stream[0:5], stream[4:9]]
    assert pb.dropped == 1
    with pytest.raises(IndexError):
        pb[2]


def test_pack_too_short_has_no_blocks():
    pb = PackedBlocks(np.arange(4, dtype=np.uint16), [(0, 4)], seq_len=4)
    assert len(pb) == 0 and pb.dropped == 4


def test_large_corpus_shows_progress(tmp_path, tokenizer, cache, monkeypatch, capsys):
    monkeypatch.setattr(tokens, 'PROGRESS_BYTES', 100)
    monkeypatch.setattr(tokens, 'BATCH_CHARS', 200)
    (tmp_path / 'big').mkdir()
    (tmp_path / 'big' / 'a.txt').write_text('the cat sat on the mat\n' * 50)
    build_token_store(Corpus(tmp_path / 'big'), tokenizer, cache)
    assert "tokenizing 'big'" in capsys.readouterr().out
    build_token_store(Corpus(tmp_path / 'big'), tokenizer, tmp_path / 'other', progress=False)
    assert 'tokenizing' not in capsys.readouterr().out


def test_import_does_not_load_fastai_text_or_spacy():
    import subprocess
    import sys

    code = 'import sys, finetune; print(sorted(m for m in sys.modules if m.startswith(("spacy", "fastai.text"))))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_saved_dataset_store_and_invalidation(tmp_path, tokenizer, cache, count_encodes):
    import datasets

    datasets.Dataset.from_dict({'text': ['the cat sat', 'the dog ran']}).save_to_disk(tmp_path / 'ds')
    store = build_token_store(Corpus(tmp_path / 'ds', name='hf'), tokenizer, cache)
    assert store.n_docs == 2
    n = len(count_encodes)
    assert build_token_store(Corpus(tmp_path / 'ds', name='hf'), tokenizer, cache).path == store.path
    assert len(count_encodes) == n
    datasets.Dataset.from_dict({'text': ['the cat ran']}).save_to_disk(tmp_path / 'ds2')
    other = build_token_store(Corpus(tmp_path / 'ds2', name='hf'), tokenizer, cache)
    assert other.path != store.path and other.n_docs == 1
