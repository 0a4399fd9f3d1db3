"""Loading causal LMs and their tokenizers: an embedded name, a hub id, a local folder, a GGUF file, or an object.

A hub id goes through the Hugging Face cache, so it works offline once cached. A `.gguf` file is
dequantized by transformers (with the `gguf` package), then copied into a fresh model built from
its config without the quantization flag, so that it trains and `save_pretrained` works like any
other model. An embedded model's GGUF (from `zoo`) is converted that way once, into a
safetensors folder in the cache. `trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .cache import atomic_folder, cache_dir, cache_folder
from .zoo import ZOO, is_zoo_name, zoo_gguf

__all__ = [
    'load_model',
    'load_tokenizer',
    'ensure_pad_token',
    'model_context_length',
    'zoo_model_dir',
    'eval_mode',
    'source_context_length',
    'check_vocab',
    'check_seq_len',
    'new_parameters',
]

NEW_PARAMS_ATTR = '_finetune_new_params'  # set on a model by `load_model`
ZOO_MARKER = 'finetune-zoo.json'  # written last into a converted embedded model's folder


def _is_gguf(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and str(source).lower().endswith('.gguf')


def _check_local(source) -> None:
    """A source that is not on disk must look like a hub id (`name` or `org/name`)."""
    s = str(source)
    if Path(s).expanduser().exists():
        return
    if s.startswith(('.', '/', '~')) or s.count('/') > 1 or _is_gguf(s) or (os.sep != '/' and os.sep in s):
        raise FileNotFoundError(f'model path {s!r} does not exist')


def _offline_hint(source, err: Exception) -> OSError:
    return OSError(
        f'could not load {source!r}: {err}\n'
        f'It is not an embedded model ({", ".join(sorted(ZOO))}), a local folder, or a hub id in the Hugging Face '
        'cache. Hub ids and paths work too; offline (HF_HUB_OFFLINE=1) a hub id loads only once it has been '
        'downloaded; a local folder or a .gguf file always loads.'
    )


def load_tokenizer(source, *, trust_remote_code: bool = False, **kwargs):
    """A tokenizer from a hub id, a local folder or a `.gguf` file (it gets a pad token), or an object, unchanged."""
    from transformers import AutoTokenizer

    if not isinstance(source, (str, os.PathLike)):
        return source
    if is_zoo_name(source):
        source = zoo_model_dir(source)
    _check_local(source)
    try:
        if _is_gguf(source):
            path = Path(source).expanduser()
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        else:
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise _offline_hint(source, e) from e
    return ensure_pad_token(tok)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its EOS token as pad.

    Padding is only ever used for batched generation here, with an attention mask; training blocks
    are never padded and labels never come from the pad id, so real EOS labels stay real.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f'tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token')
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source,  # 'smollm2-135m' (embedded), a hub id, a local folder, a .gguf file, or an `AutoModelForCausalLM`
    *,
    dtype: torch.dtype = torch.float32,  # weights stay fp32 for training; mixed precision autocasts
    trust_remote_code: bool = False,  # run code shipped with a hub model only when asked
    **kwargs,  # passed to `from_pretrained`
):
    """An ordinary, trainable `AutoModelForCausalLM`; `torch_dtype=` (transformers' old name) means `dtype=`."""
    from transformers import AutoModelForCausalLM

    if 'torch_dtype' in kwargs:
        dtype = kwargs.pop('torch_dtype')

    if isinstance(source, torch.nn.Module):
        return source
    if is_zoo_name(source):
        source = zoo_model_dir(source)
    _check_local(source)
    if _is_gguf(source):
        return _load_gguf(Path(source).expanduser(), dtype)
    kwargs.pop('output_loading_info', None)  # always asked for: it names the newly initialised weights
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
    except OSError as e:
        raise _offline_hint(source, e) from e
    tied = _tied_keys(model) if getattr(model.config, 'tie_word_embeddings', False) else set()
    params = dict(model.named_parameters(remove_duplicate=False))  # a missing buffer is recomputed, not trained
    new = sorted(k for k in set(info.get('missing_keys', ())) - tied if k in params)
    if new:
        setattr(model, NEW_PARAMS_ATTR, new)
    return model


def new_parameters(model) -> list[str]:
    """Names of the weights `load_model` found missing from the checkpoint and initialised anew (a new LM head)."""
    return list(getattr(model, NEW_PARAMS_ATTR, []))


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF checkpoint into a fresh model that is not marked as quantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, 'quantization_config'):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(
            f'{path}: GGUF weights do not fit the {type(model).__name__} config '
            f'(missing {missing[:5]}, unexpected {unexpected[:5]})'
        )
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.config.name_or_path = str(path)
    return model.eval()


def _tied_keys(model) -> set[str]:
    tied = getattr(model, '_tied_weights_keys', None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def source_context_length(source) -> int | None:
    """The context window of the model `source` names, from its config file alone (no weights); None if unknown.

    A folder or a hub id already in the cache is read; an embedded model not converted yet and a
    `.gguf` file are not (their limit is checked once the model has loaded).
    """
    if not isinstance(source, (str, os.PathLike)) or _is_gguf(source):
        return None
    if is_zoo_name(str(source)):
        folder = cache_dir() / 'zoo' / str(source)
        if not (folder / ZOO_MARKER).exists():
            return None
        source = folder
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().exists()
                                            else str(source))  # fmt: skip
    except Exception:  # not found, offline, remote code: the model's own load says why
        return None
    return _config_context_length(config)


def model_context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    return _config_context_length(model.config)


def _config_context_length(config) -> int | None:
    for attr in ('max_position_embeddings', 'n_positions', 'max_sequence_length', 'seq_length'):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def zoo_model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of embedded model `name`, converted from its GGUF file on first use."""
    if name not in ZOO:
        raise ValueError(f'{name!r} is not an embedded model; embedded: {sorted(ZOO)} (hub ids and paths work too)')
    final = cache_dir(cache) / 'zoo' / name
    if (final / ZOO_MARKER).exists():
        return final
    entry = ZOO[name]
    with tempfile.TemporaryDirectory(prefix=f'.{name}-gguf-', dir=cache_folder('zoo', cache=cache)) as scratch:
        gguf = zoo_gguf(name, scratch, cache)
        print(f'converting {gguf.name} to a trainable safetensors checkpoint (once)')
        with atomic_folder(final, overwrite=True) as tmp:
            _load_gguf(gguf, torch.float32).save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(gguf).save_pretrained(tmp)
            marker = {'name': name, 'package': f'{entry.package}=={entry.version}', 'gguf_sha256': entry.member_sha256}
            (tmp / ZOO_MARKER).write_text(json.dumps(marker))
    return final


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block; each module's own train/eval flag as before, however it ends."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def check_seq_len(model, seq_len: int | None, fix: str = 'rebuild the DataLoaders with') -> None:
    """Refuse a `seq_len` longer than the model's context window (the model, or the name or path of one)."""
    loaded = not isinstance(model, (str, os.PathLike))
    limit = model_context_length(model) if loaded else source_context_length(model)
    if seq_len is not None and limit is not None and seq_len > limit:
        what = type(model).__name__ if loaded else repr(str(model))
        raise ValueError(
            f'seq_len={seq_len} is longer than the context window of {what} ({limit} positions): {fix} '
            f'seq_len <= {limit}'
        )


def check_vocab(model, tokenizer) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f'the tokenizer has {len(tokenizer):,} tokens but the model embeds only {rows:,}: '
            'use the tokenizer that belongs to this model (or resize its embeddings)'
        )
