"""Attention computed in a model's own code (passes/eager_attention.py): the recognized forms
(4-D matmul; bmm / baddbmm on 3-D views; ALiBi) become one SDPA call that equals the model's
computation; anything that is not that form (a float score bias, ALiBi rounded to 16 bits, a
fill that is not a mask, a tensor scale, dropout in training, an in-place write that is no mask)
is left alone; GPT-Neo (global and local layers, its own window shorter than the prompt) compiles
and matches the stock model (dense) and the independent reference (sparse, greedy generate)."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from packaging.version import Version

import moa_flex
from moa_flex.passes.eager_attention import rewrite_eager_attention
from moa_flex.passes.nodes import attention_nodes, padding_mask_input
from moa_flex.plan import Plan
from moa_flex.reference import planned_logits, reference_logits
from moa_flex.runtime.verify import VerifyError
from tiny_models import captured

MIN = torch.finfo(torch.float32).min


def own_attention(q, k, v, keep, allowed):  # noqa: ANN001, ANN201
    """The GPT-Neo form: scores in float32, a boolean where, an additive mask (HF's eager form,
    where(allowed, 0, min)), eval dropout."""
    mask = torch.where(allowed, 0.0, MIN)
    s = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) / 4.0
    s = torch.where(keep, s, torch.tensor(MIN, dtype=s.dtype))
    s = s * 0.5 + mask
    p = torch.nn.functional.softmax(s, dim=-1).to(v.dtype)
    p = torch.nn.functional.dropout(p, 0.1, False)
    return torch.matmul(p, v)


def inputs(seed: int, B: int = 2, H: int = 3, Q: int = 5, K: int = 7, D: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Q, K, K))
    keep = torch.rand(1, 1, Q, K, generator=g) > 0.3
    keep[..., 0] = True  # every query keeps a key
    allowed = torch.rand(B, 1, Q, K, generator=g) > 0.2
    allowed[..., 0] = True
    return q, k, v, keep, allowed


@pytest.mark.parametrize("seed", range(3))
def test_the_recognized_form_becomes_one_sdpa_call_equal_to_the_model(seed: int) -> None:
    args = inputs(seed)
    gm, example = captured(own_attention, *args)
    want = own_attention(*args)
    made = rewrite_eager_attention(gm.graph)
    gm.recompile()
    assert len(made) == 1 and len(attention_nodes(gm.graph)) == 1
    assert not any(n.target is torch.nn.functional.softmax for n in gm.graph.nodes)  # the model's own path is gone
    got = gm(*example)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert (got - want).abs().max() <= 1e-6


def own_attention_3d(q, k, v, keep, allowed, baddbmm: bool = False):  # noqa: ANN001, ANN201
    """The BART / XGLM / GPT-NeoX-Japanese forms: scores of [B * H, T, D] views by bmm (or
    baddbmm onto zeros with alpha as the scale), viewed 4-D for the mask and back, a floor at the
    mask's fill, softmax of the 3-D scores, bmm with the values."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    q3, k3, v3 = q.reshape(B * H, Q, D), k.reshape(B * H, K, D), v.reshape(B * H, K, D)
    if baddbmm:
        s = torch.baddbmm(torch.zeros(B * H, Q, K), q3, k3.transpose(1, 2), beta=1.0, alpha=0.25)
    else:
        s = torch.bmm(q3 * 0.25, k3.transpose(1, 2))
    s = s.view(B, H, Q, K) + torch.where(allowed, 0.0, MIN)
    s = torch.max(s, torch.full((), MIN))
    p = torch.nn.functional.softmax(s.view(B * H, Q, K), dim=-1)
    p = torch.nn.functional.dropout(p, p=0.1, training=False)
    return torch.bmm(p, v3).view(B, H, Q, D)


@pytest.mark.parametrize("baddbmm", [False, True])
def test_the_3d_forms_become_one_sdpa_call_equal_to_the_model(baddbmm: bool) -> None:
    args = inputs(3)
    gm, example = captured(lambda *a: own_attention_3d(*a, baddbmm=baddbmm), *args)
    want = own_attention_3d(*args, baddbmm=baddbmm)
    assert len(rewrite_eager_attention(gm.graph)) == 1
    gm.recompile()
    assert not any(n.target in (torch.bmm, torch.baddbmm) for n in gm.graph.nodes)
    got = gm(*example)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert (got - want).abs().max() <= 1e-6


def _alibi(q, k, v, keep, allowed, bias):  # noqa: ANN001, ANN201
    s = torch.matmul(q, k.transpose(-1, -2)) + bias + torch.where(allowed, 0.0, MIN)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _slopes(H: int) -> torch.Tensor:
    """ALiBi's slopes, computed from constants as BLOOM and MPT compute them in their graphs."""
    return 1.0 / torch.pow(2.0, torch.arange(1, H + 1, dtype=torch.float32))


def own_alibi(q, k, v, keep, allowed, rounded: bool = False, in_place: bool | str = False):  # noqa: ANN001, ANN201
    """MPT's form: scaled scores plus slopes x key positions (one value per key), a masked_fill,
    softmax. ``rounded``: the bias through bfloat16 (BLOOM in bf16); ``in_place``: the mask
    written with masked_fill_ (XLM: a mask, read as one); ``"add_"``: an in-place add too, which
    is no mask and which data flow does not show."""
    H, K = q.shape[1], k.shape[2]
    bias = (torch.arange(1 - K, 1, dtype=torch.int32).view(1, 1, 1, K) * _slopes(H).view(1, H, 1, 1))
    if rounded:
        bias = bias.to(torch.bfloat16).to(torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.5 + bias
    if in_place == "add_":
        s.add_(1.0)
    if in_place:
        s.masked_fill_(~allowed, MIN)
    else:
        s = s.masked_fill(~allowed, MIN)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def own_alibi_bloom(q, k, v, keep, allowed):  # noqa: ANN001, ANN201
    """BLOOM's form: baddbmm of the [B * H, 1, K] bias (slopes x positions from an integer mask)
    with the [B * H, T, D] views, beta 1 and the scale as alpha; an additive where-mask."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    positions = torch.ones(B, K, dtype=torch.long).cumsum(-1) - 1
    bias = (_slopes(H)[..., None] * positions[:, None, :]).reshape(B * H, 1, K)
    s = bias.baddbmm(q.reshape(B * H, Q, D), k.reshape(B * H, K, D).transpose(-1, -2), beta=1.0, alpha=0.25)
    s = s.view(B, H, Q, K) + torch.where(allowed, 0.0, MIN)
    p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).view(B * H, Q, K)
    return torch.bmm(p, v.reshape(B * H, K, D))


def alibi_from_mask(q, k, v, attention_mask, rounded: bool = False):  # noqa: ANN001, ANN201
    """BLOOM's positions (counts of the 2-D attention_mask) times the slopes, added to the
    scores, and the padding as an additive where-mask. ``rounded``: the bias through bfloat16,
    which, made from the attention_mask too, must not pass as a mask either."""
    H = q.shape[1]
    positions = (attention_mask.cumsum(-1) - 1) * attention_mask  # [B, K]
    bias = _slopes(H)[..., None] * positions[:, None, :]  # [B, H, K]
    if rounded:
        bias = bias.to(torch.bfloat16).to(torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.5 + bias[:, :, None, :]
    s = s + torch.where(attention_mask.bool()[:, None, None, :], 0.0, MIN)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def alibi_from_mask_rounded(q, k, v, attention_mask):  # noqa: ANN001, ANN201
    """:func:`alibi_from_mask` rounded (a function of its own: the graph input keeps the name
    ``attention_mask``, by which the pass finds the padding mask)."""
    return alibi_from_mask(q, k, v, attention_mask, rounded=True)


def test_alibi_made_from_the_attention_mask_is_alibi_not_a_mask() -> None:
    """A term made from the attention_mask and constants alone is read as a mask, unless it is
    ALiBi (slopes x positions: one value per head): then sdpa_alibi, equal to the model on a
    left-padded batch; rounded to 16 bits, neither (left alone)."""
    q, k, v, _, _ = inputs(0, Q=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    gm, example = captured(alibi_from_mask, q, k, v, mask)
    want = alibi_from_mask(q, k, v, mask)
    made = rewrite_eager_attention(gm.graph)
    gm.recompile()
    assert len(made) == 1 and made[0].target is torch.ops.moa_flex.sdpa_alibi.default
    got = gm(*example)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert (got - want)[1].abs().max() <= 1e-5 and (got - want)[0, :, 2:].abs().max() <= 1e-5  # real queries
    gm, _ = captured(alibi_from_mask_rounded, q, k, v, mask)
    assert padding_mask_input(gm.graph) is not None
    assert rewrite_eager_attention(gm.graph) == []


@pytest.mark.parametrize("fn", [own_alibi, own_alibi_bloom, lambda *a: own_alibi(*a, in_place=True)])
def test_alibi_becomes_sdpa_alibi_equal_to_the_model(fn) -> None:  # noqa: ANN001
    """ALiBi (slopes from constants times integer key positions, added to the scores or as
    baddbmm's input) becomes one moa_flex::sdpa_alibi call with the slopes times the scale that
    multiplies the bias; it equals the model (the bias differs from -slope (i - j) by a constant
    per query)."""
    args = inputs(0)
    gm, example = captured(fn, *args)
    want = fn(*args)
    made = rewrite_eager_attention(gm.graph)
    gm.recompile()
    assert len(made) == 1 and made[0].target is torch.ops.moa_flex.sdpa_alibi.default
    assert not any(n.target is torch.softmax or n.target is torch.nn.functional.softmax for n in gm.graph.nodes)
    got = gm(*example)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert (got.reshape(want.shape) - want).abs().max() <= 1e-5


def own_gpt(q, k, v, keep, allowed, fill: float = -1e4):  # noqa: ANN001, ANN201
    """OpenAI GPT's form: keys permuted from [B, K, H, D] straight to [B, H, D, K], and a 0/1
    float mask multiplied into the scores, ``S * m + fill * (1 - m)``."""
    kt = k.transpose(1, 2).contiguous()  # the model's [B, K, H, D] keys
    m = keep.float()
    s = torch.matmul(q, kt.permute(0, 2, 3, 1)) / 4.0
    s = s * m + fill * (1 - m)
    return torch.matmul(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("seed", range(3))
def test_a_permuted_key_and_a_multiplied_mask_become_sdpa_equal_to_the_model(seed: int) -> None:
    args = inputs(seed)
    gm, example = captured(own_gpt, *args)
    made = rewrite_eager_attention(gm.graph)
    gm.recompile()
    assert len(made) == 1 and not any(n.target is torch.softmax for n in gm.graph.nodes)
    got = gm(*example)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert (got - own_gpt(*args)).abs().max() <= 1e-6


def _multiplied_two_masks(q, k, v, keep, allowed):  # noqa: ANN001, ANN201
    s = torch.matmul(q, k.transpose(-1, -2))
    s = s * keep.float() + -1e4 * (1 - allowed.float())  # not one m: no mask of this form
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _fill_zero(q, k, v, keep, allowed):  # noqa: ANN001, ANN201
    s = torch.where(keep, torch.matmul(q, k.transpose(-1, -2)), torch.tensor(0.0))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _tensor_scale(q, k, v, keep, allowed, scale):  # noqa: ANN001, ANN201
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _training_dropout(q, k, v, keep, allowed):  # noqa: ANN001, ANN201
    p = torch.nn.functional.dropout(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), 0.1, True)
    return torch.matmul(p, v)


@pytest.mark.parametrize("fn,extra", [
    (_alibi, "bias"),  # a float score bias is no mask (ALiBi, relative positions)
    (_fill_zero, None),  # a where whose fill does not remove the key
    (_tensor_scale, "scale"),  # a scale that is not a constant
    (_training_dropout, None),
    (lambda *a: own_alibi(*a, rounded=True), None),  # ALiBi rounded to 16 bits: its error grows with position
    (lambda *a: own_alibi(*a, in_place="add_"), None),  # the scores changed in place, not by a mask
    (lambda *a: own_gpt(*a, fill=-1.0), None),  # a multiplied mask whose fill does not remove the key
    (_multiplied_two_masks, None),
])
def test_what_is_not_the_form_is_left_alone(fn, extra: str | None) -> None:  # noqa: ANN001
    args = inputs(0)
    if extra == "bias":
        args = (*args, torch.randn(1, 3, 5, 7))
    elif extra == "scale":
        args = (*args, torch.tensor(0.3))
    gm, _ = captured(fn, *args)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert rewrite_eager_attention(gm.graph) == []
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def tiny_gpt_neo(window: int = 8):  # noqa: ANN201
    import transformers

    config = transformers.GPTNeoConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=window, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(config).eval()


def test_gpt_neo_with_its_own_window_matches_stock_and_the_reference() -> None:
    """GPT-Neo computes attention in its own code, with a local window (8) shorter than the
    prompt (24): dense plan == stock (1e-5); a sparse plan == the reference (1e-4) on a left-padded
    batch; greedy generate over the MoA cache == the reference's tokens."""
    model = tiny_gpt_neo()
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (dense - stock)[real].abs().max() <= 1e-5

    sparse = Plan.uniform(model.config, alpha=4, beta=0.3)
    model.moa_flex.set_plan(sparse)
    pads, positions = [0, 5], (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    want = reference_logits(model, sparse, pads=pads, input_ids=ids, attention_mask=mask, position_ids=positions)
    assert (got - want)[real].abs().max() <= 1e-4
    assert (got - stock)[real].abs().max() > 1e-3  # the plan bites: the reference is not the dense model

    new = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    full = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    ref = planned_logits(model, sparse, 24 + new, out[:, :-1], full[:, :-1])
    assert torch.equal(out[:, 24:], ref[:, 23:].argmax(-1))


def test_alibi_rounded_to_16_bits_is_refused_at_the_first_call() -> None:
    """BLOOM in bfloat16 rounds its ALiBi bias to bfloat16 (an error growing with the position
    that exact ALiBi would not reproduce): not read as ALiBi, nothing is rewritten, and the first
    call raises naming the forms moa-flex recognizes. In float32 the same model compiles and its
    dense plan equals the stock model. (transformers 5.17's BLOOM sizes its bias by the cache's
    token count in decode steps: refused at compile, by name.)"""
    import transformers

    from moa_flex.support import tiny_config

    from moa_flex.architecture import alibi_over_cache_length

    config = tiny_config("bloom")
    ids = torch.randint(3, 50, (1, 12))
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    if alibi_over_cache_length(model):  # transformers 5.17: refused at compile, by name
        with pytest.raises(ValueError, match="builds its ALiBi bias over the whole cache length in a decode step"):
            moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
        return
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
    with pytest.raises(Exception, match="ALiBi rounded to 16 bits"):
        with torch.no_grad():
            model(input_ids=ids)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - stock).abs().max() <= 1e-5


def test_the_own_code_pass_leaves_every_other_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """On GPT-Neo's traced graph the nodes the passes removed are its attention computations
    (from the scores' matmul to the values' matmul) and what fed only them (its masks); every
    other node is still there with its target."""
    from moa_flex.passes import attention_pass, eager_attention
    from moa_flex.passes.nodes import keeps_effects, padding_mask_input

    model = tiny_gpt_neo()
    seen = []

    def watched(gm: torch.fx.GraphModule, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        outs = {m.out.name for m in (eager_attention._match(n, padding_mask_input(gm.graph)) for n in gm.graph.nodes)
                if m is not None}
        only = set(outs)
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or keeps_effects(node) or not node.users:
                continue
            if all(u.name in only for u in node.users):
                only.add(node.name)
        before = {n.name: n.target for n in gm.graph.nodes}
        report = real(gm, *args, **kwargs)
        seen.append((before, {n.name: n.target for n in gm.graph.nodes}, only, outs))
        return report

    real = attention_pass.rewrite_attention
    monkeypatch.setattr(attention_pass, "rewrite_attention", watched)
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 96, (1, 20)), use_cache=False)
    before, after, only, outs = seen[0]  # the compiled graph (the first-call check's copy comes second)
    assert len(outs) == 2  # one computation per layer
    removed = set(before) - set(after)
    assert removed and removed <= only
    assert all(after[name] == target for name, target in before.items() if name in after)


def test_own_code_attention_needs_the_first_call_check() -> None:
    """Whether the model's mask is causal is a value the passes cannot see: verify=False is
    refused for such models at the first call, naming the switch."""
    model = tiny_gpt_neo()
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, verify=False)
    with pytest.raises(Exception, match="compile with verify=True"):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 96, (1, 20)), use_cache=False)


def test_own_code_attention_is_checked_before_any_length_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first call too large for the check raises (naming the warm-up) instead of running
    unchecked; a short call then checks the graph, and the long one runs."""
    from moa_flex.runtime import verify

    model = tiny_gpt_neo()
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False)
    monkeypatch.setattr(verify, "MAX_SCORES", 4 * 16 * 16)  # 1 row x 4 heads x 16 x 16 scores
    long_ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model.moa_flex.original_forward(input_ids=long_ids, use_cache=False).logits
        with pytest.raises(Exception, match="too large to check"):
            model(input_ids=long_ids, use_cache=False)
        model(input_ids=long_ids[:, :12], use_cache=False)  # checked (12 x 12 scores a head)
        got = model(input_ids=long_ids, use_cache=False).logits
    assert (got - stock).abs().max() <= 1e-5


def test_a_bmm_model_is_checked_and_exact_on_a_batch() -> None:
    """XGLM (bmm on [B * H, T, D] views): the first-call check compares [B, H, Q, Dv] with the
    model's own output viewed so, on a batch of two; dense plan == stock."""
    import transformers

    from moa_flex.support import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("xglm")).eval()
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits  # the checked first call
        again = model(input_ids=ids, use_cache=False).logits
    assert (got - stock).abs().max() <= 1e-5 and (again - stock).abs().max() <= 1e-5


def test_big_bird_block_sparse_attention_is_refused_at_compile() -> None:
    """BigBird with attention_type='block_sparse' runs its own block-sparse attention (random
    blocks, no softmax over all keys) on long inputs, and on short ones switches itself to full
    attention with a log call Dynamo cannot trace: refused at compile by name, nothing changed;
    once switched (its modules say so, the config does not), or with
    attention_type='original_full', it compiles and a dense plan equals the stock model on
    an input long enough for blocks."""
    import transformers

    config = transformers.BigBirdConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=1024, is_decoder=True, attention_type="block_sparse", block_size=16,
        num_random_blocks=2)
    model = transformers.BigBirdForCausalLM(config).eval()
    with pytest.raises(ValueError, match="block-sparse attention .attention_type='block_sparse'"):
        moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
    assert getattr(model, "moa_flex", None) is None
    with torch.no_grad():  # a short input switches its modules to full attention for good: then it compiles
        model(input_ids=torch.randint(3, 100, (1, 40)))
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
    config.attention_type = "original_full"
    torch.manual_seed(0)
    model = transformers.BigBirdForCausalLM(config).eval()
    ids = torch.randint(3, 100, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)
    with torch.no_grad():
        if Version(transformers.__version__) < Version("5.25"):  # 5.17 builds it a bidirectional mask: the check
            with pytest.raises(VerifyError, match="layer 0"):  # refuses it (docs/DESIGN.md)
                model(input_ids=ids)
            return
        assert (model(input_ids=ids).logits - stock).abs().max() <= 1e-5
