"""Text generation with the model's own `generate`: batched prompts, KV cache, sampling options.

Prompts are padded on the left here, for the call only: the user's tokenizer is never changed (its
`padding_side`, its pad token), and one without a pad token pads with EOS under the attention mask.
"""

from __future__ import annotations

import torch

from .models import eval_mode

__all__ = ['generate']


@torch.no_grad()
def generate(
    model,  # a transformers causal LM
    tokenizer,  # its tokenizer
    prompts: str | list[str],  # one prompt, or several generated as one left-padded batch ('' starts from BOS)
    max_new_tokens: int | None = None,  # tokens to add to each prompt; default: the generation config's, else 64
    do_sample: bool | None = None,  # default: the model's generation config (greedy if it says nothing)
    temperature: float | None = None,  # sampling temperature (with do_sample); default: the generation config's
    top_p: float | None = None,  # nucleus sampling mass (with do_sample); default: the generation config's
    top_k: int | None = None,  # keep the k most likely tokens (with do_sample); default: the generation config's
    return_prompt: bool = True,  # include each prompt in the returned text
    **kwargs,  # passed to `model.generate` (e.g. repetition_penalty, num_beams, num_return_sequences)
) -> str | list:
    """Continue each prompt: a string for a string, a list for a list; with `num_return_sequences=n` > 1, a list
    of n strings per prompt. As with `model.generate`, what is not given comes from `model.generation_config`
    (an instruct model's `do_sample=True, temperature=0.6`, say), and decoding is greedy when nothing says."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    config = getattr(model, 'generation_config', None)
    if max_new_tokens is None:
        max_new_tokens = getattr(config, 'max_new_tokens', None) or 64
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be at least 1, got {max_new_tokens}')
    given = {'do_sample': do_sample, 'temperature': temperature, 'top_p': top_p, 'top_k': top_k}
    given = {k: v for k, v in given.items() if v is not None}
    sampling = given.get('do_sample', getattr(config, 'do_sample', False))
    if sampling and given.get('temperature') is not None and given['temperature'] <= 0:
        raise ValueError(f'temperature must be positive when sampling, got {temperature}')
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded(_prompt_ids(tokenizer, batch), pad, device)
    with eval_mode(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            use_cache=True,
            **given,
            **kwargs,
        )
    start = 0 if return_prompt else input_ids.shape[1]
    texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    n = kwargs.get('num_return_sequences') or 1
    if n > 1:
        texts = [texts[i * n : (i + 1) * n] for i in range(len(batch))]
    return texts[0] if single else texts


def _prompt_ids(tokenizer, batch: list[str]) -> list[list[int]]:
    """Each prompt's ids; an empty prompt starts from the BOS token (EOS where there is none)."""
    ids = tokenizer(batch)['input_ids']
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None)
    for i, row in enumerate(ids):
        if not row:
            if start is None:
                raise ValueError(
                    f'prompt {i} is empty and the tokenizer has neither a BOS nor an EOS token to start from'
                )
            ids[i] = [start]
    return ids


def _pad_id(tokenizer) -> int:
    """The id that fills the left of shorter prompts: the pad token, else EOS (masked out either way)."""
    for name in ('pad_token_id', 'eos_token_id'):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise ValueError(f'tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token to pad prompts')


def _left_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (decoder-only models continue from the right end) and their attention mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask
