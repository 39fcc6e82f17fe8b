"""Tiny random-weight transformers models and inputs shared by the tests (CPU, fp32).

One builder for every family the tests use (:func:`tiny_model`), with the default shape
``L, H, KVH, D`` = 2 layers, 4 query / 2 KV heads of 16; ``SEQ`` = 300 tokens lies in one
FlexAttention length bucket (384), shared by most tests to limit compiles.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import transformers

from moa_flex.plan import ModelShape, Plan
from moa_flex.zoo.train import TrainConfig

L, H, KVH, D = 2, 4, 2, 16
VOCAB = 128
SEQ = 300
PROMPT, NEW = 290, 10  # generate tests: planned length 300, the bucket of SEQ

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": D}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"sliding_window": None, "pad_token_id": 0}),
    # soft-capping, query_pre_attn_scalar scale, and every other layer a 128-token window of its own
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": D, "sliding_window": 128, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 0.5}),
    # MoE: every layer routes to 4 experts and adds a shared expert in place (out.add_), which
    # the passes once dropped; full attention in every layer (tests/test_chunked_attention.py
    # takes its chunked local attention)
    "llama4_moe": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM,
                   # a chunk size (transformers 5.17 builds the chunked mask whatever the layers) but no chunked layer
                   {"head_dim": D, "intermediate_size_mlp": 128, "num_local_experts": 4, "attention_chunk_size": 8192,
                    "layer_types": lambda layers: ["full_attention"] * layers}),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"sliding_window": None, "num_local_experts": 4}),
    # a hybrid: gated-delta-net linear attention in layers 0 and 2, softmax attention in 1 and 3
    # (a depth of 2 keeps one of each); MoE feed-forward
    "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM,
                   {"head_dim": D, "linear_key_head_dim": D, "linear_value_head_dim": D, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                    "layer_types": lambda layers: ["linear_attention", "full_attention"] * (layers // 2)}),
    # learned attention sinks (a softmax term per head without a value), every other layer a
    # 128-token window of its own, MoE
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                {"head_dim": D, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 128,
                 "layer_types": lambda layers: ["sliding_attention", "full_attention"] * (layers // 2)}),
}
EAGER_ONLY = {"gemma2", "gpt_oss"}  # HF's sdpa refuses soft-capping and learned sinks: the stock model runs eager
WINDOWED = {"gemma2", "gpt_oss"}  # layers with a window of the model's own keep the model's mask


def tiny_model(family: str = "llama", *, layers: int = L, heads: int = H, kv_heads: int = KVH, head_dim: int = D,
               vocab: int = VOCAB, intermediate: int = 128, max_positions: int = 4096, seed: int = 0,
               dtype: torch.dtype = torch.float32, attn: str | None = None, **extra) -> transformers.PreTrainedModel:  # noqa: ANN003
    """A tiny random model of ``family`` in eval mode, weights from ``seed``; ``attn``: the
    attention implementation (default sdpa, eager for families whose sdpa refuses them)."""
    config_cls, model_cls, family_extra = FAMILIES[family]
    family_extra = {k: v(layers) if callable(v) else v for k, v in family_extra.items()}  # per-depth values
    config = config_cls(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_size=heads * head_dim, intermediate_size=intermediate, vocab_size=vocab,
        max_position_embeddings=max_positions, **{**family_extra, **extra},
    )
    config._attn_implementation = attn or ("eager" if family in EAGER_ONLY else "sdpa")
    torch.manual_seed(seed)
    return model_cls(config).eval().to(dtype)


def sparse_plan(config: transformers.PretrainedConfig | ModelShape, granularity: str, seed: int = 0) -> Plan:
    """Heterogeneous spans well below SEQ, so the masks really cut (sink 16, spans in 16s)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    g = shape.num_kv_heads if granularity == "kv_head" else shape.num_heads
    gen = torch.Generator().manual_seed(seed)
    alpha = (torch.randint(-2, 6, (shape.num_layers, g), generator=gen) * 16).double().tolist()
    beta = (torch.randint(0, 5, (shape.num_layers, g), generator=gen) / 8).tolist()
    return Plan(shape, alpha, beta, granularity=granularity, sink=16, min_span=32, span_multiple=16)


def ids_of(length: int, batch: int = 2, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """Random token ids [batch, length] (no token 0, the pad of the generate tests)."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def prompt_ids(batch: int = 2, length: int = PROMPT, seed: int = 5) -> torch.Tensor:
    return ids_of(length, batch, seed)


def run_generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, new: int = NEW):  # noqa: ANN201
    """Greedy generate returning the dict output with logits (pad token 0)."""
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=new,
            do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
        )


def dense_mask_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes of a graph that produce a 4-D bool tensor (a dense attention mask) the graph's
    output depends on (a mask the model builds and never uses, like transformers 5.17's
    Llama 4 chunked mask without chunked layers, is dead code inductor drops)."""
    live: set[torch.fx.Node] = set()
    work = [n for n in gm.graph.nodes if n.op == "output"]
    while work:
        node = work.pop()
        if node not in live:
            live.add(node)
            work.extend(node.all_input_nodes)
    out = []
    for n in gm.graph.nodes:
        if n not in live:
            continue
        val = n.meta.get("val", n.meta.get("example_value"))
        if isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype == torch.bool:
            out.append(n)
    return out


def tiny_train_config(out: object, **kw: object) -> TrainConfig:
    """A needle-model training run small enough for the CPU (seconds): 2 layers, hidden 32."""
    base = TrainConfig(
        out=str(out), seed=0, steps=40, tokens_per_step=512, lengths=(64, 96), curriculum=0.5, record_spacing=16,
        question_spacing=32, lr=3e-3, min_lr=3e-4, warmup=5, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16,
        intermediate=64, max_position=128, device="cpu", workers=0, eval_lengths=(64, 96), eval_depths=(0.0, 1.0),
        eval_samples=4, log_every=5, progress=False, verbose=False, induction_steps=10, induction_length=33,
    )
    return replace(base, **kw)


def slots_called(model: torch.nn.Module, ids: torch.Tensor, attention: str, offset: str) -> list[int]:
    """The cache slot of each attention call of one forward, in call order, as the model's own
    code computes it: ``layer_idx`` + the ``offset`` keyword its caller passes to the modules of
    class ``attention`` (HRM's ``cycle_offset``, Dory's ``cache_offset``), read by a pre-hook."""
    seen: list[int] = []

    def record(module, _args, kwargs):  # noqa: ANN001, ANN202
        seen.append(module.layer_idx + kwargs.get(offset, 0))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for m in model.modules() if type(m).__name__ == attention]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def record_written_slots(monkeypatch) -> dict:  # noqa: ANN001
    """Spy on the passes' check of cache writes against the call order: per "<graph> <what>"
    (e.g. "prefill cache_extend"), the slot each write writes where the graph names it, and the
    plan's ``call_slots`` it was checked against (None: call order)."""
    import moa_flex.passes.nodes as nodes

    written: dict = {}
    check = nodes._check_slots_in_call_order

    def spy(found, what, graph, slots=None):  # noqa: ANN001, ANN202
        written[f"{graph} {what}"] = ([nodes.written_slot(n) for n in found], slots)
        return check(found, what, graph, slots)

    monkeypatch.setattr(nodes, "_check_slots_in_call_order", spy)
    return written


def captured(fn, *args: torch.Tensor) -> tuple[torch.fx.GraphModule, list]:  # noqa: ANN001
    """The Dynamo graph of ``fn(*args)`` and its inputs (in the graph's order)."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append((gm, list(example_inputs)))
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def strong_doge(**fields: object) -> torch.nn.Module:
    """A tiny random Doge whose bias varies a lot from key to key: A of either sign, O(1), and
    dt_proj 30x its random size at hidden size 64 (the matrix's perturbed weights give a bias near
    1 everywhere), less when wider, so that A * softplus(dt) stays near 10 (a bias of e^40 leaves
    nothing of q.k in any float32 score)."""
    from moa_flex.support import _build

    model = _build("doge", **fields)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.A.copy_(torch.randn(attn.A.shape, generator=gen) * 1.5)
            attn.dt_proj.weight.mul_(30 * 64 / model.config.hidden_size)  # dt of about the same size when wider
    return model


def qwen4_exp_indexed() -> bool:
    """Whether this transformers' Qwen4-Exp has ``indexed_attention`` layers with a block indexer
    (5.25; 5.17 names them ``qwen_sparse_attention``, a layer kind moa-flex refuses by name)."""
    from moa_flex.support import causal_lm_types, tiny_config

    if "qwen4_exp_text" not in causal_lm_types():
        return False
    return "indexed_attention" in (getattr(tiny_config("qwen4_exp_text"), "layer_types", None) or ())
