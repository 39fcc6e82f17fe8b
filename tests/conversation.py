"""Conversations on a compiled model checked turn by turn against step-by-step reference decoding
(tests/test_longctx.py, test_chunked_attention.py, test_hybrid.py, test_kv_sharing.py).
"""

from __future__ import annotations

import warnings

import torch

import moa_flex

from moa_flex.kernels.quant import FP8
from moa_flex.plan import Plan
from moa_flex.runtime.cache import MoaCache
from reference import planned_logits
from tiny_models import ids_of


def reference_greedy(model, plan: Plan, N: int, ids: torch.Tensor, mask: torch.Tensor, new: int) -> tuple:  # noqa: ANN001
    """Step-by-step greedy decoding with the reference planned for N: every step's logits come
    from the whole sequence so far. Returns (sequences, logits [B, new, V])."""
    steps = []
    for _ in range(new):
        logits = planned_logits(model, plan, N, ids, mask)[:, -1]
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(steps, 1)


def generate(model, ids: torch.Tensor, mask: torch.Tensor, new: int, cache: MoaCache | None = None):  # noqa: ANN001, ANN201
    kw = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True, **kw)


def padded_prompt(model, plan: Plan, N: int, length: int = 150, pad: int = 11,  # noqa: ANN001
                  seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask [2, length] of a batch whose second row is left-padded by ``pad`` tokens,
    checked to be cut by ``plan`` (its reference logits differ from a dense plan's)."""
    ids = ids_of(length, seed=seed, vocab=model.config.get_text_config().vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    dense = planned_logits(model, Plan.dense(model.config), N, ids, mask)
    assert (planned_logits(model, plan, N, ids, mask) - dense)[0].abs().max() > 1e-3, "the plan really cuts"
    return ids, mask


def converse(model, plan: Plan, N: int, ids: torch.Tensor, mask: torch.Tensor, turns: tuple, new: int,  # noqa: ANN001
             seed: int) -> list[MoaCache]:
    """Turns of a conversation on a compiled model (``turns``: the user's new tokens per turn,
    None for the first): each turn's tokens and logits must equal step-by-step reference
    decoding of the whole conversation planned for N. Returns each turn's cache."""
    cache, caches = None, []
    for turn, user in enumerate(turns):
        if user is not None:  # the user's next message, appended to the conversation so far
            ids = torch.cat([ids, ids_of(user, seed=seed + turn)], 1)
            mask = torch.cat([mask, torch.ones(ids.shape[0], user, dtype=mask.dtype)], 1)
        out = generate(model, ids, mask, new, cache)
        want_seq, want_logits = reference_greedy(model, plan, N, ids, mask, new)
        assert torch.equal(out.sequences, want_seq), f"turn {turn}"
        assert (torch.stack(out.logits, 1) - want_logits).abs().max() <= 1e-4, f"turn {turn}"
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        caches.append(cache)
        ids, mask = out.sequences, torch.cat([mask, torch.ones(ids.shape[0], new, dtype=mask.dtype)], 1)
    return caches


def chunked_turns(model, plan: Plan, chunk: int, N: int = 60) -> None:  # noqa: ANN001
    """Compile ``model`` (eager) with prompts in chunks of ``chunk``, then a conversation of two
    turns from a 20-token batch whose first row has 4 left pads: each turn equals step-by-step
    reference decoding (:func:`converse`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moa_flex.compile(model, plan, max_length=N, prefill_chunk=chunk, backend="eager", progress=False,
                         compile_cache=False)
        ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        ids[0, :4] = 0
        converse(model, plan, N, ids, mask, (None, 9), 4, seed=6)


def reference_greedy_fp8(model, plan, N: int, ids: torch.Tensor, mask: torch.Tensor, new: int) -> tuple:  # noqa: ANN001
    """Step-by-step greedy decoding with the reference over FP8-stored keys and values: every
    step's logits from the whole sequence so far. (sequences, logits [B, new, V])."""
    steps = []
    for _ in range(new):
        logits = planned_logits(model, plan, N, ids, mask, kv_dtype=FP8)[:, -1]
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(steps, 1)


def gpu_turns(model, plan: Plan, mode: str | None) -> None:  # noqa: ANN001
    """Compile ``model`` (on a GPU; eager for ``mode`` None, else inductor with ``mode``) with
    prompts in chunks of 5; a 20-token batch whose first row has 7 left pads, then a second turn
    of 9 tokens, 4 new tokens each: tokens and logits equal step-by-step reference decoding
    (fp32, 1e-3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moa_flex.compile(model, plan, backend="eager" if mode is None else "inductor", mode=mode, progress=False,
                         compile_cache=False, max_length=60, prefill_chunk=5)
        ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(4)).cuda()
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
        ids[0, :7] = 0
        cache = None
        for user in (None, 9):
            if user is not None:
                more = torch.randint(3, 100, (2, user), generator=torch.Generator().manual_seed(9)).cuda()
                ids, mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                     **({} if cache is None else {"past_key_values": cache}))
            want, want_logits = reference_greedy(model, plan, 60, ids, mask, 4)
            assert torch.equal(out.sequences, want), user
            assert float((torch.stack(out.logits, 1) - want_logits).abs().max()) <= 1e-3, user
            cache = model.moa_flex.cache
            ids, mask = out.sequences, torch.cat([mask, torch.ones_like(mask[:, :4])], 1)
