"""What the passes do for multi-head latent attention (MLA): attend over the cached latent.

DeepSeek-V2/V3 and their kin cache per token one latent ``c`` [r] and one rotary key
``k_rot`` [rope], shared by all heads, and every call expands them with ``kv_b_proj``
(W [H * (nope + v), r]): ``k_h = [W_uk,h c (+ b_k,h) ; k_rot]``, ``v_h = W_uv,h c (+ b_v,h)``.
For a query ``q_h = [q_nope,h ; q_rot,h]``:

    q_h . k_h   = (W_uk,h^T q_nope,h) . c + q_rot,h . k_rot  (+ q_nope,h . b_k,h)
    sum_j p_j v_h,j = W_uv,h (sum_j p_j c_j) (+ b_v,h)

The key bias adds the same term to every key of a query, which softmax cancels; the value
bias passes through weights that sum to 1. So the model's attention over its expanded heads
equals attention with one KV head, keys ``[c ; k_rot]`` and values ``c`` (what the MoA cache
holds, runtime/cache.py), queries ``[W_uk,h^T q_nope,h ; q_rot,h]`` at the model's scale, and
the output projected by ``W_uv,h``: weight absorption. The passes find ``kv_b_proj``'s weight
as the linear node that expands the cached latent into the call's values;
``architecture.check_latent_expansion`` checks, before anything is compiled, that each layer's
``expand_kv`` is this expansion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from moa_flex.architecture import layer_config_value

from .nodes import arg, recorded_value

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_SEARCH = 40  # how many ancestors of the call's values are searched for the expansion


@dataclass(frozen=True)
class LatentDims:
    """Sizes of a latent-attention layer: query heads, per-head no-rotary and rotary query/key
    widths, value width, latent width."""

    heads: int
    nope: int
    rope: int
    v: int
    rank: int

    @classmethod
    def from_config(cls, config: Any, heads: int, layer: int) -> "LatentDims":
        """Decoder layer ``layer``'s sizes (its own where the config keeps per-layer configs: dots3)."""
        nope, rope, v, rank = (int(layer_config_value(config, name, layer))
                               for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
        return cls(heads, nope, rope, v, rank)


@dataclass
class Absorbed:
    """The nodes of one layer's absorption: the queries to attend with, and the up-projection of
    the latent output (``up`` [H, r, v], ``up_bias`` [H, 1, v] or None)."""

    q: torch.fx.Node
    up: torch.fx.Node
    up_bias: torch.fx.Node | None

    def project(self, graph: torch.fx.Graph, out: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
        """``out`` [..., H, S, r] projected to the model's values [..., H, S, v], after ``out``
        (``like``: the replaced call, whose metadata the new nodes take)."""
        with graph.inserting_after(out):
            y = _call(graph, torch.ops.aten.matmul.default, (out, self.up), like)
        if self.up_bias is None:
            return y
        with graph.inserting_after(y):
            return _call(graph, torch.ops.aten.add.Tensor, (y, self.up_bias), like)


def expansion_weight(node: torch.fx.Node, latent: Any, layer: int, after_held: bool = False) -> tuple[Any, Any]:
    """(weight, bias) of the linear node that expands ``latent`` (the cached latent's node) into
    the values of the attention call ``node``: ``kv_b_proj``. ``after_held``: a prefill chunk of
    an indexed layer over the cache, whose expansion reads the held latent followed by the
    chunk's (``MoaCacheLayer.held_latent``). ValueError if the call's values do not come from
    such a node."""
    seen: set[torch.fx.Node] = set()
    work = [node.args[2]]
    while work and len(seen) < _SEARCH:
        cur = work.pop(0)
        if not isinstance(cur, torch.fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if cur.op == "call_function" and cur.target in _LINEAR and _reaches(cur.args[0], latent, after_held):
            return cur.args[1], arg(cur, 2, "bias", None)
        work.extend(cur.all_input_nodes)
    raise ValueError(f"layer {layer}: latent attention, but the call's values are not a linear expansion of the "
                     "cached latent (kv_b_proj); moa-flex attends over the latent only where the model expands it so")


def _reaches(node: Any, target: Any, after_held: bool = False) -> bool:
    """Whether ``node`` is ``target`` up to views and casts (the latent as kv_b_proj reads it), or,
    with ``after_held``, the sequence-dim concatenation of two tensors ending in it (a chunk over
    the cache: the held latent, then the chunk's, ``MoaCacheLayer.held_latent``)."""
    while isinstance(node, torch.fx.Node):
        if node is target:
            return True
        if after_held and node.op == "call_function" and node.target in (torch.cat, torch.ops.aten.cat.default):
            parts, dim = node.args[0], arg(node, 1, "dim", 0)
            if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-2, 2)):
                return False
            node = parts[-1]
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name not in ("view", "reshape", "to", "contiguous", "float", "type_as") or not node.args:
            return False
        node = node.args[0]
    return False


def absorb(graph: torch.fx.Graph, before: torch.fx.Node, q: Any, weight: Any, bias: Any, dims: LatentDims,
           like: torch.fx.Node) -> Absorbed:
    """New nodes before ``before``: the absorbed queries [..., H, S, r + rope] from the model's
    ``q`` [..., H, S, nope + rope] and ``kv_b_proj``'s ``weight`` [H * (nope + v), r] (module
    docstring), and the up-projection of the output; ``like``: the replaced call."""
    d = dims
    with graph.inserting_before(before):
        w = _call(graph, torch.ops.aten.view.default, (weight, [d.heads, d.nope + d.v, d.rank]), like)
        w_uk = _call(graph, torch.ops.aten.slice.Tensor, (w, 1, 0, d.nope), like)
        w_uv = _call(graph, torch.ops.aten.slice.Tensor, (w, 1, d.nope, d.nope + d.v), like)
        up = _call(graph, torch.ops.aten.transpose.int, (w_uv, 1, 2), like)
        q_nope = _call(graph, torch.ops.aten.slice.Tensor, (q, -1, 0, d.nope), like)
        q_rot = _call(graph, torch.ops.aten.slice.Tensor, (q, -1, d.nope, d.nope + d.rope), like)
        q_abs = _call(graph, torch.ops.aten.matmul.default, (q_nope, w_uk), like)
        q_new = _call(graph, torch.ops.aten.cat.default, ([q_abs, q_rot], -1), like)
        up_bias = None
        if isinstance(bias, torch.fx.Node):
            b = _call(graph, torch.ops.aten.view.default, (bias, [d.heads, d.nope + d.v]), like)
            b_v = _call(graph, torch.ops.aten.slice.Tensor, (b, 1, d.nope, d.nope + d.v), like)
            up_bias = _call(graph, torch.ops.aten.unsqueeze.default, (b_v, 1), like)
    return Absorbed(q_new, up, up_bias)


def _call(graph: torch.fx.Graph, op: Callable, args: tuple, like: torch.fx.Node) -> torch.fx.Node:
    """A call of ``op`` with ``like``'s module stack and trace, and a fake value computed from its
    inputs' (Dynamo's nodes carry them; AOTAutograd's cache reads them)."""
    node = graph.call_function(op, args)
    node.meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack")}
    fake = torch.fx.node.map_arg(args, recorded_value)
    if not any(a is None for a in torch.utils._pytree.tree_leaves(fake)):  # every input's value known
        node.meta["example_value"] = op(*fake)
    return node
