"""The passes change attention and nothing else (docs/DESIGN.md, "Running a plan").

A pass may replace attention calls and erase what only they used (the model's dense mask);
every other node of the model's graph stays, with the same target, even when nothing uses its
value (an in-place call like ``out.add_(x)``: Llama 4's MoE adds its shared expert so, and an
earlier dead-code elimination dropped it, silently).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx

import moa_flex
from moa_flex.plan import Plan
from moa_flex.passes.nodes import (
    CACHED, Layout, as_cached, cached_layout, call_layers, eliminate_dead_code,
)
from reference import reference_logits
from rewrites import check_only_attention_changed, watch_rewrites
from tiny_models import EAGER_ONLY, FAMILIES, SEQ, WINDOWED, dense_mask_nodes, ids_of, sparse_plan, tiny_model


# make test-slow: Qwen3-Next's traced graph (linear attention in torch) takes 7 s; Mistral (its window off) and
# Qwen2 (q/k/v biases) trace to Llama's graph but for their biases, which the default run's families cover (GPT-OSS)
SLOW_FAMILIES = {"qwen3_next", "mistral", "qwen2"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f
                                    for f in FAMILIES])
def test_attention_pass_leaves_every_other_node(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill pass on each family's traced graph: the nodes it removed are attention
    calls and what fed only them; every other node is still there with its target; one
    rewritten node per attention layer, no dense mask built (outside models with windows of
    their own); the compiled model with a dense plan equals the stock model (fp32, 1e-5), and
    then (set_plan, the same graph) a sparse plan equals the reference (1e-4). backend='eager';
    the same through inductor: tests/test_regional.py."""
    model = tiny_model(family)
    ids = ids_of(SEQ)
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
    plan = sparse_plan(model.config, "kv_head")
    want = reference_logits(model, plan, input_ids=ids)
    assert (want - stock).abs().max() > 1e-3, "the sparse plan must change the logits"
    seen = watch_rewrites(monkeypatch)
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, verify=False)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    check_only_attention_changed(seen)
    assert (got - stock).abs().max() <= 1e-5
    report = model.moa_flex.reports[-1]
    assert sorted(r.layer for r in report.rewritten) == list(range(plan.num_layers)), "one node per attention layer"
    if family not in WINDOWED:
        assert not dense_mask_nodes(report.graph_module), "no dense mask is built"
    model.moa_flex.set_plan(plan)
    with torch.no_grad():
        sparse = model(input_ids=ids, use_cache=False).logits
    assert (sparse - want).abs().max() <= 1e-4
    assert len(model.moa_flex.reports) == 1 and len(seen) == 1, "one graph for both plans"
    moa_flex.uncompile(model)
    assert model.config._attn_implementation == ("eager" if family in EAGER_ONLY else "sdpa")


def test_dead_code_elimination_keeps_in_place_calls_and_what_it_was_not_given() -> None:
    """From the roots given, unused pure nodes go (transitively); an unused in-place call and
    an unused node the rewrite did not disconnect stay. FX's own rule would drop both."""

    def f(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out = x * 2
        mask = (m > 0).logical_not()  # used only by the erased call: dead after the rewrite
        out.add_(x)  # an effect on `out`; its own value is unused
        x + 1  # unused, but not the rewrite's doing
        return out + mask.sum()

    gm = torch.fx.symbolic_trace(f)
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    add_mask = out_node.args[0]
    summed = add_mask.args[1]
    with graph.inserting_before(out_node):
        new = graph.call_function(torch.add, (add_mask.args[0], 0))
    add_mask.replace_all_uses_with(new)
    roots = list(add_mask.all_input_nodes)
    graph.erase_node(add_mask)
    eliminate_dead_code(graph, roots)
    names = {n.name for n in graph.nodes}
    assert summed.name not in names and not any(n.target == "logical_not" for n in graph.nodes), "the dead mask goes"
    assert any(n.op == "call_method" and n.target == "add_" for n in graph.nodes), "the in-place call stays"
    assert any(n.op == "call_function" and n.args[1:] == (1,) for n in graph.nodes if n.args), "x + 1 stays"
    gm.recompile()
    x, m = torch.randn(3), torch.randn(3)
    assert torch.equal(gm(x, m), x * 2 + x)

    plain = torch.fx.symbolic_trace(f)
    plain.graph.eliminate_dead_code()
    assert not any(n.target == "add_" for n in plain.graph.nodes), "FX's own rule drops the in-place call"


@pytest.mark.parametrize("read", [False, True])
def test_dead_code_elimination_drops_a_scratch_tensor_only_written_into(read: bool) -> None:
    """A tensor the graph allocates and only writes into (DeepSeek-V3.2's ``expand_kv`` assembles
    keys with ``copy_`` into a ``new_empty``) goes with its writes and what fed only them once
    the call that read it is erased; read by anything else (``read``), it stays, writes included."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k = x @ w  # feeds only the scratch's first half
        scratch = x.new_empty(3, 4)
        scratch[:, :2].copy_(k)
        scratch[:, 2:].copy_(x[:, :2])
        used = torch.mul(scratch, 1.0)  # the call the rewrite replaces
        return (used.sum() + scratch.sum()) if read else used.sum()

    gm = torch.fx.symbolic_trace(f)
    graph = gm.graph
    call = next(n for n in graph.nodes if n.target is torch.mul)
    with graph.inserting_before(call):
        new = graph.call_function(torch.zeros, ((),))
    call.replace_all_uses_with(new)
    roots = list(call.all_input_nodes)
    graph.erase_node(call)
    eliminate_dead_code(graph, roots)
    names = [str(n.target) for n in graph.nodes]
    assert (names.count("copy_") == 2) == read and ("new_empty" in names) == read
    assert any("matmul" in name for name in names) == read, "the scratch's source goes with it"
    gm.recompile()
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    if not read:
        assert torch.equal(gm(x, w), torch.zeros(()).sum())


def test_cached_layout_sees_through_a_copy_the_cache_wrote() -> None:
    """GPT-NeoX-Japanese writes ``cat(...).contiguous()`` to its cache and its attention call,
    its [B * H] views peeled, reads the ``cat``: the same values, so the cached layout. A cast
    that changes the dtype is not the same values: None (refused)."""
    for dtype, want in ((torch.float32, CACHED), (torch.float16, None)):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        x.meta["example_value"] = torch.zeros(1, 2, 6, 4)
        cached = graph.call_method("contiguous" if dtype == torch.float32 else "to", (x,) if dtype == torch.float32
                                   else (x, dtype))
        cached.meta["example_value"] = torch.zeros(1, 2, 6, 4, dtype=dtype)
        graph.output(x)
        assert cached_layout(x, cached) == want, dtype


def test_cached_layout_tells_grouping_from_rearranging() -> None:
    """HF's repeat_kv (a None-index, expand, reshape) and dtype casts keep query head h on
    group h // (H / G): the cached tensor itself. JetMoE's .repeat tiles the groups (head h on
    group h % G), DiffLlama's values are chunks of the heads tiled and set side by side: a
    layout the passes replay to write the cache as the call reads it. Tiling under grouping is a
    layout too (checked against the plan's KV heads by as_cached). A selection, tiling along the
    tokens, grouping under a tiling, and parts grouped differently: None (refused)."""

    def grouped(k: torch.Tensor) -> torch.Tensor:
        b, g, s, d = k.shape
        return k[:, :, None, :, :].expand(b, g, 2, s, d).reshape(b, g * 2, s, d).float()

    def tiled(k: torch.Tensor) -> torch.Tensor:
        return k.repeat(1, 2, 1, 1).float()

    def tiled_as_sequence(k: torch.Tensor) -> torch.Tensor:
        return k.repeat((1, 3, 1, 1))

    def tiled_then_grouped(k: torch.Tensor) -> torch.Tensor:
        return grouped(k.repeat(1, 2, 1, 1))

    def grouped_then_tiled(k: torch.Tensor) -> torch.Tensor:
        return grouped(k).repeat(1, 2, 1, 1)

    def halves_side_by_side(v: torch.Tensor) -> torch.Tensor:  # DiffLlama's fused values
        halves = torch.chunk(v, 2, dim=1)
        return torch.cat([grouped(halves[0].repeat(1, 2, 1, 1)), grouped(halves[1].repeat(1, 2, 1, 1))], dim=-1)

    def halves_grouped_apart(v: torch.Tensor) -> torch.Tensor:
        halves = torch.chunk(v, 2, dim=1)
        return torch.cat([grouped(halves[0].repeat(1, 2, 1, 1)), grouped(grouped(halves[1]))], dim=-1)

    def halves_along_tokens(v: torch.Tensor) -> torch.Tensor:
        halves = torch.chunk(v, 2, dim=2)
        return torch.cat([halves[0], halves[1]], dim=-1)

    def repeated_along_tokens(k: torch.Tensor) -> torch.Tensor:
        return k.repeat(1, 1, 2, 1)

    def selected(k: torch.Tensor) -> torch.Tensor:
        return k[:, :1]

    repeat = lambda layout, n: Layout("repeat", (layout,), n=n)  # noqa: E731
    chunk = lambda i: Layout("chunk", (CACHED,), n=2, i=i)  # noqa: E731
    cases = ((grouped, CACHED, 2), (tiled, repeat(CACHED, 2), 4), (tiled_as_sequence, repeat(CACHED, 3), 6),
             (tiled_then_grouped, repeat(CACHED, 2), 4), (grouped_then_tiled, None, None),
             (halves_side_by_side, Layout("cat", (repeat(chunk(0), 2), repeat(chunk(1), 2))), 2),
             (halves_grouped_apart, None, None), (halves_along_tokens, None, None),
             (repeated_along_tokens, None, None), (selected, None, None), (lambda k: k, CACHED, 2))
    k_value = torch.zeros(1, 2, 6, 4)
    for fn, want, heads in cases:
        gm = torch.fx.symbolic_trace(fn)
        torch.fx.passes.shape_prop.ShapeProp(gm).propagate(k_value)
        for node in gm.graph.nodes:  # shapes where Dynamo records them
            if "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
                node.meta["example_value"] = torch.empty(node.meta["tensor_meta"].shape)
        k = next(n for n in gm.graph.nodes if n.op == "placeholder")
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        got = cached_layout(out, k)
        assert got == want, fn
        if want is not None:
            assert got.heads(2) == heads, fn
            graph = torch.fx.Graph()  # the replay writes what the call reads, up to HF's grouping
            x = graph.placeholder("x")
            x.meta["example_value"] = k_value
            out_node = graph.output(None)
            replayed = as_cached(graph, out_node, x, got, heads)
            out_node.args = (replayed,)
            value = torch.randn(1, 2, 6, 4)
            ungrouped = torch.fx.GraphModule(torch.nn.Module(), graph)(value)
            assert ungrouped.shape[1] == heads
            call = fn(value)
            group = call.shape[1] // heads
            assert torch.equal(ungrouped.repeat_interleave(group, 1).float(), call.float()), fn


def test_calls_in_a_list_of_attention_sublayers_take_their_cache_index() -> None:
    """Module paths ``layers.N.self_attn.j`` (LongCat-Flash: two attention sublayers per decoder
    layer, layer_idx 2N + j) map to N * sublayers + j; plain paths to N; a mix is refused."""
    graph = torch.fx.Graph()

    def call(path: str) -> torch.fx.Node:
        node = graph.placeholder(f"n{len(graph.nodes)}")
        node.meta["nn_module_stack"] = {"a": ("model.layers", object), "b": (path, object)}
        return node

    listed = [call(f"model.layers.{n}.self_attn.{j}") for n in (0, 1, 2) for j in (0, 1)]
    assert [layer for layer, _ in call_layers(listed)] == [0, 1, 2, 3, 4, 5]
    bracketed = [call(f"L['self'].model.layers[{n}].self_attn[{j}]") for n in (0, 1) for j in (0, 1, 2)]
    assert [layer for layer, _ in call_layers(bracketed)] == [0, 1, 2, 3, 4, 5]
    plain = [call(f"model.layers.{n}.self_attn") for n in (0, 1)]
    assert [layer for layer, _ in call_layers(plain)] == [0, 1]
    with pytest.raises(ValueError, match="sublayers"):
        call_layers(plain + listed[:2])
