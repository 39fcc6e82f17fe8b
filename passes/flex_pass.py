"""FX graph pass: rewrite ``flex_attention`` calls (models loaded with
``attn_implementation="flex_attention"``) into moa-flex attention.

Each ``torch.ops.higher_order.flex_attention`` node is mapped to its decoder layer (the same
``nn_module_stack`` rule as the SDPA pass), the whole set is checked against the plan, and
each node becomes ``torch.ops.moa_flex.attention`` with the node's q, k, v (GQA is implicit
in the head counts, as in the HOP), its scale, soft-cap and padding mask. Nothing is changed
unless every node passes.

Proof by evaluation
-------------------
A flex_attention node carries its semantics as two traced functions, the ``score_mod`` and
the ``mask_mod`` GraphModules (plus the tensors they read). The pass does not match their
code as text: it *runs* them and compares with the closed forms moa-flex can reproduce.

- score_mod: probed at a huge score to read its cap (identity returns the score, soft-capping
  returns ``cap``), then evaluated on random scores and indices and compared with ``score``
  or ``cap * tanh(score / cap)``. The cap must match the config's, when given.
- mask_mod: its window is read by sweeping one query over every distance up to a horizon
  (the traced key length, or 2**20 tokens under dynamic shapes), then the mod is evaluated
  on a dense small grid plus random far and window-boundary (q, kv) pairs, random heads and
  batch rows, over several random draws of the tensors it reads, and compared exactly with
  one of the masks HF builds: ``causal`` (no tensor), ``causal & padding[b, kv]`` (one bool
  [B, K] tensor: the forward's padding mask, passed to the op as its 2-D mask), or the
  packed-sequence form ``seq[b, q] == seq[b, kv] & pos[b, kv] <= pos[b, q]`` (two integer
  [B, K] tensors, traced when no attention_mask is given) or, as transformers before 5.24
  builds it, ``seq[b, q] == seq[b, kv] & kv <= q`` (one integer [B, K] tensor of sequence
  ids), each optionally ``& q - kv < window``. Packed rows are not supported at run time: a
  check op in the graph raises if a row holds several sequences (or, with positions, its
  positions are not consecutive); otherwise the packed form is exactly causal.

A mod that matches none of these (a document mask, ALiBi, an additive mask) raises a
ValueError naming the layer. Layers with a window get an in-graph dense [B, 1, Q, K] mask
(causal & window & padding) that the op ANDs in, as the SDPA pass does for model windows.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.attention / mask_info / unpacked_rows)
from moa_flex.plan import Plan

from .nodes import PassReport, RewrittenNode, eliminate_dead_code, erase_with_inputs, node_layer, plan_layers

FLEX_ATTENTION = torch.ops.higher_order.flex_attention
DYNAMIC_HORIZON = 1 << 20  # tokens: distances probed when the traced key length is symbolic
_GRID = 48  # tokens: side of the dense (q, kv) grid of the mask proof
_BATCH = 3  # rows of the random tensors the proof feeds the mods
_DRAWS = 4  # random draws of those tensors
_POINTS = 4096  # random (q, kv) pairs per draw


@dataclass(frozen=True)
class MaskSemantics:
    """What a proven mask_mod computes.

    ``kind``: 'causal' (no tensor), 'padding' (``causal & buffers[index][b, kv]``) or
    'packed' (``buffers[seq]``/``buffers[pos]``: sequence ids and positions of each token;
    ``pos`` None: causal over token indices, transformers < 5.24);
    ``window`` in tokens (keys with q - kv >= window are masked) or None.
    """

    kind: str
    window: int | None
    index: int | None = None
    seq: int | None = None
    pos: int | None = None


def flex_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The flex_attention HOP nodes of a graph, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is FLEX_ATTENTION]


def _val(node: object) -> object:
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _submodule(gm: torch.fx.GraphModule, node: object, what: str, layer: int) -> torch.fx.GraphModule:
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        raise ValueError(f"layer {layer}: flex_attention {what} is {node!r}, expected a traced GraphModule")
    return getattr(gm, node.target)


def _vmap_points(fn: Callable, n_index: int, n_buffers: int) -> Callable:
    """fn evaluated pointwise over 1-D tensors of indices (as FlexAttention vmaps its mods)."""
    return torch.vmap(fn, in_dims=(0,) * n_index + (None,) * n_buffers)


# --- score_mod --------------------------------------------------------------------------


def prove_score_mod(mod: torch.fx.GraphModule, layer: int, num_heads: int, device: torch.device,
                    expected_cap: float | None = None) -> float:
    """Soft-cap of a score_mod proven by evaluation: 0.0 for the identity, ``cap`` for
    ``cap * tanh(score / cap)``; ValueError naming the layer otherwise."""
    gen = torch.Generator().manual_seed(layer)
    n = _POINTS
    idx = [torch.randint(0, hi, (n,), generator=gen).to(device) for hi in (_BATCH, num_heads, 4096, 4096)]
    run = _vmap_points(mod, 5, 0)
    huge = torch.full((1,), 1e30, device=device)
    try:
        probe = float(run(huge, *(i[:1] for i in idx))[0])
        scores = torch.randn(n, generator=gen).to(device)
    except Exception as e:  # a mod that cannot run on plain indices cannot be proven either
        raise ValueError(f"layer {layer}: could not evaluate the flex_attention score_mod ({type(e).__name__}: {e})") from e
    cap = 0.0 if probe == float(huge[0]) else probe
    if not (cap == 0.0 or (math.isfinite(cap) and 0 < cap < 1e20)):
        raise ValueError(
            f"layer {layer}: the flex_attention score_mod is neither the identity nor logit soft-capping "
            f"(it maps a score of 1e30 to {probe}); moa-flex cannot reproduce it"
        )
    spread = 4 * cap if cap else 30.0
    scores = torch.cat([scores * spread, torch.tensor([0.0, -1e4, 1e4, 1e-3], device=device)])
    idx = [torch.cat([i, i[:4]]) for i in idx]
    got = run(scores, *idx)
    want = scores if cap == 0.0 else cap * torch.tanh(scores / cap)
    ok = torch.equal(got, want) if cap == 0.0 else torch.allclose(got, want, rtol=1e-5, atol=1e-6 * cap)
    if not ok:
        form = "score (identity)" if cap == 0.0 else f"{cap} * tanh(score / {cap})"
        raise ValueError(
            f"layer {layer}: the flex_attention score_mod is not {form} on random scores and indices "
            f"(max difference {(got - want).abs().max().item():.3g}); moa-flex reproduces only the identity "
            "and logit soft-capping (no score bias, ALiBi or additive mask)"
        )
    if expected_cap is not None and not math.isclose(cap, expected_cap, rel_tol=1e-6):
        raise ValueError(
            f"layer {layer}: the flex_attention score_mod soft-caps at {cap or 'none'} but the config's "
            f"attn_logit_softcapping is {expected_cap or 'none'}"
        )
    return cap


# --- mask_mod ---------------------------------------------------------------------------


def _causal(q: torch.Tensor, kv: torch.Tensor, window: int | None) -> torch.Tensor:
    ok = kv <= q
    return ok & (q - kv < window) if window else ok


def _expected(sem: MaskSemantics, b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
              bufs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The closed form of a candidate semantics at points (b, q, kv)."""
    if sem.kind == "causal":
        return _causal(q, kv, sem.window)
    if sem.kind == "padding":
        return _causal(q, kv, sem.window) & bufs[sem.index][b, kv].bool()
    seq = bufs[sem.seq]
    if sem.pos is None:
        return (seq[b, q] == seq[b, kv]) & _causal(q, kv, sem.window)
    pos = bufs[sem.pos]
    return (seq[b, q] == seq[b, kv]) & _causal(pos[b, q], pos[b, kv], sem.window)


def _neutral(sem: MaskSemantics, n_bufs: int, horizon: int, device: torch.device) -> list[torch.Tensor]:
    """Buffers under which a candidate is plain causal (+ window): no padding, one sequence."""
    bufs = [torch.empty(0, device=device)] * n_bufs
    if sem.kind == "padding":
        bufs[sem.index] = torch.ones(_BATCH, horizon, dtype=torch.bool, device=device)
    elif sem.kind == "packed":
        bufs[sem.seq] = torch.zeros(_BATCH, horizon, dtype=torch.long, device=device)
        if sem.pos is not None:
            bufs[sem.pos] = torch.arange(horizon, device=device).expand(_BATCH, horizon).contiguous()
    return bufs


def _random_bufs(sem: MaskSemantics, n_bufs: int, horizon: int, draw: int, gen: torch.Generator,
                 device: torch.device) -> list[torch.Tensor]:
    bufs = [torch.empty(0, device=device)] * n_bufs
    if sem.kind == "padding":
        density = (0.2, 0.5, 0.8, 0.95)[draw % 4]
        bufs[sem.index] = (torch.rand(_BATCH, horizon, generator=gen) < density).to(device)
    elif sem.kind == "packed":
        bufs[sem.seq] = torch.randint(0, 3, (_BATCH, horizon), generator=gen).to(device)
        if sem.pos is not None:
            if draw % 2:  # arbitrary positions
                pos = torch.randint(0, horizon, (_BATCH, horizon), generator=gen)
            else:  # consecutive positions with a row offset: distances = index distances
                pos = torch.arange(horizon).expand(_BATCH, horizon) + torch.randint(0, 64, (_BATCH, 1), generator=gen)
            bufs[sem.pos] = pos.to(device)
    return bufs


def _points(horizon: int, num_heads: int, window: int | None, gen: torch.Generator,
            device: torch.device) -> tuple[torch.Tensor, ...]:
    """(b, h, q, kv) index tensors: a dense grid near 0, then random pairs at every scale of
    distance, around the window's edge and in the future."""
    g = min(_GRID, horizon)
    gq, gk = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    gq, gk = gq.flatten().repeat(_BATCH), gk.flatten().repeat(_BATCH)
    gb = torch.arange(_BATCH).repeat_interleave(g * g)
    n = _POINTS
    q = torch.randint(0, horizon, (n,), generator=gen)
    log_d = torch.exp(torch.rand(n, generator=gen) * math.log(horizon)).long() - 1
    uni_d = torch.randint(0, horizon, (n,), generator=gen)
    edge = (window or 1) + torch.randint(-3, 4, (n,), generator=gen)
    future = -torch.randint(1, 64, (n,), generator=gen)
    pick = torch.randint(0, 4, (n,), generator=gen)
    d = torch.stack([log_d, uni_d, edge, future])[pick, torch.arange(n)]
    kv = (q - d).clamp(0, horizon - 1)
    b = torch.cat([gb, torch.randint(0, _BATCH, (n,), generator=gen)])
    q, kv = torch.cat([gq, q]), torch.cat([gk, kv])
    h = torch.randint(0, num_heads, (len(q),), generator=gen)
    return tuple(t.to(device) for t in (b, h, q, kv))


def _candidates(buffers: Sequence[object], layer: int, batch: int, kv_len: object) -> list[MaskSemantics]:
    """The semantics a mask_mod reading these tensors may have (window still unknown)."""
    vals = [_val(x) for x in buffers]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        raise ValueError(f"layer {layer}: the flex_attention mask_mod reads non-tensor values {buffers}")
    shapes = [tuple(v.shape) for v in vals]

    def is_bk(v: torch.Tensor) -> bool:
        return v.dim() == 2 and v.shape[0] == batch and v.shape[1] == kv_len

    if not vals:
        return [MaskSemantics("causal", None)]
    if len(vals) == 1 and vals[0].dtype == torch.bool and is_bk(vals[0]):
        return [MaskSemantics("padding", None, index=0)]

    def is_ids(v: torch.Tensor) -> bool:
        return is_bk(v) and not v.is_floating_point() and v.dtype != torch.bool

    if len(vals) == 1 and is_ids(vals[0]):  # transformers < 5.24: sequence ids only
        return [MaskSemantics("packed", None, seq=0)]
    if len(vals) == 2 and all(is_ids(v) for v in vals):
        return [MaskSemantics("packed", None, seq=0, pos=1), MaskSemantics("packed", None, seq=1, pos=0)]
    raise ValueError(
        f"layer {layer}: the flex_attention mask_mod reads tensors of shapes/dtypes "
        f"{[(s, str(v.dtype)) for s, v in zip(shapes, vals)]}; moa-flex takes a mask_mod that reads nothing "
        f"(causal), one bool padding mask [B, K] = [{batch}, {kv_len}], or HF's packed-sequence ids "
        "(one integer [B, K] tensor) and positions (two)"
    )


def _window(run: Callable, sem: MaskSemantics, n_bufs: int, horizon: int, device: torch.device) -> int | None:
    """The window (tokens) of a mask_mod under neutral tensors: the first distance a query
    at the end of the horizon no longer sees, or None if it sees every earlier key."""
    q = torch.full((horizon,), horizon - 1, device=device)
    kv = torch.arange(horizon - 1, -1, -1, device=device)  # distance d = index
    zeros = torch.zeros(horizon, dtype=torch.long, device=device)
    seen = run(zeros, zeros, q, kv, *_neutral(sem, n_bufs, horizon, device)).bool()
    hidden = (~seen).nonzero()
    return int(hidden[0]) if len(hidden) else None


def prove_mask_mod(mod: torch.fx.GraphModule, buffers: Sequence[object], layer: int, num_heads: int,
                   batch: int, kv_len: object, device: torch.device) -> MaskSemantics:
    """The semantics of a mask_mod, proven by evaluation (see the module docstring);
    ValueError naming the layer if it is none moa-flex can reproduce.

    ``kv_len``: the traced key length (tokens; an int, or symbolic under dynamic shapes).
    """
    horizon = kv_len if isinstance(kv_len, int) else DYNAMIC_HORIZON
    horizon = max(horizon, _GRID)
    run = _vmap_points(mod, 4, len(buffers))
    failures = []
    for sem in _candidates(buffers, layer, batch, kv_len):
        try:
            sem = MaskSemantics(sem.kind, _window(run, sem, len(buffers), horizon, device), sem.index, sem.seq, sem.pos)
            gen = torch.Generator().manual_seed(1000 + layer)
            ok = True
            for draw in range(_DRAWS):
                bufs = _random_bufs(sem, len(buffers), horizon, draw, gen, device)
                b, h, q, kv = _points(horizon, num_heads, sem.window, gen, device)
                got = run(b, h, q, kv, *bufs).bool()
                if not torch.equal(got, _expected(sem, b, q, kv, bufs)):
                    ok = False
                    break
        except Exception as e:  # noqa: BLE001  (the error is reported, never swallowed)
            raise ValueError(f"layer {layer}: could not evaluate the flex_attention mask_mod ({type(e).__name__}: {e})") from e
        if ok:
            return sem
        failures.append(_describe(sem))
    raise ValueError(
        f"layer {layer}: the flex_attention mask_mod is not {' nor '.join(failures)} on random indices and "
        "tensors (a document mask, prefix-LM, or a mask with an offset/KV cache?); moa-flex reproduces only "
        "causal attention with HF's padding mask and the model's own sliding window"
    )


def _describe(sem: MaskSemantics) -> str:
    base = {"causal": "causal", "padding": "causal & padding[b, kv]",
            "packed": "HF's packed-sequence causal mask"}[sem.kind]
    return f"{base} & (q - kv < {sem.window})" if sem.window else base


# --- run-time helpers the rewritten graph calls -----------------------------------------


def window_mask(q: torch.Tensor, padding: torch.Tensor | None, window: int) -> torch.Tensor:
    """Dense bool mask [B, 1, Q, Q]: causal & (q - kv < window) & padding[b, kv] (queries and
    keys at the same positions; ``window`` in tokens). Called from the rewritten graph."""
    B, Q = q.shape[0], q.shape[2]
    i = torch.arange(Q, device=q.device).view(Q, 1)
    j = torch.arange(Q, device=q.device).view(1, Q)
    allowed = ((j <= i) & (i - j < window)).view(1, 1, Q, Q)
    if padding is None:
        return allowed.expand(B, 1, Q, Q)
    return allowed & padding.bool().view(B, 1, 1, Q)


# --- the pass ---------------------------------------------------------------------------


@dataclass
class _Call:
    node: torch.fx.Node
    layer: int
    path: str
    softcap: float = 0.0
    mask: MaskSemantics | None = None


def _check_node(call: _Call) -> None:
    node = call.node
    if len(node.args) != 9 or node.kwargs:
        raise ValueError(f"layer {call.layer}: flex_attention node {node.name} has an unknown signature "
                         f"({len(node.args)} args, kwargs {list(node.kwargs)}); written for torch 2.13's HOP")
    q, k = _val(node.args[0]), _val(node.args[1])
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        raise ValueError(f"layer {call.layer}: flex_attention node {node.name} has no example q/k values in its "
                         "meta; the pass runs on graphs traced by Dynamo")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"layer {call.layer}: flex_attention over {q.shape[2]} queries and {k.shape[2]} keys; "
                         "moa-flex rewrites flex_attention prefill only (no KV cache: pass use_cache=False)")
    if node.args[7]:
        raise ValueError(f"layer {call.layer}: the flex_attention score_mod reads tensors {list(node.args[7])} "
                         "(an additive mask or position bias); moa-flex cannot reproduce it")
    for user in node.users:
        if user.target is not operator.getitem:
            raise ValueError(f"layer {call.layer}: flex_attention's result is used by {user.name}, not unpacked")
        if user.args[1] != 0 and user.users:
            raise ValueError(f"layer {call.layer}: the graph uses flex_attention output {user.args[1]} "
                             "(log-sum-exp, e.g. for attention sinks); moa-flex returns the attention output only")


def rewrite_flex_attention(
    gm: torch.fx.GraphModule, plan: Plan, runtime_id: int, softcaps: Sequence[float] | None = None,
) -> PassReport:
    """Replace every flex_attention node of ``gm`` by moa-flex attention for its layer.

    Every node is mapped, checked against the plan and its score_mod / mask_mod proven
    (module docstring) before anything changes. ``softcaps``: per layer, the config's logit
    soft-cap (0 = none), checked against the score_mod; None skips that check.
    """
    nodes = flex_nodes(gm.graph)
    eliminate_dead_code(gm.graph, [u for n in nodes for u in n.users])  # unused outputs (log-sum-exp) before checking users
    try:
        calls = [_Call(n, *node_layer(n)) for n in nodes]
    except ValueError as e:
        raise ValueError(
            f"{e}. (This graph calls flex_attention outside an HF decoder layer; for a model, "
            "moa_flex.compile(model, plan) traces it with attn_implementation='sdpa'.)"
        ) from e
    planned = plan_layers([c.layer for c in calls], plan.model, "the traced graph has flex_attention calls")
    for c, layer in zip(calls, planned):
        c.layer = layer
    proven: dict[tuple, MaskSemantics] = {}
    for c in calls:
        _check_node(c)
        q = _val(c.node.args[0])
        c.softcap = prove_score_mod(
            _submodule(gm, c.node.args[3], "score_mod", c.layer), c.layer, q.shape[1], q.device,
            float(softcaps[c.layer]) if softcaps else None,
        )
        mod = _submodule(gm, c.node.args[4][-1], "mask_mod", c.layer)
        kv_len = _val(c.node.args[1]).shape[2]
        key = _stateless_key(mod, c.node.args[8], q.shape, kv_len)
        if key is not None and key in proven:
            c.mask = proven[key]
        else:
            c.mask = prove_mask_mod(mod, c.node.args[8], c.layer, q.shape[1], q.shape[0], kv_len, q.device)
            if key is not None:
                proven[key] = c.mask
    return _rewrite(gm, calls, runtime_id)


def _stateless_key(mod: torch.fx.GraphModule, buffers: Sequence[object], q_shape: object, kv_len: object) -> tuple | None:
    """Memo key of a mask_mod proof: a GraphModule without state (no tensors, submodules or
    get_attr) is fully defined by its code, so layers with the same code, buffer metas and
    shapes share one proof (layers of a model trace identical mask_mods). None: prove anew."""
    if any(True for _ in mod.named_parameters()) or any(True for _ in mod.named_buffers()) or any(True for _ in mod.children()):
        return None
    if any(n.op == "get_attr" for n in mod.graph.nodes):
        return None
    metas = tuple(f"{tuple(v.shape)} {v.dtype}" if isinstance(v := _val(b), torch.Tensor) else repr(b) for b in buffers)
    return (mod.code, metas, str(tuple(q_shape)), str(kv_len))  # str: symbolic sizes do not hash


def _rewrite(gm: torch.fx.GraphModule, calls: list[_Call], runtime_id: int) -> PassReport:
    graph = gm.graph
    paddings: dict[tuple, torch.fx.Node | None] = {}  # one 2-D padding node per source
    windowed: dict[tuple, torch.fx.Node] = {}  # one dense mask per (padding, window)
    infos: dict[torch.fx.Node, torch.fx.Node] = {}
    report = PassReport(graph_module=gm)
    roots: list[torch.fx.Node] = []  # inputs of erased nodes: the masks and mods they alone used

    def meta_of(node: torch.fx.Node) -> dict:
        return {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}

    for c in calls:
        node, sem = c.node, c.mask
        bufs = node.args[8]
        # The 2-D padding mask [B, K] (None: plain causal), shared by all layers reading it.
        if sem.kind == "padding":
            padding = bufs[sem.index]
        elif sem.kind == "packed":
            pos = None if sem.pos is None else bufs[sem.pos]
            key = ("packed", bufs[sem.seq], pos)
            if key not in paddings:
                with graph.inserting_before(node):
                    paddings[key] = graph.call_function(torch.ops.moa_flex.unpacked_rows.default, (bufs[sem.seq], pos))
                paddings[key].meta = meta_of(node)
            padding = paddings[key]
        else:
            padding = None
        mask = padding
        if sem.window:
            key = (padding, sem.window)
            if key not in windowed:
                with graph.inserting_before(node):
                    windowed[key] = graph.call_function(window_mask, (node.args[0], padding, sem.window))
                windowed[key].meta = meta_of(node)
            mask = windowed[key]
        info = None
        if mask is not None:
            if mask not in infos:
                with graph.inserting_after(mask):
                    infos[mask] = graph.call_function(torch.ops.moa_flex.mask_info.default, (mask,))
                infos[mask].meta = meta_of(node)
            info = infos[mask]
        q, k, v = node.args[:3]
        with graph.inserting_after(node):
            new = graph.call_function(
                torch.ops.moa_flex.attention.default,
                (q, k, v, mask, node.args[5], c.layer, runtime_id, c.softcap, info),
            )
        new.meta = dict(node.meta)
        for user in list(node.users):
            if user.args[1] == 0:
                new.meta.update({k_: v_ for k_, v_ in user.meta.items() if k_ in ("example_value", "val", "tensor_meta")})
                user.replace_all_uses_with(new)
            graph.erase_node(user)
        erase_with_inputs(graph, node, roots)
        report.rewritten.append(RewrittenNode(c.layer, new.name, c.path))
    eliminate_dead_code(graph, roots)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return report
