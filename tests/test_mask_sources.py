"""Where an attention call's mask comes from (passes/mask_sources.py): a mask made from the
2-D attention_mask, positions and shape reads passes; a mask carrying a learned bias, a bias
computed from the hidden states, or a selection by content is refused, naming its sources; a
model whose mask carries such a bias (Inkling's, with verify off) is refused at its first call.
Attention in a model's own code that adds such a term to its scores (ProphetNet's
relative-position bias from the hidden states) is refused naming the term's sources."""

from __future__ import annotations

import pytest
import torch
import transformers

import moa_flex
from moa_flex.passes.eager_attention import unread_score_biases
from moa_flex.passes.mask_sources import check_masks_are_masks, is_bias_source, mask_sources
from moa_flex.passes.nodes import arg, attention_nodes
from moa_flex.plan import Plan
from moa_flex.support import causal_lm_types, check_type

from tiny_models import captured

MIN = torch.finfo(torch.float32).min
H, T, D = 2, 6, 8


class Attention(torch.nn.Module):
    """One SDPA call over a mask built the way ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = torch.nn.Linear(D, 3 * H * D)
        self.rel = torch.nn.Parameter(torch.randn(H, 2 * T))  # a learned relative-position table
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)
        self.register_buffer("causal_float", torch.ones(T, T).tril(), persistent=False)  # OpenAI GPT's
        self.gate = torch.nn.Parameter(torch.ones(T, T).tril())  # the same values, learned

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.proj(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        pos = torch.arange(N, device=x.device)
        allowed = (pos[None, :] <= pos[:, None]) & attention_mask[:, None, None, :].bool()
        if self.kind == "bool":
            mask = allowed
        elif self.kind == "additive":  # HF's eager form, sized from the hidden states' shape
            mask = torch.where(allowed, x.new_zeros(()), MIN) + torch.zeros_like(x[:, None, :1, :1])[..., 0]
        elif self.kind == "expand_as":  # XLM: the mask takes the scores' shape
            mask = allowed.expand_as(q @ k.transpose(-1, -2))
        elif self.kind == "buffer":
            mask = self.causal[:N, :N] & attention_mask[:, None, None, :].bool()
        elif self.kind == "float_buffer":  # a float 0/1 buffer compared with 0: position data
            mask = (self.causal_float[:N, :N] != 0) & attention_mask[:, None, None, :].bool()
        elif self.kind == "learned_selection":  # a parameter compared with 0: keys chosen by learned values
            mask = (self.gate[:N, :N] != 0) & attention_mask[:, None, None, :].bool()
        elif self.kind == "learned_bias":
            rel = (pos[:, None] - pos[None, :]) + T
            mask = torch.where(allowed, 0.0, MIN) + self.rel[:, rel][None]
        elif self.kind == "content_bias":
            mask = torch.where(allowed, 0.0, MIN) + q.mean(-1)[:, :, None, :]
        else:  # "content_selection": keys chosen by their hidden states
            mask = allowed & (x.norm(dim=-1) > 1.0)[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def graph_of(kind: str, dynamic: bool = False) -> torch.fx.GraphModule:
    x = torch.randn(2, T, D)
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[0, :2] = 0
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(x, 1)
        torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
    gm, _ = captured(Attention(kind).eval(), x, attention_mask)
    return gm


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["bool", "additive", "expand_as", "buffer", "float_buffer"])
def test_a_mask_of_positions_and_padding_passes(kind: str, dynamic: bool) -> None:
    gm = graph_of(kind, dynamic)
    (node,) = attention_nodes(gm.graph)
    sources = mask_sources(arg(node, 3, "attn_mask", None))
    assert any("attention_mask" in str(n.target) for n in sources)
    assert not any(is_bias_source(n) for n in sources)
    check_masks_are_masks([(node, 0)])


@pytest.mark.parametrize("kind, named", [("learned_bias", "rel"), ("content_bias", "proj"),
                                         ("content_selection", "x"), ("learned_selection", "gate")])
def test_a_bias_or_a_selection_by_content_is_refused_naming_its_source(kind: str, named: str) -> None:
    gm = graph_of(kind)
    (node,) = attention_nodes(gm.graph)
    with pytest.raises(ValueError, match="score bias") as e:
        check_masks_are_masks([(node, 3)])
    assert "layer 3" in str(e.value)
    sources = [str(n.target) for n in mask_sources(arg(node, 3, "attn_mask", None))]
    assert any(named in s for s in sources), sources


def test_shape_reads_are_not_sources() -> None:
    """The additive form reads the hidden states for a zero of their dtype and a shape only."""
    gm = graph_of("additive", dynamic=True)
    (node,) = attention_nodes(gm.graph)
    sources = mask_sources(arg(node, 3, "attn_mask", None))
    tensors = [str(n.target) for n in sources if isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert tensors == ["L_attention_mask_"], [str(n.target) for n in sources]


@pytest.mark.skipif("inkling_text" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES,
                    reason="this transformers has no Inkling")
def test_a_model_whose_mask_carries_a_bias_is_refused_at_its_first_call_with_verify_off() -> None:
    """Inkling adds a bias computed from the hidden states through SDPA's mask. Its sliding
    layers' own head layout is made the others' here, so that only the bias stands in the way."""
    from moa_flex.support import _build

    model = _build("inkling_text")
    config = model.config
    for own, shared in (("swa_num_attention_heads", "num_attention_heads"),
                        ("swa_num_key_value_heads", "num_key_value_heads"), ("swa_head_dim", "head_dim")):
        setattr(config, own, getattr(config, shared))
    model = type(model)(config).eval()
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False, verify=False)
    with pytest.raises(ValueError, match="rel_logits_proj"), torch.no_grad():
        model(input_ids=torch.randint(0, config.vocab_size, (1, 12)), use_cache=False)


def own_attention(q, k, v, allowed, bias=None):  # noqa: ANN001, ANN201
    """Attention in a model's own code: a mask from a boolean, and ``bias`` (or an additive mask
    made in the graph) added to the scores."""
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + (torch.where(allowed, 0.0, MIN) if bias is None else bias)
    s = s.masked_fill(~allowed, MIN)
    return torch.matmul(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("bias", ["float", "mask"])
def test_a_score_term_of_own_code_attention_is_named_when_it_is_a_bias(bias: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, D, generator=g) for _ in range(3))
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    term = (torch.randn(1, H, T, T, generator=g),) if bias == "float" else ()
    gm, _ = captured(own_attention, q, k, v, allowed, *term)
    found = unread_score_biases(gm.graph)
    if bias == "mask":  # a where over a boolean: a mask, not a bias
        assert found == []
    else:
        ((node, sources),) = found
        assert [str(n.target) for n in sources] == ["L_bias_"]


@pytest.mark.parametrize("model_type,source", [
    ("prophetnet", "relative_pos_embeddings"),  # a relative-position bias from the hidden states, in its own code
    # (Doge's bias from its values, once refused here, is read as a per-key bias: tests/test_key_bias.py)
])
def test_a_model_whose_scores_carry_a_bias_is_refused_naming_it(model_type: str, source: str) -> None:
    if model_type not in causal_lm_types():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    r = check_type(model_type)
    said = "adds to the scores a term" if model_type == "prophetnet" else "score bias"  # its own code's wording
    assert r.status == "refused" and source in r.detail and said in r.detail, r.detail
