"""Multimodal requests: which token types make some prompt tokens attend each other in both
directions (Gemma 3 and 4's image and video tokens), refused because MoA's masks are causal;
and models whose positions depend on the image layout, refused with images because generate's
loop passes text positions.

Used by generate's loop (:mod:`moa_flex.runtime.decode_loop`, which passes the token types to
the prefill) and by the compiled forward (a plain forward or a prefill called directly), so no
path answers such a request with causal attention instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class _Blocks:
    """A family whose prefill lets each run of some token types attend itself in both directions
    (transformers 5.25, ``get_block_sequence_ids_for_mask``); its ``prepare_inputs_for_generation``
    passes the token types to the prefill only."""

    argument: str  # the forward's token-type input
    types: tuple[int, ...]  # the token types whose runs are bidirectional blocks
    switch: tuple[str, Any] | None = None  # (text-config field, value) that turns the blocks on; None: always on


BLOCKS = {  # model type: its blocks; token types of any other family are refused
    "gemma3": _Blocks("token_type_ids", (1,)),  # image tokens, on every layer
    "gemma4": _Blocks("mm_token_type_ids", (1, 2), ("use_bidirectional_attention", "vision")),  # image, video tokens
    "gemma4_unified": _Blocks("mm_token_type_ids", (1, 2), ("use_bidirectional_attention", "vision")),
}


def blocks_of(model: torch.nn.Module | None) -> _Blocks | None:
    config = getattr(model, "config", None)
    return BLOCKS.get(getattr(config, "model_type", None))



TOKEN_TYPE_ARGUMENTS = frozenset(b.argument for b in BLOCKS.values())


def check_token_types(model: Callable[[], torch.nn.Module | None], kwargs: dict) -> None:
    """:func:`check_causal` on the token types a forward's ``kwargs`` carry, if the model's
    family has bidirectional blocks (:data:`BLOCKS`). ``model``: returns the model, called only
    when a token-type argument is there (every forward, decode steps included, runs this)."""
    if not any(kwargs.get(name) is not None for name in TOKEN_TYPE_ARGUMENTS):
        return
    model = model()
    blocks = blocks_of(model)
    if blocks is not None and kwargs.get(blocks.argument) is not None:
        check_causal(model, blocks, kwargs[blocks.argument])


def check_causal(model: torch.nn.Module, blocks: _Blocks, types: torch.Tensor) -> None:
    """NotImplementedError if the model's prefill would let two tokens of the prompt attend each
    other both ways: a run of two or more tokens of the block types (a single one attends only
    itself, as causally), with the config's switch on. MoA's masks are causal, so moa-flex cannot
    reproduce such a block: refused rather than a different result."""
    if blocks.switch is not None:
        field, value = blocks.switch
        if getattr(model.config.get_text_config(), field, None) != value:
            return  # this config keeps every token causal
    if not isinstance(types, torch.Tensor) or types.dim() != 2:
        raise ValueError(f"{blocks.argument} must be a [batch, tokens] tensor, got "
                         f"{tuple(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__}")
    inside = torch.isin(types, torch.tensor(blocks.types, device=types.device, dtype=types.dtype))
    if bool((inside[:, 1:] & inside[:, :-1]).any()):
        raise NotImplementedError(
            f"{type(model).__name__} lets each run of tokens with {blocks.argument} in {list(blocks.types)} (image or "
            "video tokens) attend itself in both directions at prefill, a non-causal mask; moa-flex's MoA masks are "
            "causal and cannot reproduce it, so this request is refused rather than answered differently")


IMAGE_PREFIX = {"git": "pixel_values"}  # model type: the input whose image tokens prefix the text, attending
# each other both ways (GIT: "images attend each other bidirectionally while text remains causal")


def check_image_prefix(model: Callable[[], torch.nn.Module | None], kwargs: dict) -> None:
    """NotImplementedError for a forward with images to a model whose image tokens form a
    bidirectional prefix of the sequence (:data:`IMAGE_PREFIX`): MoA's masks are causal.
    ``model``: returns the model, called only when some such input is there."""
    if not any(kwargs.get(name) is not None for name in IMAGE_PREFIX.values()):
        return
    model = model()
    argument = IMAGE_PREFIX.get(getattr(getattr(model, "config", None), "model_type", None))
    if argument is not None and kwargs.get(argument) is not None:
        raise NotImplementedError(
            f"{type(model).__name__} puts the image tokens of {argument} before the text and lets them attend each "
            "other in both directions, a non-causal mask; moa-flex's MoA masks are causal and cannot reproduce it, so "
            "a request with images is refused rather than answered differently (text-only requests run)")


def check_text_positions(model: torch.nn.Module) -> None:
    """NotImplementedError for a request with multimodal inputs to a model that derives its
    positions from the image layout (multimodal rotary positions, ``get_rope_index``, as
    Qwen-VL models do): moa-flex's generate loop passes text positions (``cumsum(mask) - 1``),
    which such a model would read as a different prompt. No supported type has such a rule
    (docs/SUPPORT.md); this keeps a new one from being answered with other positions."""
    for owner in (model, getattr(model, "model", None)):
        if callable(getattr(owner, "get_rope_index", None)):
            raise NotImplementedError(
                f"{type(model).__name__} computes its positions from the image layout ({type(owner).__name__}."
                "get_rope_index); moa-flex's generate passes text positions (cumsum of the attention mask), so a "
                "request with multimodal inputs is refused rather than answered with other positions (text-only "
                "requests run)")
