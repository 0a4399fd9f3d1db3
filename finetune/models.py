"""Loading causal LMs and their tokenizers: an embedded name, a hub id, a local folder, a GGUF file, or an object.

A hub id goes through the Hugging Face cache, so it works offline once cached. A `.gguf` file is
dequantized by transformers (with the `gguf` package), then copied into a fresh model built from
its config without the quantization flag, so that it trains and `save_pretrained` works like any
other model. `trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .zoo import ZOO, is_zoo_name, zoo_model_dir

__all__ = ['load_model', 'load_tokenizer', 'ensure_pad_token', 'model_context_length']


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
    """A tokenizer from a hub id, a local folder, a `.gguf` file or a tokenizer object; it gets a pad token."""
    from transformers import AutoTokenizer

    if not isinstance(source, (str, os.PathLike)):
        return ensure_pad_token(source)
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
    """An ordinary, trainable `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM

    if isinstance(source, torch.nn.Module):
        return source
    if is_zoo_name(source):
        source = zoo_model_dir(source)
    _check_local(source)
    if _is_gguf(source):
        return _load_gguf(Path(source).expanduser(), dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise _offline_hint(source, e) from e


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


def model_context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = model.config
    for attr in ('max_position_embeddings', 'n_positions', 'max_sequence_length', 'seq_length'):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None
