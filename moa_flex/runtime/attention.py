"""moa-flex attention at run time: the op the compile pass puts in place of each attention call.

``torch.ops.moa_flex.attention(q, k, v, attn_mask, scale, layer, runtime_id, softcap)`` (a
custom op, :mod:`moa_flex.runtime.ops`) looks up the :class:`MoaRuntime` that holds the
plan, builds (or reuses) the layer's FlexAttention BlockMask for the call's lengths, and runs
FlexAttention, compiled once per length bucket.

Lengths are padded at the end to a bucket (:func:`length_bucket`): padded keys come after
every real query, so causality hides them, and the output is sliced back; FlexAttention thus
compiles once per bucket, not per length.

Planned length N: the call's key length (the input length for a forward without cache), or
``runtime.planned_length`` when set. A left-padding mask (the 2-D [B, K] padding mask the
pass passes for layers without a window of their own, or a model's 4-D mask) makes every
row planned for its own real tokens: its logical positions start after its pad. Any other
mask (right padding, a model's own sliding window) is ANDed in densely.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # FlexAttention's auxiliary outputs (torch >= 2.9); older torch has return_lse only
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - depends on the torch version
    AuxRequest = None

from moa_flex.masks import allowed_from_mask, block_mask_from_spans, padding_info, selection_keep
from moa_flex.plan import Plan

from .ops import RUNTIMES
from .startup_log import StartupLog

_ids = itertools.count(1)
_flex_compiled: Callable | None = None
_flex_shapes: set[tuple] = set()  # the shapes the process-wide compiled FlexAttention has seen


def compiled_flex_attention() -> Callable:
    """The process-wide FlexAttention, compiled for static shapes (one per length bucket):
    inductor's CPU FlexAttention template fails to generate code for per-row captured
    tensors under dynamic shapes (torch 2.13), so lengths are bucketed instead."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def softcap_score_mod(softcap: float) -> Callable:
    """score_mod of logit soft-capping: ``softcap * tanh(score / softcap)`` (Gemma 2)."""

    def capped(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return softcap * torch.tanh(score / softcap)

    return capped


def score_mod_of(softcap: float, alibi: torch.Tensor | None, q_start: torch.Tensor | None,
                 key_bias: torch.Tensor | None = None, group: int = 1) -> Callable | None:
    """The score_mod of a call: soft-capping (if ``softcap`` > 0), then ALiBi's
    ``-slope[h] * (i - kv)``, where a query row's key index is ``i = q_start + q_idx`` (``q_start``
    a one-element tensor, so that rows and lengths are data, not constants that recompile), then
    ``key_bias[b, h // group, kv]`` (float32 [B, G, K]: each key's own bias, Doge's; ``group``
    query heads per head of it)."""
    cap = softcap_score_mod(softcap) if softcap > 0 else None
    if alibi is None and key_bias is None:
        return cap

    def biased(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        if cap is not None:
            score = cap(score, b, h, q, kv)
        if alibi is not None:
            score = score - alibi[h] * (q_start[0] + q - kv).to(torch.float32)
        if key_bias is not None:
            score = score + key_bias[b, h // group, kv]
        return score

    return biased


EAGER_MAX_TOKENS = 16384  # keys of one call: eager FlexAttention holds [B, H, Q, K] scores


def eager_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """FlexAttention without compilation: its reference implementation, which evaluates the
    mask_mod on every (query, key) pair and materializes the [B, H, Q, K] scores. What
    ``backend="eager"`` runs (debugging, tests); refused above :data:`EAGER_MAX_TOKENS` keys."""
    if k.shape[2] > EAGER_MAX_TOKENS:
        raise ValueError(
            f"moa-flex backend='eager' runs FlexAttention uncompiled, which holds [B, H, Q, K] scores; a call over "
            f"{k.shape[2]} keys is above its limit of {EAGER_MAX_TOKENS}: compile with backend='inductor'"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)


class MoaRuntime:
    """Holds a plan for the attention op; registered under an integer id used in graphs.

    ``compiled``: FlexAttention compiled by inductor (one kernel per length bucket), or its
    uncompiled reference implementation (:func:`eager_flex_attention`, ``backend="eager"``).
    """

    def __init__(self, plan: Plan, block_size: int = 128, *, compiled: bool = True,
                 query_chunk: int | None = None) -> None:
        self.plan = plan
        self.block_size = block_size
        self.compiled = compiled
        # queries per FlexAttention call (rounded up to blocks): a call's block masks hold
        # [B, H, query_chunk / block, keys / block] indices, linear in the keys (None: all queries at once)
        self.query_chunk = query_chunk
        self.planned_length: int | None = None
        self.calls = 0
        self.id = next(_ids)
        self._spans: dict[int, torch.Tensor] = {}  # planned length -> head spans [L, H]
        self.warned_dense = False  # the dense-mask warning, once per runtime
        self.log: StartupLog | None = None  # start-up lines (set by moa_flex.compile)
        # the layer a call with layer -1 runs as: code compiled once for several layers
        # (moa_flex.passes.regional) is told which one by its caller
        self.current_layer = -1
        RUNTIMES[self.id] = self

    def head_spans(self, N: int) -> torch.Tensor:
        """The plan's head spans [L, H] at planned length N (tokens), memoized."""
        spans = self._spans.get(N)
        if spans is None:
            if len(self._spans) > 256:
                self._spans.clear()
            spans = self._spans[N] = self.plan.head_spans(N)
        return spans

    def set_plan(self, plan: Plan) -> None:
        """Switch to another plan of the same model shape (checked by the caller)."""
        self.plan = plan
        self._spans.clear()

    def close(self) -> None:
        """Unregister (after which graphs that use this id fail loudly)."""
        RUNTIMES.pop(self.id, None)

    def index_keep(self, scores: torch.Tensor, info: torch.Tensor, layer: int) -> torch.Tensor:
        """Bool [B, Q, K] over an indexer's scores [B, Q, K] (the call's queries are the last Q of
        K positions): the keys ``layer``'s rule keeps, each row planned for its own real tokens
        (left pads from ``info``). The indexer picks one set of keys for all heads, so the layer's
        heads must share one span: a plan of per-head rules for such a layer is refused."""
        if layer < 0:
            layer = self.current_layer
        B, q_len, kv_len = scores.shape
        planned = self.planned_length or kv_len
        pads = info[:-1].cpu()
        spans = torch.stack([self.head_spans(max(1, planned - p))[layer] for p in pads.tolist()])  # [B, H]
        if bool((spans != spans[:, :1]).any()):
            raise ValueError(
                f"layer {layer} selects keys with an indexer (DeepSeek Sparse Attention): one selection for all its "
                f"heads, so its heads need one rule, but the plan gives them spans {spans[0].tolist()}; use a plan "
                "of granularity 'kv_head' (a latent cache is one KV head: one rule a layer)")
        return selection_keep(spans[:, 0].to(scores.device), self.plan.sink, pads.to(scores.device), q_len, kv_len)

    def block_mask(
        self, layer: int, q_len: int, kv_len: int, attn_mask: torch.Tensor | None, device: torch.device,
        planned: int, padded_len: int, info: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
    ) -> BlockMask:
        """The layer's BlockMask for one call, over ``padded_len`` keys (index space), for the
        query rows ``rows`` = [r0, r1) of the padded queries (default all ``q_len + padding``).

        ``planned`` is the request's planned length N (tokens); ``info`` the mask's
        :func:`~moa_flex.masks.padding_info` if the graph computed it already. No q-side indices
        (only a backward pass reads them). Cached by spans and pads unless a dense mask (beyond
        causal + left padding) must be ANDed in.
        """
        q_offset = kv_len - q_len
        extra = padded_len - kv_len
        r0, r1 = rows if rows is not None else (0, q_len + extra)
        if attn_mask is None:
            spans = self.head_spans(planned)[layer]
            return block_mask_from_spans(spans, self.plan.sink, r1 - r0, q_offset + r0, padded_len, self.block_size,
                                         device, compute_q_blocks=False)
        if attn_mask.dim() not in (2, 4):
            raise ValueError(f"attention mask must be 2-D [B, K] or 4-D [B, 1 or H, Q, K], got {attn_mask.dim()}-D")
        if attn_mask.shape[-1] != kv_len or (attn_mask.dim() == 4 and attn_mask.shape[-2] != q_len):
            raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)} does not match q/kv lengths {q_len}/{kv_len}")
        info = (padding_info(attn_mask) if info is None else info).cpu()
        pads, simple = info[:-1], bool(info[-1])
        spans = torch.stack([self.head_spans(max(1, planned - p))[layer] for p in pads.tolist()])
        dense = None
        if not simple:
            q0, q1 = min(r0, q_len), min(r1, q_len)  # this call's real query rows
            if attn_mask.dim() == 2:  # causal AND the padding mask, as the model would build it
                i = torch.arange(q0, q1, device=attn_mask.device).view(-1, 1) + q_offset
                j = torch.arange(kv_len, device=attn_mask.device).view(1, -1)
                allowed = (j <= i).view(1, 1, q1 - q0, kv_len) & attn_mask.bool().view(-1, 1, 1, kv_len)
            else:
                allowed = allowed_from_mask(attn_mask[:, :, q0:q1])
            if not self.warned_dense:
                self.warned_dense = True
                warnings.warn(
                    "moa-flex: the attention mask is more than causal + left padding (the model's own sliding "
                    "window, right padding, an indexer's selection of keys?); it is ANDed in densely, without full "
                    "blocks.",
                    stacklevel=2,
                )
            # padded keys and query rows past the real ones: never allowed
            dense = torch.nn.functional.pad(allowed, (0, extra, 0, (r1 - r0) - (q1 - q0)), value=False)
        return block_mask_from_spans(
            spans, self.plan.sink, r1 - r0, q_offset + r0, padded_len, self.block_size, device, compute_q_blocks=False,
            pads=pads, dense_mask=dense,
        )

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
        scale: float, layer: int, softcap: float, info: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
        alibi: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse attention of one layer: q [B, H, Q, D], k/v [B, KVH, K, D] -> [B, H, Q, Dv].
        ``sinks`` [H]: learned sink logits (GPT-OSS), one more term ``exp(sink)`` in each
        softmax's denominator: the output times ``sigmoid(lse - sink)``. ``alibi`` [H] float32:
        ALiBi slopes, the score bias ``-slope * (i - j)`` for a query at key index i and a key at
        j (a score_mod). ``key_bias`` [B, G, K]: each key's own score bias, G heads grouped as
        k's (Doge's; a score_mod). ``layer`` -1: the runtime's ``current_layer`` (regional
        compilation sets it before each layer's code)."""
        if layer < 0:
            layer = self.current_layer
            if layer < 0:
                raise RuntimeError("moa-flex attention of a shared compiled layer was called before its layer was set")
        q_len, kv_len = q.shape[2], k.shape[2]
        if q_len != kv_len and self.planned_length is None:
            raise NotImplementedError(
                "moa-flex: attention over a dense KV cache (decoding without a MoaCache) is not supported; "
                "use model.generate(), which plans the request and allocates the ragged MoA cache, or pass "
                "past_key_values=moa_flex.MoaCache(...), or run the whole sequence (use_cache=False)."
            )
        planned = self.planned_length or kv_len
        if planned < kv_len:
            raise ValueError(f"input of {kv_len} tokens exceeds the planned length max_length={planned}")
        self.calls += 1
        padded = length_bucket(kv_len)
        extra = padded - kv_len
        if extra:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        rows = q.shape[2]
        step = rows if self.query_chunk is None else min(rows, -(-self.query_chunk // self.block_size) * self.block_size)
        flex = compiled_flex_attention() if self.compiled else eager_flex_attention
        kwargs = dict(scale=scale if scale > 0 else 1.0 / math.sqrt(q.shape[-1]), enable_gqa=k.shape[1] != q.shape[1])
        if alibi is not None:
            alibi = alibi.to(device=q.device, dtype=torch.float32)
        if key_bias is not None:  # float32, padded with the keys
            key_bias = torch.nn.functional.pad(key_bias.to(device=q.device, dtype=torch.float32), (0, extra))
        if sinks is not None:  # the log-sum-exp comes back beside the output
            kwargs.update({"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True})
        shape = (tuple(q.shape[:2]), step, tuple(k.shape), q.dtype, q.device, softcap > 0, sinks is not None,
                 alibi is not None, key_bias is not None)
        first = self.compiled and self.log is not None and shape not in _flex_shapes
        _flex_shapes.add(shape)
        phase = self.log.phase(f"compiling FlexAttention for {padded}-key calls") if first else contextlib.nullcontext()
        outs = []
        with phase:
            outs.append(self._flex_rows(flex, q, k, v, 0, step, layer, q_len, kv_len, attn_mask, planned, padded, info,
                                        kwargs, sinks, softcap, alibi, key_bias))
        if first:
            self.log.compiles += 1
        for r0 in range(step, rows, step):
            outs.append(self._flex_rows(flex, q, k, v, r0, step, layer, q_len, kv_len, attn_mask, planned, padded, info,
                                        kwargs, sinks, softcap, alibi, key_bias))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[:, :, :q_len]

    def _flex_rows(self, flex: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int, step: int,
                   layer: int, q_len: int, kv_len: int, attn_mask: torch.Tensor | None, planned: int, padded: int,
                   info: torch.Tensor | None, kwargs: dict, sinks: torch.Tensor | None = None, softcap: float = 0.0,
                   alibi: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """One FlexAttention call: padded query rows [r0, r0 + step) over all keys (``sinks``:
        learned sink logits [H], applied from the call's log-sum-exp; ``alibi``: slopes [H];
        ``key_bias``: [B, G, K] per key)."""
        q_start = None if alibi is None else torch.tensor([kv_len - q_len + r0], dtype=torch.int32, device=q.device)
        group = 1 if key_bias is None else q.shape[1] // key_bias.shape[1]
        kwargs = {**kwargs, "score_mod": score_mod_of(softcap, alibi, q_start, key_bias, group)}
        qc = q[:, :, r0:r0 + step]
        if qc.shape[2] < step:
            qc = torch.nn.functional.pad(qc, (0, 0, 0, step - qc.shape[2]))
        bm = self.block_mask(layer, q_len, kv_len, attn_mask, q.device, planned, padded, info, rows=(r0, r0 + step))
        if sinks is None:
            return flex(qc, k, v, block_mask=bm, **kwargs)
        out, aux = flex(qc, k, v, block_mask=bm, **kwargs)
        lse = aux.lse if AuxRequest is not None else aux  # [B, H, rows], natural log
        return out * torch.sigmoid(lse.float() - sinks.view(1, -1, 1).float())[..., None].to(out.dtype)


def length_bucket(n: int, block: int = 128, steps_per_octave: int = 4) -> int:
    """Smallest bucket >= n tokens: multiples of ``block`` on a geometric grid (4 per octave),
    so FlexAttention compiles a bounded number of shapes (<= 19% padding)."""
    if n <= block:
        return block
    k = math.ceil(steps_per_octave * math.log2(n / block) - 1e-9)
    while True:
        bucket = -(-int(math.ceil(block * 2 ** (k / steps_per_octave))) // block) * block
        if bucket >= n:
            return bucket
        k += 1
