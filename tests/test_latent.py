"""Multi-head latent attention (DeepSeek-V2/V3 and kin): the MoA cache holds the latent, and the
passes attend over it with the expansion absorbed (passes/latent.py).

The oracle is the model's own attention: the support matrix's checks (a dense plan equals the
stock model, a random sparse plan equals the independent reference, greedy generate through the
latent cache is token-exact against reference decoding), a compile-time check that refuses an
expansion other than the one absorbed, and the first-call guard catching a wrong absorption.
"""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.plan import ModelShape, Plan
from moa_flex.support import _build, _random_plan, check_type, tiny_config


@pytest.mark.parametrize("model_type", ["deepseek_v3",
                                        pytest.param("minicpm3", marks=pytest.mark.slow),
                                        pytest.param("kimi_linear", marks=pytest.mark.slow),  # hybrid: 19 s
                                        # two attention sublayers per decoder layer (layer_idx 2N + j): 10 s
                                        pytest.param("longcat_flash", marks=pytest.mark.slow)])
def test_latent_attention_passes_the_matrix(model_type: str) -> None:
    r = check_type(model_type)
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_the_cache_holds_one_latent_head() -> None:
    """The plan rules one KV head per layer; the cache keeps, per kept token, the latent and the
    rotary key as the key (r + rope wide) and the latent as the value (r wide): what generate
    wrote is the model's own latent, read back from the slots."""
    config = tiny_config("deepseek_v3")
    r, rope = config.kv_lora_rank, config.qk_rope_head_dim
    shape = ModelShape.from_config(config)
    assert (shape.num_kv_heads, shape.head_dim, shape.value_dim) == (1, r + rope, r)
    model = _build("deepseek_v3")
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    layer = model.moa_flex.cache.moa_layers[0]
    assert layer.keys.shape[-1] == r + rope and layer.values.shape[-1] == r
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # the prompt's latents, as the model computes them (positions 0..11 in slots 0..11)
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(hidden)[..., :r])
    torch.testing.assert_close(layer.values[0, :12], latent[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.keys[0, :12, :r], latent[0], atol=1e-5, rtol=1e-5)


def test_an_expansion_other_than_the_absorbed_one_is_refused_at_compile() -> None:
    """A layer whose expand_kv reads kv_b_proj in another layout (heads swapped) is refused
    before anything changes, naming the module."""
    model = _build("deepseek_v3")
    attn = model.model.layers[1].self_attn
    own = attn.expand_kv

    def swapped(kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = own(kv_nope, k_rot)
        return k.flip(1), v.flip(1)

    attn.expand_kv = swapped
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.expand_kv does not expand the latent into keys"):
        moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    assert not hasattr(model, "moa_flex")


def test_the_first_call_guard_catches_a_wrong_absorption(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the up-projection's bias dropped (a wrong rewrite: the tiny model's kv_b_proj gets a
    bias), the first prefill's check raises, naming the layer."""
    import moa_flex.passes.latent as latent

    model = _build("deepseek_v3")
    for layer in model.model.layers:
        proj = layer.self_attn.kv_b_proj
        proj.bias = torch.nn.Parameter(torch.randn(proj.out_features) * 0.5)
    real = latent.absorb

    def without_bias(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        absorbed = real(*args, **kwargs)
        absorbed.up_bias = None
        return absorbed

    monkeypatch.setattr("moa_flex.passes.prefill_pass.absorb", without_bias)
    moa_flex.compile(model, _random_plan(model.config), backend="eager", progress=False, compile_cache=False)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match="layer 0's rewritten attention .* differs from the model's own"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_a_value_bias_is_carried_through() -> None:
    """kv_b_proj with a bias (key bias: softmax cancels it; value bias: added after the weights):
    sparse and generate still match the reference, through the latent cache."""
    from moa_flex.reference import planned_logits

    model = _build("deepseek_v3")
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        proj = layer.self_attn.kv_b_proj
        proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, generator=gen) * 0.5)
    plan = _random_plan(model.config)
    moa_flex.compile(model, plan, backend="eager", progress=False, compile_cache=False)
    ids = torch.randint(3, 100, (2, 24), generator=gen)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = planned_logits(model, plan, 28, seq[:, :-1], torch.ones_like(seq[:, :-1]))
    assert torch.equal(ref[:, 23:].argmax(-1), seq[:, 24:])


def test_attention_sublayers_must_follow_the_cache_numbering() -> None:
    """LongCat-Flash: decoder layer N holds self_attn.0 and .1 answering to layer_idx 2N and 2N + 1,
    which the passes assume (passes/nodes.py call_layers); another numbering is refused by name."""
    from moa_flex.architecture import attention_layer_problem

    model = _build("longcat_flash")
    assert attention_layer_problem(model) == ""
    model.model.layers[1].self_attn[0].layer_idx = 3
    assert "layers.1.self_attn.0 answers to layer_idx 3 inside decoder layer 1" in attention_layer_problem(model)
