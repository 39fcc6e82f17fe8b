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
"""

from __future__ import annotations

from typing import Any

import torch

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

