"""A model that runs a middle section of its decoder layers several times per forward, each loop
on cache slots of its own appended after the decoder layers (Dory's ``per_loop`` cache): one rule
per slot, and the calls visit the slots out of order (input layers, loop 0, loops 1.., output
layers).

The passes map the k-th attention call to the plan's ``call_slots[k]``, derived from the config
(``architecture.call_slots``); the reference finds each call's slot from the ``cache_offset``
Dory's own code passes (a forward pre-hook), so the two agree only if the derivation is right.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

import moa_flex
import moa_flex.passes.nodes as nodes
from moa_flex.architecture import call_slots, slot_layers
from moa_flex.plan import ModelShape, Plan
from moa_flex.reference import planned_logits, reference_logits
from moa_flex.support import _build, causal_lm_types
from tiny_models import ids_of, record_written_slots, slots_called

pytestmark = pytest.mark.skipif("dory" not in causal_lm_types(),
                                reason=f"transformers {transformers.__version__} has no dory")


def test_call_slots_are_the_ones_dorys_code_visits() -> None:
    """Two input, two recurrent, one output layer, three loops: 9 slots, visited
    0-3 (input, loop 0), 5-6 and 7-8 (loops 1 and 2), 4 (output)."""
    model = _build("dory", num_hidden_layers=5, layer_types=["sliding_attention", "full_attention"] * 2
                   + ["sliding_attention"], n_input_layers=2, n_recurrent_layers=2, n_output_layers=1,
                   n_recurrent_loops=3)
    config = model.config
    assert call_slots(config) == (0, 1, 2, 3, 5, 6, 7, 8, 4)
    assert tuple(slots_called(model, ids_of(12, batch=1), "DoryAttention", "cache_offset")) == call_slots(config)
    assert slot_layers(config) == [0, 1, 2, 3, 4, 2, 3, 2, 3]  # the decoder layer whose module writes each slot
    shape = ModelShape.from_config(config)
    assert (shape.num_layers, shape.call_slots) == (9, call_slots(config))


def test_each_slot_gets_its_own_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that cuts only slot 3 (the looped layer's second loop; the output layer, called
    after it, owns slot 2) changes the logits, and the compiled model follows the reference there,
    and equals the stock model with a dense plan: a mapping by call order would give that rule to
    the output layer. Generate runs over one cache layer per slot; the passes check each cache
    write's slot against the plan's call order."""
    written = record_written_slots(monkeypatch)
    model = _build("dory", initializer_range=0.1)  # larger weights: one slot's rule moves the logits by 1e-2
    shape = ModelShape.from_config(model.config)
    assert shape.call_slots == (0, 1, 3, 2)
    ids = ids_of(96, batch=1)
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
    dense = Plan.dense(shape, granularity="kv_head")
    alpha, beta = torch.as_tensor(dense.alpha).tolist(), torch.as_tensor(dense.beta).tolist()
    alpha[3], beta[3] = [16.0] * shape.num_kv_heads, [0.0] * shape.num_kv_heads  # 4 sinks + 12 recent
    plan = Plan(shape, alpha, beta, granularity="kv_head", sink=4, min_span=8, span_multiple=4)
    want = reference_logits(model, plan, input_ids=ids)
    assert (want - stock).abs().max() > 1e-2, "the rule of slot 3 must cut"
    moa_flex.compile(model, plan, backend="eager", progress=False)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4
    model.moa_flex.set_plan(dense)  # the same graph: a dense plan is the stock model
    with torch.no_grad():
        assert (model(input_ids=ids, use_cache=False).logits - stock).abs().max() <= 1e-5
    model.moa_flex.set_plan(plan)
    batch = ids_of(40, batch=2, seed=4)
    with torch.no_grad():
        seq = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert len(model.moa_flex.cache.layers) == 4  # Dory appends no layers to a cache that has its slots
    ref = planned_logits(model, plan, 46, seq[:, :-1], torch.ones_like(seq[:, :-1]))
    assert torch.equal(ref[:, 39:].argmax(-1), seq[:, 40:])
    order = ([0, 1, 3, 2], (0, 1, 3, 2))  # the slots written, the plan's call order they were checked against
    assert written == {"prefill cache_extend": order, "decode cache_append": order}


def test_a_cache_write_off_the_plans_call_order_is_refused() -> None:
    with pytest.raises(ValueError, match=r"do not follow the order \[0, 1, 3, 2\]"):
        graph = torch.fx.Graph()
        keys = graph.placeholder("keys")
        keys.meta["grapharg"] = SimpleNamespace(source=SimpleNamespace(name="L['cache'].layers[3].keys"))
        write = graph.call_function(torch.ops.moa_flex.cache_extend.default, (keys,))
        nodes._check_slots_in_call_order([write], "cache_extend", "prefill", (0, 1, 3, 2))


def test_a_last_loop_cache_is_refused_at_compile() -> None:
    """``last_loop``: the loops before the last read the last loop's cache layers without
    writing them, which a MoA cache (each slot keeps what its own calls wrote) does not model."""
    model = _build("dory", recurrent_kv_cache_mode="last_loop")
    assert slot_layers(model.config) is None
    with pytest.raises(ValueError, match="recurrent_kv_cache_mode='last_loop'.*load it with recurrent_kv_cache_mode="):
        moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False)


def test_the_plan_records_the_call_order_and_checks_it() -> None:
    model = _build("dory")
    plan = Plan.dense(model.config)
    again = Plan.from_dict(plan.to_dict())
    assert again.model.call_slots == (0, 1, 3, 2)
    again.check_model(model.config)
    looped_thrice = _build("dory", n_recurrent_loops=3).config
    with pytest.raises(ValueError, match="num_layers = 4 but the model has cache slots = 5"):
        plan.check_model(looped_thrice)
    data = plan.to_dict()
    data["model"]["call_slots"] = [0, 1, 1, 2]
    with pytest.raises(ValueError, match="call_slots must list every layer of the plan once"):
        Plan.from_dict(data)


def test_profiling_is_refused_naming_why() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="Dory's recurrent loops"):
        _check_profilable(_build("dory"), 64)
