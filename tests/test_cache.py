"""The ragged MoA cache: slot map, prefill and append writes, layout and memory (CPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.cache import MoaCache
from moa_flex.runtime.slots import slot_positions


def simulated(caps: list[list[int]], widths: list[int], sink: int, last: list[int]) -> torch.Tensor:
    """What each slot holds after writing positions 0..last[b] one by one (DESIGN slot map)."""
    B = len(caps)
    out = torch.full((B, sum(widths)), -1, dtype=torch.long)
    for b in range(B):
        base = 0
        for g, width in enumerate(widths):
            cap = caps[b][g]
            for p in range(last[b] + 1):
                slot = p if p < sink else sink + (p - sink) % (cap - sink)
                if slot < cap:  # cap <= sink: positions past cap never occur in valid use
                    out[b, base + slot] = p
            base += width
    return out


@st.composite
def layouts(draw):  # noqa: ANN001, ANN201
    B = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    sink = draw(st.integers(0, 6))
    widths = [draw(st.integers(sink + 1, sink + 12)) for _ in range(G)]
    caps = [[draw(st.integers(sink + 1, w)) for w in widths] for _ in range(B)]
    last = [draw(st.integers(-1, 60)) for _ in range(B)]
    return B, G, sink, widths, caps, last


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_slot_positions_match_simulated_writes(layout) -> None:  # noqa: ANN001
    B, G, sink, widths, caps, last = layout
    offsets = torch.tensor([0] + list(torch.tensor(widths).cumsum(0)), dtype=torch.int32)
    got = slot_positions(torch.tensor(caps, dtype=torch.int32), offsets, sink, torch.tensor(last))
    assert torch.equal(got, simulated(caps, widths, sink, last))


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 4), st.integers(1, 20))
def test_prefill_then_appends_equal_one_prefill(layout, pad_max, steps) -> None:  # noqa: ANN001
    """Writing a prompt (one cache_extend) then tokens one by one (cache_append) leaves the
    cache exactly as one cache_extend of the whole sequence, and every slot holds the K of the
    position the slot map says (slots that never held a token keep what they held)."""
    B, G, sink, widths, caps, _ = layout
    D = 3
    gen = torch.Generator().manual_seed(B * 100 + G)
    pads = torch.randint(0, pad_max + 1, (B,), generator=gen)
    prompt = int(pads.max()) + 1 + int(torch.randint(0, 30, (), generator=gen))
    total = prompt + steps
    k_all = torch.randn(B, G, total, D, generator=gen, dtype=torch.float64)
    v_all = torch.randn(B, G, total, D, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0] + list(torch.tensor(widths).cumsum(0)), dtype=torch.int32)
    caps_t = torch.tensor(caps, dtype=torch.int32)
    spans = torch.zeros(B, G, dtype=torch.int32)

    def fresh() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        S = int(offsets[-1])
        return torch.full((B, S, D), 7.0, dtype=torch.float64), torch.full((B, S, D), 7.0, dtype=torch.float64), torch.zeros(B, dtype=torch.long)

    keys, values, length = fresh()
    torch.ops.moa_flex.cache_extend(keys, values, length, k_all[:, :, :prompt], v_all[:, :, :prompt], pads, spans, caps_t,
                                    offsets, sink, None, None)
    assert torch.equal(length, prompt - pads)
    for t in range(prompt, total):
        torch.ops.moa_flex.cache_append(keys, values, length, k_all[:, :, t:t + 1], v_all[:, :, t:t + 1], spans, caps_t, offsets, sink,
                                        None, None)
    assert torch.equal(length, total - pads)

    k1, v1, l1 = fresh()
    torch.ops.moa_flex.cache_extend(k1, v1, l1, k_all, v_all, pads, spans, caps_t, offsets, sink, None, None)
    assert torch.equal(keys, k1) and torch.equal(values, v1)

    held = simulated(caps, widths, sink, (total - pads - 1).tolist())
    for b in range(B):
        for s in range(int(offsets[-1])):
            g = int(torch.searchsorted(offsets, s, right=True)) - 1
            p = int(held[b, s])
            want = torch.full((D,), 7.0, dtype=torch.float64) if p < 0 else k_all[b, g, int(pads[b]) + p]
            assert torch.equal(keys[b, s], want), (b, s, p)


def plan_for(L: int = 3, H: int = 4, KVH: int = 2, granularity: str = "head") -> Plan:
    shape = ModelShape(L, H, KVH, 8)
    G = H if granularity == "head" else KVH
    gen = torch.Generator().manual_seed(3)
    alpha = (torch.randint(0, 4, (L, G), generator=gen) * 16).double().tolist()
    beta = (torch.randint(0, 5, (L, G), generator=gen) / 8).tolist()
    return Plan(shape, alpha, beta, granularity=granularity, sink=8, min_span=16, span_multiple=8)


@pytest.mark.parametrize("granularity", ["head", "kv_head"])
def test_layout_and_memory(granularity: str) -> None:
    plan = plan_for(granularity=granularity)
    pads = torch.tensor([0, 5, 2])
    N = 200
    cache = MoaCache(plan, 3, N, pads=pads, dtype=torch.bfloat16)
    for l, layer in enumerate(cache.layers):
        for b in range(3):
            n = N - int(pads[b])
            assert layer.caps[b].tolist() == plan.cache_spans(n)[l].tolist()
            assert layer.spans[b].tolist() == plan.head_spans(n)[l].tolist()
        widths = (layer.offsets[1:] - layer.offsets[:-1]).tolist()
        assert widths == plan.cache_spans(N)[l].tolist()  # the longest row (pad 0) sets the widths
    slots = int(plan.cache_spans(N).sum())
    assert cache.slots() == slots
    assert cache.memory_bytes() == 2 * 3 * slots * 8 * 2  # K and V, rows, slots, head dim, bf16 bytes
    measured = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache.memory_bytes() == measured
    assert cache.dense_memory_bytes() == 2 * 3 * 3 * 2 * N * 8 * 2
    assert cache.memory_bytes() / cache.dense_memory_bytes() == pytest.approx(plan.kv_density(N))


def test_bad_input() -> None:
    plan = plan_for()
    with pytest.raises(ValueError, match="pads"):
        MoaCache(plan, 2, 100, pads=torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="planned_length"):
        MoaCache(plan, 2, 0)
    with pytest.raises(ValueError, match="devices"):
        MoaCache(plan, 1, 100, devices=["cpu"])
    cache = MoaCache(plan, 1, 100)
    with pytest.raises(RuntimeError, match="moa_flex.compile"):
        cache.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)


def test_dead_code_elimination_keeps_cache_writes() -> None:
    """Dynamo records custom ops by their OpOverloadPacket; the passes' dead-code elimination
    must keep such mutating calls even though nothing uses their (None) result (both nodes
    are given as roots: only the pure one goes)."""
    from moa_flex.passes.nodes import eliminate_dead_code, keeps_effects

    graph = torch.fx.Graph()
    keys, values, length, k = (graph.placeholder(n) for n in ("keys", "values", "length", "k"))
    write = graph.call_function(torch.ops.moa_flex.cache_append, (keys, values, length, k, k, k, k, k, 0, None, None))
    dead = graph.call_function(torch.ops.aten.add, (k, 1))
    graph.output(k)
    assert keeps_effects(write) and not keeps_effects(dead)
    eliminate_dead_code(graph, [write, dead])
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.moa_flex.cache_append]


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton append kernel needs CUDA or TRITON_INTERPRET=1",
)


@needs_triton
@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 3), st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from([4, 24]), st.booleans())
def test_triton_append_equals_twin(layout, start, dtype, D, strided) -> None:  # noqa: ANN001
    """The fused append kernel writes exactly the twin's slots and lengths, ring wrap-around
    included, from strided float32 [B, G, 1, D] inputs into float32 or bfloat16 caches."""
    from moa_flex.runtime.slots import cache_append_reference
    from moa_flex.kernels.append import cache_append_triton

    B, G, sink, widths, caps, last = layout
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(B * 7 + G * 3 + D)
    offsets = torch.tensor([0] + list(torch.tensor(widths).cumsum(0)), dtype=torch.int32, device=dev)
    caps_t = torch.tensor(caps, dtype=torch.int32, device=dev)
    S = int(offsets[-1])
    keys = torch.randn(B, S, D, generator=gen).to(dev, dtype)
    values = torch.randn(B, S, D, generator=gen).to(dev, dtype)
    length = torch.tensor([l + 1 + start for l in last], device=dev)
    twin = [keys.clone(), values.clone(), length.clone()]
    for _ in range(3):  # several steps: positions advance, slots wrap around the ring
        # float32 new K/V, cast on write; values representable in the cache's dtype, since Triton's
        # interpreter rounds float32 -> bfloat16 differently from the GPU (which rounds to nearest)
        full = torch.randn(B, 1, G, 2 * D, generator=gen).to(dtype).float().to(dev)
        k_new = full[..., :D].transpose(1, 2) if strided else full[..., :D].transpose(1, 2).contiguous()
        v_new = full[..., D:].transpose(1, 2)
        cache_append_triton(keys, values, length, k_new, v_new, caps_t, offsets, sink)
        cache_append_reference(*twin, k_new, v_new, caps_t, offsets, sink)
        assert torch.equal(keys, twin[0]) and torch.equal(values, twin[1]) and torch.equal(length, twin[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 'cuda' names the current one")
def test_cache_records_the_concrete_device() -> None:
    """A cache built for "cuda" records the device its tensors are on ("cuda:0"), what a
    model's parameters report: a later turn on that cache is accepted (the long-context bench
    once failed on "cuda" != "cuda:0")."""
    cache = MoaCache(plan_for(), 1, 64, devices="cuda")
    here = torch.device("cuda", torch.cuda.current_device())
    assert {layer.device for layer in cache.moa_layers} == {here}
    assert {layer.keys.device for layer in cache.moa_layers} == {here}


def test_cache_devices_as_strings_or_devices() -> None:
    a = MoaCache(plan_for(), 1, 64, devices="cpu")
    b = MoaCache(plan_for(), 1, 64, devices=[torch.device("cpu")] * 3)
    assert [layer.device for layer in a.moa_layers] == [layer.device for layer in b.moa_layers] == [torch.device("cpu")] * 3


def test_values_take_the_configs_value_head_dim() -> None:
    """A config with v_head_dim (MiMo-V2-Flash: values narrower than keys): the cache keeps
    values at that width, and the dense-size count adds both widths."""
    from moa_flex.support import tiny_config

    config = tiny_config("mimo_v2_flash")
    plan = Plan.dense(config)
    cache = MoaCache(plan, 2, 64, config=config)
    assert cache.value_dims == [config.v_head_dim] * plan.num_layers and cache.head_dims == [config.head_dim] * 2
    for layer in cache.moa_layers:
        assert layer.keys.shape[-1] == config.head_dim and layer.values.shape[-1] == config.v_head_dim
    per_token = (config.head_dim + config.v_head_dim) * plan.num_kv_heads * 4  # fp32, summed over layers below
    assert cache.dense_memory_bytes() == per_token * plan.num_layers * 2 * 64


def test_ops_that_write_take_every_argument_without_a_default() -> None:
    """torch 2.11's dispatcher drops trailing arguments equal to their defaults before the
    in-place version bump of a mutating custom op, which then indexes past them (IndexError in
    every compiled prefill on the H200's torch 2.11); so no moa_flex op that writes a tensor may
    give any argument a default."""
    import moa_flex.runtime.ops  # noqa: F401  (registers the ops)

    mutating = []
    for name in dir(torch.ops.moa_flex):
        packet = getattr(torch.ops.moa_flex, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        schema = packet.default._schema
        if schema.is_mutable:
            mutating.append(name)
            assert not [a.name for a in schema.arguments if a.has_default_value()], f"moa_flex::{name}: {schema}"
    assert {"cache_extend", "cache_append", "chunk_prefill"} <= set(mutating)
