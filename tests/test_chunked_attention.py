"""A model's own attention pattern under a plan: Llama 4's chunked local attention (a query
attends its own chunk of ``attention_chunk_size`` positions) and sliding windows, whose layers'
caches are bounded by them. Oracles: the reference attention over HF's own masks
(moa_flex.reference: the plan's keep rule ANDed with the model's chunked or sliding mask),
step by step over the whole conversation; the stock model for a dense plan."""

from __future__ import annotations

import pytest
import torch
import transformers

import moa_flex
from moa_flex.architecture import model_windows, reads_token_count
from moa_flex.plan import ModelShape, Plan
from conversation import converse, generate
from tiny_models import ids_of, sparse_plan, tiny_model

CHUNK = 64


def llama4(chunk: int = CHUNK, **extra) -> transformers.PreTrainedModel:  # noqa: ANN003
    """A tiny Llama 4: layers 0-2 attend in chunks of ``chunk`` (RoPE), layer 3 is a NoPE layer
    with full attention whose queries are scaled by a function of the position (attention
    temperature, floor_scale 4 so that it changes within a test's length); MoE in every layer."""
    return tiny_model("llama4_moe", layers=4, attention_chunk_size=chunk, floor_scale=4, attn_scale=0.3,
                      layer_types=None, no_rope_layers=None, **extra)


def test_the_model_pattern_per_layer() -> None:
    config = llama4().config
    assert config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert model_windows(config, ModelShape.from_config(config)) == [-CHUNK, -CHUNK, -CHUNK, None]
    assert "NoPE layers [3]" in reads_token_count(config)
    assert reads_token_count(tiny_model().config) is None
    model = llama4()
    with pytest.warns(UserWarning, match="decode steps run without CUDA graphs"):
        moa_flex.compile(model, Plan.dense(model.config), mode="reduce-overhead", backend="eager")
    assert not model.moa_flex.cudagraphs  # no step graph would freeze the token count


def test_chunked_local_attention_conversation_equals_the_reference() -> None:
    """Two turns on a left-padded batch, prefilled in chunks of 48 that straddle the model's
    chunks of 64: tokens and logits equal step-by-step reference decoding of the whole
    conversation; the chunked layers' caches hold at most sink + 64 slots per group."""
    N = 330
    model = llama4()
    plan = sparse_plan(model.config, "head", seed=8)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, backend="eager")
    ids = ids_of(150, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    caches = converse(model, plan, N, ids, mask, (None, 40), 12, seed=10)
    layers = caches[-1].moa_layers
    assert all(int(layer.caps.max()) <= plan.sink + CHUNK for layer in layers[:3])
    assert int(layers[3].caps.max()) > plan.sink + CHUNK, "the full-attention layer keeps its plan's spans"


def test_dense_plan_equals_the_stock_model() -> None:
    model = llama4()
    ids = ids_of(100, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        stock_logits = model(input_ids=ids, attention_mask=mask).logits
    moa_flex.compile(model, Plan.dense(model.config), prefill_chunk=40, backend="eager")
    got = generate(model, ids, mask, 10)
    assert torch.equal(got.sequences, want)
    with torch.no_grad():  # a plain forward: FlexAttention with HF's chunked mask ANDed in
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert (plain - stock_logits)[:, 7:].abs().max() <= 1e-5


def test_sliding_window_layers_keep_at_most_their_window() -> None:
    """GPT-OSS (every other layer a 128-token window, learned sinks): generate equals the
    reference and the windowed layers' caches hold sink + 128 slots, the others their spans."""
    N = 330
    model = tiny_model("gpt_oss", attn="eager")
    plan = Plan.dense(model.config)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=100, backend="eager")
    ids = ids_of(200, seed=2)
    caches = converse(model, plan, N, ids, torch.ones_like(ids), (None,), 6, seed=4)
    caps = [int(layer.caps.max()) for layer in caches[0].moa_layers]
    assert caps == [plan.sink + 128, N] * (len(caps) // 2)
