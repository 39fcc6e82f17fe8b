"""moa_flex.compile on tiny random-weight HF decoders (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.attention import length_bucket
from reference import reference_logits
from tiny_models import D, H, KVH, L, SEQ, dense_mask_nodes, ids_of, sparse_plan, tiny_model

EAGER = {"backend": "eager"}  # semantics tests: no inductor (its whole-model path is tested once per kind)


def test_model_sliding_window_is_kept() -> None:
    """A model window (Mistral, 100 tokens < SEQ) is ANDed in: the plan never widens it."""
    model = tiny_model("mistral", sliding_window=100)
    config = model.config
    ids = ids_of(SEQ)
    plan = sparse_plan(config, "kv_head", seed=7)
    want = reference_logits(model, plan, input_ids=ids)
    dense_want = reference_logits(model, Plan.dense(config), input_ids=ids)
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
    assert (dense_want - stock).abs().max() <= 1e-4, "reference sees the model's window"
    moa_flex.compile(model, plan, **EAGER)
    with pytest.warns(UserWarning, match="sliding"), torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4


def test_right_padding_takes_the_dense_path() -> None:
    model = tiny_model("llama")
    plan = sparse_plan(model.config, "kv_head", seed=9)
    ids = ids_of(SEQ)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 40 :] = 0
    want = reference_logits(model, plan, [0, 0], input_ids=ids, attention_mask=mask)
    moa_flex.compile(model, plan, **EAGER)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (got[0] - want[0]).abs().max() <= 1e-4
    assert (got[1, : SEQ - 40] - want[1, : SEQ - 40]).abs().max() <= 1e-4


@pytest.mark.parametrize("kv_heads,granularity", [(H, "head"), (KVH, "head")])
def test_per_query_head_plans(kv_heads: int, granularity: str) -> None:
    """MHA, and per-query-head rules on a GQA model (MoA's own plans)."""
    model = tiny_model("llama", kv_heads=kv_heads)
    ids = ids_of(SEQ)
    plan = sparse_plan(model.config, granularity, seed=3)
    want = reference_logits(model, plan, input_ids=ids)
    moa_flex.compile(model, plan, **EAGER)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4


def test_left_padded_batch_rows_equal_rows_alone() -> None:
    model = tiny_model("llama")
    plan = sparse_plan(model.config, "kv_head", seed=5)
    lengths = [SEQ, SEQ - 57]
    ids = ids_of(SEQ)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, : SEQ - lengths[1]] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    moa_flex.compile(model, plan, **EAGER)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    gm = model.moa_flex.reports[-1].graph_module
    infos = [n for n in gm.graph.nodes if n.target == torch.ops.moa_flex.mask_info.default]
    assert len(infos) == 1, "the mask is analysed once per forward, not per layer"
    assert not dense_mask_nodes(gm), "the model's dense [B, 1, Q, K] mask is no longer built"
    with torch.no_grad():
        for b, n in enumerate(lengths):
            alone = model(input_ids=ids[b : b + 1, SEQ - n :], use_cache=False).logits
            assert (batch[b, SEQ - n :] - alone[0]).abs().max() <= 1e-4, b
    moa_flex.uncompile(model)
    # and the same batch through the independent reference
    pads = [SEQ - n for n in lengths]
    want = reference_logits(model, plan, pads, input_ids=ids, attention_mask=mask, position_ids=position_ids)
    assert (batch[1, SEQ - lengths[1] :] - want[1, SEQ - lengths[1] :]).abs().max() <= 1e-4


def test_lengths_do_not_recompile_the_model() -> None:
    """Policy: the model graph compiles once (dynamic shapes); FlexAttention once per length bucket."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    plan = sparse_plan(model.config, "kv_head")
    moa_flex.compile(model, plan)
    with torch.no_grad():
        # Warm-up: the first call traces the model; the second may add one FlexAttention
        # variant (the first call's tensors carry another dispatch key set).
        model(input_ids=ids_of(SEQ), use_cache=False)
        model(input_ids=ids_of(SEQ - 1), use_cache=False)
        graphs = counters["stats"]["unique_graphs"]
        for n in (SEQ - 2, SEQ + 41, 290):  # same bucket as SEQ
            assert length_bucket(n) == length_bucket(SEQ)
            got = model(input_ids=ids_of(n, seed=n), use_cache=False).logits
        assert counters["stats"]["unique_graphs"] == graphs, "no compile within a bucket"
        model.moa_flex.set_plan(Plan.dense(model.config))  # the same model graph, every span dense
        dense = model(input_ids=ids_of(290, seed=290), use_cache=False).logits
    assert len(model.moa_flex.reports) == 1, "the model graph was traced once"
    # regional compilation (the default): layer 0 compiled, layer 1 running its code
    assert [(r.layers, r.compiles, r.shared) for r in model.moa_flex.region_reports] == [([0, 1], 1, {1: 0})]
    moa_flex.uncompile(model)
    want = reference_logits(model, plan, input_ids=ids_of(290, seed=290))
    assert (got - want).abs().max() <= 1e-4
    with torch.no_grad():
        assert (dense - model(input_ids=ids_of(290, seed=290), use_cache=False).logits).abs().max() <= 1e-5


def test_set_plan_switches_without_recompiling() -> None:
    model = tiny_model("llama")
    first, second = sparse_plan(model.config, "kv_head", seed=1), sparse_plan(model.config, "head", seed=2)
    ids = ids_of(SEQ)
    want = reference_logits(model, second, input_ids=ids)
    moa_flex.compile(model, first, **EAGER)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        model.moa_flex.set_plan(second)
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4
    assert len(model.moa_flex.reports) == 1, "the model graph was not traced again"
    with pytest.raises(ValueError, match="num_layers"):
        model.moa_flex.set_plan(Plan.dense(ModelShape(L + 1, H, KVH, D)))


def test_backend_in_a_torch_compile_workflow() -> None:
    model = tiny_model("qwen2")
    plan = sparse_plan(model.config, "head", seed=6)
    ids = ids_of(SEQ)
    want = reference_logits(model, plan, input_ids=ids)
    compiled = torch.compile(model, backend=moa_flex.backend(plan, config=model.config, inner="eager"), dynamic=True,
                             fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4


def test_flex_attention_model_is_switched_to_sdpa() -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("flex_attention")
    plan = sparse_plan(model.config, "kv_head", seed=4)
    ids = ids_of(SEQ)
    want = reference_logits(model, plan, input_ids=ids)
    moa_flex.compile(model, plan, **EAGER)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-4
    moa_flex.uncompile(model)
    assert model.config._attn_implementation == "flex_attention"


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_model("llama")
    wrong = Plan.dense(ModelShape(L + 1, H, KVH, D))
    with pytest.raises(ValueError, match="num_layers"):
        moa_flex.compile(model, wrong)
    with pytest.raises(ValueError, match="num_heads"):
        moa_flex.compile(model, Plan.dense(ModelShape(L, 2 * H, KVH, D)))
    with pytest.raises(TypeError, match="Plan"):
        moa_flex.compile(model, {"alpha": []})
    assert getattr(model, "moa_flex", None) is None, "nothing half-applied"
    model.model.layers[1]._hf_hook = object()  # what accelerate's dispatch_model (device_map) leaves
    with pytest.raises(ValueError, match="'model.layers.1' carries an accelerate hook of type object"):
        moa_flex.compile(model, Plan.dense(ModelShape(L, H, KVH, D)))
    del model.model.layers[1]._hf_hook
    assert getattr(model, "moa_flex", None) is None
    # attention patterns moa-flex does not model are refused, not replaced by causal + window
    model.config.layer_types = ["full_attention", "indexed_attention"]
    with pytest.raises(ValueError, match="indexed_attention"):
        moa_flex.compile(model, Plan.dense(model.config))
    model.config.layer_types = None
    model.config.attention_chunk_size = 64
    with pytest.raises(ValueError, match="chunked local attention"):
        moa_flex.compile(model, Plan.dense(model.config))
    model.config.attention_chunk_size = None
    assert getattr(model, "moa_flex", None) is None

    from moa_flex.passes.attention_pass import make_backend

    from torch.nn.attention.flex_attention import flex_attention

    flex_fn = torch.compile(
        lambda q, k, v: flex_attention(q, k, v), backend=make_backend(Plan.dense(ModelShape(L, H, KVH, D)), 0), fullgraph=True
    )
    with pytest.raises(Exception, match="attn_implementation='sdpa'"):
        flex_fn(*(torch.randn(1, H, 128, D) for _ in range(3)))

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    fn = torch.compile(mlp, backend=make_backend(Plan.dense(ModelShape(L, H, KVH, D)), 0), fullgraph=True)
    with pytest.raises(Exception, match="no attention call"):
        fn(torch.randn(2, 4))


def test_op_rejects_bad_masks() -> None:
    from moa_flex.runtime.attention import MoaRuntime

    runtime = MoaRuntime(sparse_plan(tiny_model("llama").config, "kv_head"))
    q, k = torch.randn(1, H, 8, D), torch.randn(1, KVH, 8, D)
    with pytest.raises(ValueError, match="2-D"):
        runtime.attention(q, k, k, torch.ones(1, 8, 8, dtype=torch.bool), -1.0, 0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        runtime.attention(q, k, k, torch.ones(1, 9, dtype=torch.bool), -1.0, 0, 0.0)
    with pytest.raises(NotImplementedError, match="MoaCache"):
        runtime.attention(q[:, :, :1], k, k, None, -1.0, 0, 0.0)
    runtime.close()


def test_generate_and_uncompile() -> None:
    model = tiny_model("llama")
    original = model.forward
    moa_flex.compile(model, sparse_plan(model.config, "kv_head"))
    with pytest.raises(ValueError, match="already compiled"):
        moa_flex.compile(model, Plan.dense(model.config))
    moa_flex.uncompile(model)
    assert model.forward == original and not hasattr(model, "moa_flex")
    out = model.generate(input_ids=ids_of(8), max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 10)


def test_bidirectional_attention_is_refused_at_compile() -> None:
    """An encoder's causal-LM head without is_decoder attends both ways: refused by name before
    anything changes (the first-call guard caught it as a 0.49 difference before); with
    is_decoder=True the same architecture is a causal decoder and compiles."""
    import transformers

    config = transformers.BertConfig(num_hidden_layers=L, num_attention_heads=H, hidden_size=H * D, intermediate_size=64,
                                     vocab_size=128, attn_implementation="sdpa")
    model = transformers.BertLMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"bidirectional \(encoder\.layer\.0\.attention\.self has is_causal=False"):
        moa_flex.compile(model, Plan.dense(config), **EAGER)
    assert getattr(model, "moa_flex", None) is None and model.config._attn_implementation == "sdpa"
    config.is_decoder = True
    assert_dense_equals_stock(transformers.BertLMHeadModel(config).eval())


def assert_dense_equals_stock(model: torch.nn.Module) -> None:
    """A dense plan compiled onto ``model`` gives the stock logits (1e-5) on a 40-token batch."""
    ids = ids_of(40)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    moa_flex.compile(model, Plan.dense(model.config), **EAGER)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - stock).abs().max() <= 1e-5


def test_xlm_masked_lm_is_refused_and_its_causal_form_compiles() -> None:
    """XLM is a masked LM unless its config says causal=True (no is_causal attribute to read):
    refused by name at compile; with causal=True its attention modules (``attentions.N``, a list
    beside the layers' other lists rather than a decoder-layer module) map to layers and a dense
    plan equals the stock model."""
    import transformers

    config = transformers.XLMConfig(n_layers=L, n_heads=H, emb_dim=H * D, vocab_size=128, causal=False)
    model = transformers.XLMWithLMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"causal=False: its attention is bidirectional"):
        moa_flex.compile(model, Plan.dense(config), **EAGER)
    assert getattr(model, "moa_flex", None) is None
    config.causal = True
    assert_dense_equals_stock(transformers.XLMWithLMHeadModel(config).eval())


@pytest.mark.parametrize("model_type,match", [
    ("inkling_text", "sliding-window layers run a head layout of their own .swa_num_attention_heads=64 against 4"),
])
def test_attention_moa_flex_cannot_rewrite_is_refused_at_compile(model_type: str, match: str) -> None:
    import transformers

    from moa_flex.support import tiny_config

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = tiny_config(model_type)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        moa_flex.compile(model, Plan.dense(config), **EAGER)
    assert getattr(model, "moa_flex", None) is None and model.config._attn_implementation == before


def test_layers_running_more_kv_heads_than_the_plan_are_refused_at_compile() -> None:
    """A layer may run a divisor of the plan's KV heads (its cache holds them expanded), not more:
    a model running 2 KV heads whose config (and plan) says 1 is refused before anything changes."""
    import transformers

    model = tiny_model("llama")  # 4 query / 2 KV heads run
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": 1})
    model.config = config
    with pytest.raises(ValueError, match=r"decoder layer 0 of LlamaForCausalLM runs 2 KV heads, the config \(and the "
                                         r"plan\) 1"):
        moa_flex.compile(model, Plan.dense(config), **EAGER)
    assert getattr(model, "moa_flex", None) is None


def test_learned_sinks_on_the_cpu_need_the_eager_backend() -> None:
    """Inductor's CPU FlexAttention returns no log-sum-exp, from which the sinks are applied:
    refused at compile time by name, not failed at the first call."""
    model = tiny_model("gpt_oss")
    with pytest.raises(NotImplementedError, match="backend='eager'"):
        moa_flex.compile(model, Plan.dense(model.config))
    assert getattr(model, "moa_flex", None) is None


def test_a_decode_step_takes_copies_of_its_arguments_without_a_new_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph capture calls the compiled step with copies of its tensor arguments; the
    step passes its own arguments as non-views (generate's ``input_ids[:, None]`` is a view,
    which Dynamo guards through its base), so the copies reuse the graph: no second trace."""
    from torch._dynamo.utils import counters

    import moa_flex.runtime.forward as fw

    model = tiny_model("llama", layers=1)
    moa_flex.compile(model, Plan.dense(model.config), max_length=64, progress=False, verify=False, **EAGER)
    steps = []
    step = fw._decode_step

    def spy(state, cache, kwargs, n):  # noqa: ANN001, ANN202
        out = step(state, cache, kwargs, n)
        steps.append((state, dict(kwargs)))
        return out

    monkeypatch.setattr(fw, "_decode_step", spy)
    ids = ids_of(20, batch=2)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
        graphs = counters["stats"]["unique_graphs"]
        state, kwargs = steps[-1]
        copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with fw.dynamo_policy():
            state.compiled_decode(**copies)
    assert steps and counters["stats"]["unique_graphs"] == graphs, "the copies traced the step again"
