"""DataLoaders of packed blocks: shapes, shifting, per-corpus validation, fallbacks and errors."""

import numpy as np
import pytest
import torch

from finetune import Corpus, lm_datablock, lm_dataloaders, mix_report, pack_corpora


def write_docs(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f'{i:04d}.txt').write_text(t)
    return folder


def test_batches_are_shifted_blocks(cat_corpus_dir, tokenizer, cache):
    dls = lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, cache=cache, verbose=False)
    x, y, corpus = dls.one_batch()
    assert x.shape == (4, 16) and y.shape == (4, 16) and corpus.shape == (4,)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one token
    packed = dls.packed
    n = len(packed.splits[0].train)
    assert len(dls.train_ds) == n and len(dls.valid_ds) == len(packed.splits[0].valid)
    assert dls.train.drop_last is False  # a partial last batch is kept: no block skipped


def test_training_order_is_seeded(cat_corpus_dir, tokenizer, cache):
    def first_batch(seed):
        dls = lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, seed=seed, cache=cache, verbose=False)
        return dls.train.one_batch()[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_validation_documents_never_trained_on(tmp_path, tokenizer, cache):
    # each document is one distinctive number word sequence; a held-out document must not reach training
    texts = [f'the cat {"big " * (i % 7)}sat on the mat number {i}\n' for i in range(60)]
    folder = write_docs(tmp_path / 'nums', texts)
    packed = pack_corpora(Corpus(folder), tokenizer, seq_len=8, valid_pct=0.2, seed=3, cache=cache)
    split = packed.splits[0]
    store = split.store
    valid_docs = {i for i in range(store.n_docs) if any(s <= store.offsets[i] < e for s, e in split.valid.spans)}
    assert len(valid_docs) == split.valid_docs == 12
    train_positions = set()
    for s, e in split.train.spans:
        train_positions.update(range(s, e))
    for d in valid_docs:
        doc = set(range(store.offsets[d], store.offsets[d + 1]))
        assert not doc & train_positions
    # and the blocks themselves only hold tokens of their own side
    all_train = np.concatenate([split.train[i] for i in range(len(split.train))])
    assert len(all_train) == len(split.train) * 9


def test_validation_grows_to_one_block(tmp_path, tokenizer, cache):
    folder = write_docs(tmp_path / 'short', [f'the cat sat {i}\n' for i in range(50)])
    with pytest.warns(UserWarning, match=r'held out \d+ documents, not 2, to fill one validation block'):
        packed = pack_corpora(Corpus(folder), tokenizer, seq_len=32, valid_pct=0.05, cache=cache)
    assert len(packed.splits[0].valid) >= 1


def test_single_document_falls_back_to_the_tail(tmp_path, tokenizer, cache):
    (tmp_path / 'one.txt').write_text('the cat sat on the mat and then slept quickly.\n' * 40)
    with pytest.warns(UserWarning, match=r"corpus 'one': 1 document\(s\) are too few.*last \d+ tokens"):
        packed = pack_corpora(Corpus(tmp_path / 'one.txt'), tokenizer, seq_len=16, valid_pct=0.1, cache=cache)
    split = packed.splits[0]
    assert split.valid_docs == 0 and len(split.valid) >= 1 and len(split.train) >= 1
    (train_end,), (valid_start,) = [e for _, e in split.train.spans], [s for s, _ in split.valid.spans]
    assert train_end == valid_start  # disjoint, and together the whole stream


def test_too_few_tokens_is_an_error(tmp_path, tokenizer, cache):
    (tmp_path / 'tiny.txt').write_text('the cat')
    with pytest.raises(ValueError, match=r"corpus 'tiny' has \d+ tokens, fewer than the 130 needed.*seq_len=64"):
        pack_corpora(Corpus(tmp_path / 'tiny.txt'), tokenizer, seq_len=64, cache=cache)


def test_all_empty_corpus_is_an_error(tmp_path, tokenizer, cache):
    write_docs(tmp_path / 'blank', ['', '   \n'])
    with pytest.raises(ValueError, match=r"corpus 'blank' has no documents"):
        with pytest.warns(UserWarning):
            pack_corpora(Corpus(tmp_path / 'blank'), tokenizer, seq_len=8, cache=cache)


def test_duplicate_names_and_bad_arguments(cat_corpus_dir, tokenizer, cache):
    with pytest.raises(ValueError, match=r"distinct; repeated: \['cats'\]"):
        pack_corpora([Corpus(cat_corpus_dir), Corpus(cat_corpus_dir)], tokenizer, cache=cache)
    with pytest.raises(ValueError, match='valid_pct'):
        pack_corpora(Corpus(cat_corpus_dir), tokenizer, valid_pct=0, cache=cache)
    with pytest.raises(TypeError, match='wrap paths in Corpus'):
        pack_corpora([str(cat_corpus_dir)], tokenizer, cache=cache)


def test_several_corpora_keep_their_ids(tmp_path, cat_corpus_dir, tokenizer, cache):
    dogs = write_docs(tmp_path / 'dogs', [f'zebra zebra zebra {i}\n' for i in range(80)])
    dls = lm_dataloaders(
        [Corpus(cat_corpus_dir), Corpus(dogs)], tokenizer, seq_len=16, bs=64, cache=cache, verbose=False
    )
    packed = dls.packed
    assert packed.names == ['cats', 'dogs']
    ids = torch.cat([b[2] for b in dls.valid])
    n_cat, n_dog = (len(s.valid) for s in packed.splits)
    assert ids.tolist() == [0] * n_cat + [1] * n_dog
    for x, _, c in dls.valid:
        for row, cid in zip(x, c):
            text = tokenizer.decode(row.tolist())
            assert ('zebra' in text) == (cid == 1)


def test_show_batch_names_the_corpus(cat_corpus_dir, tokenizer, cache, capsys):
    dls = lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, cache=cache)
    assert 'cats' in capsys.readouterr().out  # the per-corpus table
    df = dls.show_batch(show=False)
    assert list(df.columns) == ['corpus', 'text'] and set(df.corpus) == {'cats'}
    assert all(isinstance(t, str) and t for t in df.text)
    dls.show_batch()
    assert 'cats' in capsys.readouterr().out


def test_datablock_composes(cat_corpus_dir, tokenizer, cache):
    """A fastai user can take the DataBlock and build DataLoaders their own way."""
    from fastai.data.block import DataBlock

    packed = pack_corpora(Corpus(cat_corpus_dir), tokenizer, seq_len=16, cache=cache)
    dblock = lm_datablock(packed)
    assert isinstance(dblock, DataBlock)
    dls = dblock.dataloaders(None, bs=2, num_workers=0)
    x, y, c = dls.valid.one_batch()
    assert x.shape == (2, 16) and torch.equal(x[0, 1:], y[0, :-1])
    (text, target, name), _ = dls.valid.decode_batch((x, y, c))
    assert isinstance(text, str) and text == tokenizer.decode(x[0].tolist()) and name == 'cats'


def test_report_counts_dropped_tokens(cat_corpus_dir, tokenizer, cache):
    packed = pack_corpora(Corpus(cat_corpus_dir), tokenizer, seq_len=16, cache=cache)
    row = mix_report(packed, show=False).table.iloc[0]
    split = packed.splits[0]
    assert row['tokens'] == split.store.n_tokens
    assert row['dropped tokens'] == split.train.dropped + split.valid.dropped
    used = (len(split.train) * 16 + 1) + (len(split.valid) * 16 + 1)
    assert used + row['dropped tokens'] == split.store.n_tokens


def test_nothing_written_under_the_data(cat_corpus_dir, tokenizer, cache):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in cat_corpus_dir.rglob('*'))
    lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=16, cache=cache, verbose=False).one_batch()
    assert sorted((str(p), p.stat().st_mtime_ns) for p in cat_corpus_dir.rglob('*')) == before


def test_tail_fallback_keeps_a_training_block_at_high_valid_pct(tmp_path, tokenizer, cache):
    (tmp_path / 'one.txt').write_text('the cat sat on the mat.\n' * 12)
    with pytest.warns(UserWarning, match='too few to hold any out'):
        packed = pack_corpora(Corpus(tmp_path / 'one.txt'), tokenizer, seq_len=8, valid_pct=0.95, cache=cache)
    assert len(packed.splits[0].train) >= 1 and len(packed.splits[0].valid) >= 1


def test_batches_are_not_page_locked_on_cpu(cat_corpus_dir, tokenizer, cache):
    # on a CUDA device they are (pin_memory=True, as the HF Trainer does); no GPU here to build that case
    dls = lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, cache=cache, verbose=False, device='cpu')
    assert dls.train.pin_memory is False and dls.valid.pin_memory is False
    dls = lm_dataloaders(
        Corpus(cat_corpus_dir), tokenizer, seq_len=16, bs=4, cache=cache, verbose=False, device='cpu', pin_memory=True
    )
    assert dls.train.pin_memory is True  # an explicit choice is kept


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'seq_len': 32.0}, 'seq_len must be a whole number of tokens >= 1, got 32.0'),
        ({'seq_len': 0}, 'seq_len must be a whole number'),
        ({'bs': 0}, 'bs must be a whole number >= 1, got 0'),
        ({'bs': -1}, 'bs must be a whole number >= 1, got -1'),
        ({'bs': True}, 'bs must be a whole number >= 1, got True'),
        ({'valid_pct': 'x'}, "valid_pct must be a number between 0 and 1 \\(exclusive\\), got 'x'"),
        ({'valid_pct': 1}, 'valid_pct must be a number between 0 and 1'),
        ({'seed': 'x'}, "seed must be a whole number >= 0, got 'x'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_tokenized(kwargs, message, cat_corpus_dir, tokenizer, cache,
                                                                 monkeypatch):  # fmt: skip
    import finetune.tokens as tokens

    def refuse(*a, **k):
        raise AssertionError('tokenized before the arguments were checked')

    monkeypatch.setattr(tokens, '_encode_batch', refuse)
    with pytest.raises(ValueError, match=message):
        lm_dataloaders(Corpus(cat_corpus_dir), tokenizer, **{'seq_len': 16, **kwargs}, cache=cache, verbose=False)
