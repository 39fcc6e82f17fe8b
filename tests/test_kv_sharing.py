"""KV sharing (Gemma 3n, Gemma 4's ``num_kv_shared_layers``): the last layers attend the keys
and values of the last earlier layer of their own type. Each such layer keeps a MoA cache of
its own of what it reads, under its own rules, written by its source layer's update; prefill
in chunks, later turns and decode equal step-by-step reference decoding (tiny random models,
CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers

import moa_flex
from moa_flex.architecture import kv_sources
from moa_flex.plan import ModelShape
from moa_flex.support import causal_lm_types, tiny_config
from conversation import converse, padded_prompt
from tiny_models import sparse_plan

TYPES = ["sliding_attention", "full_attention"] * 3  # 6 layers, the last 2 or 4 reading others'


def shared_config(model_type: str, shared: int, window: int = 64) -> transformers.PretrainedConfig:
    """A tiny ``model_type`` config of six layers whose last ``shared`` read earlier layers' KV."""
    if model_type not in causal_lm_types():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    base = tiny_config(model_type)
    fields = {k: v for k, v in base.to_dict().items() if k not in ("layer_types", "num_kv_shared_layers")}
    fields.update(num_hidden_layers=len(TYPES), layer_types=list(TYPES), num_kv_shared_layers=shared,
                  sliding_window=window)
    kinds = list(base.layer_types)  # one layer of each kind: per-layer lists (sizes, sparsity) go by kind
    for key, value in list(fields.items()):
        if isinstance(value, list) and len(value) == len(kinds) and key != "layer_types":
            fields[key] = [value[kinds.index(t)] for t in TYPES]
    per_layer = fields.get("per_layer_config") or {}  # Gemma 4: overrides by layer index
    if per_layer:
        fields["per_layer_config"] = {str(i): per_layer[str(kinds.index(t))] for i, t in enumerate(TYPES)
                                      if str(kinds.index(t)) in per_layer}
    return type(base)(**fields)


def brute_sources(types: list[str], shared: int) -> dict[int, int]:
    """Each of the last ``shared`` layers -> the last layer of its type among the others."""
    first = len(types) - shared
    return {i: [j for j in range(first) if types[j] == types[i]][-1] for i in range(first, len(types))}


@pytest.mark.parametrize("shared", [2, 4])
def test_each_shared_layer_reads_the_last_earlier_layer_of_its_type(shared: int) -> None:
    config = shared_config("gemma3n_text", shared)
    assert kv_sources(config, ModelShape.from_config(config)) == brute_sources(TYPES, shared)
    assert kv_sources(tiny_config("llama"), ModelShape.from_config(tiny_config("llama"))) == {}


@pytest.mark.parametrize("model_type", [
    pytest.param("gemma3n_text", marks=pytest.mark.slow),  # 11 s (make test-slow); Gemma 4's runs the same writes
    "gemma4_text",  # its reading layers run the chunk's last query only (logits_to_keep): padded queries
])
def test_a_conversation_over_shared_kv_in_chunks_equals_the_reference(model_type: str) -> None:
    """Two turns of a left-padded batch, prefilled in chunks of 48 under a sparse plan: tokens
    and logits equal reference decoding; every layer holds a cache of its own, and the reading
    layers' caches are written (they hold tokens)."""
    torch.manual_seed(0)
    config = shared_config(model_type, 2)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    N = 300
    plan = sparse_plan(model.config, "kv_head", seed=3)
    ids, mask = padded_prompt(model, plan, N)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, backend="eager", progress=False)
    caches = converse(model, plan, N, ids, mask, (None, 30), 8, seed=20)
    cache = caches[-1]
    assert len(cache.moa_layers) == len(TYPES)
    assert cache.kv_sources == {4: 2, 5: 3}
    assert [len(layer.readers) for layer in cache.moa_layers] == [0, 0, 1, 1, 0, 0]
    for reader in cache.moa_layers[4:]:
        assert bool((reader.length > 0).all()) and reader.keys.abs().sum() > 0, "written by its source"


def test_profiling_the_last_positions_queries_equals_profiling_all() -> None:
    """Gemma 4 runs its reading layers on the positions whose logits are kept only; the profiler
    pads those queries in front. No other row of those layers reaches the loss, so the
    influence equals a profile of the same model made to run every position (the config asking
    for hidden states turns Gemma 4's slicing off)."""
    from moa_flex.profile.instrument import profile_model
    from profile_cases import calib

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(shared_config("gemma4_text", 2),
                                                          attn_implementation="sdpa").eval()
    samples = calib(model, [40], n=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: with more threads the two shapes' reductions differ (4e-4)
    try:
        sliced = profile_model(model, samples, sink=4, span_multiple=8, progress=False, impl="chunked")
        model.config.output_hidden_states = True
        whole = profile_model(model, samples, sink=4, span_multiple=8, progress=False, impl="chunked")
    finally:
        torch.set_num_threads(threads)
    assert sliced.hist[40][4:].abs().sum() > 0, "the reading layers have influence"
    torch.testing.assert_close(sliced.hist[40], whole.hist[40], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(sliced.sink_share[40], whole.sink_share[40], rtol=1e-6, atol=1e-12)
