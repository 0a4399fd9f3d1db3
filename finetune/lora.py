"""LoRA through peft: wrapping a model in adapters, and saving the adapters or merged weights.

`lora=True` uses `default_lora_config()`: rank 16, alpha 32, dropout 0.05 on every linear layer
of the decoder blocks (peft's 'all-linear', which leaves the LM head alone), the usual starting
point for LoRA fine-tuning of small and medium LLMs. A `peft.LoraConfig` is used as given, after
checking that its target modules exist.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

__all__ = ['default_lora_config', 'add_lora', 'is_peft_model', 'linear_layer_names', 'save_lora']


def default_lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear', bias='none', task_type='CAUSAL_LM'
    )


def is_peft_model(model) -> bool:
    return type(model).__module__.startswith('peft.')


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct names (last component) of the model's linear layers: what LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n})


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap `model` in LoRA adapters (`lora` is True or a `peft.LoraConfig`); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = default_lora_config() if lora is True else lora
    if not isinstance(config, LoraConfig):
        raise TypeError(f'lora must be True or a peft.LoraConfig, got {type(lora).__name__}')
    targets = config.target_modules
    if targets is not None and not isinstance(targets, str):  # a str is 'all-linear' or a regular expression
        names = linear_layer_names(model)
        missing = sorted(set(targets) - set(names))
        if missing:
            raise ValueError(
                f'LoRA target modules {missing} are not linear layers of {type(model).__name__}; '
                f'its linear layers are named {names}'
            )
    config = copy.deepcopy(config)
    if config.task_type is None:
        config.task_type = 'CAUSAL_LM'
    return get_peft_model(model, config)


def save_lora(model, path: Path, merged: bool) -> None:
    """An adapter folder that peft loads, or (`merged=True`) a plain model with the adapters merged in."""
    if merged:
        plain = copy.deepcopy(model).merge_and_unload()  # a copy: the learner keeps its adapters
        plain.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
