"""Latent attention whose layers differ in query heads and latent widths (dots3: DeepSeek Sparse
Attention layers beside sliding-window latent layers of their own head layout, transformers'
``per_layer_config``): one rule a layer over each layer's own latent cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.cache import MoaCache
from moa_flex.support import _random_plan, check_type, causal_lm_types, tiny_config

pytestmark = pytest.mark.skipif("dots3_note_text" not in causal_lm_types(),
                                reason=f"transformers {transformers.__version__} has no dots3_note")


def _dots3(window: int = 5) -> torch.nn.Module:
    config = tiny_config("dots3_note_text")
    config.index_topk, config.index_n_heads, config._attn_implementation = 6, 8, "sdpa"
    config.sliding_window = window  # below the prompt: the sliding layer's own window cuts too
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _per_layer(config, name: str) -> list[int]:  # noqa: ANN001
    return [int(getattr(config.per_layer_config[i], name)) for i in range(config.num_hidden_layers)]


def test_the_shape_records_each_layers_heads_and_the_cache_takes_each_layers_widths() -> None:
    """The tiny dots3 has 4 heads and a latent of 32 in its indexed layer, 2 heads and 64 in its
    sliding one (the config raises on a global read of either): the shape keeps the heads per
    layer (the plan's JSON too), and the MoA cache gives each layer its own latent + rotary key
    width, its heads' spans, and an indexer ring only where an indexer runs."""
    config = tiny_config("dots3_note_text")
    heads, ranks = _per_layer(config, "num_attention_heads"), _per_layer(config, "kv_lora_rank")
    rope = _per_layer(config, "qk_rope_head_dim")
    assert len(set(heads)) == 2 and len(set(ranks)) == 2, "the tiny config's layers must differ"
    shape = ModelShape.from_config(config)
    assert (shape.layer_heads, shape.num_heads, shape.num_kv_heads) == (tuple(heads), max(heads), 1)
    assert shape.head_dim is None and shape.value_dim is None  # each layer's cache reads its own
    plan = _random_plan(config)
    again = Plan.from_dict(plan.to_dict())
    assert again.model == shape and torch.equal(again.alpha, plan.alpha)
    again.check_model(config)
    cache = MoaCache(plan, 2, 40, config=config)
    for l, layer in enumerate(cache.moa_layers):
        assert layer.keys.shape[-1] == ranks[l] + rope[l] and layer.values.shape[-1] == ranks[l]
        assert tuple(layer.spans.shape) == (2, heads[l])
        assert (layer.index_keys is not None) == (config.layer_types[l] == "indexed_attention")
    assert cache.memory_bytes() == sum(t.nbytes for layer in cache.moa_layers
                                       for t in (layer.keys, layer.values, layer.index_keys) if t is not None)


def test_plans_whose_layers_differ_in_heads_are_checked() -> None:
    """Only one KV head (a latent) under granularity 'kv_head' may carry per-layer heads, one
    count a layer whose largest is num_heads; a plan for other heads does not fit the model."""
    shape = ModelShape(2, 4, 1, 40, layer_heads=(4, 2))
    Plan.dense(shape)
    for bad, words in ((dict(layer_heads=(4,)), "has 1 entries"), (dict(layer_heads=(4, 0)), ">= 1"),
                       (dict(layer_heads=(3, 2)), "must be the most"), (dict(num_kv_heads=2), "one KV head")):
        with pytest.raises(ValueError, match=words):
            Plan.dense(ModelShape(**{**shape.__dict__, **bad}))
    with pytest.raises(ValueError, match="granularity 'kv_head'"):
        Plan.dense(shape, granularity="head")
    data = Plan.dense(shape).to_dict()
    data["model"]["layer_heads"] = 4
    with pytest.raises(ValueError, match="plan.model.layer_heads must be a list"):
        Plan.from_dict(data)
    with pytest.raises(ValueError, match="layer_heads"):
        Plan.dense(ModelShape(2, 4, 1, 40, layer_heads=(2, 4))).check_model(shape)
    with pytest.raises(ValueError, match="layer_heads"):
        Plan.dense(ModelShape(2, 4, 1, 40)).check_model(shape)


class _PerLayer:
    """A config whose layers differ in heads without latent attention: a global read raises as
    transformers' heterogeneous configs do (AmbiguousGlobalPerLayerAttributeError, a RuntimeError)."""

    model_type, num_hidden_layers, hidden_size = "per_layer", 2, 64
    per_layer_config = {0: SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                        1: SimpleNamespace(num_attention_heads=2, num_key_value_heads=2, head_dim=16)}

    @property
    def num_attention_heads(self) -> int:
        raise RuntimeError("num_attention_heads differs between layers")


def test_heads_that_differ_without_a_latent_are_refused() -> None:
    """With KV heads of their own, layers of other head counts would map heads to the plan's
    groups wrongly: refused by name."""
    with pytest.raises(TypeError, match="differs between attention layers .* only with latent attention"):
        ModelShape.from_config(_PerLayer())


def test_profiling_refuses_layers_that_differ_in_heads() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="differ in query heads"):
        _check_profilable(_dots3(), 32)


@pytest.mark.slow  # 11 s (make test-slow); tests/test_support.py's matrix runs dots3 with `make support`
def test_dots3_passes_the_matrix() -> None:
    r = check_type("dots3_note_text")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


@pytest.mark.slow  # 15 s each (make test-slow)
@pytest.mark.parametrize("chunk", [8, 3])
def test_a_chunked_prompt_and_a_later_turn_match_the_reference(chunk: int) -> None:
    """A left-padded prompt in chunks (the indexed layer selecting over the cache and the chunk,
    the sliding layer of other heads and latent width bounded by its own window of 5) and a
    second turn: tokens and logits equal step-by-step reference decoding."""
    from conversation import chunked_turns

    model = _dots3()
    chunked_turns(model, _random_plan(model.config), chunk)
    # a chunk over the cache keeps no call of the model's own attention for the first-call check, which
    # compares an empty cache's chunk only: the sliding layer's call would get the indexed layer's
    # all-True [B, 1, C, 1] mask, which SDPA on a GPU refuses (an H100 run did)
    assert not [line for line in model.moa_flex.log.lines if "cache was not empty" in line]
    assert [line for line in model.moa_flex.log.lines if "layers' attention equals the model's own" in line]
