"""The support matrix (moa_flex.support) on a representative subset: what CI runs of `make support`."""

from __future__ import annotations

import pytest
import torch
import transformers

from moa_flex.support import Result, causal_lm_types, check_type, main, markdown, tiny_config

BLOOM_DECODES = "get_mask_sizes" in __import__("inspect").getsource(transformers.BloomModel.forward)


@pytest.mark.parametrize("model_type", [pytest.param("llama", marks=pytest.mark.slow),  # tests/test_compile.py, test_generate.py
                                        # make test-slow: MoE routing runs in the default run in DBRX and
                                        # MiniMax, QK-norm in tests/test_pass_invariants.py's Qwen3
                                        pytest.param("mixtral", marks=pytest.mark.slow), "gpt2",
                                        pytest.param("qwen3", marks=pytest.mark.slow),
                                        "ctrl",  # assigns its nn.Buffer in forward (runtime/traceable.py)
                                        "dbrx",  # experts loop over nonzero(): moa_flex::dbrx_experts
                                        "xglm",  # attention in its own code, bmm on 3-D views (passes/eager_attention.py)
                                        "minimax",  # accepts only its own cache class: a MoaCache that is one
                                        pytest.param("bloom", marks=pytest.mark.skipif(  # ALiBi in its own code
                                            not BLOOM_DECODES, reason="this transformers' BLOOM is refused (its bias spans "
                                            "the cache in decode steps): tests/test_eager_attention.py")),
                                        # no SDPA in transformers: its eager attention rewritten; a decoder's
                                        "bigbird_pegasus",  # attention with is_causal=False and a causal mask
                                        pytest.param("git", marks=pytest.mark.slow),  # no SDPA; a vision tower
                                        pytest.param("mpt", marks=pytest.mark.slow),  # ALiBi added to 4-D scores
                                        pytest.param("gpt_neox_japanese", marks=pytest.mark.slow),  # caches a copy
                                        # hybrids (tests/test_hybrid.py runs Qwen3-Next's conversation by default)
                                        pytest.param("qwen3_next", marks=pytest.mark.slow),  # 15 s
                                        pytest.param("falcon_h1", marks=pytest.mark.slow)])  # Mamba in torch: 25 s
def test_softmax_decoders_are_supported(model_type: str) -> None:
    """Dense == stock, sparse == reference, generate token-exact: plain, MoE, GPT-2 layout (h.N),
    QK-norm, attention in the model's own code (XGLM; BLOOM and MPT with ALiBi), attention and Mamba side by side in every layer (Falcon-H1), linear-attention layers
    between attention layers (Qwen3-Next)."""
    r = check_type(model_type)
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


@pytest.mark.parametrize("model_type,words", [("mamba", "no softmax-attention layer"),
                                              ("rwkv", "no softmax-attention heads (a recurrent model")])
def test_a_model_without_softmax_attention_is_refused_by_name(model_type: str, words: str) -> None:
    r = check_type(model_type)
    assert r.status == "refused" and words in r.detail


def test_tiled_kv_heads_are_planned_as_the_call_sees_them() -> None:
    """JetMoE tiles its KV heads (.repeat over its top_k query experts) between the cache write
    and attention: the plan takes the call's layout (one KV head per query head), the passes
    write the cache tiled, and the matrix passes. (Planned from the config's 2 KV heads, layer 0
    would run 4: the first-call guard once caught that as a wrong answer.)"""
    from moa_flex.plan import ModelShape

    config = tiny_config("jetmoe")
    assert config.num_key_value_heads < config.num_attention_heads
    assert ModelShape.from_config(config).num_kv_heads == config.num_attention_heads
    r = check_type("jetmoe")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_layers_with_fewer_kv_heads_are_cached_expanded() -> None:
    """MiMo-V2-Flash: sliding layers run twice the config's KV heads, and values are narrower
    than keys. The plan takes the sliding layers' 4, a full-attention layer's 2 are cached each
    twice (HF's grouped expansion, so each query head reads its own KV head), the cache keeps
    values at v_head_dim, and the matrix passes. A layer whose KV heads do not
    divide the plan's is still refused at compile time, naming it."""
    import dataclasses

    from moa_flex.architecture import kv_head_mismatches
    from moa_flex.plan import ModelShape
    from moa_flex.support import _build

    config = tiny_config("mimo_v2_flash")
    assert ModelShape.from_config(config).num_kv_heads == 2 * config.num_key_value_heads
    assert config.v_head_dim < config.head_dim  # its cache keeps narrower values (MoaCache's value_dims)
    r = check_type("mimo_v2_flash")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")
    llama = _build("llama")  # 4 query / 2 KV heads in every layer
    shape = ModelShape.from_config(llama.config)
    assert kv_head_mismatches(llama, dataclasses.replace(shape, num_kv_heads=4)) == []  # 2 divides 4
    assert kv_head_mismatches(llama, dataclasses.replace(shape, num_kv_heads=1))[0] == (0, 2)  # more than the plan's


def test_a_model_dynamo_cannot_trace_is_refused_by_name() -> None:
    """A forward Dynamo cannot trace as one graph (here an MLP that breaks the graph; MiniMax's
    refusal of any cache but its own was such a case until its MoaCache became one) is refused
    at the first call with Dynamo's reason, and the support matrix says so."""
    import torch

    import moa_flex
    from moa_flex.plan import Plan

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").eval()
    mlp = model.model.layers[0].mlp
    plain = mlp.forward

    def breaking(x):  # noqa: ANN001, ANN202
        torch._dynamo.graph_break()
        return plain(x)

    mlp.forward = breaking
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    with pytest.raises(NotImplementedError, match="cannot trace this model's forward"):
        model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)


@pytest.mark.slow  # 7 s (make test-slow): tests/test_chunked_attention.py runs Llama 4's chunked and NoPE layers
def test_chunked_local_attention_passes_the_matrix() -> None:  # by default, tests/test_pass_invariants.py its MoE
    r = check_type("llama4_text")  # chunked layers, a NoPE layer with attention temperature, MoE
    assert r.status == "supported", r.detail


def test_tiny_configs_keep_one_layer_of_each_kind() -> None:
    config = tiny_config("gemma2")
    assert config.num_hidden_layers == len(config.layer_types) == 2
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert "llama" in causal_lm_types() and len(causal_lm_types()) > 100


def test_markdown_and_cli(tmp_path, capsys) -> None:  # noqa: ANN001
    text = markdown([Result("a", "supported", "ok"), Result("b", "refused", "x | y")], "cmd")
    assert "2 causal-LM model types: 1 supported, 1 refused, 0 fails, 0 not built." in text
    assert "| b | refused | x / y |" in text
    out = tmp_path / "S.md"
    assert main(["--types", "mamba", "--out", str(out), "--quiet"]) == 0  # refused at compile (no attention)
    assert "| mamba | refused | MambaConfig has no softmax-attention layer" in out.read_text()
    with pytest.raises(SystemExit):
        main(["--types", "not-a-type"])
    assert "not causal-LM model types" in capsys.readouterr().err


def test_tiny_configs_derive_consistent_sizes() -> None:
    """Encoder-decoder-derived decoders get 2 decoder layers; MLA sizes agree (MHA kept, head_dim the
    rotary part); a read-only property (Falcon's head_dim) and a per-layer head_dim (Gemma 4) are handled."""
    bart = tiny_config("bart")
    assert bart.decoder_layers == bart.encoder_layers == 2 and bart.decoder_attention_heads == 4
    mla = tiny_config("deepseek_v3")
    assert mla.num_key_value_heads == mla.num_attention_heads and mla.head_dim == mla.qk_rope_head_dim
    assert mla.qk_head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim
    assert tiny_config("falcon").hidden_size == 64
    gemma4 = tiny_config("gemma4_text")
    assert gemma4.num_hidden_layers == 2 and gemma4.hidden_size_per_layer_input == 16


@pytest.mark.parametrize("model_type,words", [
    # its block attention residuals (is_causal=False, over one position's block outputs) are not an encoder's
    ("inkling2_text", "sliding-window layers run a head layout of their own"),
    ("blt", "several stacks (patcher_config, encoder_config, decoder_config, global_config)"),  # bytes and patches
    ("reformer", "runs LSH self-attention (attn_layers ['local', 'lsh'])"),  # keys picked by hashing
    ("xlnet", "it keeps a state of its own (mems)"),  # a memory, not a transformers Cache
    ("cpmant", "bidirectional over its input"),  # every input token is context: test below
])
def test_layouts_a_plan_does_not_model_are_refused_at_compile(model_type: str, words: str) -> None:
    if model_type not in causal_lm_types():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    r = check_type(model_type)
    assert r.status == "refused" and not r.detail.startswith("(at the first call)") and words in r.detail


@pytest.mark.slow  # about 8 s (make test-slow)
def test_layers_with_their_own_head_dims_are_supported() -> None:
    """Gemma 4: sliding layers with head_dim 16, full ones with 32 (tiny); the plan leaves
    head_dim open and each layer's cache takes its own from the config."""
    from moa_flex.plan import ModelShape

    assert ModelShape.from_config(tiny_config("gemma4_text")).head_dim is None
    r = check_type("gemma4_text")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_git_runs_text_and_refuses_its_bidirectional_image_prefix() -> None:
    """GIT's vision tower (is_causal=False) is not taken for the language model's attention, and
    a request with images, whose tokens prefix the text attending each other both ways, is refused
    before anything runs (text-only requests pass the matrix: the slow parametrization above)."""
    import torch

    import moa_flex
    from moa_flex.architecture import bidirectional_attention
    from moa_flex.plan import Plan
    from moa_flex.support import _build

    model = _build("git")
    assert [n for n, m in model.named_modules() if getattr(m, "is_causal", None) is False]  # the tower's
    assert bidirectional_attention(model) == []
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False)
    size = model.config.vision_config.image_size
    pixels = torch.zeros(1, 3, size, size)
    with pytest.raises(NotImplementedError, match="image tokens of pixel_values before the text"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=pixels)
    with pytest.raises(NotImplementedError, match="image tokens of pixel_values before the text"):
        model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=pixels, max_new_tokens=2)


def test_every_parameter_is_perturbed_and_buffers_are_not() -> None:
    """A parameter initialized to zero (Doge's ``A``, a gate) must not stay zero in the matrix."""
    from moa_flex.support import PERTURB_STD, _perturbed

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 64)
        torch.nn.init.zeros_(m.weight)
        m.register_buffer("table", torch.zeros(8))
        return m

    a, b = _perturbed(fresh()), _perturbed(fresh())
    assert torch.equal(a.weight, b.weight)  # the same noise every run
    assert 0.8 * PERTURB_STD < float(a.weight.std()) < 1.2 * PERTURB_STD and bool((a.bias != fresh().bias).all())
    assert not a.table.any()


def test_cpm_ant_attends_later_tokens_of_its_input() -> None:
    """Why CPM-Ant is refused as bidirectional (architecture.BOTH_WAYS_OVER_INPUT): in the stock
    model, changing the last input token changes the logits at every earlier position."""
    from moa_flex.support import _build

    model = _build("cpmant").eval()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, -1] = 3 + (int(ids[0, -1]) + 7) % 97
    with torch.no_grad():
        a, b = (model(input_ids=x, use_cache=False).logits for x in (ids, other))
    assert (a[0, :-1] - b[0, :-1]).abs().amax(-1).min() > 1e-3  # every earlier position sees it
