"""The compile pass on models that run attn_implementation="flex_attention" (CPU, fp32):
flex_attention HOP nodes rewritten into moa-flex attention after their score_mod and
mask_mod are proven by evaluation; unprovable mods and plan mismatches rejected whole."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.attention import MoaRuntime
from moa_flex.passes.attention_pass import make_backend, rewrite_attention
from moa_flex.passes.nodes import PassReport
from moa_flex.passes.flex_pass import flex_nodes, prove_mask_mod, prove_score_mod
from reference import reference_logits
from tiny_models import D, H, KVH, L, SEQ, ids_of, sparse_plan, tiny_model

PAD = 57  # left-pad tokens of the second row


def left_padded_inputs() -> dict:
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :PAD] = 0
    return {"input_ids": ids_of(SEQ), "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def flex_model(family: str):  # noqa: ANN201
    model = tiny_model(family)
    model.set_attn_implementation("flex_attention")
    return model


def stock_logits(model, **inputs) -> torch.Tensor:  # noqa: ANN001
    """The stock model's logits through its sdpa (eager for soft-capping families) attention:
    the same function as HF's flex_attention path, without HF compiling FlexAttention."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager" if getattr(model.config, "attn_logit_softcapping", None) else "sdpa")
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        model.set_attn_implementation(before)


def compile_flex(model, plan: Plan, inner: str) -> tuple:  # noqa: ANN001
    """model.forward under torch.compile with the moa-flex backend, partial graphs allowed."""
    runtime = MoaRuntime(plan, compiled=inner == "inductor")
    reports: list[PassReport] = []
    cap = float(getattr(model.config, "attn_logit_softcapping", None) or 0.0)
    fn = make_backend(plan, runtime.id, inner=inner, on_report=reports.append, softcaps=[cap] * L, partial_graphs=True)
    return torch.compile(model.forward, backend=fn, dynamic=False), runtime, reports


def check_rewritten(reports: list[PassReport]) -> None:
    """The last traced attention piece: one moa-flex call per layer, no flex_attention left."""
    gm = reports[-1].graph_module
    assert sorted(r.layer for r in reports[-1].rewritten) == list(range(L))
    assert not flex_nodes(gm.graph), "every flex_attention node was rewritten"
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.moa_flex.attention.default]
    assert len(calls) == L


def real_rows_close(got: torch.Tensor, want: torch.Tensor, tol: float, pads: list[int]) -> None:
    for b, pad in enumerate(pads):
        err = (got[b, pad:] - want[b, pad:]).abs().max().item()
        assert err <= tol, (b, err)


def check_plans(compiled, model, plan, runtime, reports, plain: bool) -> None:  # noqa: ANN001
    """The sparse plan against the independent reference on a left-padded batch (HF's padding
    mask_mod) and, if ``plain``, on a batch without attention_mask (HF's packed-sequence
    mask_mod); then the dense plan, same graphs, against the stock model (left-padded)."""
    padded = left_padded_inputs()
    with torch.no_grad():
        stock = stock_logits(model, **padded)
        for x, pads in ([({"input_ids": ids_of(SEQ)}, [0, 0])] if plain else []) + [(padded, [0, PAD])]:
            got = compiled(**x, use_cache=False).logits
            check_rewritten(reports)
            want = reference_logits(model, plan, pads, **x)
            real_rows_close(got, want, 1e-4, pads)
        assert (want - stock).abs().max() > 1e-3, "the sparse plan must change the logits"
        runtime.set_plan(Plan.dense(model.config))
        real_rows_close(compiled(**padded, use_cache=False).logits, stock, 1e-5, [0, PAD])


def test_llama_gqa_flex_model() -> None:
    model = flex_model("llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    plan = sparse_plan(model.config, "kv_head", seed=11)
    compiled, runtime, reports = compile_flex(model, plan, "eager")
    check_plans(compiled, model, plan, runtime, reports, plain=True)
    # Packed sequences (positions restart inside a row, no attention_mask): HF's packed mask_mod
    # is causal only for one sequence per row, which the rewritten graph checks at run time.
    packed = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ - SEQ // 2)]).expand(2, SEQ)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] hold packed sequences"), torch.no_grad():
        compiled(input_ids=ids_of(SEQ), position_ids=packed, use_cache=False)
    runtime.close()


def test_gemma2_flex_model_softcap_and_window() -> None:
    """Soft-capping on every layer and a 128-token window of the model's own on layer 0."""
    model = flex_model("gemma2")
    assert model.config.layer_types[0] == "sliding_attention" and model.config.sliding_window < SEQ
    plan = sparse_plan(model.config, "kv_head", seed=12)
    compiled, runtime, reports = compile_flex(model, plan, "eager")
    check_plans(compiled, model, plan, runtime, reports, plain=False)
    runtime.close()


# --- rejection, on hand-built graphs ----------------------------------------------------

Q = 128


class _Attention(torch.nn.Module):
    def __init__(self, score_mod) -> None:  # noqa: ANN001
        super().__init__()
        self.score_mod = score_mod

    def forward(self, q, k, v, block_mask):  # noqa: ANN001, ANN201
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask, enable_gqa=True)


class _Layer(torch.nn.Module):
    def __init__(self, score_mod) -> None:  # noqa: ANN001
        super().__init__()
        self.self_attn = _Attention(score_mod)


class _Toy(torch.nn.Module):
    """Decoder-shaped module paths (layers.N.self_attn), one flex_attention call per layer."""

    def __init__(self, score_mods) -> None:  # noqa: ANN001
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(s) for s in score_mods)

    def forward(self, q, k, v, block_masks):  # noqa: ANN001, ANN201
        for layer, bm in zip(self.layers, block_masks):
            q = layer.self_attn(q, k, v, bm)
        return q


def identity(score, b, h, q, kv):  # noqa: ANN001, ANN201
    return score


def causal(b, h, q, kv):  # noqa: ANN001, ANN201
    return kv <= q


PADDING = torch.ones(1, Q, dtype=torch.bool)
DOCS = (torch.arange(Q) // 40).view(1, Q)
BAD_MASKS = {
    "prefix-LM": (lambda b, h, q, kv: (kv <= q) | (kv < 8), "mask_mod is not causal"),
    "padding read at the query": (lambda b, h, q, kv: (kv <= q) & PADDING[b, q], r"not causal & padding\[b, kv\]"),
    # HF's packed mask before transformers 5.24 is DOCS[b, q] == DOCS[b, kv] & kv <= q (accepted, checked at
    # run time: test_mask_proof_reads_windows_padding_and_packing); keys of document 0 visible from all is not
    "document with a global one": (lambda b, h, q, kv: (kv <= q) & ((DOCS[b, q] == DOCS[b, kv]) | (DOCS[b, kv] == 0)),
                                   "not HF's packed-sequence causal mask"),
    "per-head window": (lambda b, h, q, kv: (kv <= q) & (q - kv < 16 + 16 * h), r"\(q - kv < 16\)"),
}
BAD_SCORES = {
    "ALiBi": (lambda s, b, h, q, kv: s + (kv - q) * 0.125, "score_mod is not score"),
    "cap other than the config's": (lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), "attn_logit_softcapping is 50"),
}


def traced_toy(score_mods, mask_mods) -> torch.fx.GraphModule:  # noqa: ANN001
    graphs = []

    def record(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return gm.forward

    q, k = torch.randn(1, H, Q, D), torch.randn(1, KVH, Q, D)
    masks = [create_block_mask(m, 1, None, Q, Q, device="cpu") for m in mask_mods]
    torch.compile(_Toy(score_mods), backend=record, fullgraph=True)(q, k, k, masks)
    return graphs[0]


def assert_untouched(gm: torch.fx.GraphModule, layers: int) -> None:
    assert len(flex_nodes(gm.graph)) == layers
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.moa_flex.attention.default]


@pytest.mark.parametrize("name", list(BAD_MASKS))
def test_unprovable_mask_mod_is_rejected_whole(name: str) -> None:
    """Layer 0 is plain causal, layer 1 is not: the error names layer 1, nothing is rewritten."""
    bad, message = BAD_MASKS[name]
    gm = traced_toy([identity, identity], [causal, bad])
    with pytest.raises(ValueError, match=f"layer 1: .*{message}"):
        rewrite_attention(gm, Plan.dense(ModelShape(L, H, KVH, D)), 0, partial_graphs=True)
    assert_untouched(gm, L)


@pytest.mark.parametrize("name", list(BAD_SCORES))
def test_unprovable_score_mod_is_rejected_whole(name: str) -> None:
    bad, message = BAD_SCORES[name]
    gm = traced_toy([lambda s, b, h, q, kv: 50.0 * torch.tanh(s / 50.0), bad], [causal, causal])
    with pytest.raises(ValueError, match=f"layer 1: .*{message}"):
        rewrite_attention(gm, Plan.dense(ModelShape(L, H, KVH, D)), 0, softcaps=[50.0] * L, partial_graphs=True)
    assert_untouched(gm, L)


def test_plan_and_layer_mismatch() -> None:
    gm = traced_toy([identity] * L, [causal] * L)
    with pytest.raises(ValueError, match=r"layers \[0, 1\] but the plan has num_layers = 3"):
        rewrite_attention(gm, Plan.dense(ModelShape(L + 1, H, KVH, D)), 0, partial_graphs=True)
    assert_untouched(gm, L)
    one = traced_toy([identity], [causal])  # an attention piece with one layer of two
    with pytest.raises(ValueError, match=r"layers \[0\] but the plan has num_layers = 2"):
        rewrite_attention(one, Plan.dense(ModelShape(L, H, KVH, D)), 0, partial_graphs=True)
    assert_untouched(one, 1)
    # and the toy's own causal graph is rewritten once the plan fits
    report = rewrite_attention(gm, Plan.dense(ModelShape(L, H, KVH, D)), 0)
    assert [r.layer for r in report.rewritten] == [0, 1] and not flex_nodes(gm.graph)


def test_attention_free_pieces_need_partial_graphs() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    plan = Plan.dense(ModelShape(L, H, KVH, D))
    with pytest.raises(ValueError, match="no attention call.*partial_graphs=True"):
        rewrite_attention(gm, plan, 0)
    report = rewrite_attention(gm, plan, 0, partial_graphs=True)
    assert report.rewritten == []


# --- the proofs, on plain functions -----------------------------------------------------


def test_mask_proof_reads_windows_padding_and_packing() -> None:
    cpu = torch.device("cpu")
    pad = torch.ones(2, 300, dtype=torch.bool)
    ids = torch.zeros(2, 300, dtype=torch.long)

    def padded_window(b, h, q, kv, p):  # noqa: ANN001, ANN202
        return (kv <= q) & (kv > q - 100) & p[b, kv]

    sem = prove_mask_mod(padded_window, [pad], 0, H, 2, 300, cpu)
    assert (sem.kind, sem.window, sem.index) == ("padding", 100, 0)

    def packed(b, h, q, kv, pos, seq):  # noqa: ANN001, ANN202  (buffers in the other order)
        return (seq[b, q] == seq[b, kv]) & (pos[b, kv] <= pos[b, q])

    sem = prove_mask_mod(packed, [ids, ids], 3, H, 2, 300, cpu)
    assert (sem.kind, sem.window, sem.seq, sem.pos) == ("packed", None, 1, 0)

    def packed_index_window(b, h, q, kv, seq, pos):  # noqa: ANN001, ANN202  (window on indices, not positions)
        return (seq[b, q] == seq[b, kv]) & (pos[b, kv] <= pos[b, q]) & (q - kv < 50)

    with pytest.raises(ValueError, match="layer 3: .*packed-sequence"):
        prove_mask_mod(packed_index_window, [ids, ids], 3, H, 2, 300, cpu)

    def packed_by_index(b, h, q, kv, seq):  # noqa: ANN001, ANN202  (transformers < 5.24: sequence ids only)
        return (seq[b, q] == seq[b, kv]) & (kv <= q)

    sem = prove_mask_mod(packed_by_index, [ids], 3, H, 2, 300, cpu)
    assert (sem.kind, sem.window, sem.seq, sem.pos) == ("packed", None, 0, None)
    # the graph's run-time check: one sequence per row, else a clear error
    assert torch.ops.moa_flex.unpacked_rows(ids, None).all()
    with pytest.raises(ValueError, match=r"rows \[1\] hold packed sequences"):
        torch.ops.moa_flex.unpacked_rows(torch.stack([ids[0], (torch.arange(300) >= 150).long()]), None)
    with pytest.raises(ValueError, match="not HF's packed-sequence"):
        prove_mask_mod(padded_window, [pad.long()], 0, H, 2, 300, cpu)  # a padding mask must be bool
    with pytest.raises(ValueError, match="reads tensors"):
        prove_mask_mod(padded_window, [pad[:, :299]], 0, H, 2, 300, cpu)  # and [B, K]


def test_score_proof() -> None:
    cpu = torch.device("cpu")
    assert prove_score_mod(identity, 0, H, cpu) == 0.0
    assert prove_score_mod(lambda s, b, h, q, kv: 0.5 * torch.tanh(s / 0.5), 0, H, cpu, 0.5) == 0.5
    with pytest.raises(ValueError, match="neither the identity nor"):
        prove_score_mod(lambda s, b, h, q, kv: 2 * s, 0, H, cpu)
    with pytest.raises(ValueError, match="config's attn_logit_softcapping is none"):
        prove_score_mod(lambda s, b, h, q, kv: 0.5 * torch.tanh(s / 0.5), 0, H, cpu, 0.0)
