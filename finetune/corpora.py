"""Corpora: named sources of documents, read as a stream.

A `Corpus` is a folder (searched recursively), a glob, a single file, or a local Hugging Face
`datasets` dataset. A document is a `.txt` file (or a piece of one, with `doc_sep`), a record of
a `.jsonl`, `.csv` or `.parquet` file, or an item of a dataset. Reading never holds a whole file
or corpus in memory: text files are decoded in chunks, records one batch at a time.

Everything here only reads; nothing under the user's data directories is ever written.
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import glob
import hashlib
import io
import json
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ['Corpus', 'ReadStats', 'TEXT_SUFFIXES', 'RECORD_SUFFIXES']

TEXT_SUFFIXES = ('.txt', '.md', '.rst', '.text')  # read as plain text when a folder is searched
RECORD_SUFFIXES = ('.jsonl', '.csv', '.parquet')  # one document per record
CHUNK_CHARS = 1 << 20  # characters decoded at a time from a text file; a long document streams in pieces
RECORD_BATCH = 1024  # records read at a time from parquet files and datasets
_HASH_CHUNK = 1 << 22
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)  # a document may be one huge field

# `errors='replace'` counts its replacements through a codec error handler of our own.
_replacements: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar('finetune_replacements', default=None)


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    counter = _replacements.get()
    if counter is not None:
        counter[0] += 1
    return '\ufffd', err.end


codecs.register_error('finetune.replace', _count_and_replace)


@dataclass
class ReadStats:
    """What one pass over a corpus read and skipped."""

    documents: int = 0  # documents yielded
    empty_documents: int = 0  # documents skipped because they held only white space
    empty_files: int = 0  # files skipped because they held nothing
    replacements: int = 0  # invalid UTF-8 sequences replaced by U+FFFD (with `errors='replace'`)


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / 'dataset_info.json').exists() or (path / 'dataset_dict.json').exists())


def _utf8_error_offset(path: Path) -> tuple[int, str]:
    """Find the byte offset of the first invalid UTF-8 sequence in `path` and the bytes there."""
    decoder = codecs.getincrementaldecoder('utf-8')('strict')
    offset = 0
    with open(path, 'rb') as f:
        while chunk := f.read(_HASH_CHUNK):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = (e.object[e.start : e.end]).hex(' ')
                return offset - pending + e.start, bad
            offset += len(chunk)
    return offset, ''


class Corpus:
    """A named source of documents: a folder, a glob, a file, or a local `datasets` dataset."""

    def __init__(
        self,
        source,  # folder (recursive), glob, file, a folder from `save_to_disk`, or a `datasets.Dataset`
        name: str | None = None,  # the corpus's name in reports and metrics; defaults to the source's stem
        *,
        text_field: str = 'text',  # the text column of `.jsonl`, `.csv`, `.parquet` and datasets
        doc_sep: str | None = None,  # splits a text file into documents (e.g. '\n\n'); None: one document per file
        errors: str = 'strict',  # invalid UTF-8: 'strict' raises (file, byte offset); 'replace' counts and replaces
        split: str = 'train',  # the split to read from a saved `DatasetDict`
        target: bool = False,  # marks the target domain of a mix
        format: str = 'auto',  # 'text', 'chat' ({"messages": [...]}), 'prompt_completion', or 'auto' (from the records)
        train_on: str = 'assistant',  # chat / prompt_completion: loss on 'assistant' (or completion) tokens, or 'all'
    ):
        if format not in FORMATS + ('auto',):
            raise ValueError(f'format={format!r}: use one of {FORMATS + ("auto",)}')
        if train_on not in ('assistant', 'all'):
            raise ValueError(f"train_on={train_on!r}: use 'assistant' (loss on the replies only) or 'all'")
        self.train_on = train_on
        if errors not in ('strict', 'replace'):
            raise ValueError(f"errors={errors!r}: use 'strict' (raise on invalid UTF-8) or 'replace'")
        if doc_sep == '':
            raise ValueError('doc_sep must be a non-empty string, or None for one document per file')
        self.text_field, self.doc_sep, self.errors, self.split, self.target = text_field, doc_sep, errors, split, target
        self.dataset = None
        if _is_hf_dataset(source):
            self.source, self.files, self.dataset = source, [], source
            default_name = getattr(source, 'info', None) and source.info.dataset_name or 'dataset'
        else:
            self.source = str(source)
            self.files = _resolve_files(self.source)
            default_name = Path(self.source.split('*')[0].rstrip('/') or '.').resolve().stem or 'corpus'
        self.format = _detect_format(self) if format == 'auto' else format
        self.name = name if name is not None else default_name
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f'corpus name must be a non-empty string, got {self.name!r}')
        self.stats = ReadStats()

    def __repr__(self) -> str:
        what = 'dataset' if self.dataset is not None else f'{len(self.files)} file' + 's' * (len(self.files) != 1)
        flags = (', target' if self.target else '') + (f', {self.format}' if self.format != 'text' else '')
        return f'Corpus({self.name!r}, {what} from {_short(self.source)}{flags})'

    # --- identity, for the token store's cache key ---
    def fingerprint(self) -> str:
        """A hash of the corpus's contents and reading options; any changed byte changes it."""
        h = hashlib.sha256()
        h.update(
            json.dumps([self.text_field, self.doc_sep, self.errors, self.split, self.format, self.train_on]).encode()
        )
        for path in self.files:
            # a saved dataset is a folder: hash each of its files
            parts = sorted(f for f in path.rglob('*') if f.is_file()) if path.is_dir() else [path]
            for part in parts:
                h.update(str(part).encode() + b'\0')
                with open(part, 'rb') as f:
                    while chunk := f.read(_HASH_CHUNK):
                        h.update(chunk)
                h.update(b'\1')
        if self.dataset is not None:
            h.update(str(getattr(self.dataset, '_fingerprint', id(self.dataset))).encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """The size of the corpus's files on disk (0 for an in-memory dataset)."""
        return sum(
            sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) if p.is_dir() else p.stat().st_size
            for p in self.files
        )

    # --- reading ---
    def documents(self) -> Iterator[str]:
        """Each document, whole. Convenient for small corpora; `segments` streams long documents."""
        parts: list[str] = []
        for text, end in self.segments():
            parts.append(text)
            if end:
                yield ''.join(parts)
                parts = []

    def segments(self) -> Iterator[tuple[str, bool]]:
        """Stream `(text, end_of_document)` pieces; a document longer than a chunk arrives in several pieces."""
        self.stats = ReadStats()
        if self.dataset is not None:
            yield from self._records(_dataset_texts(self.dataset, self.text_field, self.split, self.source))
            return
        empty = []
        for path in self.files:
            if path.stat().st_size == 0:
                empty.append(path)
                continue
            suffix = path.suffix.lower()
            if suffix == '.jsonl':
                yield from self._records(_jsonl_texts(path, self.text_field, self.errors, self))
            elif suffix == '.csv':
                yield from self._records(_csv_texts(path, self.text_field, self.errors, self))
            elif suffix == '.parquet':
                yield from self._records(_parquet_texts(path, self.text_field))
            elif _is_dataset_dir(path):
                yield from self._records(_dataset_texts(path, self.text_field, self.split, path))
            else:
                yield from self._text_file(path)
        if empty:
            self.stats.empty_files = len(empty)
            names = ', '.join(str(p) for p in empty[:5]) + (f' and {len(empty) - 5} more' if len(empty) > 5 else '')
            warnings.warn(f'corpus {self.name!r}: skipped {len(empty)} empty file(s): {names}', stacklevel=2)

    def records(self) -> Iterator[tuple[dict, str]]:
        """Chat and prompt/completion corpora: each record (a dict) with where it came from ('file line N')."""
        if self.format == 'text':
            raise ValueError(f'corpus {self.name!r} is plain text: read it with segments()')
        self.stats = ReadStats()
        sources = [(self.dataset, self.source)] if self.dataset is not None else [(p, p) for p in self.files]
        for source, where in sources:
            for record, place in _raw_records(source, where, self):
                problem = _record_problem(record, self.format)
                if problem:
                    raise ValueError(f'corpus {self.name!r}: {place}: {problem}')
                self.stats.documents += 1
                yield record, place

    def _records(self, texts: Iterator[str]) -> Iterator[tuple[str, bool]]:
        for text in texts:
            if text.strip():
                self.stats.documents += 1
                yield text, True
            else:
                self.stats.empty_documents += 1

    def _text_file(self, path: Path) -> Iterator[tuple[str, bool]]:
        """Split a text file into documents at `doc_sep`, streaming it in chunks."""
        sep, pending, started = self.doc_sep, '', False
        for chunk in _read_text_chunks(path, self.errors, self):
            pending += chunk
            if sep is not None:
                *docs, pending = pending.split(sep)
                for doc in docs:
                    yield from self._finish_doc(doc, started)
                    started = False
            if len(pending) > CHUNK_CHARS:  # a long document: hand over a piece, cut at a line end
                limit = len(pending) - (len(sep) - 1 if sep else 0)  # keep what may start a separator
                cut = pending.rfind('\n', 0, limit) + 1 or limit
                piece, pending = pending[:cut], pending[cut:]
                if started or piece.strip():
                    started = True
                    yield piece, False
        yield from self._finish_doc(pending, started)

    def _finish_doc(self, text: str, started: bool) -> Iterator[tuple[str, bool]]:
        if started or text.strip():  # started: the document's earlier pieces were already handed over
            self.stats.documents += 1
            yield text, True
        else:
            self.stats.empty_documents += 1


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.startswith('datasets.') and hasattr(obj, 'column_names')


def _short(source) -> str:
    s = str(source)
    return s if len(s) < 60 else '...' + s[-57:]


def _resolve_files(source: str) -> list[Path]:
    """The files of a source, in sorted order. A folder is searched recursively for known suffixes.

    A path that exists is always that path, even with `*?[` in its name; only one that does not
    exist is taken as a glob pattern. Symlinked files and folders inside a folder are followed (a
    folder reached twice, as through a symlink loop, is searched once).
    """
    path = Path(source)
    if not path.exists() and not path.is_symlink():
        if not any(c in source for c in '*?['):
            raise FileNotFoundError(f'corpus source {source!r} does not exist')
        files = sorted(
            Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file() or _is_dataset_dir(Path(p))
        )
        if not files:
            raise FileNotFoundError(f'corpus source {source!r} does not exist, and no files match it as a pattern')
        return files
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f'corpus source {source!r} is a symlink to {os.readlink(path)!r}, which does not exist')
    if _is_dataset_dir(path):
        return [path]
    if not path.is_dir():
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError(
                f'corpus source {source!r} is not a regular file (a FIFO, socket or device): copy its text to a file'
            )
        return [path]
    files, skipped = [], []
    for p in _walk(path):
        if _is_dataset_dir(p):
            files.append(p)
        elif p.is_file():
            (files if p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES else skipped).append(p)
    if skipped:
        suffixes = sorted({p.suffix or '(none)' for p in skipped})
        warnings.warn(
            f'{source}: skipped {len(skipped)} file(s) with suffixes {", ".join(suffixes)}; '
            f'folders are searched for {", ".join(TEXT_SUFFIXES + RECORD_SUFFIXES)} (name other files with a glob)',
            stacklevel=3,
        )
    if not files:
        raise FileNotFoundError(f'folder {source!r} holds no {"/".join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files')
    return files


def _walk(root: Path) -> list[Path]:
    """Every non-hidden entry under `root`, sorted, following symlinked folders once each (no loops).

    A saved `datasets` folder is returned whole, not searched.
    """
    out, seen = [], set()

    def visit(folder: Path):
        real = os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        for p in sorted(folder.iterdir()):
            if p.name.startswith('.'):
                continue
            if p.is_dir() and not _is_dataset_dir(p):
                visit(p)
            else:
                out.append(p)

    visit(root)
    return sorted(out)


def _open_text(path: Path, errors: str, newline: str | None = None) -> io.TextIOWrapper:
    # utf-8-sig strips a BOM; newline=None turns CRLF and CR into LF.
    return open(
        path, encoding='utf-8-sig', errors='strict' if errors == 'strict' else 'finetune.replace', newline=newline
    )


class _decoding:
    """Count replacements while reading, and turn a decode error into one that names file and offset."""

    def __init__(self, path: Path, corpus: Corpus):
        self.path, self.corpus = path, corpus

    def __enter__(self):
        self.counter = [0]
        self.token = _replacements.set(self.counter)

    def __exit__(self, typ, err, tb):
        _replacements.reset(self.token)
        self.corpus.stats.replacements += self.counter[0]
        if self.counter[0]:
            warnings.warn(
                f'corpus {self.corpus.name!r}: replaced {self.counter[0]} invalid UTF-8 sequence(s) in {self.path}',
                stacklevel=4,
            )
        if isinstance(err, UnicodeDecodeError):
            offset, bad = _utf8_error_offset(self.path)
            raise UnicodeError(
                f'corpus {self.corpus.name!r}: {self.path} is not valid UTF-8 at byte offset {offset} (bytes {bad}); '
                "fix the file, or pass errors='replace' to replace invalid sequences"
            ) from err
        return False


def _read_text_chunks(path: Path, errors: str, corpus: Corpus) -> Iterator[str]:
    with _decoding(path, corpus), _open_text(path, errors) as f:
        while chunk := f.read(CHUNK_CHARS):
            yield chunk


FORMATS = ('text', 'chat', 'prompt_completion')


def _first_record(corpus: Corpus):
    """The first record of a corpus of records (JSONL, Parquet, saved or in-memory datasets), or None for text."""

    def first_row(data):
        if isinstance(data.column_names, dict):  # a DatasetDict
            data = data[corpus.split] if corpus.split in data else None
        return next(iter(data), None) if data is not None else None

    if corpus.dataset is not None:
        return first_row(corpus.dataset)
    for path in corpus.files:
        suffix = path.suffix.lower()
        if _is_dataset_dir(path):
            import datasets

            return first_row(datasets.load_from_disk(str(path)))
        if suffix == '.jsonl' and path.stat().st_size:
            with open(path, encoding='utf-8', errors='replace') as f:
                for line in f:
                    if line.strip():
                        try:
                            return json.loads(line)
                        except json.JSONDecodeError:
                            return None
        elif suffix == '.parquet':
            import pyarrow.parquet as pq

            return dict.fromkeys(pq.ParquetFile(path).schema_arrow.names)
    return None  # text files only (or empty record files): plain text


def _detect_format(corpus: Corpus) -> str:
    record = _first_record(corpus)
    if isinstance(record, dict) and 'messages' in record and corpus.text_field not in record:
        return 'chat'
    if isinstance(record, dict) and {'prompt', 'completion'} <= set(record) and corpus.text_field not in record:
        return 'prompt_completion'
    return 'text'


def _raw_records(source, where, corpus: Corpus) -> Iterator[tuple[dict, str]]:
    if not isinstance(source, Path) or _is_dataset_dir(source):
        import datasets

        data = datasets.load_from_disk(str(source)) if isinstance(source, Path) else source
        data = data[corpus.split] if isinstance(data.column_names, dict) else data
        for i, row in enumerate(data):
            yield row, f'{where} row {i}'
    elif source.suffix.lower() == '.jsonl':
        with _decoding(source, corpus), _open_text(source, corpus.errors) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f'{source} line {lineno}'
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f'corpus {corpus.name!r}: {source} line {lineno} is not valid JSON ({e.msg})'
                        ) from None
    elif source.suffix.lower() == '.parquet':
        import pyarrow.parquet as pq

        for b, batch in enumerate(pq.ParquetFile(source).iter_batches(batch_size=RECORD_BATCH)):
            for i, row in enumerate(batch.to_pylist()):
                yield row, f'{source} row {b * RECORD_BATCH + i}'
    else:
        raise ValueError(f'corpus {corpus.name!r}: {source} is not .jsonl, .parquet or a dataset: it holds no records')


def _record_problem(record, format: str) -> str | None:
    """What is wrong with one chat or prompt/completion record, or None."""
    if not isinstance(record, dict):
        return f'the record is {type(record).__name__}, not an object'
    if format == 'prompt_completion':
        for key in ('prompt', 'completion'):
            if not isinstance(record.get(key), str):
                return f'{key!r} is missing or not text (the record has {sorted(record)})'
        return None if record['completion'].strip() else 'the completion is empty: nothing to train on'
    messages = record.get('messages')
    if not isinstance(messages, list) or not messages:
        return f"no 'messages' list of turns (the record has {sorted(record)})"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get('role'), str) or not isinstance(m.get('content'), str):
            return f"message {i} is not a {{'role': ..., 'content': ...}} object of text: {str(m)[:80]}"
    if not any(m['role'] == 'assistant' for m in messages):
        return 'the conversation has no assistant turn: nothing to train on'
    return None


def _jsonl_texts(path: Path, field: str, errors: str, corpus: Corpus) -> Iterator[str]:
    with _decoding(path, corpus), _open_text(path, errors) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'corpus {corpus.name!r}: {path} line {lineno} is not valid JSON ({e.msg})') from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f'corpus {corpus.name!r}: {path} line {lineno} has no {field!r} field (it has {keys}); '
                    'pass text_field= to name the text field'
                )
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(
                    f'corpus {corpus.name!r}: {path} line {lineno}: field {field!r} is {type(text).__name__}, not text'
                )
            yield text


def _csv_rows(reader) -> Iterator[list[str]]:
    """The reader's rows, read with no field-size limit; the process-wide limit is put back around each row."""
    while True:
        old = csv.field_size_limit(CSV_FIELD_LIMIT)
        try:
            row = next(reader, None)
        finally:
            csv.field_size_limit(old)
        if row is None:
            return
        yield row


def _csv_texts(path: Path, field: str, errors: str, corpus: Corpus) -> Iterator[str]:
    with _decoding(path, corpus), _open_text(path, errors, newline='') as f:
        reader = _csv_rows(csv.reader(f))
        header = next(reader, None) or []
        if field not in header:
            raise ValueError(
                f'corpus {corpus.name!r}: {path} has no column {field!r} (columns: {header}); '
                'pass text_field= to name the text column'
            )
        col = header.index(field)
        for row in reader:
            if len(row) > col:
                text = row[col].replace('\r\n', '\n')
                yield text


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f'{path} has no column {field!r} (columns: {names}); pass text_field= to name the text column')
    for batch in pf.iter_batches(batch_size=RECORD_BATCH, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _dataset_texts(dataset, field: str, split: str, where) -> Iterator[str]:
    if not hasattr(dataset, 'column_names'):
        import datasets

        dataset = datasets.load_from_disk(str(dataset))
    if isinstance(dataset.column_names, dict):  # a DatasetDict
        if split not in dataset:
            raise ValueError(
                f'{where}: the saved DatasetDict has no split {split!r} (splits: {list(dataset)}); pass split='
            )
        dataset = dataset[split]
    if field not in dataset.column_names:
        raise ValueError(
            f'{where}: the dataset has no column {field!r} (columns: {dataset.column_names}); pass text_field='
        )
    for batch in dataset.select_columns([field]).iter(batch_size=RECORD_BATCH):
        for text in batch[field]:
            if text is not None:
                yield text
