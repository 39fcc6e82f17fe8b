"""``model.generate(...)`` after ``moa_flex.compile``: transformers' generate over a ragged MoA cache.

The request is planned for ``N = prompt + max_new_tokens`` tokens (or compile's
``max_length``); a :class:`~moa_flex.runtime.cache.MoaCache` is allocated for it (or the previous
request's reused, when the layout is the same: static addresses for CUDA graphs) and handed
to transformers' own ``generate`` as its cache, with moa-flex's decoding loop
(:func:`moa_flex.runtime.decode_loop.decode_loop`) as ``custom_generate``: transformers resolves the
generation config and builds the logits processors and stopping criteria, and the output
format is transformers'; the per-token loop is moa-flex's (far less host work per token).
Every row of a left-padded batch is planned for its own real tokens. A later turn passes the
earlier turn's cache back (``past_key_values``, or ``cache`` from transformers 5.24 on) with
the whole conversation as ``input_ids``: only the tokens the cache has not seen are prefilled,
and the conversation stays planned for the cache's length (compile's ``max_length``). Beam
search, several sequences per prompt and other decoding modes are refused (the cache is
allocated per prompt row). A multimodal wrapper's request (images, ...) goes to transformers
as given: it encodes the images, and the decoding loop passes them to the prefill or refuses
the request (a non-causal mask over the image tokens), as its docstring says. A model whose
``generate`` is its own and rejects ``custom_generate`` (MusicGen's decoders) decodes over the
MoA cache with transformers' per-token loop instead (``_own_loop``, warned once); where the
model's input preparation would feed fewer tokens than the cache has not seen (transformers'
MusicgenForCausalLM drops the prompt once a cache is passed), the unseen tokens are fed
(warned once), and a request whose loop still prefilled less than the prompt is refused.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch

from moa_flex.architecture import codebook_rows, layer_placement, sequence_mask

from .cache import MoaCache
from .forward import planned_for
from .decode_loop import decode_loop

if TYPE_CHECKING:
    from .state import CompiledState


def _new_tokens(model: torch.nn.Module, prompt: int, kwargs: dict) -> int:
    """max_new_tokens of the request, resolved as HF does (kwargs, then generation config)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("max_new_tokens") is not None:
        new = int(kwargs["max_new_tokens"])
    elif kwargs.get("max_length") is not None:
        new = int(kwargs["max_length"]) - prompt
    elif config is not None and config.max_new_tokens is not None:
        new = int(config.max_new_tokens)
    elif config is not None and config.max_length is not None:
        new = int(config.max_length) - prompt
    else:
        raise ValueError("generate() needs max_new_tokens to plan the MoA cache")
    if new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens resolves to {new} for a prompt of {prompt} tokens")
    return new


def _left_pads(mask: torch.Tensor) -> torch.Tensor:
    """Left-pad tokens per row of a 2-D padding mask; ValueError if a row is not left-padded."""
    real = mask.bool()
    pads = (~real).int().cumprod(dim=1).sum(dim=1)
    j = torch.arange(mask.shape[1], device=mask.device).view(1, -1)
    if not bool((real == (j >= pads.view(-1, 1))).all()):
        raise ValueError("moa-flex generate needs a left-padded batch (attention_mask 0s only at the start of rows)")
    if bool((pads >= mask.shape[1]).any()):
        raise ValueError("a row of the batch has no real token (attention_mask all 0)")
    return pads.cpu()


def generate(model: torch.nn.Module, state: "CompiledState", *args: Any, **kwargs: Any) -> Any:
    """transformers' generate over a ragged MoA KV cache; arguments as HF's ``generate``."""
    bound = inspect.signature(state.original_generate).bind_partial(*args, **kwargs)
    params = dict(bound.arguments)
    params.update(params.pop("kwargs", {}))
    inputs = params.get("inputs", params.get("input_ids"))
    if inputs is None or inputs.dim() != 2 or inputs.dtype not in (torch.long, torch.int):
        raise ValueError("moa-flex generate needs input_ids [batch, tokens] (inputs_embeds are not supported)")
    config = params.get("generation_config") or model.generation_config
    for name in ("num_beams", "num_return_sequences"):
        value = params.get(name, getattr(config, name, 1)) or 1
        if value != 1:
            raise NotImplementedError(f"moa-flex generate supports {name}=1 only, got {value}")
    if params.get("assistant_model") is not None:
        raise NotImplementedError("moa-flex generate does not support assisted generation")
    given = [params.pop(name) for name in ("past_key_values", "cache") if params.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once: got both past_key_values and cache")
    if params.get("custom_generate") is not None:
        raise NotImplementedError("moa-flex generate runs its own decoding loop; custom_generate cannot replace it")
    B, prompt = inputs.shape
    new = _new_tokens(model, prompt, params)
    mask = params.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs)
    rows = codebook_rows(model.config)
    if rows > 1:  # MusicGen: a row per codebook, the decoder (and the cache) one per sequence
        B = B // rows
    pads = _left_pads(sequence_mask(mask, rows) if rows > 1 else mask)
    if not state.takes_cache:
        if given:
            raise ValueError(f"{type(model).__name__}'s forward takes no cache: a later turn is the whole "
                             "conversation as input_ids, without past_key_values")
        return _recomputing(model, state, params, prompt + new)
    if given:
        cache = _next_turn(model, state, given[0], inputs, pads, new)
    else:
        planned = state.max_length or prompt + new
        if prompt + new > planned:
            raise ValueError(f"prompt ({prompt}) + max_new_tokens ({new}) exceeds compile's max_length={planned}")
        cache = _cache_for(model, state, B, planned, pads)
    streamer = params.pop("streamer", None)  # transformers hands no streamer to a callable custom_generate
    _stop_strings_to_criteria(params, config)
    params.update(attention_mask=mask, max_new_tokens=new, **{state.cache_arg: cache})
    params["custom_generate"] = functools.partial(decode_loop, moa_state=state, moa_streamer=streamer)
    params.pop("max_length", None)
    params.pop("input_ids", None)
    params["inputs"] = inputs
    try:
        return state.original_generate(**params)
    except ValueError as e:
        if "custom_generate" not in str(e):
            raise
        # a generate of the model's own (MusicGen's: its delay pattern over codebooks) that rejects the hook
        # while validating its keyword arguments, before any forward: it decodes with its own loop instead
        return _own_loop(model, state, params, streamer)


def _recomputing(model: torch.nn.Module, state: "CompiledState", params: dict, total: int) -> Any:
    """The request through transformers' generate for a model whose forward takes no KV cache
    (OpenAI GPT): each step runs the whole sequence again, with every layer's attention planned
    for the request's ``total`` tokens (or compile's ``max_length``), so its tokens are those of
    a cache of that plan; warned once per model (it saves attention time, no memory)."""
    if "recomputes" not in state.warned:
        state.warned.add("recomputes")
        warnings.warn(f"moa-flex: {type(model).__name__}'s forward takes no KV cache, so its generate() runs the whole "
                      "sequence again for every token; moa-flex plans each of those forwards for the request's length "
                      "(sparse attention, the tokens a MoA cache would give), which saves attention time but no "
                      "memory", stacklevel=3)
    planned = state.max_length or total
    if total > planned:
        raise ValueError(f"prompt + max_new_tokens ({total}) exceeds compile's max_length={planned}")
    with planned_for(state, planned):
        return state.original_generate(**params)


def _own_loop(model: torch.nn.Module, state: "CompiledState", params: dict, streamer: Any) -> Any:
    """The request through the model's own ``generate`` and transformers' per-token loop
    (``_sample``) over the MoA cache, for a model whose ``generate`` does not take moa-flex's
    loop as ``custom_generate`` (MusicGen): the same prefill and decode graphs, with the host
    work per token of transformers' loop; warned once per model. NotImplementedError, after
    the request, where that loop ran fewer tokens through the cache than the prompt holds: its
    output ignores part of the prompt (transformers' own MusicgenForCausalLM, below)."""
    if "own generate" not in state.warned:
        state.warned.add("own generate")
        warnings.warn(f"moa-flex: {type(model).__name__} has a generate() of its own, which does not take moa-flex's "
                      "decoding loop (transformers' custom_generate hook): it decodes over the MoA cache with "
                      "transformers' per-token loop, with more host time per token", stacklevel=3)
    params.pop("custom_generate")
    if streamer is not None:
        params["streamer"] = streamer
    config = params.get("generation_config") or model.generation_config
    if params.get("num_return_sequences") is None and getattr(config, "num_return_sequences", None) is None:
        params["num_return_sequences"] = 1  # MusicGen's own generate reads it, and transformers 5.x leaves it None
    cache, prompt = params[state.cache_arg], params["inputs"].shape[1]
    seen = cache.seen_tokens  # a later turn: the conversation's first tokens are in the cache already
    with _feeding_unseen(model, state, cache):
        out = state.original_generate(**params)
    ran = cache.seen_tokens - seen
    if ran < prompt - seen:
        import transformers

        raise NotImplementedError(
            f"{type(model).__name__}'s own generate() of transformers {transformers.__version__} ran "
            f"{ran} tokens through the cache for a prompt of {prompt - seen}: it did not prefill the "
            "whole prompt, so its tokens would ignore part of it (MusicGen's prepare_inputs_for_generation keeps "
            "input_ids[:, -1:] whenever a cache is passed, at the first step too); run the compiled forward over a "
            "moa_flex.MoaCache (prefill, then one token per step) instead")
    return out


@contextlib.contextmanager
def _feeding_unseen(model: torch.nn.Module, state: "CompiledState", cache: MoaCache) -> Any:
    """Around a model's own generate over ``cache``: where its ``prepare_inputs_for_generation``
    feeds the forward fewer tokens than the cache has not seen (transformers' MusicgenForCausalLM
    keeps ``input_ids[:, -1:]`` whenever a cache is passed, so its prefill would run the last
    prompt token alone), the inputs are prepared again without the cache (nothing sliced) and
    the unseen tokens fed; warned once per model. Models that feed them all are left as they are."""
    original = model.prepare_inputs_for_generation

    def prepare(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> dict:
        inputs = original(input_ids, *args, **kwargs)
        fed, unseen = inputs.get("input_ids"), input_ids.shape[-1] - cache.seen_tokens
        if kwargs.get(state.cache_arg) is not cache or fed is None or fed.shape[-1] >= unseen:
            return inputs
        whole = original(input_ids, *args, **{**kwargs, state.cache_arg: None})["input_ids"]
        if whole is None or whole.shape[-1] != input_ids.shape[-1]:  # it slices without a cache too: refused after
            return inputs
        if "feeds unseen" not in state.warned:
            import transformers

            state.warned.add("feeds unseen")
            warnings.warn(f"moa-flex: {type(model).__name__}.prepare_inputs_for_generation of transformers "
                          f"{transformers.__version__} fed {fed.shape[-1]} of the {unseen} tokens the cache has not "
                          "seen (it keeps the last tokens alone once a cache is passed, the prompt's first step "
                          "included, so its own generate ignores the prompt); moa-flex feeds them all", stacklevel=5)
        inputs["input_ids"] = whole[..., cache.seen_tokens:]
        return inputs

    own = model.__dict__.get("prepare_inputs_for_generation")  # one set on the instance, put back after
    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation  # the class's method again
        else:
            model.prepare_inputs_for_generation = own


def _next_turn(model: torch.nn.Module, state: "CompiledState", cache: Any, inputs: torch.Tensor, pads: torch.Tensor,
               new: int) -> MoaCache:
    """The cache of an earlier turn, checked for this one: ``inputs`` is the whole conversation
    so far (transformers' convention), of which the cache has seen the first
    ``cache.seen_tokens``; only the rest is prefilled. ValueError naming the mismatch, before
    anything is written (the cache stays usable)."""
    if not isinstance(cache, MoaCache):
        raise ValueError(f"moa-flex generate continues a conversation from its own MoaCache (model.moa_flex.cache or "
                         f"the cache the previous output returned), got {type(cache).__name__}")
    if cache.plan is not state.plan and cache.plan != state.plan:
        raise ValueError("the MoaCache was built for another plan than the model's")
    devices, dtype = layer_placement(model, state.plan.model)
    if cache.dtype != dtype or [layer.device for layer in cache.moa_layers] != [torch.device(d) for d in devices]:
        raise ValueError(f"the MoaCache was built for another model: {cache.dtype} on "
                         f"{sorted({str(layer.device) for layer in cache.moa_layers})}, the model is {dtype} on "
                         f"{sorted({str(d) for d in devices})}")
    B, total = inputs.shape
    if cache.batch_size != B:
        raise ValueError(f"the MoaCache holds a batch of {cache.batch_size} rows, this turn has {B}")
    if total <= cache.seen_tokens:
        raise ValueError(f"input_ids must be the whole conversation: {total} tokens, but the cache has seen "
                         f"{cache.seen_tokens}")
    if not torch.equal(pads, cache.pads):
        raise ValueError(f"the conversation's left padding {pads.tolist()} is not the cache's {cache.pads.tolist()}")
    if total + new > cache.planned_length:
        raise ValueError(f"this turn would pass the planned length: {total} tokens + max_new_tokens {new} > "
                         f"{cache.planned_length}; compile with a larger max_length (every turn of a conversation "
                         "is planned for it)")
    state.cache = cache
    return cache


def _stop_strings_to_criteria(params: dict, config: Any) -> None:
    """``stop_strings`` as a stopping criterion built here: transformers builds it from the
    ``tokenizer`` argument, which it does not keep for a callable ``custom_generate``."""
    stop = params.pop("stop_strings", None) or getattr(config, "stop_strings", None)
    if not stop:
        return
    tokenizer = params.get("tokenizer")
    if tokenizer is None:
        raise ValueError("stop_strings needs the model's tokenizer: pass tokenizer= to generate()")
    from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(params.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop))
    params["stopping_criteria"] = criteria
    if getattr(config, "stop_strings", None):  # the config's own: transformers must not build it again
        config = copy.deepcopy(config)
        config.stop_strings = None
        params["generation_config"] = config


def _cache_for(model: torch.nn.Module, state: "CompiledState", batch: int, planned: int, pads: torch.Tensor) -> MoaCache:
    """The previous request's cache if its layout matches (reset), else a new one."""
    devices, dtype = layer_placement(model, state.plan.model)
    old = state.cache
    if (old is not None and old.plan is state.plan and old.batch_size == batch and old.planned_length == planned
            and torch.equal(old.pads, pads) and old.dtype == dtype and old.kv_dtype == (state.kv_dtype or dtype)
            and [layer.device for layer in old.moa_layers] == [torch.device(d) for d in devices]):
        old.reset()
        return old
    state.cache = None  # free the old one before allocating
    state.cache = new_cache(model, state, batch, planned, state.kv_dtype, pads=pads)
    return state.cache


def new_cache(model: torch.nn.Module, state: "CompiledState", batch: int, planned: int,
              kv_dtype: torch.dtype | str | None, *, pads: torch.Tensor | None = None) -> MoaCache:
    """A fresh MoaCache for the compiled model: its plan, its layers' devices and dtype, its own
    windows (the layers' caches bounded by them), stored in ``kv_dtype`` (None: the model's)."""
    devices, dtype = layer_placement(model, state.plan.model)
    return MoaCache(state.plan, batch, planned, pads=pads, dtype=dtype, devices=devices, config=model.config,
                    kv_dtype=kv_dtype, windows=state.windows)
