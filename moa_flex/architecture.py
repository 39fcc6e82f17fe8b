"""What moa-flex reads from a transformers model and its config, beyond the attention shape.

Per decoder layer: the model's own sliding window, its logit soft-cap, and the device and
dtype of its attention weights (models spread with ``device_map``). The attention shape
itself is :class:`moa_flex.plan.ModelShape`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_ATTN = re.compile(r"(?:layers|\bh|blocks)\.(\d+)\.(?:self_attn|attn|attention|self_attention)$")


def softcaps(config: Any, num_layers: int) -> list[float]:
    """Per layer, the model's attention logit soft-cap (0.0: none), from ``attn_logit_softcapping``."""
    cap = getattr(config, "attn_logit_softcapping", None)
    return [float(cap) if cap else 0.0] * num_layers


MODELED_LAYER_TYPES = ("full_attention", "sliding_attention")


def model_windows(config: Any, num_layers: int) -> list[int | None]:
    """Per layer, the model's own sliding window (tokens) or None, from its config
    (``sliding_window`` and, where present, ``layer_types``). ValueError for an attention
    pattern moa-flex does not model (chunked local attention, linear attention layers): the
    passes would replace the model's mask by causal + window and answer wrongly."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if getattr(config, "attention_chunk_size", None) and (types is None or "chunked_attention" in types[:num_layers]):
        raise ValueError(f"{type(config).__name__} has attention_chunk_size={config.attention_chunk_size} (chunked "
                         "local attention), which moa-flex does not model")
    other = sorted({t for t in (types or [])[:num_layers] if t not in MODELED_LAYER_TYPES})
    if other:
        raise ValueError(f"{type(config).__name__} has layers of type {other}; moa-flex models "
                         f"{list(MODELED_LAYER_TYPES)} only")
    if not window:
        return [None] * num_layers
    if types is None:
        return [int(window)] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:num_layers]]


def layer_placement(model: torch.nn.Module, num_layers: int) -> tuple[list[torch.device], torch.dtype]:
    """Device of every decoder layer's attention (models spread with device_map) and the
    attention weights' dtype, found through module paths ``...layers.N.self_attn``."""
    devices: dict[int, torch.device] = {}
    dtype = None
    for name, module in model.named_modules():
        m = _ATTN.search(name)
        if m is None:
            continue
        param = next(module.parameters(), None)
        if param is not None:
            devices[int(m.group(1))] = param.device
            dtype = dtype or param.dtype
    if sorted(devices) != list(range(num_layers)):
        fallback = next(model.parameters())
        return [fallback.device] * num_layers, fallback.dtype
    return [devices[layer] for layer in range(num_layers)], dtype or next(model.parameters()).dtype
