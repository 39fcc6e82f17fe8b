"""The linear-fusion pass (CPU, fp32): q/k/v -> moa_flex::grouped_linear, gate/up + SiLU ->
moa_flex::gated_mlp, in Dynamo graphs of a tiny Llama, in hand-built FX graphs, under
symbolic batch sizes, and end to end through moa_flex.compile's decode step.

On CPU the ops run their fp32 twins, so a fused fp32 graph must match the unfused one to
rounding (1e-5)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moa_flex
from moa_flex.passes.linear_pass import GATED, GROUPED, LINEAR_TARGETS, LinearFusionReport, fuse_linears
from tiny_models import L, NEW, PROMPT, prompt_ids, run_generate, sparse_plan, tiny_model

GROUPED_OP = torch.ops.moa_flex.grouped_linear.default
GATED_OP = torch.ops.moa_flex.gated_mlp.default
LAYERS = L


def tiny_llama(**extra) -> transformers.PreTrainedModel:  # noqa: ANN003
    """The shared tiny Llama (hidden 64: 4 heads of 16), config extras passed through."""
    return tiny_model(max_positions=256, **extra)


def capture(fn, *args, dynamic: bool = False) -> list[tuple[torch.fx.GraphModule, list]]:  # noqa: ANN001
    """(graph, example inputs) of each graph Dynamo traces from fn(*args), run unchanged."""
    graphs: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args)
    return graphs


def decode_like_graph(model, batch: int, tokens: int) -> tuple[torch.fx.GraphModule, list]:  # noqa: ANN001
    """The graph of a forward over `tokens` new tokens per row (M = batch * tokens), static shapes."""
    ids = torch.randint(1, 128, (batch, tokens), generator=torch.Generator().manual_seed(1))
    (graph,) = capture(lambda x: model(input_ids=x, use_cache=False).logits, ids)
    return graph


def nodes_of(gm: torch.fx.GraphModule, targets: tuple) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def run(gm: torch.fx.GraphModule, inputs: list) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert (g - w).abs().max().item() <= tol


# ---------------------------------------------------------------------------------- Llama graphs
@pytest.mark.parametrize("batch, tokens", [(1, 1), (2, 2), (16, 1)])
def test_llama_graph_fuses_qkv_and_gated_mlp_per_layer(batch: int, tokens: int) -> None:
    model = tiny_llama()
    gm, inputs = decode_like_graph(model, batch, tokens)
    want = run(gm, inputs)
    report = fuse_linears(gm)
    assert isinstance(report, LinearFusionReport) and report.graph_module is gm
    assert (report.gated, report.grouped, report.skipped, report.guards) == (LAYERS, LAYERS, [], [])
    by_layer = report.by_layer()
    assert sorted(by_layer) == list(range(LAYERS))
    for layer, groups in by_layer.items():
        assert [g.kind for g in groups] == [GROUPED, GATED]
        qkv, mlp = groups
        assert qkv.modules == [f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv"]
        assert mlp.modules == [f"model.layers.{layer}.mlp.gate_proj", f"model.layers.{layer}.mlp.up_proj"]
        assert qkv.rows == mlp.rows == str(batch * tokens)
    # one op per group, fed the graph's own weight placeholders (nothing concatenated)
    grouped, gated = nodes_of(gm, (GROUPED_OP,)), nodes_of(gm, (GATED_OP,))
    assert len(grouped) == len(gated) == LAYERS
    for node in grouped:
        assert len(node.args[1]) == 3 and all(w.op == "placeholder" for w in node.args[1])
        assert sorted(u.args[1] for u in node.users) == [0, 1, 2]
    for node in gated:
        assert all(w.op == "placeholder" for w in node.args[1:])
    assert len(nodes_of(gm, LINEAR_TARGETS)) == 2 * LAYERS + 1  # o_proj, down_proj per layer, lm_head
    assert not nodes_of(gm, (F.silu,))
    assert_close(run(gm, inputs), want)


def test_linears_with_bias_are_left_alone() -> None:
    """attention_bias=True: q/k/v (and o) carry a bias, so only the MLPs fuse; the q/k/v groups
    are reported as skipped and keep their linear nodes."""
    model = tiny_llama(attention_bias=True)
    gm, inputs = decode_like_graph(model, 2, 1)
    want = run(gm, inputs)
    report = fuse_linears(gm)
    assert (report.gated, report.grouped) == (LAYERS, 0)
    assert [(g.kind, g.layer) for g in report.skipped] == [(GROUPED, layer) for layer in range(LAYERS)]
    assert all("has a bias" in g.reason for g in report.skipped)
    with_bias = [n for n in nodes_of(gm, LINEAR_TARGETS) if n.args[2] is not None]
    assert len(with_bias) == 4 * LAYERS  # q, k, v, o untouched
    assert not nodes_of(gm, (GROUPED_OP,))
    assert_close(run(gm, inputs), want)


def test_rows_above_max_rows_are_not_rewritten() -> None:
    model = tiny_llama()
    gm, inputs = decode_like_graph(model, 3, 6)  # M = 18 > 16
    code = gm.code
    report = fuse_linears(gm)
    assert (report.gated, report.grouped) == (0, 0)
    assert len(report.skipped) == 2 * LAYERS
    assert all("M = 18 rows > max_rows = 16" in g.reason for g in report.skipped)
    assert gm.code == code
    report = fuse_linears(gm, max_rows=18)  # the same graph with the limit at its M
    assert (report.gated, report.grouped) == (LAYERS, LAYERS)
    with pytest.raises(ValueError, match="max_rows"):
        fuse_linears(gm, max_rows=0)


# ---------------------------------------------------------------------------------- symbolic rows
class Block(torch.nn.Module):
    """q/k/v then a gated MLP, as a decoder layer has them."""

    def __init__(self, K: int = 24, N: int = 40) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.q, self.k, self.v = (torch.nn.Linear(K, n, bias=False) for n in (K, 8, 8))
        self.gate, self.up = torch.nn.Linear(K, N, bias=False), torch.nn.Linear(K, N, bias=False)
        self.down = torch.nn.Linear(N, K, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) + torch.cat([self.k(x), self.v(x)], -1).repeat(1, 1, 3)[..., : x.shape[-1]]
        return self.down(F.silu(self.gate(h)) * self.up(h))


def test_symbolic_batch_is_guarded_on_its_hint() -> None:
    """dynamic=True: M is a symbol; the decision follows the compiled call's batch and guards
    it, so a batch on the other side of max_rows compiles its own (unfused) graph and a batch
    on the same side reuses the fused one."""
    block = Block().eval()
    reports: list[LinearFusionReport] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202
        reports.append(fuse_linears(gm, max_rows=16))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(block, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 5, 32, 16, 40, 3):
            x = torch.randn(batch, 1, 24)
            assert_close([fn(x)], [block(x)])
    assert [(r.gated, r.grouped, len(r.skipped)) for r in reports] == [(1, 1, 0), (0, 0, 2)]
    (sym,) = {g.rows for g in reports[0].fused}
    assert not sym.isdigit()
    assert reports[0].guards == [f"{sym} <= 16"]
    assert reports[1].guards == [f"{sym} > 16"]
    assert all(f"M = {sym} rows > max_rows = 16" in g.reason for g in reports[1].skipped)
    assert "(hint; guarded)" in reports[1].skipped[0].reason  # the later group: proven by that guard


def test_symbolic_rows_outside_dynamo_are_skipped() -> None:
    """A graph with a symbolic batch, rewritten after its compile (no guard can be added):
    nothing is fused, every group says why, the graph is unchanged."""
    block = Block().eval()
    [(graph, _)] = capture(block, torch.randn(4, 1, 24), dynamic=True)
    code = graph.code
    report = fuse_linears(graph)
    assert (report.gated, report.grouped, len(report.skipped)) == (0, 0, 2)
    assert all("symbolic" in g.reason for g in report.skipped)
    assert graph.code == code


# ---------------------------------------------------------------------------------- hand-built graphs
def silu_of(graph: torch.fx.Graph, node: torch.fx.Node, how: str) -> torch.fx.Node:
    if how == "module":
        return graph.call_module("act", (node,))
    return graph.call_function(F.silu if how == "functional" else torch.ops.aten.silu.default, (node,))


def hand_built(lead: tuple[int, ...], K: int, widths: list[int], gated: bool, silu: str, swap: bool,
               weights_as: str, seed: int) -> tuple[torch.fx.GraphModule, list, torch.Tensor]:
    """A graph of linears sharing x (gated: silu(x W0^T) * (x W1^T), else each output, summed
    into one tensor and also returned alone), with its inputs and the eager result."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=gen)
    ws = [torch.randn(n, K, generator=gen) for n in widths]
    root = torch.nn.Module()
    root.act = torch.nn.SiLU()
    graph = torch.fx.Graph()
    xn = graph.placeholder("x")
    xn.meta["val"] = x
    inputs, wnodes = [x], []
    for i, w in enumerate(ws):
        if weights_as == "placeholder":
            node = graph.placeholder(f"w{i}")
            node.meta["val"] = w
            inputs.append(w)
        else:
            root.register_buffer(f"w{i}", w)
            node = graph.get_attr(f"w{i}")
        wnodes.append(node)
    lins = [graph.call_function(F.linear, (xn, w, None)) for w in wnodes]
    if gated:
        act = silu_of(graph, lins[0], silu)
        out = graph.call_function(operator.mul, (lins[1], act) if swap else (act, lins[1]))
        graph.output(out)
        want = F.silu(x @ ws[0].T) * (x @ ws[1].T)
    else:
        graph.output(tuple(lins))
        want = [x @ w.T for w in ws]
    return torch.fx.GraphModule(root, graph), inputs, want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    K=st.integers(1, 48),
    gated=st.booleans(),
    grouped_n=st.integers(2, 3),
    widths=st.lists(st.integers(1, 40), min_size=3, max_size=3),
    silu=st.sampled_from(["functional", "aten", "module"]),
    swap=st.booleans(),
    weights_as=st.sampled_from(["placeholder", "get_attr"]),
    max_rows=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_hand_built_graphs_match_eager(lead: list[int], K: int, gated: bool, grouped_n: int, widths: list[int],
                                       silu: str, swap: bool, weights_as: str, max_rows: int, seed: int) -> None:
    widths = [widths[0]] * 2 if gated else widths[:grouped_n]
    gm, inputs, want = hand_built(tuple(lead), K, widths, gated, silu, swap, weights_as, seed)
    report = fuse_linears(gm, max_rows=max_rows)
    M = 1
    for d in lead:
        M *= d
    fused = M <= max_rows
    assert (report.gated, report.grouped) == ((int(fused and gated), int(fused and not gated)))
    assert len(report.skipped) == int(not fused)
    assert len(nodes_of(gm, LINEAR_TARGETS)) == (0 if fused else len(widths))
    if fused and gated:
        assert not nodes_of(gm, (F.silu, torch.ops.aten.silu.default, operator.mul))
        assert not any(n.op == "call_module" for n in gm.graph.nodes)
    got = run(gm, inputs)
    assert_close(got, want if isinstance(want, list) else [want], tol=1e-5 * max(1, K))


def test_get_attr_weights_after_the_first_linear_move_up() -> None:
    """symbolic_trace places each get_attr right before its use: the grouped op still sees
    every weight defined before it."""

    class QKV(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv = (torch.nn.Parameter(torch.randn(n, 8)) for n in (8, 4, 4))

        def forward(self, x: torch.Tensor) -> tuple:
            q = F.linear(x, self.wq)
            k = F.linear(x, self.wk)
            return q.relu(), k, F.linear(x, self.wv)

    mod = QKV()
    gm = torch.fx.symbolic_trace(mod)
    x = torch.randn(3, 8)
    next(iter(gm.graph.nodes)).meta["val"] = x
    report = fuse_linears(gm)
    assert report.grouped == 1
    assert_close(run(gm, [x]), list(mod(x)))


def test_groups_that_do_not_qualify_are_skipped_whole() -> None:
    """Four linears on one input (more than the kernel takes), a gate whose output is also
    used elsewhere or a broadcasting up weight (each falls back to a grouped pair), and mixed
    dtypes: each reported, none rewritten partially."""
    x = torch.randn(2, 8)
    ws = [torch.randn(4, 8) for _ in range(4)]

    def four(x: torch.Tensor, a, b, c, d) -> tuple:  # noqa: ANN001
        return tuple(F.linear(x, w) for w in (a, b, c, d))

    gm = torch.fx.symbolic_trace(four)
    for node, val in zip(gm.graph.nodes, [x, *ws]):
        node.meta["val"] = val
    report = fuse_linears(gm)
    assert (report.gated, report.grouped) == (0, 0)
    assert "4 linears share input" in report.skipped[0].reason
    assert len(nodes_of(gm, LINEAR_TARGETS)) == 4

    def leaky_gate(x: torch.Tensor, g, u) -> tuple:  # noqa: ANN001
        gate = F.linear(x, g)
        return F.silu(gate) * F.linear(x, u), gate

    gm = torch.fx.symbolic_trace(leaky_gate)
    for node, val in zip(gm.graph.nodes, [x, ws[0], ws[1]]):
        node.meta["val"] = val
    want = leaky_gate(x, ws[0], ws[1])
    report = fuse_linears(gm)
    assert (report.gated, report.grouped) == (0, 1)
    assert_close(run(gm, [x, ws[0], ws[1]]), list(want))

    up_row = torch.randn(1, 8)  # silu(x g^T) * (x u^T) broadcasts a one-row up: not the gated kernel
    gm = torch.fx.symbolic_trace(lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u))
    for node, val in zip(gm.graph.nodes, [x, ws[0], up_row]):
        node.meta["val"] = val
    report = fuse_linears(gm)
    assert (report.gated, report.grouped) == (0, 1)
    assert_close(run(gm, [x, ws[0], up_row]), [F.silu(x @ ws[0].T) * (x @ up_row.T)])

    gm = torch.fx.symbolic_trace(lambda x, a, b: (F.linear(x, a), F.linear(x, b)))
    for node, val in zip(gm.graph.nodes, [x, ws[0], ws[1].double()]):
        node.meta["val"] = val
    report = fuse_linears(gm)
    assert report.grouped == 0 and "torch.float64" in report.skipped[0].reason


# ---------------------------------------------------------------------------------- end to end
def count_ops(fn) -> dict[str, int]:  # noqa: ANN001
    """How often each moa_flex linear op ran during fn() (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {op: names.count(f"moa_flex::{op}") for op in (GROUPED, GATED)}


def test_compiled_generate_with_fused_linears_is_token_exact() -> None:
    """moa_flex.compile(fuse_linear=True) on CPU: each decode step runs one grouped_linear and
    one gated_mlp per layer, and greedy generate gives the tokens (and logits) of
    fuse_linear=False. Shapes of test_generate (same prefill graph)."""
    ids = prompt_ids()
    outs, reports = {}, {}
    for fuse in (True, False):
        model = tiny_model()
        moa_flex.compile(model, sparse_plan(model.config, "kv_head"), fuse_linear=fuse, backend="eager")
        run_generate(model, ids, new=2)  # trace prefill and decode outside the count
        counts = count_ops(lambda: outs.__setitem__(fuse, run_generate(model, ids)))  # noqa: B023
        reports[fuse] = model.moa_flex.decode_reports[-1]
        decode_steps = NEW - 1  # the prefill gives the first token
        assert counts == ({GROUPED: decode_steps * LAYERS, GATED: decode_steps * LAYERS} if fuse
                          else {GROUPED: 0, GATED: 0})
    fusion = reports[True].linear_fusion
    assert (fusion.gated, fusion.grouped, fusion.skipped) == (LAYERS, LAYERS, [])
    assert len(fusion.guards) == 1 and fusion.guards[0].endswith("<= 16")  # the symbolic batch
    assert reports[False].linear_fusion is None
    assert outs[True].sequences.shape == (2, PROMPT + NEW)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    got, want = torch.stack(outs[True].logits, 1), torch.stack(outs[False].logits, 1)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton linear kernels, CUDA graphs)")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_fused_decode_on_gpu_matches_unfused(mode: str | None) -> None:
    """On a GPU fusion is on by default: the Triton kernels run inside the compiled decode step
    (and its captured step graph with reduce-overhead); tokens equal those of fuse_linear=False."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = prompt_ids().cuda()
    outs, reports = {}, {}
    for fuse in (None, False):
        model = tiny_model().cuda()
        moa_flex.compile(model, sparse_plan(model.config, "kv_head"), mode=mode, fuse_linear=fuse)
        outs[fuse] = run_generate(model, ids)
        reports[fuse] = model.moa_flex.decode_reports[-1]
        assert (model.moa_flex.cache.step_graph is not None) == (mode == "reduce-overhead")
    fusion = reports[None].linear_fusion
    assert (fusion.gated, fusion.grouped, fusion.skipped) == (LAYERS, LAYERS, [])
    assert reports[False].linear_fusion is None
    assert torch.equal(outs[None].sequences, outs[False].sequences)
    got, want = torch.stack(outs[None].logits, 1), torch.stack(outs[False].logits, 1)
    assert (got - want).abs().max().item() <= 1e-3
