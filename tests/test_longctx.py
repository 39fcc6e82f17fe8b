"""Long contexts in bounded memory: block masks linear in N, exact chunked prefill over the
ragged cache, and conversations continued turn after turn (tiny models, CPU, fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch

import moa_flex
from moa_flex.masks import BLOCK_MASK_CACHE, block_mask_from_spans, mask_bytes
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.attention import MoaRuntime
from moa_flex.runtime.cache import MoaCache
from reference import planned_logits, reference_logits
from conversation import converse, generate, reference_greedy
from tiny_models import SEQ, ids_of, sparse_plan, tiny_model

EAGER = {"backend": "eager"}


# ------------------------------------------------------------------------------------------------
# 1. no run-time tensor grows with N squared


def test_block_masks_grow_linearly_with_the_length() -> None:
    """The masks one attention call builds for a 32-head plan, at N = 131072 and 262144 tokens:
    no q-side indices, and twice the bytes at twice the length (one query chunk; a plan whose
    spans grow with N keeps [H, chunk / 128, N / 128] indices)."""
    plan = Plan.uniform(ModelShape(1, 32, 8, 128), alpha=4096, beta=0.25)
    runtime = MoaRuntime(plan, query_chunk=16384)
    sizes = {}
    for N in (131072, 262144):
        BLOCK_MASK_CACHE.clear()
        mask = runtime.block_mask(0, N, N, None, torch.device("cpu"), N, N, rows=(N - 16384, N))
        assert mask.q_num_blocks is None and mask.q_indices is None, "inference keeps no q-side indices"
        assert tuple(mask.kv_indices.shape) == (1, 32, 16384 // 128, N // 128)
        sizes[N] = mask_bytes(mask)
    assert 1.99 < sizes[262144] / sizes[131072] <= 2.0, sizes  # the index tensors double; per-row counts stay
    runtime.close()


def test_the_mask_cache_is_bounded_in_bytes() -> None:
    from moa_flex.masks import _MaskCache

    cache = _MaskCache(max_bytes=30_000)
    for n in range(12):
        mask = block_mask_from_spans(torch.tensor([64 + 16 * n] * 4), 16, 2048, 0, 2048, 128, "cpu",
                                     compute_q_blocks=False)
        cache.put(("m", n), mask)
        assert cache.bytes <= 30_000
    assert cache.get(("m", 11)) is not None and cache.get(("m", 0)) is None, "least recently used go first"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_plain_forward_in_query_chunks_is_exact(family: str) -> None:
    """A forward without cache runs its attention 128 queries per FlexAttention call: the
    logits equal the reference and one call over all queries (Mistral: its own 100-token
    window, ANDed in as a dense mask, cut to each call's query rows)."""
    model = tiny_model(family, **({"sliding_window": 100} if family == "mistral" else {}))
    plan = sparse_plan(model.config, "kv_head", seed=2)
    ids = ids_of(SEQ)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    want = reference_logits(model, plan, [0, 40], **inputs)
    outs = []
    moa_flex.compile(model, plan, prefill_chunk=128, **EAGER)
    for chunk in (128, None):  # the query chunk is read at run time: the same graph
        model.moa_flex.runtime.query_chunk = chunk
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message="moa-flex: the attention mask is more than")
            outs.append(model(**inputs, use_cache=False).logits)
    assert len(model.moa_flex.reports) == 1
    moa_flex.uncompile(model)
    for got in outs:
        assert (got[0] - want[0]).abs().max() <= 1e-4 and (got[1, 40:] - want[1, 40:]).abs().max() <= 1e-4
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# 2. exact chunked prefill


def prefill_logits(model, plan: Plan, ids: torch.Tensor, mask: torch.Tensor, N: int) -> torch.Tensor:  # noqa: ANN001
    """All logits of a prefill onto a fresh MoaCache planned for N tokens."""
    pads = (mask == 0).int().cumprod(1).sum(1)
    cache = MoaCache(plan, ids.shape[0], N, pads=pads, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     past_key_values=cache, use_cache=True, logits_to_keep=0).logits


CASES = {  # (model kwargs, granularity, chunk, left pads): chunks dividing the prompt and not,
    # shorter than the spans and rings (spans 32..96 at N), longer than them, longer than the prompt
    "divides": ({}, "kv_head", 100, [0, 0]),
    "does not divide, padded": ({}, "kv_head", 70, [0, 23]),
    # padding over whole chunks: chunks with no real token in a row (a chunk's pads were read as none)
    "shorter than spans, head granularity, padding over whole chunks": ({}, "head", 16, [0, 37]),
    "longer than spans, MHA": ({"kv_heads": 4}, "head", 200, [11, 0]),
    "one chunk": ({}, "kv_head", 512, [0, 7]),
    "model window": ({"family": "mistral", "sliding_window": 120}, "kv_head", 64, [0, 9]),
    "learned sinks": ({"family": "gpt_oss"}, "head", 48, [0, 6]),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "learned sinks" else c for c in CASES])
def test_chunked_prefill_equals_one_shot_and_the_reference(case: str) -> None:
    """Logits at every position (hence at every chunk boundary) of a prefill in chunks equal
    the independent reference planned for N and a prefill in one chunk."""
    extra, granularity, chunk, pads = CASES[case]
    model = tiny_model(**extra)
    plan = sparse_plan(model.config, granularity, seed=5)
    N = SEQ + 20
    ids = ids_of(SEQ)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    want = planned_logits(model, plan, N, ids, mask)
    moa_flex.compile(model, plan, prefill_chunk=chunk, **EAGER)
    got = prefill_logits(model, plan, ids, mask, N)
    model.moa_flex.prefill_chunk = None
    one_shot = prefill_logits(model, plan, ids, mask, N)
    for b, p in enumerate(pads):
        assert (got[b, p:] - want[b, p:]).abs().max() <= 1e-4, b
        assert (got[b, p:] - one_shot[b, p:]).abs().max() <= 1e-4, b
    assert (planned_logits(model, Plan.dense(model.config), N, ids, mask)[0] - want[0]).abs().max() > 1e-3, \
        "the plan really cuts"


def test_chunks_return_the_logits_asked_for() -> None:
    model = tiny_model()
    plan = sparse_plan(model.config, "kv_head")
    moa_flex.compile(model, plan, prefill_chunk=64, **EAGER)
    ids = ids_of(200, batch=1)
    full = prefill_logits(model, plan, ids, torch.ones_like(ids), 210)
    for keep in (1, 5, 90):
        cache = MoaCache(plan, 1, 210)
        with torch.no_grad():
            got = model(input_ids=ids, past_key_values=cache, logits_to_keep=keep).logits
        assert got.shape[1] == keep and (got - full[:, -keep:]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# 3. conversations


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_a_conversation_equals_one_request_planned_for_n(family: str) -> None:
    """Three turns on a left-padded batch, prefilled in chunks: each turn's tokens and logits
    equal step-by-step reference decoding of the whole conversation planned for N (GPT-OSS:
    learned sinks in prefill, chunks and decode steps, and windows of its own)."""
    N = 360
    model = tiny_model(family)
    plan = sparse_plan(model.config, "head", seed=8)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, **EAGER)
    ids = ids_of(200, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    ids[1, :17] = 0
    caches = converse(model, plan, N, ids, mask, (None, 40, 33), 12, seed=10)
    assert all(cache is model.moa_flex.cache for cache in caches)


def test_turns_that_do_not_fit_are_refused_and_the_cache_stays_usable() -> None:
    N = 330
    model = tiny_model()
    plan = sparse_plan(model.config, "kv_head", seed=1)
    moa_flex.compile(model, plan, max_length=N, **EAGER)
    ids = ids_of(200, seed=4)
    mask = torch.ones_like(ids)
    out = generate(model, ids, mask, 8)
    cache = model.moa_flex.cache
    seen = cache.seen_tokens
    conversation = torch.cat([out.sequences, ids_of(20, seed=9)], 1)
    longer_mask = torch.ones_like(conversation)
    cases = [
        ("pass the planned length", dict(ids=conversation, mask=longer_mask, new=200)),
        ("batch of 2 rows, this turn has 1", dict(ids=conversation[:1], mask=longer_mask[:1], new=4)),
        ("left padding", dict(ids=conversation, mask=torch.cat([torch.zeros(2, 1, dtype=torch.long), longer_mask[:, 1:]], 1),
                              new=4)),
        ("whole conversation", dict(ids=conversation[:, :100], mask=longer_mask[:, :100], new=4)),
    ]
    for match, kw in cases:
        with pytest.raises(ValueError, match=match):
            generate(model, kw["ids"], kw["mask"], kw["new"], cache)
        assert cache.seen_tokens == seen, "nothing was written"
    other = MoaCache(sparse_plan(model.config, "head", seed=3), 2, N)
    with pytest.raises(ValueError, match="another plan"):
        generate(model, conversation, longer_mask, 4, other)
    half = MoaCache(plan, 2, N, dtype=torch.float16)
    with pytest.raises(ValueError, match="another model"):
        generate(model, conversation, longer_mask, 4, half)
    # and the refused turns left the cache as it was: the valid turn equals the reference
    got = generate(model, conversation, longer_mask, 6, cache)
    want, _ = reference_greedy(model, plan, N, conversation, longer_mask, 6)
    assert torch.equal(got.sequences, want)
