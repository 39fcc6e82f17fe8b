"""A model whose forward takes no KV cache (OpenAI GPT): its own-code attention (keys permuted
straight to [B, H, D, K], a float 0/1 causal buffer multiplied into the scores) is rewritten,
and its generate, which runs the whole sequence again for every token, is planned for the
request's length, so that its tokens are those a MoA cache of that plan would give."""

from __future__ import annotations

import warnings

import pytest
import torch

import moa_flex
from moa_flex.plan import Plan
from moa_flex.reference import planned_logits
from moa_flex.runtime.verify import VerifyError
from moa_flex.support import _build, _random_plan, check_type


def tiny_gpt() -> torch.nn.Module:
    return _build("openai-gpt").eval()


def test_openai_gpt_passes_the_matrix() -> None:
    """Dense == stock (1e-5), a random sparse plan == the reference (1e-4), greedy generate of a
    left-padded batch token-exact against the reference planned for the request's length."""
    r = check_type("openai-gpt")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_generate_is_planned_for_the_request_and_warns_once() -> None:
    """A short plan (spans far below the request's 40 tokens), so that a plan for any other
    length would give other tokens: generate equals the reference at N = prompt + new, not at
    another length; the runtime's planned length is restored after the request."""
    model = tiny_gpt()
    plan = _random_plan(model.config, seed=3)
    moa_flex.compile(model, plan, backend="eager", progress=False, compile_cache=False)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    said = [w for w in caught if "takes no KV cache" in str(w.message)]
    assert len(said) == 1 and "no memory" in str(said[0].message)
    assert model.moa_flex.runtime.planned_length is None
    out, logits = res.sequences, torch.stack(res.logits, dim=1)  # [2, 16, vocab]
    full = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], dim=1)
    ref = planned_logits(model, plan, 40, out[:, :-1], full[:, :-1])[:, 23:]
    assert torch.equal(ref.argmax(-1), out[:, 24:])
    assert (ref - logits).abs().max() <= 1e-4
    longer = planned_logits(model, plan, 96, out[:, :-1], full[:, :-1])[:, 23:]
    assert (longer - logits).abs().max() > 1e-3  # the planned length matters here (90x the tolerance)


def test_a_cache_handed_to_its_forward_is_refused() -> None:
    """Its forward would swallow the cache in **kwargs and attend the new token alone."""
    model = tiny_gpt()
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    cache = moa_flex.MoaCache(model.moa_flex.plan, batch_size=1, planned_length=8)
    with pytest.raises(ValueError, match="takes no KV cache"):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache)
    with pytest.raises(ValueError, match="without past_key_values"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, max_new_tokens=2)


def test_a_causal_buffer_of_other_values_is_caught_at_the_first_call() -> None:
    """The rewrite reads ``S * b + fill * (1 - b)`` as keys kept where b != 0, exact for a b of
    0s and 1s only: a buffer with 0.5 on its diagonal scales those scores, which the first-call
    check finds on the real inputs, naming the layer."""
    model = tiny_gpt()
    b = model.transformer.h[1].attn.bias
    b.copy_(b - 0.5 * torch.eye(b.shape[-1]))
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    with pytest.raises(VerifyError, match="layer 1"):
        model(input_ids=torch.randint(3, 100, (1, 12)))
