"""The profiler: tiled influence vs the naive O(N^2) reference, the formula vs real masking,
Profile save/load, resume after a crash, the Triton kernel under the interpreter."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import moa_flex.profile.influence as influence
import moa_flex.profile.instrument as instrument
import moa_flex.profile.store as store
from moa_flex.plan import ModelShape
from moa_flex.data.samples import Sample
from moa_flex.profile.influence import (
    dropped_loss, influence_chunked, influence_histogram, influence_matrix, influence_reference,
)
from moa_flex.profile.instrument import profile_model
from moa_flex.profile.store import Profile
from profile_cases import SINK, SM, VOCAB, _CAPTURE, calib, reference_profile
from tiny_models import tiny_model as shared_tiny_model

L, H, KVH, D = 2, 4, 2, 16
# The Triton kernels run on the GPU, or in Triton's interpreter on CPU tensors (tests/conftest.py
# sets TRITON_INTERPRET=1 before triton is imported when there is no GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or TRITON_DEVICE is None,
                                  reason="triton kernels need CUDA or TRITON_INTERPRET=1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against the reference b (0 if both are 0)."""
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def random_attention(H: int, KVH: int, N: int, D: int, seed: int, dtype=torch.float32) -> tuple:
    """Random q, k, v [.., N, D]; O is the true causal attention output; dO random."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, N, D, generator=g, dtype=torch.float64) for h in (H, KVH, KVH))
    kk, vv = k.repeat_interleave(H // KVH, 0), v.repeat_interleave(H // KVH, 0)
    scale = D ** -0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    a = torch.softmax((q @ kk.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1)
    o = a @ vv
    do = torch.randn(H, N, D, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, o, do)) + (scale,)


# ------------------------------------------------------------------------------------------------
# The formula and the histograms on random tensors


def test_formula_is_exact_for_a_loss_linear_in_the_output():
    """For L = sum(W * O), masking (i, j) and renormalizing changes L by exactly E_ij: check the
    reference's E against an explicit masked attention, pair by pair."""
    q, k, v, _, _, scale = random_attention(2, 1, 12, 4, seed=1, dtype=torch.float64)
    W = torch.randn(2, 12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kk, vv = k.expand(2, -1, -1), v.expand(2, -1, -1)

    def out(allowed: torch.Tensor) -> torch.Tensor:
        s = (q @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, -1) @ vv

    causal = torch.ones(2, 12, 12, dtype=torch.bool).tril()
    o = out(causal)
    E = influence_matrix(q, k, v, o, W, scale)  # dO = dL/dO = W
    for h, i, j in [(0, 5, 0), (1, 11, 7), (0, 3, 3), (1, 9, 2), (0, 1, 0)]:
        allowed = causal.clone()
        allowed[h, i, j] = False
        actual = (W * (out(allowed) - o)).sum().item()
        assert actual == pytest.approx(E[h, i, j].item(), rel=1e-9, abs=1e-12)
    assert torch.all(E[:, 0] == 0) and torch.all(E.triu(1) == 0)


@settings(max_examples=30, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    N=st.integers(1, 90), Dh=st.sampled_from([4, 8, 16]),
    sink=st.integers(0, 20), sm=st.integers(1, 24),
    block_q=st.sampled_from([8, 16, 32, 128]), block_k=st.sampled_from([8, 16, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference(heads, N, Dh, sink, sm, block_q, block_k, seed):
    Hq, Hk = heads
    q, k, v, o, do, scale = random_attention(Hq, Hk, N, Dh, seed)
    hist, sink_share = influence_chunked(q, k, v, o, do, scale=scale, sink=sink, span_multiple=sm,
                                         block_q=block_q, block_k=block_k)
    ref_hist, ref_sink = influence_reference(q, k, v, o, do, scale=scale, sink=sink, span_multiple=sm)
    assert hist.shape == (Hq, math.ceil(N / sm)) and sink_share.shape == (Hq,)
    assert rel_err(hist, ref_hist) <= 1e-5
    assert rel_err(sink_share, ref_sink) <= 1e-5
    # every causal pair but row 0's lands in exactly one place
    total = influence_matrix(q, k, v, o, do, scale).abs().sum((-1, -2))
    assert torch.allclose(ref_hist.sum(-1) + ref_sink, total, rtol=1e-12)


def degenerate_attention(dtype=torch.float32) -> tuple:
    """Random attention where key 7 takes (numerically) all the mass of row 30 of head 0, and
    much of the mass of many other rows: A == 1 exactly in fp32."""
    q, k, v, _, do, scale = random_attention(2, 1, 40, 8, seed=3, dtype=torch.float64)
    k[0, 7] = q[0, 30] * 60
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    a = torch.softmax((q @ k.expand(2, -1, -1).transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1)
    assert a[0, 30, 7] > 1 - 1e-12 and (a[0, 30, 7].float() == 1)
    o = a @ v.expand(2, -1, -1)
    return tuple(t.to(dtype) for t in (q, k, v, o, do)) + (scale,)


def test_rows_with_all_mass_on_one_key_stay_finite():
    """E stays finite (1 - A floored at ONE_MINUS_A_MIN); in float64 the tiles still agree with
    the reference (in fp32 such pairs are ill-conditioned: G - D and 1 - A both cancel)."""
    for dtype in (torch.float32, torch.float64):
        q, k, v, o, do, scale = degenerate_attention(dtype)
        for impl in ("reference", "chunked"):
            hist, sink_share = influence_histogram(q, k, v, o, do, scale=scale, sink=2, span_multiple=4, impl=impl)
            assert torch.isfinite(hist).all() and torch.isfinite(sink_share).all()
    ref, ref_sink = influence_reference(q, k, v, o, do, scale=scale, sink=2, span_multiple=4)
    got, got_sink = influence_chunked(q, k, v, o, do, scale=scale, sink=2, span_multiple=4)
    assert rel_err(got, ref) <= 1e-9 and rel_err(got_sink, ref_sink) <= 1e-9


@settings(max_examples=40, deadline=None)
@given(N=st.integers(2, 70), sink_blocks=st.integers(0, 3), sm=st.sampled_from([1, 4, 8, 16]),
       span_blocks=st.lists(st.integers(0, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_dropped_loss_is_the_sum_over_dropped_pairs(N, sink_blocks, sm, span_blocks, seed):
    """Suffix sums of the histogram equal the brute-force sum of |E| over the pairs that the
    keep rule (docs/DESIGN.md) drops, for sink and span - sink multiples of span_multiple."""
    sink = sink_blocks * sm
    q, k, v, o, do, scale = random_attention(2, 1, N, 4, seed, dtype=torch.float64)
    hist, _ = influence_reference(q, k, v, o, do, scale=scale, sink=sink, span_multiple=sm)
    E = influence_matrix(q, k, v, o, do, scale).abs()
    spans = [sink + b * sm for b in span_blocks] + [N, N + 5]
    got = dropped_loss(hist, spans, N=N, sink=sink, span_multiple=sm)
    assert got.shape == (2, len(spans))
    i = torch.arange(N).view(-1, 1)
    j = torch.arange(N).view(1, -1)
    for r, S in enumerate(spans):
        keep = (j <= i) & ((j < sink) | (i - j < S - sink))
        dropped = (j <= i) & ~keep
        assert torch.allclose(got[:, r], E[:, dropped].sum(-1), rtol=1e-10, atol=1e-14)


def test_dropped_loss_refuses_inexact_spans_and_wrong_bins():
    hist = torch.rand(3, 4)  # N = 30, span_multiple 8 -> 4 bins
    with pytest.raises(ValueError, match="not multiples of span_multiple"):
        dropped_loss(hist, [12], N=30, sink=2, span_multiple=8)
    with pytest.raises(ValueError, match="bins"):
        dropped_loss(hist, [10], N=40, sink=2, span_multiple=8)
    assert torch.equal(dropped_loss(hist, [30, 2, 0], N=30, sink=2, span_multiple=8)[:, 0], torch.zeros(3))
    assert torch.allclose(dropped_loss(hist, [2, 0], N=30, sink=2, span_multiple=8), hist.sum(-1, keepdim=True).expand(3, 2))


def test_bad_inputs_name_the_field():
    q, k, v, o, do, scale = random_attention(4, 2, 10, 8, seed=0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        influence_chunked(q, k[:1].expand(3, -1, -1), v[:1].expand(3, -1, -1), o, do, scale=scale, sink=0, span_multiple=4)
    with pytest.raises(ValueError, match="o and do"):
        influence_chunked(q, k, v, o[:, :5], do, scale=scale, sink=0, span_multiple=4)
    with pytest.raises(ValueError, match="sink"):
        influence_chunked(q, k, v, o, do, scale=scale, sink=-1, span_multiple=4)
    with pytest.raises(ValueError, match="span_multiple"):
        influence_chunked(q, k, v, o, do, scale=scale, sink=0, span_multiple=0)
    with pytest.raises(ValueError, match="impl"):
        influence_histogram(q, k, v, o, do, scale=scale, sink=0, span_multiple=4, impl="fast")


# ------------------------------------------------------------------------------------------------
# Tiny HF model: the whole profiler vs a reference built from an independent eager attention




def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, kv_heads: int = KVH) -> transformers.PreTrainedModel:
    """The shared tiny Llama with this module's 64-token vocabulary."""
    return shared_tiny_model(vocab=VOCAB, max_positions=1024, dtype=dtype, seed=seed, kv_heads=kv_heads)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_profile_matches_reference_on_tiny_model(checkpointing):
    model = tiny_model()
    samples = calib(model, [40, 67], n=2)
    profile = profile_model(model, samples, sink=SINK, span_multiple=SM, progress=False, impl="chunked",
                            checkpointing=checkpointing)
    assert profile.lengths == [40, 67] and profile.num_samples == {40: 2, 67: 2}
    for N in (40, 67):
        refs = [reference_profile(model, s) for s in samples[N]]
        ref_hist = sum(r[0] for r in refs) / 2
        ref_sink = sum(r[1] for r in refs) / 2
        assert profile.hist[N].shape == (L, H, math.ceil(N / SM)) and profile.hist[N].dtype == torch.float64
        assert rel_err(profile.hist[N], ref_hist) <= 1e-5
        assert rel_err(profile.sink_share[N], ref_sink) <= 1e-5
    # everything restored, no weight gradient anywhere
    assert model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_checkpointing_recomputes_each_layer(monkeypatch):
    """With checkpointing every layer's attention forward runs twice (forward + recompute)."""
    calls = []
    original = instrument._InfluenceAttention.forward
    monkeypatch.setattr(instrument._InfluenceAttention, "forward", staticmethod(
        lambda ctx, q, k, v, scale, layer: calls.append(layer) or original(ctx, q, k, v, scale, layer)))
    model = tiny_model()
    samples = calib(model, [30])
    profile_model(model, samples, sink=SINK, span_multiple=SM, progress=False, checkpointing=True)
    assert sorted(calls) == [0, 0, 1, 1]
    calls.clear()
    profile_model(model, samples, sink=SINK, span_multiple=SM, progress=False, checkpointing=False)
    assert sorted(calls) == [0, 1]


def test_largest_influence_predicts_masking():
    """Mask the single (layer, head, i, j) with the largest |E| (over every layer, head and pair;
    row 0 has E = 0 by definition, nothing else is excluded) and rerun: the loss moves by about
    E. Tiny fp64 model at the default init (0.02), where one pair's effect is near-linear."""
    model = tiny_model(torch.float64, seed=0)
    sample = calib(model, [64], seed=3, max_new_tokens=6)[64][0]
    _, _, Es = reference_profile(model, sample)
    layer, (h, i, j) = max(((lay, torch.unravel_index(E.abs().argmax(), E.shape)) for lay, E in Es.items()),
                           key=lambda t: Es[t[0]][t[1]].abs().item())
    estimate = Es[layer][h, i, j].item()
    assert estimate != 0

    def loss() -> float:
        with torch.no_grad():
            logits = model(input_ids=sample.input_ids.unsqueeze(0), use_cache=False).logits[0, -sample.answer.numel() - 1:-1]
            return torch.nn.functional.cross_entropy(logits, sample.answer).item()

    model.set_attn_implementation("moa_test_reference")
    try:
        base = loss()
        _CAPTURE["drop"] = (layer, int(h), int(i), int(j))
        masked = loss()
    finally:
        _CAPTURE.pop("drop", None)
        model.set_attn_implementation("sdpa")
    change = masked - base
    assert math.copysign(1, change) == math.copysign(1, estimate)
    assert abs(change - estimate) <= 0.2 * abs(estimate)


def test_profile_rejects_unsupported_models():
    samples = {30: [Sample([0], [5] * 20, [2, 6, 3], [7, 8])]}
    model = tiny_model()
    with pytest.raises(TypeError, match="samples must map"):
        profile_model(model, samples[30], sink=SINK, span_multiple=SM, progress=False)
    with pytest.raises(ValueError, match="no samples for length 40"):
        profile_model(model, samples, [40], sink=SINK, span_multiple=SM, progress=False)
    with pytest.raises(ValueError, match="eval"):
        profile_model(model.train(), samples, sink=SINK, span_multiple=SM, progress=False)
    gemma = transformers.Gemma2Config(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      hidden_size=16, intermediate_size=32, vocab_size=VOCAB, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="soft-capping"):
        profile_model(transformers.Gemma2ForCausalLM(gemma).eval(), samples, sink=SINK, span_multiple=SM, progress=False)
    mistral = transformers.MistralConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         hidden_size=16, intermediate_size=32, vocab_size=VOCAB, sliding_window=16)
    with pytest.raises(ValueError, match="sliding window"):
        profile_model(transformers.MistralForCausalLM(mistral).eval(), samples, sink=SINK, span_multiple=SM, progress=False)


# ------------------------------------------------------------------------------------------------
# Profile file, other model, resume


def small_profile(seed: int = 0) -> Profile:
    g = torch.Generator().manual_seed(seed)
    shape = ModelShape(L, H, KVH, D, "tiny")
    return Profile(shape, SINK, SM, {40: torch.rand(L, H, 5, generator=g, dtype=torch.float64),
                                     67: torch.rand(L, H, 9, generator=g, dtype=torch.float64)},
                   {40: torch.rand(L, H, generator=g, dtype=torch.float64), 67: torch.rand(L, H, generator=g, dtype=torch.float64)},
                   {40: 3, 67: 2}, data_hash="abc", fingerprint="f00", meta={"note": "x"})


def test_profile_save_load_roundtrip(tmp_path):
    p = small_profile()
    p.save(tmp_path / "p.safetensors")
    q = Profile.load(tmp_path / "p.safetensors")
    assert q.header() == p.header()
    for N in p.lengths:
        assert torch.equal(q.hist[N], p.hist[N]) and torch.equal(q.sink_share[N], p.sink_share[N])
    assert torch.equal(q.dropped_loss(67, [SINK + 16, 67]), p.dropped_loss(67, [SINK + 16, 67]))
    spans = torch.tensor([[SINK + 8, SINK + 16, 67, SINK] * (H // 4)] * L)
    per_head = q.head_loss(67, spans)
    for layer in range(L):
        for h in range(H):
            assert per_head[layer, h] == q.dropped_loss(67, [int(spans[layer, h])])[layer, h, 0]


def test_profile_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not a moa-flex profile"):
        Profile.load(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"hist\[40\] has shape"):
        Profile(ModelShape(L, H, KVH, D), SINK, SM, {40: torch.zeros(L, H, 4)}, {40: torch.zeros(L, H)}, {40: 1})


def test_profile_for_another_model_is_refused():
    model = tiny_model()
    p = small_profile()
    p.fingerprint = store.model_fingerprint(model)
    p.check_model(model)
    p.check_model(model.config)
    other_shape = tiny_model(kv_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads is 4, the profile has 2"):
        p.check_model(other_shape)
    with pytest.raises(ValueError, match="weights fingerprint"):
        p.check_model(tiny_model(seed=1))


def test_resume_after_crash(tmp_path, monkeypatch):
    model = tiny_model()
    samples = calib(model, [30, 45])
    kw = dict(sink=SINK, span_multiple=SM, progress=False)
    straight = profile_model(model, samples, **kw)

    real = instrument._profile_length
    done = []

    def crash_on_second(*args, **kwargs):
        if done:
            raise RuntimeError("simulated crash")
        done.append(args[2])
        return real(*args, **kwargs)

    ckpt = tmp_path / "ckpt.safetensors"
    monkeypatch.setattr(instrument, "_profile_length", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        profile_model(model, samples, checkpoint_path=ckpt, **kw)
    assert Profile.load(ckpt).lengths == [30]
    assert model.config._attn_implementation == "sdpa"  # restored despite the crash

    resumed_lengths = []
    monkeypatch.setattr(instrument, "_profile_length", lambda *a, **k: resumed_lengths.append(a[2]) or real(*a, **k))
    resumed = profile_model(model, samples, checkpoint_path=ckpt, **kw)
    assert resumed_lengths == [45]
    assert resumed.header() == straight.header()
    for N in (30, 45):
        assert torch.allclose(resumed.hist[N], straight.hist[N], rtol=1e-12, atol=0)
    assert Profile.load(ckpt).lengths == [30, 45]

    with pytest.raises(ValueError, match="data_hash"):
        profile_model(model, calib(model, [30, 45], seed=9), checkpoint_path=ckpt, **kw)


# ------------------------------------------------------------------------------------------------
# The Triton kernel, under the interpreter on CPU


@needs_triton
@pytest.mark.parametrize("heads,N,Dh,sink,sm,block", [
    ((4, 2), 77, 8, 5, 8, 16),     # several bins per tile, ragged last block, sink inside the first block
    ((2, 2), 50, 16, 0, 32, 16),   # no sink, bins wider than a tile
    ((3, 1), 40, 12, 20, 7, 16),   # span_multiple not dividing the block, head dim not a power of 2
    ((2, 1), 70, 8, 33, 16, 32),   # sink across block boundaries
])
def test_triton_matches_chunked(heads, N, Dh, sink, sm, block):
    from moa_flex.kernels.influence import influence_triton, row_lse_triton

    q, k, v, o, do, scale = (t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) else t
                             for t in random_attention(*heads, N, Dh, seed=N))
    hist, sink_share = influence_triton(q, k, v, o, do, scale=scale, sink=sink, span_multiple=sm, block=block)
    ref_hist, ref_sink = influence_chunked(q, k, v, o, do, scale=scale, sink=sink, span_multiple=sm)
    assert hist.shape == ref_hist.shape and sink_share.shape == ref_sink.shape
    assert rel_err(hist, ref_hist) <= 1e-5
    assert rel_err(sink_share, ref_sink) <= 1e-5
    assert torch.allclose(row_lse_triton(q, k, scale, block), influence.row_lse_chunked(q, k, scale), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_stays_finite_when_a_row_has_all_mass_on_one_key():
    from moa_flex.kernels.influence import influence_triton

    q, k, v, o, do, scale = (t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) else t for t in degenerate_attention())
    hist, sink_share = influence_triton(q, k, v, o, do, scale=scale, sink=2, span_multiple=4, block=16)
    assert torch.isfinite(hist).all() and torch.isfinite(sink_share).all()


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from moa_flex.kernels.influence import influence_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, o, do, scale = random_attention(2, 1, 8, 8, seed=0)
    with pytest.raises(ValueError, match="CUDA"):
        influence_triton(q, k, v, o, do, scale=scale, sink=0, span_multiple=4)
    with pytest.raises(TypeError, match="bf16"):
        influence_triton(q.double(), k, v, o, do, scale=scale, sink=0, span_multiple=4)


@needs_triton
def test_profile_model_with_triton_kernel_matches_chunked():
    """The whole profiler through the Triton path on a tiny model."""
    model = tiny_model().to(TRITON_DEVICE)
    samples = calib(model, [40])
    kw = dict(sink=SINK, span_multiple=SM, progress=False)
    tri = profile_model(model, samples, impl="triton", **kw)
    ref = profile_model(model, samples, impl="chunked", **kw)
    assert rel_err(tri.hist[40], ref.hist[40]) <= 1e-5
    assert rel_err(tri.sink_share[40], ref.sink_share[40]) <= 1e-5


def test_a_profile_that_is_not_finite_is_refused_naming_its_layers():
    """A model whose gradients are NaN somewhere (found on a tiny Gemma 3n) must not become a
    plan: the profile refuses, naming the layers."""
    hist, sink = torch.rand(3, 2, 5, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    instrument.check_finite(hist, sink, 40)
    hist[1, 0, 2], sink[2, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"layers \[1, 2\] at 40 tokens is not finite"):
        instrument.check_finite(hist, sink, 40)
