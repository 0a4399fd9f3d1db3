"""Text generation with the model's own `generate`: batched prompts, KV cache, sampling options."""

from __future__ import annotations

import torch

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
    side = tokenizer.padding_side
    tokenizer.padding_side = 'left'  # decoder-only models continue from the right end
    try:
        enc = tokenizer(batch, return_tensors='pt', padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ('input_ids', 'attention_mask')}
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
            **kwargs,
        )
    finally:
        model.train(was_training)
    start = 0 if return_prompt else enc['input_ids'].shape[1]
    texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    return texts[0] if single else texts
