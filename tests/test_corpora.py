"""Corpus reading: every source format, streaming, order, and the bad inputs."""

import json
import os
import warnings

import pytest

import finetune.corpora as corpora
from finetune import Corpus


def docs(corpus):
    return list(corpus.documents())


def test_txt_one_document_per_file_sorted_recursive(tmp_path):
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'z.txt').write_text('zed')
    (tmp_path / 'a.txt').write_text('alpha')
    (tmp_path / 'c.md').write_text('charlie')
    (tmp_path / '.hidden').mkdir()
    (tmp_path / '.hidden' / 'h.txt').write_text('hidden')
    c = Corpus(tmp_path, name='x')
    assert docs(c) == ['alpha', 'zed', 'charlie']  # sorted paths: a.txt, b/z.txt, c.md
    assert c.stats.documents == 3


def test_default_name_from_source(tmp_path):
    d = tmp_path / 'contracts'
    d.mkdir()
    (d / 'a.txt').write_text('x')
    assert Corpus(d).name == 'contracts'
    assert Corpus(str(d) + '/*.txt').name == 'contracts'
    assert Corpus(d / 'a.txt').name == 'a'


def test_glob_and_doc_sep(tmp_path):
    (tmp_path / 'a.txt').write_text('one\n\ntwo\n\n\n\nthree')
    (tmp_path / 'b.log').write_text('four')
    c = Corpus(str(tmp_path / '*.txt'), name='g', doc_sep='\n\n')
    assert docs(c) == ['one', 'two', 'three']  # the empty piece between separators is skipped
    assert c.stats.empty_documents == 1
    assert docs(Corpus(str(tmp_path / '*.log'), name='log')) == ['four']  # a glob names any file


def test_bom_and_crlf_normalised(tmp_path):
    (tmp_path / 'a.txt').write_bytes('\ufeffline one\r\nline two\rthree\r\n'.encode())
    assert docs(Corpus(tmp_path / 'a.txt')) == ['line one\nline two\nthree\n']


def test_large_file_is_streamed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, 'CHUNK_CHARS', 64)
    text = ''.join(f'line {i} of a long document\n' for i in range(200))
    (tmp_path / 'big.txt').write_text(text)
    segs = list(Corpus(tmp_path / 'big.txt').segments())
    assert len(segs) > 10 and max(len(t) for t, _ in segs) <= 3 * 64
    assert [end for _, end in segs] == [False] * (len(segs) - 1) + [True]
    assert ''.join(t for t, _ in segs) == text


def test_doc_sep_split_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, 'CHUNK_CHARS', 7)
    parts = [f'document number {i}' for i in range(30)]
    (tmp_path / 'a.txt').write_text('<SEP>'.join(parts))
    assert docs(Corpus(tmp_path / 'a.txt', doc_sep='<SEP>')) == parts


def test_jsonl(tmp_path):
    lines = [{'text': 'first'}, {'text': 'second', 'id': 2}, {'text': '   '}]
    (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n\n')
    c = Corpus(tmp_path / 'a.jsonl')
    assert docs(c) == ['first', 'second']
    assert c.stats.empty_documents == 1
    (tmp_path / 'b.jsonl').write_text(json.dumps({'body': 'x'}) + '\n')
    assert docs(Corpus(tmp_path / 'b.jsonl', text_field='body')) == ['x']


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / 'bad.jsonl'
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl line 2 is not valid JSON'):
        docs(Corpus(p, name='legal'))


def test_jsonl_missing_field_names_file_line_and_keys(tmp_path):
    p = tmp_path / 'bad.jsonl'
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"corpus 'legal'.*bad\.jsonl line 2 has no 'text' field.*\['body'\]"):
        docs(Corpus(p, name='legal'))


def test_csv(tmp_path):
    p = tmp_path / 'a.csv'
    p.write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n')
    assert docs(Corpus(p)) == ['hello, world', 'multi\nline']
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['id', 'text'\]\)"):
        docs(Corpus(p, text_field='body'))


def test_parquet(tmp_path):
    import pandas as pd

    p = tmp_path / 'a.parquet'
    pd.DataFrame({'text': ['p one', 'p two', None], 'n': [1, 2, 3]}).to_parquet(p)
    assert docs(Corpus(p)) == ['p one', 'p two']
    with pytest.raises(ValueError, match='no column'):
        docs(Corpus(p, text_field='missing'))


def test_saved_dataset_and_dataset_object(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({'text': ['d one', 'd two', '']})
    ds.save_to_disk(tmp_path / 'ds')
    c = Corpus(tmp_path / 'ds', name='hf')
    assert docs(c) == ['d one', 'd two']
    datasets.DatasetDict({'train': ds, 'test': ds.select([0])}).save_to_disk(tmp_path / 'dd')
    assert docs(Corpus(tmp_path / 'dd', split='test')) == ['d one']
    with pytest.raises(ValueError, match="no split 'valid'"):
        docs(Corpus(tmp_path / 'dd', split='valid'))
    assert docs(Corpus(ds, name='obj')) == ['d one', 'd two']


def test_folder_with_mixed_formats(tmp_path):
    (tmp_path / 'a.txt').write_text('plain')
    (tmp_path / 'b.jsonl').write_text('{"text": "record"}\n')
    (tmp_path / 'c.bin').write_bytes(b'\0\1')
    with pytest.warns(UserWarning, match=r'skipped 1 file\(s\) with suffixes \.bin'):
        c = Corpus(tmp_path)
    assert docs(c) == ['plain', 'record']


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope'):
        Corpus(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match=r'no files match'):
        Corpus(str(tmp_path / '*.nothing'))


def test_empty_file_skipped_with_warning(tmp_path):
    (tmp_path / 'a.txt').write_text('content')
    (tmp_path / 'empty.txt').write_text('')
    c = Corpus(tmp_path, name='e')
    with pytest.warns(UserWarning, match=r"corpus 'e': skipped 1 empty file\(s\): .*empty\.txt"):
        assert docs(c) == ['content']
    assert c.stats.empty_files == 1


def test_invalid_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / 'bad.txt'
    p.write_bytes(b'good text \xff\xfe more')
    with pytest.raises(UnicodeError, match=r"corpus 'x': .*bad\.txt is not valid UTF-8 at byte offset 10"):
        docs(Corpus(p, name='x'))


def test_invalid_utf8_offset_past_first_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, '_HASH_CHUNK', 16)
    p = tmp_path / 'bad.txt'
    p.write_bytes(b'a' * 40 + b'\xc3' + b'(' + b'b' * 10)
    with pytest.raises(UnicodeError, match='byte offset 40'):
        docs(Corpus(p, name='x'))


def test_errors_replace_counts(tmp_path):
    p = tmp_path / 'bad.txt'
    p.write_bytes(b'one \xff two \xfe three')
    c = Corpus(p, name='x', errors='replace')
    with pytest.warns(UserWarning, match=r'replaced 2 invalid UTF-8'):
        assert docs(c) == ['one \ufffd two \ufffd three']
    assert c.stats.replacements == 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(ValueError, match='errors='):
            Corpus(p, errors='ignore')


def test_fingerprint_tracks_content_and_options(tmp_path):
    p = tmp_path / 'a.txt'
    p.write_text('one')
    a = Corpus(p).fingerprint()
    assert Corpus(p).fingerprint() == a
    assert Corpus(p, doc_sep='\n').fingerprint() != a
    p.write_text('two')
    assert Corpus(p).fingerprint() != a


def test_reading_writes_nothing(cat_corpus_dir):
    def snapshot():
        return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in cat_corpus_dir.rglob('*'))

    before = snapshot()
    c = Corpus(cat_corpus_dir)
    docs(c), c.fingerprint()
    assert snapshot() == before


def test_csv_reads_huge_fields_without_changing_the_process_wide_limit(tmp_path):
    import csv

    before = csv.field_size_limit()
    big = 'word ' * (before // 5 + 1000)  # longer than csv's default field limit
    path = tmp_path / 'big.csv'
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([['text'], [big], ['small']])
    docs = list(Corpus(path).documents())
    assert docs == [big, 'small']
    assert csv.field_size_limit() == before


def test_an_existing_path_is_that_path_even_with_glob_characters(tmp_path):
    (tmp_path / 'notes[1].txt').write_text('the real notes')
    (tmp_path / 'notes1.txt').write_text('what the pattern would match')
    assert list(Corpus(tmp_path / 'notes[1].txt').documents()) == ['the real notes']
    folder = tmp_path / 'news[2024]'
    folder.mkdir()
    (folder / 'a.txt').write_text('an article')
    assert list(Corpus(folder).documents()) == ['an article']
    assert list(Corpus(str(tmp_path / 'notes*.txt')).documents()) == ['what the pattern would match', 'the real notes']
    with pytest.raises(FileNotFoundError, match=r"'.*nothing\[9\].txt' does not exist, and no files match it as a"):
        Corpus(tmp_path / 'nothing[9].txt')


def test_symlinked_folders_and_files_are_both_followed_and_loops_end(tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    (outside / 'b.txt').write_text('in a linked folder')
    (tmp_path / 'single.txt').write_text('a linked file')
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'a.txt').write_text('plain')
    (corpus / 'linked').symlink_to(outside, target_is_directory=True)
    (corpus / 'file.txt').symlink_to(tmp_path / 'single.txt')
    (outside / 'back').symlink_to(corpus, target_is_directory=True)  # a loop through the link
    assert sorted(Corpus(corpus).documents()) == ['a linked file', 'in a linked folder', 'plain']


def test_a_fifo_is_refused_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / 'pipe.txt'
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"'.*pipe.txt' is not a regular file \(a FIFO"):
        Corpus(fifo)
