"""Layer groups for decoder-only LMs: embeddings | decoder blocks in `n_groups` | final norm + LM head.

The parts are found by structure, not by name: the decoder blocks are the model's longest
`nn.ModuleList`; parameters registered before it are the embeddings (token and position), those
after it are the final norm and the LM head. This covers Llama, Mistral, Qwen2, Gemma, GPT-2,
GPT-NeoX, Phi, OPT and most other Hugging Face causal LMs. Every parameter is listed exactly once:
a tied embedding / LM-head matrix is one tensor, and it goes to the head group, because it is the
output layer that every phase of `fine_tune` trains. An empty group (the embeddings of a tied model
without position embeddings) is left out.

Norm layers are recognised by type (LayerNorm and friends) or by a class name ending in `Norm`
(LlamaRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, ...), for weight-decay exclusion and `train_bn`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .models import eval_mode

DEFAULT_GROUPS = 4  # block groups: with embeddings and head, six LR levels, as many as ULMFiT's LSTM had

__all__ = [
    'DEFAULT_GROUPS',
    'LayerGroup',
    'decoder_groups',
    'find_blocks',
    'is_norm',
    'norm_bias_params',
]


@dataclass
class LayerGroup:
    """A named group of parameters and the modules they come from."""

    name: str
    params: list[nn.Parameter]
    modules: list[str]  # a short description of where the parameters live


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm, torch's RMSNorm, or a model's own `...Norm` class."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, getattr(nn, 'RMSNorm', nn.LayerNorm))
    return isinstance(module, norm_types) or type(module).__name__.endswith(('Norm', 'RMSNorm', 'LayerNorm'))


def norm_bias_params(model: nn.Module, with_bias: bool = True) -> list[nn.Parameter]:
    """Parameters of norm layers, and (with `with_bias`) every bias: the ones that get no weight decay."""
    out, seen = [], set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if is_norm(module):
            chosen = own
        elif with_bias:
            chosen = [p for n, p in module.named_parameters(recurse=False) if n == 'bias' or n.endswith('_bias')]
        else:
            chosen = []
        for p in chosen:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder blocks: the longest `nn.ModuleList` of identical module types, with its qualified name."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def decoder_groups(model: nn.Module, n_groups: int | None = None, only: set[int] | None = None) -> list[LayerGroup]:
    """Embeddings | blocks cut into `n_groups` contiguous groups | final norm + LM head.

    `n_groups=None` means `DEFAULT_GROUPS`, or one group per block for models with fewer blocks.

    `only` keeps just the parameters with these ids (the adapters of a LoRA model).
    """
    found = find_blocks(model)
    named = list(model.named_parameters())  # each tensor once, under its first name
    if only is not None:
        named = [(n, p) for n, p in named if id(p) in only]
    if found is None:
        warnings.warn(
            f'{type(model).__name__}: no list of decoder blocks found; all parameters form one group, '
            'so freeze() and discriminative learning rates have nothing to act on',
            stacklevel=2,
        )
        return [LayerGroup('all', [p for _, p in named], [type(model).__name__])]
    prefix, blocks = found
    n_blocks = len(blocks)
    if n_groups is None:
        n_groups = min(DEFAULT_GROUPS, n_blocks)
    if not isinstance(n_groups, int) or not 1 <= n_groups <= n_blocks:
        raise ValueError(
            f'n_groups={n_groups!r}: {type(model).__name__} has {n_blocks} decoder blocks, so use 1 to {n_blocks}'
        )
    # block i goes to group i * n_groups // n_blocks: contiguous, sizes differ by at most one
    block_group = [i * n_groups // n_blocks for i in range(n_blocks)]
    embed, head, middle = [], [], [[] for _ in range(n_groups)]
    embed_names, head_names = [], []
    order = _execution_order(model)
    first_block = order.get(f'{prefix}.0')
    seen_blocks = False
    for name, p in named:
        if name.startswith(prefix + '.'):
            seen_blocks = True
            index = int(name[len(prefix) + 1 :].split('.', 1)[0])
            middle[block_group[index]].append(p)
            continue
        ran = order.get(name.rsplit('.', 1)[0])
        after = ran > first_block if ran is not None and first_block is not None else seen_blocks
        (head if after else embed).append(p)
        (head_names if after else embed_names).append(name)
    tied = _tied_head(model)
    if tied is not None and any(p is tied for p in embed):
        embed = [p for p in embed if p is not tied]
        head.insert(0, tied)
        embed_names = [n for n in embed_names if model.get_parameter(n) is not tied]
        head_names.insert(0, 'lm_head (tied to the input embeddings)')
    groups = [LayerGroup('embeddings', embed, _short_names(embed_names))]
    for g in range(n_groups):
        members = [i for i, bg in enumerate(block_group) if bg == g]
        label = f'blocks {members[0]}-{members[-1]}' if len(members) > 1 else f'block {members[0]}'
        groups.append(LayerGroup(label, middle[g], [f'{prefix}.{members[0]}..{members[-1]}']))
    groups.append(LayerGroup('norm + head', head, _short_names(head_names)))
    return [g for g in groups if g.params]


def _execution_order(model: nn.Module) -> dict[str, int]:
    """The order in which modules first run in a two-token forward pass (eval mode, no grad).

    Registration order is not execution order in every model (OPT registers its final norm
    before its blocks). An empty dict when the model cannot run such a pass.
    """
    order: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():

        def record(_module, _args, name=name):
            order.setdefault(name, len(order))

        hooks.append(module.register_forward_pre_hook(record))
    try:
        device = next(model.parameters()).device
        with eval_mode(model), torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    except Exception:  # a model that needs more than input_ids: fall back to registration order
        order.clear()
    finally:
        for h in hooks:
            h.remove()
    return order


def _tied_head(model: nn.Module) -> nn.Parameter | None:
    get_in, get_out = getattr(model, 'get_input_embeddings', None), getattr(model, 'get_output_embeddings', None)
    if get_in is None or get_out is None:
        return None
    inp, out = get_in(), get_out()
    if inp is None or out is None:
        return None
    return out.weight if out.weight is inp.weight else None


def _short_names(names: list[str]) -> list[str]:
    """Module names without the parameter suffix, in order, each once."""
    out = []
    for n in names:
        module = n.rsplit('.', 1)[0] if '.' in n and not n.startswith('lm_head (') else n
        if module not in out:
            out.append(module)
    return out
