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
    prompts: str | list[str],  # one prompt, or several generated as one left-padded batch
    max_new_tokens: int = 64,  # tokens to add to each prompt
    do_sample: bool = False,  # False: greedy decoding; True: sample with temperature / top_p / top_k
    temperature: float = 1.0,  # sampling temperature (with do_sample)
    top_p: float = 1.0,  # nucleus sampling mass (with do_sample)
    top_k: int | None = None,  # keep the k most likely tokens (with do_sample)
    return_prompt: bool = True,  # include each prompt in the returned text
    **kwargs,  # passed to `model.generate` (e.g. repetition_penalty, num_beams)
) -> str | list[str]:
    """Continue each prompt; returns a string for a string, a list for a list."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be at least 1, got {max_new_tokens}')
    if do_sample and temperature <= 0:
        raise ValueError(f'temperature must be positive when sampling, got {temperature}')
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded(tokenizer(batch)['input_ids'], pad, device)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    with eval_mode(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad,
            use_cache=True,
            **sampling,
            **kwargs,
        )
    start = 0 if return_prompt else input_ids.shape[1]
    texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    return texts[0] if single else texts


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
