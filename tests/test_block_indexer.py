"""Qwen4-Exp's query-aware sparse attention over a MoA plan: its indexer picks blocks of keys
among those the layer's rule keeps (moa_flex/runtime/block_selection.py, run through
``moa_flex::block_select`` by moa_flex/runtime/traceable.py), in forwards without a cache, the
prefill of a MoA cache, chunks over it and decode steps (the ring keeps each kept token's raw
index key and rotary terms; passes/indexed.py points the selection at the cache's slots).

Oracles: the stock model (a dense plan changes nothing), the independent reference
(moa_flex/reference.py: float64 attention under the brute-force rule, the indexer's mask ANDed
with the same rule by a forward hook, ties to the earlier block), step-by-step reference decoding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import moa_flex
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime import block_selection
from moa_flex.support import _random_plan, check_type, tiny_config

from tiny_models import qwen4_exp_indexed

pytestmark = pytest.mark.skipif(not qwen4_exp_indexed(), reason=f"transformers {transformers.__version__} has no "
                                "Qwen4-Exp with indexed_attention layers")


def _model(layer_types: list[str] | None = None) -> torch.nn.Module:
    config = tiny_config("qwen4_exp_text")  # budget 16 in blocks of 4: the selection cuts past 16 keys
    if layer_types is not None:
        config.layer_types = layer_types
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _compile(model: torch.nn.Module, plan: Plan, **kw: object) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moa_flex.compile(model, plan, backend="eager", progress=False, compile_cache=False, **kw)
    return model


@pytest.mark.parametrize("model_type", ["qwen4_exp_text", pytest.param("qwen4_exp", marks=pytest.mark.slow)])
def test_qwen4_exp_passes_the_matrix(model_type: str) -> None:
    """Dense plan == stock, random sparse plan == reference, greedy generate over the MoA cache
    token-exact (12-16 s each; the multimodal type in make test-slow)."""
    r = check_type(model_type)
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_the_rule_reaches_the_indexer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys the indexer may pick among are the causal keys the layer's rule keeps (no more:
    a key the cache will not hold is never picked), and the selection then cuts them."""
    model = _model(["indexed_attention", "indexed_attention"])
    shape = ModelShape.from_config(model.config)
    G = shape.num_kv_heads  # spans of 28 and 20 of 40 keys: the rule cuts, and leaves more than the budget of 16
    plan = Plan(shape, [[28.0] * G, [20.0] * G], [[0.0] * G] * 2, granularity="kv_head", sink=4, min_span=8,
                span_multiple=4)
    seen = []
    real = block_selection.block_select

    def spy(*args: object, **kw: object) -> torch.Tensor:
        out = real(*args, **kw)
        seen.append((args[4].clone(), out.clone()))
        return out

    monkeypatch.setattr(block_selection, "block_select", spy)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    _compile(model, plan)
    seen.clear()  # compile's check of each indexer against its own forward
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(seen) == 2
    from moa_flex.masks import reference_mask
    for layer, (visible, picked) in enumerate(seen):
        rule = reference_mask(plan, layer, 40, 40, 0, 40)[0]  # [Q, K], one rule for the layer's heads
        assert torch.equal(visible[0], rule & torch.ones(40, 40, dtype=torch.bool).tril())
        assert int(visible.sum()) < 40 * 41 // 2  # the rule cut
        assert bool((picked <= visible).all()) and int(picked.sum()) < int(visible.sum())  # and the selection


@pytest.mark.slow  # 20 s each (make test-slow); the chunk test below runs the same paths with a linear layer
@pytest.mark.parametrize("chunk", [8, 3])
def test_chunks_and_a_later_turn_of_attention_layers_match_the_reference(chunk: int) -> None:
    from conversation import chunked_turns

    model = _model(["indexed_attention", "indexed_attention"])
    chunked_turns(model, _random_plan(model.config), chunk)


@pytest.mark.slow  # 24 s (make test-slow); the default run's matrix check decodes over the ring
def test_chunks_and_a_later_turn_beside_a_linear_layer_match_the_reference() -> None:
    """A left-padded prompt in chunks of 3 (the padded row's second chunk starts with a pad) and a
    second turn: each chunk over the cache scores the cache's slots and its own keys, each decode
    step the ring; tokens and logits equal step-by-step reference decoding."""
    from conversation import chunked_turns

    model = _model()
    chunked_turns(model, _random_plan(model.config), 3)
    graphs = [r.graph_module.graph for r in model.moa_flex.reports]
    assert any(n.target == torch.ops.moa_flex.chunk_select_keep.default for g in graphs for n in g.nodes)


@pytest.mark.slow  # 30 s (make test-slow)
def test_a_pad_inside_a_chunk_over_the_cache_changes_nothing() -> None:
    """In a chunk over a filled cache, the linear-attention layers still get the chunk's padding
    (a mask per layer type, runtime/forward.py): the pads' token ids do not reach the state."""
    from conversation import generate

    model = _compile(_model(), _random_plan(_model().config), max_length=40, prefill_chunk=3)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # the second chunk holds two pads
    other = ids.clone()
    ids[0, :5], other[0, :5] = 0, torch.arange(7, 12)
    a, b = (torch.stack(generate(model, x, mask, 2).logits, 1) for x in (ids, other))
    assert float((a - b).abs().max()) <= 1e-6


def test_per_head_rules_are_refused_in_an_indexed_layer() -> None:
    """One selection serves all heads of a layer, so their rule must be one."""
    model = _model()
    shape = ModelShape.from_config(model.config)
    G = shape.num_kv_heads
    plan = Plan(shape, [[4.0 + 4 * (g % 2) for g in range(G)]], [[0.0] * G], granularity="kv_head", sink=2,
                min_span=4, span_multiple=2)
    _compile(model, plan)
    with pytest.raises(ValueError, match="selects keys with an indexer"), torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, 24)), use_cache=False)


def test_an_indexer_it_does_not_compute_is_refused_at_compile() -> None:
    """A key norm other than the one the op computes: refused before anything changes."""
    model = _model()
    indexer = model.model.layers[1].self_attn.indexer
    indexer.k_layernorm.eps = 0.5  # a norm the model's own code computes, which the op is not told of
    indexer.k_layernorm.forward = lambda x: x
    with pytest.raises(NotImplementedError, match="not what moa-flex's block selection computes"):
        _compile(model, Plan.dense(model.config))
    assert "forward" not in indexer.__dict__  # nothing routed


def test_an_indexer_whose_own_forward_selects_otherwise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routed forward is compared with the model's own (here one that keeps every visible
    key, as another transformers might): a different choice is refused at compile."""
    model = _model()
    indexer = model.model.layers[1].self_attn.indexer
    monkeypatch.setattr(type(indexer), "_select_tokens", lambda self, h, q, k, cos, sin, mask, **kw: mask)
    with pytest.raises(NotImplementedError, match="not what moa-flex's block selection computes"):
        _compile(model, Plan.dense(model.config))


def test_profiling_refuses_the_indexer() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="Qwen4-Exp's blocks"):
        _check_profilable(_model(), 40)


def test_the_ring_keeps_each_kept_tokens_key_and_rotary_terms() -> None:
    """After a request, each slot of the ring (one KV group's slots: the layer's groups share one
    slot map) holds the raw index key transformers' own cache holds for the position the slot
    map puts there, then that position's rotary cos and sin (``architecture.index_ring_width``);
    ``memory_bytes`` counts the ring."""
    from moa_flex.architecture import index_ring_width
    from moa_flex.kernels.slot_map import slot_positions

    model = _model()
    config = model.config
    plan = _random_plan(config)
    _compile(model, plan)
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, :-1]
        stock = model.moa_flex.original_forward(input_ids=seq, use_cache=True).past_key_values
    cache = model.moa_flex.cache
    moa = cache.moa_layers[0]  # decoder layer 1, the indexed one
    d, width = config.indexer_head_dim, index_ring_width(config)
    assert width == d + 2 * config.head_dim == plan.model.index_dim  # full rotary in the tiny config
    assert moa.index_keys.shape[1:] == (int(moa.offsets[1]), width) and moa.offsets.numel() == 3  # 2 groups, 1 kept
    pos = slot_positions(moa.ring_caps, moa.ring_offsets, moa.sink, torch.tensor([seq.shape[1] - 1]))[0]
    held = pos >= 0
    assert 0 < int(held.sum()) < seq.shape[1]  # the rule dropped some
    ring = moa.index_keys[0, held]
    torch.testing.assert_close(ring[:, :d], stock.layers[1].indexer_keys[0, pos[held]], rtol=0, atol=1e-5)
    cos, sin = model.model.rotary_emb(ring, pos[held].view(1, -1))
    torch.testing.assert_close(ring[:, d:], torch.cat([cos[0], sin[0]], -1), rtol=0, atol=1e-6)
    assert cache.memory_bytes() == sum(l.keys.nbytes + l.values.nbytes + l.index_keys.nbytes for l in cache.moa_layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton decode and chunk kernels, CUDA graphs)")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_on_a_gpu_chunks_turns_and_decode_equal_the_reference(mode: str | None) -> None:
    """On a GPU (eager; inductor with the decode steps in CUDA graphs): chunks of 5 of a
    left-padded prompt, a second turn and decode steps through the Triton kernels reading the
    block selection; tokens and logits equal step-by-step reference decoding (fp32, 1e-3)."""
    from conversation import gpu_turns

    model = _model().cuda()
    gpu_turns(model, _random_plan(model.config), mode)


def test_a_gb_budget_is_refused_by_name() -> None:
    """The ring keeps one entry per kept token, not one per KV slot: a GB budget's bytes per slot
    do not describe it, so the optimizer refuses one (a density or a token budget works)."""
    from moa_flex.optimize.budget import Budget

    shape = ModelShape.from_config(_model().config)
    with pytest.raises(ValueError, match="one indexer entry per kept token"):
        Budget(gb=1.0, batch_size=1, length=64).slot_limits([64], shape, shape.num_kv_heads)


@pytest.mark.slow  # 30 s (make test-slow)
def test_an_fp8_cache_equals_the_fp8_reference() -> None:
    """An FP8 cache (the ring stays in the model's dtype): a left-padded prompt in chunks of 8 and
    a second turn equal step-by-step reference decoding over FP8-stored keys and values."""
    from conversation import reference_greedy_fp8

    model = _model()
    plan = _random_plan(model.config)
    _compile(model, plan, max_length=60, prefill_chunk=8, kv_dtype="fp8")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    cache = None
    for user in (None, 9):
        if user is not None:
            more = torch.randint(3, 100, (2, user), generator=torch.Generator().manual_seed(9))
            ids, mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True,
                                 **({} if cache is None else {"past_key_values": cache}))
        cache = model.moa_flex.cache
        assert cache.moa_layers[0].keys.dtype == torch.float8_e4m3fn and cache.moa_layers[0].index_keys.dtype == torch.float32
        want, want_logits = reference_greedy_fp8(model, plan, 60, ids, mask, 4)
        assert torch.equal(out.sequences, want), user
        assert float((torch.stack(out.logits, 1) - want_logits).abs().max()) <= 1e-4, user
        ids, mask = out.sequences, torch.cat([mask, torch.ones_like(mask[:, :4])], 1)
