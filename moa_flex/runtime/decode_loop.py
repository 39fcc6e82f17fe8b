"""moa-flex's decoding loop: transformers' ``generate`` prepares the request, this loop decodes.

``model.generate`` after ``moa_flex.compile`` hands this loop to transformers' own
``generate`` as its ``custom_generate`` (a callable, transformers >= 5.0). transformers
still resolves the generation config, validates it and builds the logits processors
(temperature, top-k/top-p, repetition penalty, ``min_new_tokens``, the user's own) and the
stopping criteria (``max_length``, EOS, stop strings, the user's own); this loop replaces its
per-token loop (``GenerationMixin._sample``). That loop re-derives the model's inputs from
its keyword arguments at every token (``prepare_inputs_for_generation``,
``_update_model_kwargs_for_generation``: attention-mask and position bookkeeping over the
whole sequence), 0.5-1.2 ms of host time per token on an H200 host, during which the GPU
waits (bench/RESULTS.md, "Decode step breakdown"). Here a step is what the compiled graphs
need and nothing else:

* prefill: the prompt (of a later turn, the tokens the cache has not seen), its 2-D padding
  mask, its positions (``cumsum(mask) - 1``, as transformers derives them), the
  :class:`~moa_flex.runtime.cache.MoaCache`, ``logits_to_keep=1``, and the request's
  multimodal inputs (below); the forward prefills it in chunks
  (``moa_flex.compile(..., prefill_chunk=...)``);
* decode: the new token of every row, its position (one more than the row's last), the cache;
  with CUDA graphs, once ``moa_flex.runtime.step_graph`` has captured the step, the loop replays it
  directly (``StepGraph.replay_static``: the new tokens and positions copied in, the logits
  read from the graph's own output) instead of going through the forward wrapper;
* token selection as transformers does it: the last logits copied to fp32, the logits
  processors, argmax (greedy) or ``multinomial(softmax)`` (sampling), the pad token for rows
  already finished, the stopping criteria. Sequences grow in a buffer allocated once.

Multimodal wrappers (Gemma 3 and 4, Fuyu, GOT-OCR2, ...): transformers' ``generate`` encodes
the images before the loop and hands it ``mm_encoder_outputs`` (``{}`` for a text-only
request, which is left out: it reads as none). Its own loop passes these and the other
prefill-only inputs (transformers' ``MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL``: pixels,
audio features, their sizes and masks) to the prefill only, where the model merges the
features into the placeholders' embeddings, and so does this loop; decode steps get none.
The token types of Gemma 3 (``token_type_ids``) and Gemma 4 (``mm_token_type_ids``) reach the
prefill too (decode steps get none, as in those models' ``prepare_inputs_for_generation``),
but where they make the image (or video) tokens attend each other in both directions (Gemma
3 always, Gemma 4 with ``use_bidirectional_attention="vision"``), the request is refused:
MoA's masks are causal and cannot reproduce that block. Multimodal inputs are refused too
where the prompt would be prefilled in several chunks (the features cannot be split); a
prompt without images runs as a text model's (tests/test_multimodal.py).

Greedy decoding and multinomial sampling give exactly what transformers' loop gives for the
same logits and random state (tests/test_generate.py compares them). ``max_length`` is the
loop's own bound; the other stopping criteria (EOS, stop strings, the user's) run at every
token, and whether they left every row finished is read one step late (on a GPU from a
pinned copy, so the host queues the next step without waiting for the GPU); the step after
the last is then run and discarded. Not supported, with a clear error: other decoding modes
(beam search, contrastive search, ...), attentions or hidden states in the output,
``synced_gpus``, model keyword arguments other than the padding mask and the inputs above
(the token types of other families, such as BERT's segment ids; encoder states; ...).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList
from transformers.generation import utils as generation_utils
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList

from moa_flex.compat import generate_output

from .forward import captured_step
from .multimodal import BLOCKS, blocks_of, check_causal, check_text_positions

if TYPE_CHECKING:
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    from .state import CompiledState

# model keyword arguments transformers' generate prepares itself; this loop derives its own
_PREPARED = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
                       "cache_position", "return_dict"})
_OUTPUTS_ALLOWED = ("output_attentions", "output_hidden_states")
# multimodal inputs transformers' loop passes to the prefill only (with a cache): pre-encoded features
# (``mm_encoder_outputs``), raw pixels, audio features, their sizes and masks
_PREFILL_ONLY = frozenset(getattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL",
                                  ("pixel_values", "pixel_values_videos", "image_sizes"))) | {"mm_encoder_outputs"}


def _check_request(generation_config: "GenerationConfig", model_kwargs: dict, synced_gpus: bool,
                   model: torch.nn.Module | None = None) -> None:
    """NotImplementedError for what this loop does not do. Model keyword arguments: the padding
    mask, the prefill's multimodal inputs and, for a family of :data:`~moa_flex.runtime.multimodal.BLOCKS` (``model``), its
    token types; anything else would be dropped, changing the result."""
    from transformers.generation.configuration_utils import GenerationMode

    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise NotImplementedError(f"moa-flex generate runs greedy decoding and sampling only, not {mode.value}")
    if synced_gpus:
        raise NotImplementedError("moa-flex generate does not support synced_gpus")
    for name in _OUTPUTS_ALLOWED:
        if getattr(generation_config, name, False) or model_kwargs.get(name):
            raise NotImplementedError(
                f"moa-flex generate does not return {name.removeprefix('output_')}: ragged decode attends a sparse cache "
                "and keeps no attention weights or per-layer states for the output"
            )
    blocks = blocks_of(model)
    passed = _PREPARED | _PREFILL_ONLY | set(_OUTPUTS_ALLOWED) | ({blocks.argument} if blocks else set())
    extra = sorted(k for k, v in model_kwargs.items() if k not in passed and v is not None)
    if extra:
        raise NotImplementedError(
            "moa-flex generate passes no model keyword arguments other than the padding mask, the prompt's multimodal "
            "inputs and the token types of the multimodal families it knows (" + ", ".join(
                f"{t}: {b.argument}" for t, b in BLOCKS.items()) + f"); got {extra}")


def _prefill_inputs(model: torch.nn.Module, model_kwargs: dict, new: int, chunk: int | None) -> dict:
    """The request's model inputs for the prefill of its ``new`` tokens besides ids, mask, positions
    and cache, as transformers' loop passes them: its multimodal inputs (decode steps get none),
    the token types of a :data:`~moa_flex.runtime.multimodal.BLOCKS` family (whole, as its own ``prepare_inputs_for_generation``
    passes them; decode steps get none either) once :func:`~moa_flex.runtime.multimodal.check_causal` has found no
    bidirectional block. An empty ``mm_encoder_outputs`` (transformers' ``{}`` for a text-only
    request) reads as none: it is left out so text-only requests run the text graph. With
    multimodal inputs, :func:`~moa_flex.runtime.multimodal.check_text_positions` first."""
    inputs = {k: v for k, v in model_kwargs.items()
              if k in _PREFILL_ONLY and v is not None and not (isinstance(v, dict) and not v)}
    if inputs:
        check_text_positions(model)
    if inputs and chunk is not None and new > chunk:
        raise NotImplementedError(
            f"the prompt's multimodal inputs {sorted(inputs)} cannot be split between prefill chunks ({new} tokens to "
            f"prefill, prefill_chunk={chunk}): compile with prefill_chunk >= {new} or prefill_chunk=None")
    blocks = blocks_of(model)
    types = model_kwargs.get(blocks.argument) if blocks else None
    if types is not None:
        check_causal(model, blocks, types)
        inputs[blocks.argument] = types
    return inputs


def _positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Prompt positions [B, length]: ``cumsum(mask) - 1`` (pads at 0), or 0..length-1."""
    if mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _StopFlag:
    """Whether a step left every row finished, read one step later: on CUDA through a pinned
    copy and an event, so the host queues the next step without waiting for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def record(self, unfinished: torch.Tensor) -> None:
        self.host.copy_(~unfinished.any(), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()
        self.pending = True

    def all_finished(self) -> bool:
        """The flag recorded last (False if none)."""
        if not self.pending:
            return False
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _split_criteria(stopping_criteria: StoppingCriteriaList, fallback: int | None) -> tuple[int | None, list]:
    """(max_length, the other criteria): the loop stops at max_length itself, as
    ``MaxLengthCriteria`` would (the smallest, if several)."""
    lengths = [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    others = [c for c in stopping_criteria if not isinstance(c, MaxLengthCriteria)]
    return (min(lengths) if lengths else fallback), others


def decode_loop(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: "LogitsProcessorList",
    stopping_criteria: StoppingCriteriaList,
    generation_config: "GenerationConfig",
    synced_gpus: bool = False,
    *,
    moa_state: "CompiledState",
    moa_streamer: "BaseStreamer | None" = None,
    **model_kwargs: Any,
) -> Any:
    """Decode a request prepared by transformers' ``generate`` (its ``custom_generate``
    signature). ``moa_state`` is ``model.moa_flex``; ``moa_streamer`` the request's streamer,
    which moa-flex's ``generate`` takes out of transformers' hands (transformers does not pass
    a streamer to a callable ``custom_generate``). Returns the sequences [B, prompt + new]
    or, with ``return_dict_in_generate``, a ``GenerateDecoderOnlyOutput``.

    With an early-stopping criterion (EOS, stop strings, ...), whether every row has finished
    is read one step late on a GPU, so the host never waits for the step in flight; the step
    after the last is then run and discarded (the MoA cache holds its token too).
    """
    _check_request(generation_config, model_kwargs, synced_gpus, model)
    cache = model_kwargs.get(moa_state.cache_arg, model_kwargs.get("past_key_values"))
    if cache is None or cache is not moa_state.cache:
        raise RuntimeError("moa-flex decode_loop runs inside moa-flex's generate, which hands it the MoA cache")
    B, prompt = input_ids.shape
    device = input_ids.device
    max_length, others = _split_criteria(stopping_criteria, generation_config.max_length)
    if max_length is None or max_length <= prompt:
        raise ValueError(f"nothing to generate: max_length {max_length} for a prompt of {prompt} tokens")
    processors = list(logits_processor) if type(logits_processor) is LogitsProcessorList else [logits_processor]
    return_dict = bool(generation_config.return_dict_in_generate)
    scores: tuple | None = () if return_dict and generation_config.output_scores else None
    raw_logits: tuple | None = () if return_dict and generation_config.output_logits else None
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos and pad is None:
        raise ValueError("stopping at EOS needs a pad token for the finished rows: pass pad_token_id")
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(moa_state.original_forward).parameters else {}
    call = {moa_state.cache_arg: cache, "use_cache": True, "return_dict": True, **keep}

    sequences = torch.empty(B, max_length, dtype=input_ids.dtype, device=device)
    sequences[:, :prompt] = input_ids
    length = prompt
    mask = model_kwargs.get("attention_mask")
    positions = _positions(mask, B, prompt, device)
    seen = cache.seen_tokens  # a later turn: the cache holds the conversation's first tokens already
    extra = _prefill_inputs(model, model_kwargs, prompt - seen, moa_state.prefill_chunk)
    outputs = model(input_ids=input_ids[:, seen:], attention_mask=mask, position_ids=positions[:, seen:], **extra,
                    **call)
    position = positions[:, -1:] + 1  # [B, 1] the next token's position per row
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    stop = _StopFlag(device)
    graph = None  # the captured decode step, replayed directly once there is one
    if moa_streamer is not None:
        moa_streamer.put(input_ids.cpu())
    while True:
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
        del outputs
        if stop.all_finished():  # the previous step finished every row: this one was extra
            break
        ids = sequences[:, :length]
        next_scores = logits
        for processor in processors:
            next_scores = processor(ids, next_scores)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (logits,)
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.nn.functional.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            tokens = torch.where(unfinished, tokens, pad)
        sequences[:, length] = tokens
        length += 1
        if moa_streamer is not None:
            moa_streamer.put(tokens.cpu())
        if length >= max_length:
            break
        if others:
            done = others[0](sequences[:, :length], scores)
            for criterion in others[1:]:
                done = done | criterion(sequences[:, :length], scores)
            unfinished = unfinished & ~done
            stop.record(unfinished)
        step = {"input_ids": tokens.unsqueeze(1), "position_ids": position}
        if graph is None:
            graph = captured_step(model, moa_state, cache, {**step, **call})
        if graph is not None:
            outputs = graph.replay_static(step)
            cache.mark_filled(1)
        else:
            outputs = model(**step, **call)
        position = position + 1
    if moa_streamer is not None:
        moa_streamer.end()
    sequences = sequences[:, :length]
    if not return_dict:
        return sequences
    return generate_output(cache, sequences=sequences, scores=scores, logits=raw_logits, attentions=None,
                            hidden_states=None)
