"""The token store and packing: each corpus tokenized once, on disk, cut into fixed-length blocks.

A `TokenStore` is a flat memory-mapped array of token ids (uint16 when the vocabulary fits, else
uint32), with the end-of-sequence token after every document, plus the offset where each document
starts. It is built with the tokenizer's batch API (Rust, all cores) and cached under a key of
the corpus's contents, the tokenizer and `FORMAT_VERSION`; entries are written through
`cache.atomic_folder`, so a killed build never leaves half an entry.

A cached entry is not trusted blindly: its `meta.json` records each file's size and SHA-256 and
the largest token id. Every load checks the files, their sizes, the document offsets and that the
ids fit the tokenizer's vocabulary (a pass over the ids, far cheaper than tokenizing); `verify=True`
(and `finetune cache verify`) also checks the checksums. `build_token_store` rebuilds a damaged
entry with a warning naming it; `TokenStore.load` refuses one with `DamagedTokenStore`, naming the
entry and what to delete. `token_stores()` lists the cache's entries (`finetune cache ls`).

`PackedBlocks` cuts a stream of token spans into windows of `seq_len + 1` tokens (inputs and
shifted targets) with a stride of `seq_len`, so every token but the first is a target exactly once;
only the final partial window is dropped, and `dropped` counts its tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from .cache import atomic_folder, cache_dir, cache_folder, sha256_file, sweep
from .corpora import Corpus, ReadStats

__all__ = [
    'FORMAT_VERSION',
    'DamagedTokenStore',
    'TokenStore',
    'token_stores',
    'render_record',
    'PackedBlocks',
    'build_token_store',
    'tokenizer_fingerprint',
]

FORMAT_VERSION = 3  # 2: per-document content hashes, unknown-token count; 3: file sizes and checksums
STORE_FILES = ('ids.bin', 'offsets.npy', 'doc_hashes.npy')
BATCH_CHARS = 1 << 22  # characters handed to the tokenizer per batch call
PROGRESS_BYTES = 1 << 22  # corpora larger than this show a progress bar while they are tokenized


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes the ids it produces."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts`, without special tokens, through the fastest batch API the tokenizer has."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        encode = getattr(backend, 'encode_batch_fast', backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)['input_ids']


class DamagedTokenStore(ValueError):
    """A cached token store whose files do not match what was written."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(
            f'the cached token store {path} is damaged: {problem}. Delete that folder (or run '
            f'`finetune cache clear {path.name}`); the next run tokenizes the corpus again'
        )


@dataclass
class TokenStore:
    """One corpus's token ids on disk: `ids[offsets[i]:offsets[i+1]]` is document `i` followed by EOS."""

    path: Path
    ids: np.ndarray  # memory-mapped, read only
    offsets: np.ndarray  # int64, n_docs + 1
    meta: dict
    mask: np.ndarray | None = None  # chat corpora: 1 where a token is trained on (the replies), memory-mapped

    @classmethod
    def load(cls, path: Path, vocab_size: int | None = None, verify: bool = False) -> TokenStore:
        """Open a cached entry, checking files, sizes, offsets and (given `vocab_size`) the id range; with
        `verify`, every file's SHA-256 too. A damaged entry raises `DamagedTokenStore`."""
        path = Path(path)
        try:
            meta = json.loads((path / 'meta.json').read_text())
            n, dtype, files = int(meta['n_tokens']), np.dtype(meta['dtype']), meta['files']
            n_docs = int(meta['n_docs'])
        except FileNotFoundError:
            raise DamagedTokenStore(path, 'meta.json is missing') from None
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedTokenStore(path, f'meta.json is unreadable or incomplete ({type(e).__name__}: {e})') from None
        for name in STORE_FILES + (('mask.bin',) if meta.get('mask') else ()):
            entry = files.get(name) if isinstance(files, dict) else None
            if not isinstance(entry, dict) or not isinstance(entry.get('bytes'), int) or 'sha256' not in entry:
                raise DamagedTokenStore(path, f'meta.json does not record the size and checksum of {name}')
            file, want = path / name, entry['bytes']
            if not file.is_file():
                raise DamagedTokenStore(path, f'{name} is missing')
            if file.stat().st_size != want:
                raise DamagedTokenStore(path, f'{name} has {file.stat().st_size:,} bytes, {want:,} were written')
            if verify and sha256_file(file) != files[name]['sha256']:
                raise DamagedTokenStore(path, f'{name} does not match its checksum: its contents changed')
        if files['ids.bin']['bytes'] != n * dtype.itemsize:
            raise DamagedTokenStore(path, f'ids.bin should hold {n:,} {dtype.name} ids')
        try:
            offsets = np.load(path / 'offsets.npy')
        except (ValueError, OSError) as e:
            raise DamagedTokenStore(path, f'offsets.npy is unreadable ({e})') from None
        if len(offsets) != n_docs + 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            raise DamagedTokenStore(path, f'offsets.npy does not cut {n:,} tokens into {n_docs:,} documents')
        ids = np.memmap(path / 'ids.bin', dtype=dtype, mode='r', shape=(n,)) if n else np.zeros(0, dtype)
        if vocab_size is not None and n:
            top = int(ids.max())
            if top >= vocab_size:
                raise DamagedTokenStore(path, f'it holds token id {top:,}, beyond the vocabulary of {vocab_size:,}')
        mask = None
        if meta.get('mask'):
            if files['mask.bin']['bytes'] != n:
                raise DamagedTokenStore(path, f'mask.bin should hold {n:,} flags')
            mask = np.memmap(path / 'mask.bin', dtype=np.uint8, mode='r', shape=(n,)) if n else np.zeros(0, np.uint8)
        return cls(path, ids, offsets, meta, mask)

    @property
    def n_trained(self) -> int:
        """Tokens that carry a label (all of them, but for the replies-only mask of a chat corpus)."""
        return self.n_tokens if self.mask is None else int(self.meta['n_trained'])

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def doc_hashes(self) -> np.ndarray:
        """A 64-bit content hash of each document's token ids (equal documents, equal hashes)."""
        return np.load(self.path / 'doc_hashes.npy')

    def __repr__(self) -> str:
        return f'TokenStore({self.meta["corpus"]!r}: {self.n_docs:,} documents, {self.n_tokens:,} tokens, {self.path})'


def build_token_store(
    corpus: Corpus,
    tokenizer,
    cache: str | os.PathLike | None = None,  # the cache folder; default $FINETUNE_CACHE or ~/.cache/finetune
    progress: bool = True,  # show a progress bar (in MB of text) for corpora over 4 MB
    verify: bool = False,  # check a cached entry's checksums too (sizes and id range are always checked)
) -> TokenStore:
    """Tokenize `corpus` into the cache, or load it from there if these inputs were tokenized before."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f'tokenizer {type(tokenizer).__name__} has no eos_token: documents need one between them')
    if getattr(corpus, 'format', 'text') == 'chat' and not getattr(tokenizer, 'chat_template', None):
        raise ValueError(
            f'corpus {corpus.name!r} holds conversations, but tokenizer {type(tokenizer).__name__} has no chat '
            'template to render them: use the tokenizer of an instruct model, or set tokenizer.chat_template'
        )
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, corpus.fingerprint(), tokenizer_fingerprint(tokenizer)]).encode()
    ).hexdigest()[:32]
    final = cache_dir(cache) / 'tokens' / key
    damaged = False
    if final.exists():
        try:
            store = TokenStore.load(final, vocab_size=len(tokenizer), verify=verify)
            corpus.stats = ReadStats(**store.meta['read_stats'])
            return store
        except DamagedTokenStore as e:
            warnings.warn(
                f'corpus {corpus.name!r}: {e.problem} in the cached token store {final}; tokenizing again', stacklevel=2
            )
            damaged = True
    sweep(cache_folder('tokens', cache=cache))  # what killed builds left behind
    try:
        with atomic_folder(final, overwrite=damaged) as tmp:
            if getattr(corpus, 'format', 'text') == 'text':
                _write_store(corpus, tokenizer, tmp, progress)
            else:
                _write_record_store(corpus, tokenizer, tmp)
    except FileExistsError:  # another process finished the same entry first: the same content
        if not (final / 'meta.json').exists():
            raise
    return TokenStore.load(final, vocab_size=len(tokenizer))


def _write_store(corpus: Corpus, tokenizer, folder: Path, progress: bool) -> None:
    eos = tokenizer.eos_token_id
    nbytes = corpus.nbytes if progress else 0
    bar = None
    if nbytes > PROGRESS_BYTES:
        from fastprogress.fastprogress import progress_bar

        total_mb = max(1, round(nbytes / 1e6))
        bar = progress_bar(range(total_mb))
        bar.comment = f'tokenizing {corpus.name!r} (MB)'  # the console bar takes no comment argument
        bar.update(0)
    done = 0
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    offsets, n_tokens = [0], 0
    with open(folder / 'ids.bin', 'wb') as out:
        texts: list[str] = []
        ends: list[bool] = []
        size = 0

        def flush():
            nonlocal n_tokens
            if not texts:
                return
            chunks = []
            for ids, end in zip(_encode_batch(tokenizer, texts), ends):
                chunks.append(np.asarray(ids, dtype=dtype))
                n_tokens += len(ids)
                if end:
                    chunks.append(np.asarray([eos], dtype=dtype))
                    n_tokens += 1
                    offsets.append(n_tokens)
            out.write(np.concatenate(chunks).tobytes())
            texts.clear()
            ends.clear()

        for text, end in corpus.segments():
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH_CHARS:
                flush()
                done, size = done + size, 0
                if bar is not None:
                    bar.update(min(int(done / 1e6), bar.total - 1))
        flush()
        if bar is not None:
            bar.update(bar.total)
    _finish_store(folder, corpus, tokenizer, offsets, n_tokens, dtype)


def _finish_store(folder: Path, corpus, tokenizer, offsets: list[int], n_tokens: int, dtype, **extra) -> None:
    """Offsets, document hashes and `meta.json` (written last) of an entry whose ids.bin (and mask.bin) exist."""
    eos = tokenizer.eos_token_id
    offsets = np.asarray(offsets, dtype=np.int64)
    np.save(folder / 'offsets.npy', offsets)
    ids = np.memmap(folder / 'ids.bin', dtype=dtype, mode='r', shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    np.save(folder / 'doc_hashes.npy', _doc_hashes(ids, offsets))
    unk = tokenizer.unk_token_id
    n_unk = int(np.count_nonzero(ids == unk)) if unk is not None and unk != eos and n_tokens else 0
    del ids
    stats = corpus.stats
    meta = {
        'format': FORMAT_VERSION,
        'corpus': corpus.name,
        'source': str(corpus.source),
        'n_tokens': n_tokens,
        'n_docs': len(offsets) - 1,
        'dtype': np.dtype(dtype).name,
        'eos_token_id': eos,
        'n_unk': n_unk,
        'max_doc_tokens': int(np.diff(offsets).max()) if len(offsets) > 1 else 0,
        'tokenizer': getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__,
        'read_stats': {k: getattr(stats, k) for k in ReadStats.__dataclass_fields__},
        'files': {name: {'bytes': (folder / name).stat().st_size, 'sha256': sha256_file(folder / name)}
                  for name in STORE_FILES + (('mask.bin',) if extra.get('mask') else ())},
        **extra,
    }  # fmt: skip
    (folder / 'meta.json').write_text(json.dumps(meta, indent=1))  # last: an entry without it is incomplete


def _write_record_store(corpus, tokenizer, folder: Path) -> None:
    """A chat or prompt/completion corpus: each record rendered, with a mask of the tokens the loss is taken on."""
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    offsets, n_tokens, n_trained = [0], 0, 0
    with open(folder / 'ids.bin', 'wb') as ids_out, open(folder / 'mask.bin', 'wb') as mask_out:
        for record, place in corpus.records():
            try:
                ids, mask = render_record(tokenizer, record, corpus.format, corpus.train_on)
            except Exception as e:  # a template's own error (an unknown role, turns out of order)
                raise ValueError(f'corpus {corpus.name!r}: {place}: the chat template cannot render it: {e}') from None
            if not any(mask):
                raise ValueError(f'corpus {corpus.name!r}: {place}: no token to train on once rendered')
            stop = int(corpus.format == 'prompt_completion')  # no template end-of-turn: the EOS teaches it to stop
            ids_out.write(np.asarray([*ids, eos], dtype=dtype).tobytes())
            mask_out.write(np.asarray([*mask, stop], dtype=np.uint8).tobytes())
            n_tokens += len(ids) + 1
            n_trained += int(sum(mask)) + stop
            offsets.append(n_tokens)
    _finish_store(folder, corpus, tokenizer, offsets, n_tokens, dtype, mask=True, n_trained=n_trained,
                  train_on=corpus.train_on, chat_format=corpus.format)  # fmt: skip


def render_record(tokenizer, record: dict, format: str, train_on: str = 'assistant') -> tuple[list[int], list[int]]:
    """Token ids of one chat or prompt/completion record, and a 0/1 mask: 1 on the tokens the loss is taken on.

    A conversation is rendered with the tokenizer's chat template. Where the template marks replies
    (`{% generation %}`), transformers' assistant mask is used; otherwise the replies are found by
    rendering growing prefixes of the conversation: reply i spans from the end of the conversation
    up to it with the generation prompt to the end of the conversation including it (its end-of-turn
    tokens included, so the model learns to stop). A prompt/completion record is the prompt then the
    completion, the mask on the completion.
    """
    if format == 'prompt_completion':
        text, spans = record['prompt'] + record['completion'], [(len(record['prompt']), None)]
    else:
        messages = [{'role': m['role'], 'content': m['content']} for m in record['messages']]
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ''
        if train_on == 'assistant' and '{% generation %}' in template.replace('{%- generation %}', '{% generation %}'):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out['input_ids']), [int(m) for m in out['assistant_masks']]
        render = partial(tokenizer.apply_chat_template, tokenize=False)
        text, spans = render(messages), []
        for i, m in enumerate(messages):
            if m['role'] != 'assistant':
                continue
            before = render(messages[:i], add_generation_prompt=True) if i else ''
            upto = render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(
                    'the template does not render the conversation as a growing text, so the replies cannot be '
                    "told apart: use train_on='all'"
                )
            spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if train_on == 'all':
        return list(enc['input_ids']), [1] * len(enc['input_ids'])
    mask = [int(any(a <= start and (b is None or start < b) for a, b in spans)) for start, _ in enc['offset_mapping']]
    return list(enc['input_ids']), mask


def _doc_hashes(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    for i in range(len(out)):
        digest = hashlib.blake2b(ids[offsets[i] : offsets[i + 1]].tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, 'little')
    return out


class PackedBlocks:
    """Windows of `seq_len + 1` tokens cut with stride `seq_len` from the concatenation of `spans` of `ids`."""

    def __init__(self, ids: np.ndarray, spans: list[tuple[int, int]], seq_len: int, mask: np.ndarray | None = None):
        if seq_len < 1:
            raise ValueError(f'seq_len must be at least 1, got {seq_len}')
        self.ids, self.seq_len, self.mask = ids, seq_len, mask  # mask: a chat corpus's trained-token flags
        self.spans = _merge_spans(spans)
        starts = np.asarray([s for s, _ in self.spans], dtype=np.int64)
        lengths = np.asarray([e - s for s, e in self.spans], dtype=np.int64)
        self._starts, self._cum = starts, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self._cum[-1])
        self.n_blocks = max(0, (self.n_tokens - 1) // seq_len)
        self.dropped = self.n_tokens - (self.n_blocks * seq_len + 1) if self.n_blocks else self.n_tokens

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> np.ndarray:
        return self._window(self.ids, i)

    def mask_window(self, i: int) -> np.ndarray | None:
        """Block `i`'s trained-token flags (1: the loss is taken there), or None for a corpus of plain text."""
        return None if self.mask is None else self._window(self.mask, i)

    @cached_property  # a pass over the mask: once per split, however often reports ask
    def n_trained(self) -> int:
        """Tokens that are targets of some block and carry a label (the first token of the stream is no target)."""
        if self.mask is None or not self.n_blocks:
            return self.n_blocks * self.seq_len
        stream = np.concatenate([self.mask[a:b] for a, b in self.spans])
        return int(stream[1 : self.n_blocks * self.seq_len + 1].sum(dtype=np.int64))

    def _window(self, array: np.ndarray, i: int) -> np.ndarray:
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(f'block {i} out of range for {self.n_blocks} blocks')
        a = (i % self.n_blocks) * self.seq_len
        b = a + self.seq_len + 1
        if len(self.spans) == 1:
            s = self._starts[0]
            return np.asarray(array[s + a : s + b])
        pos = np.arange(a, b, dtype=np.int64)
        span = np.searchsorted(self._cum, pos, side='right') - 1
        return np.asarray(array[self._starts[span] + pos - self._cum[span]])

    def __repr__(self) -> str:
        return f'PackedBlocks({self.n_blocks:,} blocks of {self.seq_len}+1 tokens, {self.dropped} dropped)'


def _merge_spans(spans) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if e <= s:
            continue
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((int(s), int(e)))
    return merged


def token_stores(cache: str | os.PathLike | None = None, verify: bool = False) -> list[dict]:
    """Every entry of the cache's token stores: key, corpus, source, tokenizer, tokens, bytes on disk, status.

    `status` is 'ok', 'damaged: <what>' (with `verify`, checksums included), or 'old format' for
    entries an earlier version wrote (never read again: `finetune cache clear` frees them).
    """
    folder = cache_dir(cache) / 'tokens'
    rows = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith('.') or not path.is_dir():
            continue
        size = sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
        try:
            meta = json.loads((path / 'meta.json').read_text())
        except (OSError, ValueError):
            meta = {}
        row = {'key': path.name, 'corpus': meta.get('corpus'), 'source': meta.get('source'),
               'tokenizer': meta.get('tokenizer'), 'tokens': meta.get('n_tokens'), 'bytes': size}  # fmt: skip
        if meta.get('format', FORMAT_VERSION) < FORMAT_VERSION:
            row['status'] = 'old format'
        else:
            try:
                TokenStore.load(path, verify=verify)
                row['status'] = 'ok'
            except DamagedTokenStore as e:
                row['status'] = f'damaged: {e.problem}'
        rows.append(row)
    return rows
