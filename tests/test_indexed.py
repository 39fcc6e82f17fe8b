"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5, HY-V4, AXK2): an indexer selects each
query's keys; the plan's rule goes into the indexer (its top-k picks among the keys the rule
keeps) and the selection stays in the attention (passes/indexed.py).

Oracles: the stock model (a dense plan changes nothing), and the independent reference
(moa_flex/reference.py: float64 attention under the brute-force rule, the indexer's mask ANDed
with the same rule by a forward hook, the selection read from the indices transformers hands
the attention function). Decoding over a MoA cache is refused until the cache keeps the
indexer's keys.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import moa_flex
import moa_flex.reference as reference
from moa_flex.masks import reference_mask, selection_keep
from moa_flex.plan import ModelShape, Plan
from moa_flex.reference import reference_logits
from moa_flex.support import _random_plan, tiny_config

LENGTH = 24
TOPK = 6  # below the rules' spans: the selection and the rule both cut


def _dsa_model(model_type: str = "deepseek_v32") -> torch.nn.Module:
    config = tiny_config(model_type)
    config.index_topk = TOPK
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _compiled(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-mask note: a selection is ANDed in densely, as documented
        moa_flex.compile(model, plan, backend="eager", progress=False, compile_cache=False)
    return model


def _logits(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("model_type", ["deepseek_v32", pytest.param("glm_moe_dsa", marks=pytest.mark.slow)])
def test_a_dense_plan_is_the_stock_model(model_type: str) -> None:
    model = _dsa_model(model_type)
    ids = _ids()
    stock = _logits(model, input_ids=ids)
    dense = _logits(_compiled(model, Plan.dense(model.config)), input_ids=ids)
    assert float((dense - stock).abs().max()) <= 1e-5


def _padded() -> dict[str, torch.Tensor]:
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def test_a_sparse_plan_matches_the_reference_with_left_padding() -> None:
    model = _dsa_model()
    plan = _random_plan(model.config)
    inputs = _padded()
    got = _logits(_compiled(model, plan), **inputs)
    want = reference_logits(model, plan, pads=[5, 0], **inputs)
    real = inputs["attention_mask"].bool()
    assert float((got - want)[real].abs().max()) <= 1e-4


@pytest.mark.slow  # inductor compiles of three layers: about 1 min (make test-slow)
def test_regional_compilation_shares_indexed_layers() -> None:
    """Through inductor with regional compilation, layers share compiled code (the indexer's keep
    rule reads its layer from the runtime, as attention does) and the logits still equal the
    reference's."""
    config = tiny_config("deepseek_v32")
    config.index_topk, config.num_hidden_layers = TOPK, 3
    config.layer_types, config.mlp_layer_types = ["indexed_attention"] * 3, ["dense"] * 3
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    plan = _random_plan(model.config)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moa_flex.compile(model, plan, progress=False, compile_cache=False)
    got = _logits(model, input_ids=ids)
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) <= 1e-4
    (report,) = model.moa_flex.region_reports
    # layer 2 runs layer 1's code; layer 0 compiles apart: it computes the indexer's k = min(index_topk,
    # keys), a symbolic size Dynamo computes once, which the later layers take as an input
    assert report.layers == [0, 1, 2] and report.shared == {2: 1}, report


def test_the_indexer_picks_among_the_kept_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selecting first and applying the rule after gives other logits (so the composition is
    tested): the reference without its indexer hook is far from moa-flex's output."""
    model = _dsa_model()
    plan = _random_plan(model.config)
    ids = _ids()
    got = _logits(_compiled(model, plan), input_ids=ids)
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) <= 1e-4
    monkeypatch.setattr(reference, "_rule_indexers", lambda m: [])
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) > 1e-2


def test_generate_over_a_moa_cache_is_refused() -> None:
    model = _compiled(_dsa_model(), Plan.dense(tiny_config("deepseek_v32")))
    with pytest.raises(NotImplementedError, match="does not yet keep the indexer's keys"):
        model.generate(input_ids=_ids(1), max_new_tokens=2, do_sample=False)


def test_per_head_rules_are_refused_in_an_indexed_layer() -> None:
    """One selection serves all heads of a layer, so their rule must be one."""
    model = _dsa_model()
    shape = ModelShape.from_config(model.config)
    H = shape.num_heads
    alpha = [[4.0 + 4 * (h % 2) for h in range(H)] for _ in range(shape.num_layers)]
    plan = Plan(shape, alpha, [[0.0] * H] * shape.num_layers, granularity="head", sink=2, min_span=4,
                span_multiple=2)
    _compiled(model, plan)
    with pytest.raises(ValueError, match="selects keys with an indexer"):
        _logits(model, input_ids=_ids())


def test_an_indexer_of_blocks_is_refused_at_compile() -> None:
    config = tiny_config("kolibri1_1")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="indexer is not DeepSeek Sparse Attention's"):
        moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)


def test_profiling_refuses_an_indexer() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="DeepSeek Sparse Attention"):
        _check_profilable(_dsa_model(), LENGTH)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 4), st.data())
def test_selection_keep_is_the_rule_per_row(kv_len: int, sink: int, data: st.DataObject) -> None:
    """The dense keep of an indexed layer equals the brute-force rule of each row's real tokens
    (a row's span: the plan's at the row's planned length, its real tokens)."""
    q_len = data.draw(st.integers(1, kv_len))
    pads = data.draw(st.lists(st.integers(0, kv_len - 1), min_size=1, max_size=3))
    plans, spans = [], []
    for pad in pads:
        alpha = float(data.draw(st.integers(sink + 1, kv_len + sink + 1)))
        plan = Plan(ModelShape(1, 1, 1, 8), [[alpha]], [[0.0]], sink=sink, min_span=sink + 1, span_multiple=1)
        plans.append(plan)
        spans.append(int(plan.head_spans(kv_len - pad)[0, 0]))
    got = selection_keep(torch.tensor(spans), sink, torch.tensor(pads), q_len, kv_len)
    for b, (pad, plan) in enumerate(zip(pads, plans)):
        n = kv_len - pad
        want = torch.zeros(q_len, kv_len, dtype=torch.bool)
        rows = min(q_len, n)  # query rows past the pad; the ones inside it keep nothing
        want[q_len - rows:, pad:] = reference_mask(plan, 0, n, rows, n - rows, n)[0]
        assert torch.equal(got[b], want), (b, pad, spans[b])
