"""A model whose attention modules run several times per forward, each call on a cache slot of
its own (HRM: an L and an H stack in cycles, slot = layer_idx + cycle_offset): one rule per slot.

The passes take the k-th attention call of a graph as slot k (passes/nodes.py ``call_layers``);
the reference finds each call's slot from the offset its caller passes (a forward pre-hook), so
the two agree only if HRM's slots really rise in call order.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

import moa_flex
import moa_flex.passes.nodes as nodes
from moa_flex.plan import ModelShape, Plan
from moa_flex.reference import planned_logits, reference_logits
from moa_flex.support import _build, causal_lm_types, check_type
from tiny_models import ids_of, record_written_slots, slots_called

pytestmark = pytest.mark.skipif("hrm_text" not in causal_lm_types(),
                                reason=f"transformers {transformers.__version__} has no hrm_text")


def test_slots_rise_in_call_order_and_the_config_counts_them() -> None:
    """The premise of the passes' mapping, checked on HRM's own code."""
    model = _build("hrm_text")
    slots = slots_called(model, ids_of(12, batch=1), "HrmTextAttention", "cycle_offset")
    assert slots == list(range(model.config.num_hidden_layers))
    assert len({id(m) for m in model.modules() if type(m).__name__ == "HrmTextAttention"}) < len(slots)


@pytest.mark.slow  # 18 s (make test-slow; make support runs it too): the test below checks the same on one slot
def test_hrm_passes_the_matrix() -> None:
    """Dense == stock (1e-5), a random plan with a rule per slot == the reference (1e-4), greedy
    generate over the MoA cache token-exact against reference decoding."""
    r = check_type("hrm_text")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_each_slot_gets_its_own_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that cuts one slot only changes the logits, and the compiled model follows the
    reference there (and equals the stock model with a dense plan): a mapping by module (slot = layer_idx) would give that rule to other calls.
    The passes check each cache write's slot where the graph names it: here every one."""
    written = record_written_slots(monkeypatch)
    # one layer per stack, two L cycles per H cycle: slots 0-1 L, 2 H, 3-4 L, 5 H (the default tiny
    # config's 16 slots trace three times as long); larger weights: one slot's rule moves the logits by 1e-2
    model = _build("hrm_text", initializer_range=0.1, num_layers_per_stack=1, L_cycles=2, num_hidden_layers=6)
    shape = ModelShape.from_config(model.config)
    ids = ids_of(96, batch=1)
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
    dense = Plan.dense(shape, granularity="kv_head")
    alpha, beta = torch.as_tensor(dense.alpha).tolist(), torch.as_tensor(dense.beta).tolist()
    slot = 4  # the L stack's second call of the second H cycle (its module's layer_idx is 0)
    alpha[slot], beta[slot] = [16.0] * shape.num_kv_heads, [0.0] * shape.num_kv_heads  # 4 sinks + 12 recent
    plan = Plan(shape, alpha, beta, granularity="kv_head", sink=4, min_span=8, span_multiple=4)
    want = reference_logits(model, plan, input_ids=ids)
    assert (want - stock).abs().max() > 1e-2, "the rule of slot 4 must cut"
    moa_flex.compile(model, plan, backend="eager", progress=False)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4
    model.moa_flex.set_plan(dense)  # the same graph: a dense plan is the stock model
    with torch.no_grad():
        assert (model(input_ids=ids, use_cache=False).logits - stock).abs().max() <= 1e-5
    model.moa_flex.set_plan(plan)
    # generate over the MoA cache: one cache layer per slot, the rule of slot 4 on its layer only
    batch = ids_of(40, batch=2, seed=4)
    mask = torch.ones_like(batch)
    with torch.no_grad():
        seq = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(model.moa_flex.cache.layers) == model.config.num_hidden_layers
    ref = planned_logits(model, plan, 46, seq[:, :-1], torch.ones_like(seq[:, :-1]))
    assert torch.equal(ref[:, 39:].argmax(-1), seq[:, 40:])
    slots = list(range(model.config.num_hidden_layers))
    # HRM's slots rise in call order: the plan has no call_slots
    assert written == {"prefill cache_extend": (slots, None), "decode cache_append": (slots, None)}


def test_a_cache_write_out_of_call_order_is_refused() -> None:
    """A graph whose second cache write writes slot 0: refused, naming the slot."""
    graph = torch.fx.Graph()
    for slot in (1, 0):
        keys = graph.placeholder(f"keys_{slot}")
        keys.meta["grapharg"] = SimpleNamespace(source=SimpleNamespace(name=f"L['cache'].layers[{slot}].keys"))
        graph.call_function(torch.ops.moa_flex.cache_extend.default, (keys,))
    writes = [n for n in graph.nodes if n.op == "call_function"]
    assert [nodes.written_slot(n) for n in writes] == [1, 0]
    with pytest.raises(ValueError, match="call 0 writes cache slot 1"):
        nodes._check_slots_in_call_order(writes, "cache_extend", "prefill")


def test_cycles_and_kv_sharing_together_are_refused() -> None:
    with pytest.raises(ValueError, match="several times per forward and shares keys and values"):
        nodes.by_layer([], "cache_extend", None, "prefill", sources={1: 0}, in_call_order=True)


def test_profiling_is_refused_naming_why() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="several times per forward"):
        _check_profilable(_build("hrm_text"), 64)
