"""What ``moa_flex.compile`` changes on a model so that Dynamo traces its forward as one graph;
each change keeps the model's results and is undone by ``moa_flex.uncompile``.

Buffer markers. A tensor registered through ``nn.Buffer`` keeps ``_is_buffer`` and
``persistent`` attributes, which ``nn.Module.__setattr__`` reads when a forward assigns the
buffer again (CTRL: ``self.pos_encoding = self.pos_encoding.to(device, dtype)``), and Dynamo
cannot read a Python attribute of a tensor (torch 2.11-2.13: "Unsupported python_type() call").
The module already records each buffer and whether it is persistent (``_buffers``,
``_non_persistent_buffers_set``), which ``__setattr__`` reads for an unmarked tensor, so the
markers are taken off the registered tensors: the assignment registers the same buffer, as
persistent as before.

DBRX's experts loop over the experts a call's tokens were routed to, a loop of data-dependent
length; they run inside one op instead (``moa_flex::dbrx_experts``, registered with the other
ops in :mod:`moa_flex.runtime.ops`; its body, :func:`run_dbrx_experts`, is here).

Qwen4-Exp's query-aware sparse attention indexer picks each query's blocks in a Python loop over
rows and queries with ``nonzero``; its ``_select_tokens`` runs as one op instead
(``moa_flex::block_select``, :mod:`moa_flex.runtime.block_selection`), after a check on random
inputs that the op's key norm and rotary embedding are the model's own.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .block_selection import rms_norm_offset, rotate

_MARKS = ("_is_buffer", "persistent")


def unmark_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, dict[str, object]]]:
    """Take the ``nn.Buffer`` markers off every registered buffer of ``model``; returns what
    :func:`mark_buffers` puts back."""
    taken, seen = [], set()
    for buffer in model.buffers():
        if id(buffer) in seen or not any(name in buffer.__dict__ for name in _MARKS):
            continue
        seen.add(id(buffer))
        marks = {name: buffer.__dict__.pop(name) for name in _MARKS if name in buffer.__dict__}
        taken.append((buffer, marks))
    return taken


def mark_buffers(taken: list[tuple[torch.Tensor, dict[str, object]]]) -> None:
    """Put back the markers :func:`unmark_buffers` took (``moa_flex.uncompile``)."""
    for buffer, marks in taken:
        for name, value in marks.items():
            setattr(buffer, name, value)


# --- DBRX's experts -------------------------------------------------------------------------
# DbrxExperts loops over the experts its tokens were routed to (``nonzero()``, then a Python
# loop over the result): a loop whose length is data, which Dynamo cannot trace into one graph,
# and DBRX takes no ``experts_implementation`` as transformers' other MoE families do. Its loop
# runs instead inside ``moa_flex::dbrx_experts``, an op Dynamo records as one node: the op calls
# transformers' own ``DbrxExperts.forward`` on the call's tensors, so the result is the model's.


class _ExpertWeights:
    """What ``DbrxExperts.forward`` reads of its ``mlp`` (``DbrxExpertGLU``): the three weights,
    and a call that runs ``DbrxExpertGLU.forward``."""

    def __init__(self, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, activation: str) -> None:
        from transformers.activations import ACT2FN

        self.w1, self.v1, self.w2 = w1, v1, w2
        self.activation_fn = ACT2FN[activation]

    def __call__(self, x: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        from transformers.models.dbrx.modeling_dbrx import DbrxExpertGLU

        return DbrxExpertGLU.forward(self, x, w1, v1, w2)


def run_dbrx_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, ffn_hidden_size: int, num_experts: int,
                     activation: str) -> torch.Tensor:
    """DBRX's routed experts on ``hidden`` [B, S, H]: transformers' ``DbrxExperts.forward``
    (the body of ``moa_flex::dbrx_experts``, :mod:`moa_flex.runtime.ops`)."""
    from types import SimpleNamespace

    from transformers.models.dbrx.modeling_dbrx import DbrxExperts

    experts = SimpleNamespace(mlp=_ExpertWeights(w1, v1, w2, activation), hidden_size=hidden.shape[-1],
                              ffn_hidden_size=ffn_hidden_size, num_experts=num_experts)
    return DbrxExperts.forward(experts, hidden, top_k_index, top_k_weights)


def _dbrx_forward(module: torch.nn.Module, activation: str) -> Any:
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        mlp = module.mlp
        return torch.ops.moa_flex.dbrx_experts(hidden_states, top_k_index, top_k_weights, mlp.w1, mlp.v1, mlp.w2,
                                               module.ffn_hidden_size, module.num_experts, activation)

    return forward


def route_dbrx_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Run every ``DbrxExperts`` of ``model`` through ``moa_flex::dbrx_experts``; returns the
    modules, for :func:`unroute_dbrx_experts`."""
    from transformers.activations import ACT2FN

    experts = [m for m in model.modules() if type(m).__name__ == "DbrxExperts"
               and type(m).__module__.startswith("transformers.models.dbrx") and "forward" not in m.__dict__]
    if not experts:
        return []
    ffn = getattr(getattr(model, "config", None), "ffn_config", None)
    activation = (getattr(ffn, "ffn_act_fn", None) or {}).get("name", "silu")
    for module in experts:
        if type(module.mlp.activation_fn) is not type(ACT2FN[activation]):
            raise NotImplementedError(
                f"a DBRX expert's activation is {type(module.mlp.activation_fn).__name__}, not the config's "
                f"{activation!r}: moa-flex runs DBRX's experts through an op that takes the activation by its name")
    for module in experts:
        module.forward = _dbrx_forward(module, activation)
    return experts


def unroute_dbrx_experts(routed: list[torch.nn.Module]) -> None:
    """Give the modules :func:`route_dbrx_experts` changed their own forward back."""
    for module in routed:
        module.__dict__.pop("forward", None)


def _block_indexer_forward(module: torch.nn.Module) -> Any:
    """Qwen4-Exp's indexer forward, its selection through ``moa_flex::block_select``. Over a MoA
    cache its keys go into the cache's ring with their tokens' rotary terms beside them (the
    cache keeps no position history: a block's first kept token may be any slot's)."""
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    norm = module.k_layernorm
    d, heads = int(module.index_head_dim), int(module.index_n_heads)

    def forward(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        full_cos, full_sin = position_embeddings
        cos, sin = full_cos[:, -T:], full_sin[:, -T:]
        q, k = torch.split(module.index_qk_proj(hidden_states), [heads * d, d], dim=-1)
        q = rope(module.q_layernorm(q.reshape(B, T, heads, d)), cos=cos, sin=sin, unsqueeze_dim=2)
        k = k.reshape(B, T, d)
        r = cos.shape[-1]
        if hasattr(cache, "moa_layers"):  # a MoaCache (runtime/cache.py, which imports the ops that import this)
            packed = cache.update_indexer(torch.cat([k, cos.expand(B, -1, -1).to(k.dtype),
                                                     sin.expand(B, -1, -1).to(k.dtype)], dim=-1), module.layer_idx)
            keys, key_cos, key_sin = torch.split(packed, [d, r, r], dim=-1)
        else:
            keys = k if cache is None else cache.update_indexer(k, module.layer_idx)
            key_cos, key_sin = full_cos.expand(B, -1, -1), full_sin.expand(B, -1, -1)
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        picked = torch.ops.moa_flex.block_select(q, keys, key_cos, key_sin, visible[:, 0], norm.weight,
                                                 float(norm.eps), int(module.compress_ratio), int(module.token_budget))
        return picked.unsqueeze(1)

    return forward


def _check_block_indexer(module: torch.nn.Module, forward: bool) -> None:
    """NotImplementedError unless the indexer's key norm and rotary embedding compute what
    ``moa_flex::block_select`` does (Qwen4-Exp's, checked on random inputs), its keys are one
    head, and (``forward``) :func:`_block_indexer_forward` picks what its own forward picks
    (random inputs, ties to the earlier block in both; a budget of two blocks, so that the
    model's loop over every query stays short whatever its own budget)."""
    from moa_flex.reference import earliest_ties

    name = type(module).__name__
    if int(getattr(module, "index_kv_heads", 1)) != 1:
        raise NotImplementedError(f"{name} has {module.index_kv_heads} index key heads; moa-flex's block selection "
                                  "(as transformers' own) pools one")
    g = torch.Generator().manual_seed(0)
    w = module.index_qk_proj.weight
    norm = module.k_layernorm
    x = torch.randn(3, norm.weight.shape[-1], generator=g).to(norm.weight)
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    cos, sin = torch.randn(3, x.shape[-1], generator=g).to(x), torch.randn(3, x.shape[-1], generator=g).to(x)
    T = 6 * int(module.compress_ratio)  # six blocks, for a budget of two
    hidden = torch.randn(2, T, w.shape[1], generator=g).to(w)
    angles = torch.arange(T).view(1, T, 1) * torch.rand(1, 1, module.index_head_dim // 2, generator=g)
    turns = tuple(torch.cat([f(angles), f(angles)], -1).expand(2, -1, -1).to(w) for f in (torch.cos, torch.sin))
    causal = torch.ones(T, T, dtype=torch.bool, device=w.device).tril().expand(2, 1, T, T)
    with torch.no_grad():
        same = torch.equal(norm(x), rms_norm_offset(x, norm.weight, float(norm.eps))) and rope is not None and (
            torch.allclose(rope(x.unsqueeze(1), cos=cos, sin=sin).squeeze(1), rotate(x, cos, sin)))
        if same and forward:
            budget, top = module.token_budget, module.block_topk
            module.token_budget, module.block_topk = 2 * int(module.compress_ratio), 2
            try:
                with earliest_ties():
                    stock = type(module).forward(module, hidden, turns, causal, None)
                same = torch.equal(_block_indexer_forward(module)(hidden, turns, causal), stock)
            finally:
                module.token_budget, module.block_topk = budget, top
    if not same:
        raise NotImplementedError(f"{name}'s forward, key norm or rotary embedding is not what moa-flex's block "
                                  "selection computes (Qwen4-Exp's): its selection would differ")


def route_block_indexers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Run every query-aware sparse attention indexer of ``model`` (Qwen4-Exp's ``QSAIndexer``)
    through :func:`_block_indexer_forward`; returns the modules, for :func:`unroute_block_indexers`.
    NotImplementedError (nothing changed) for an indexer it does not compute."""
    indexers = [m for m in model.modules() if type(m).__name__.endswith("QSAIndexer")
                and type(m).__module__.startswith("transformers.models.") and "forward" not in m.__dict__]
    for i, module in enumerate(indexers):  # one class: its forward is compared once
        _check_block_indexer(module, forward=i == 0)
    for module in indexers:
        module.forward = _block_indexer_forward(module)
    return indexers


def unroute_block_indexers(routed: list[torch.nn.Module]) -> None:
    """Give the indexers :func:`route_block_indexers` changed their own forward back."""
    for module in routed:
        module.__dict__.pop("forward", None)
