"""Hybrid models: softmax attention in some decoder layers, linear attention (or Mamba,
convolutions) in the others. The plan rules the attention layers only and names them; the
MoA cache holds those layers and leaves the others' state to transformers (tiny Qwen3-Next,
CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.architecture import step_graph_problem
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.cache import MoaCache, MoaCacheLayer
from conversation import converse, padded_prompt
from tiny_models import ids_of, sparse_plan, tiny_model

LAYERS = 4  # linear, attention, linear, attention


def test_a_hybrid_plan_rules_its_attention_layers_only(tmp_path) -> None:  # noqa: ANN001
    config = tiny_model("qwen3_next", layers=LAYERS).config
    shape = ModelShape.from_config(config)
    assert (shape.num_layers, shape.layers, shape.total_layers) == (2, (1, 3), LAYERS)
    assert [shape.plan_layer(i) for i in (1, 3)] == [0, 1]
    with pytest.raises(ValueError, match="decoder layer 2 is not a planned attention layer"):
        shape.plan_layer(2)
    plan = sparse_plan(config, "kv_head")
    assert tuple(plan.alpha.shape) == (2, shape.num_kv_heads), "rules for the attention layers only"
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.model == shape and again == plan
    plan.check_model(config)
    other = tiny_model("qwen3_next", layers=LAYERS, layer_types=["full_attention", "linear_attention"] * 2).config
    with pytest.raises(ValueError, match=r"plan\.model\.layers = \[1, 3\] but the model has attention layers = \[0, 2\]"):
        plan.check_model(other)


@pytest.mark.parametrize("layers,total,why", [
    ((1,), None, "come together"), ((2, 1), 4, "increasing"), ((1, 4), 4, "below total_layers"), ((1,), 4, "has 1 entries, expected num_layers = 2"),
])
def test_inconsistent_hybrid_layers_are_refused(layers: tuple, total: int | None, why: str) -> None:
    data = Plan.dense(ModelShape(2, 4, 2, 16)).to_dict()
    data["model"].update(layers=list(layers), total_layers=total)
    with pytest.raises(ValueError, match=why):
        Plan.from_dict(data)


def test_the_cache_holds_moa_layers_for_attention_and_transformers_layers_for_the_rest() -> None:
    model = tiny_model("qwen3_next", layers=LAYERS)
    plan = sparse_plan(model.config, "kv_head")
    with pytest.raises(ValueError, match="needs config="):
        MoaCache(plan, 1, 100)
    cache = MoaCache(plan, 1, 100, config=model.config)
    assert len(cache.layers) == LAYERS and cache.moa_layers == [cache.layers[1], cache.layers[3]]
    assert not any(isinstance(cache.layers[i], MoaCacheLayer) for i in (0, 2))
    assert cache.memory_bytes() == sum(layer.memory_bytes() for layer in cache.moa_layers)


def hybrid_model(kind: str) -> torch.nn.Module:
    """Qwen3-Next (linear-attention layers between attention layers) or Falcon-H1 (attention
    and Mamba side by side in every layer), tiny and random."""
    if kind == "qwen3_next":
        return tiny_model("qwen3_next", layers=LAYERS)
    import transformers

    from moa_flex.support import tiny_config

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="sdpa").eval()


@pytest.mark.slow  # 20-60 s each; the default run checks both hybrids through the support matrix subset
@pytest.mark.parametrize("kind", ["qwen3_next", "falcon_h1"])
def test_a_hybrid_conversation_in_chunks_equals_the_reference(kind: str) -> None:
    """Two turns on a left-padded batch, prefilled in chunks of 48 (the linear / Mamba states
    go from chunk to chunk and turn to turn in transformers' own cache layers, or beside the
    MoA K/V): tokens and logits equal step-by-step reference decoding of the whole
    conversation planned for N."""
    N = 300
    model = hybrid_model(kind)
    plan = sparse_plan(model.config, "head", seed=3)
    ids, mask = padded_prompt(model, plan, N)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, backend="eager", progress=False)
    for cache in converse(model, plan, N, ids, mask, (None, 30), 8, seed=20):
        assert cache.state_tensors(), "the linear layers' states live in the cache"


def test_layer_kinds_moa_flex_does_not_plan_are_refused_at_compile() -> None:
    """A layer type that is neither softmax attention moa-flex models nor a state layer it
    can leave alone (here: compressed sparse attention) is refused before anything changes."""
    model = tiny_model("qwen3_next", layers=2, layer_types=["linear_attention", "compressed_sparse_attention"])
    with pytest.raises(ValueError, match="has layers of type \\['compressed_sparse_attention'\\]"):
        moa_flex.compile(model, Plan.dense(model.config), backend="eager")
    assert getattr(model, "moa_flex", None) is None


def test_attention_calls_whose_heads_are_not_the_plans_are_refused() -> None:
    """A model whose attention calls run other head counts than its config says: a call whose
    query heads differ from the plan's is refused by the passes at the first call, naming the
    counts. (Inkling, once an IndexError in the mask, then refused so at the first call, is now
    refused at compile time from its config: its sliding layers' own head layout.)"""
    import transformers

    from moa_flex.support import check_type

    r = check_type("inkling_text")
    assert r.status == "refused" and "sliding-window layers run a head layout of their own" in r.detail
    model = tiny_model("llama")  # 4 query / 2 KV heads run; the config then claims 8 / 4 (same grouping)
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_attention_heads": 8, "num_key_value_heads": 4})
    model.config = config
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False)
    with pytest.raises(ValueError, match="the attention call has 4 query and [24] key heads, the plan 8 and 4"):
        model(input_ids=ids_of(40))


@pytest.mark.slow  # profiling a hybrid (make test-slow)
def test_a_hybrid_profile_has_its_attention_layers_and_equals_the_reference() -> None:
    """Profiling a hybrid: one histogram per attention layer (plan order), equal to the
    reference built from an independent eager attention's q, k, v, O and dO; the linear
    layers take part in the backward untouched."""
    from moa_flex.profile import profile_model
    from profile_cases import SINK, SM, calib, reference_profile

    model = hybrid_model("qwen3_next")
    samples = calib(model, [48], n=1)
    profile = profile_model(model, samples, sink=SINK, span_multiple=SM, progress=False, impl="chunked")
    assert profile.model.layers == (1, 3) and profile.hist[48].shape[0] == 2
    hist, sink, _ = reference_profile(model, samples[48][0])
    assert torch.allclose(profile.hist[48], hist, rtol=1e-5, atol=1e-12)
    assert torch.allclose(profile.sink_share[48], sink, rtol=1e-5, atol=1e-12)
    assert float(profile.hist[48].abs().sum()) > 0


@pytest.mark.slow  # Mamba in torch and step-by-step reference decoding: about 2 minutes each
@pytest.mark.parametrize("model_type", ["zamba", "zamba2"])
def test_an_attention_block_shared_by_layers_takes_each_layers_rules(model_type: str) -> None:
    """Zamba / Zamba2: one attention block (tied weights; ``layer_idx`` None or -1: the caller
    passes its layer; Zamba2 adds per-layer adapters) runs in decoder layers 1 and 3, beside
    Mamba. Each call is ruled by its own decoder layer's plan layer, and caches per layer: a
    two-turn conversation, prefilled in chunks, equals step-by-step reference decoding; the two
    attention layers' rules differ."""
    from moa_flex.support import _build

    kinds = ["linear_attention", "hybrid"] * 2
    extra = {"hybrid_layer_ids": [1, 3]} if model_type == "zamba2" else {}
    model = _build(model_type, num_hidden_layers=4, layer_types=kinds, **extra)
    shape = ModelShape.from_config(model.config)
    plan = Plan(shape, [[16.0, 96.0], [64.0, 0.0]], [[0.25, 0.0], [0.0, 0.5]], granularity="kv_head", sink=16,
                min_span=32, span_multiple=16)
    assert list(plan.model.layer_indices) == [1, 3] and plan.spans(300)[0].tolist() != plan.spans(300)[1].tolist()
    moa_flex.compile(model, plan, max_length=300, prefill_chunk=64, backend="eager")
    ids = ids_of(150, seed=7, vocab=model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    converse(model, plan, 300, ids, mask, (None, 30), 6, seed=2)


@pytest.mark.slow  # 12 s (make test-slow); the default run checks MiniMax through the support matrix subset
def test_minimax_keeps_its_linear_state_in_a_moa_cache_of_its_own_class() -> None:
    """MiniMax's forward accepts only a MiniMaxCache (its lightning-attention layers keep their
    state in the cache's linear_cache list): its MoaCache is one, the states start unset, go
    from chunk to chunk (a prompt in chunks of 48 and greedy decoding equal the reference; the
    slow hybrid conversations check later turns), and reset clears them; decode steps are not captured as CUDA graphs (the states are new
    tensors every step)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    from moa_flex.support import _build

    model = _build("minimax")
    kinds = model.config.layer_types
    assert "linear_attention" in kinds and "full_attention" in kinds
    N = 300
    plan = sparse_plan(model.config, "kv_head", seed=3)
    cache = MoaCache(plan, 2, N, config=model.config)
    assert isinstance(cache, MiniMaxCache) and isinstance(cache, MoaCache)
    assert all(cache.get_linear_cache(i) is None for i in range(len(kinds)))
    ids, mask = padded_prompt(model, plan, N)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, backend="eager", progress=False)
    last = converse(model, plan, N, ids, mask, (None,), 4, seed=20)[-1]
    assert [isinstance(last.get_linear_cache(i), torch.Tensor) for i in range(len(kinds))] == \
        [k == "linear_attention" for k in kinds]
    last.reset()
    assert all(last.get_linear_cache(i) is None for i in range(len(kinds)))
    assert "replace their state tensors" in step_graph_problem(model.config)
    assert step_graph_problem(tiny_model().config) is None
