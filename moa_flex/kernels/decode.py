"""Ragged MoA decode: one query token per batch row over the per-KV-group ragged KV cache.

Layout (docs/DESIGN.md, "The KV cache"), per layer:

* ``k`` ``[B, S, D]``, ``v`` ``[B, S, Dv]``: the slot axis concatenates the KV groups; group
  ``g`` owns slots ``offsets[g] .. offsets[g+1]-1`` (``offsets`` int32 ``[G+1]``, the
  allocation, the same for every row, ``offsets[0] = 0``, ``offsets[G] = S``).
* ``caps`` int32 ``[B, G]``: row ``b`` uses the first ``caps[b, g]`` slots of group ``g``.
* ``spans`` int32 ``[B, H]``: span (tokens) of query head ``h`` in row ``b`` (``<= caps``).
* ``pos`` int64 ``[B]``: logical position ``i`` of the row's query; its own K/V are already
  in the cache.

Logical position held by local slot ``s`` of a group with cap ``C`` (``R = C - sink``):
``s >= C`` unused; ``s < sink``: ``p = s``, valid iff ``p <= i``; otherwise valid iff
``s <= i`` and then ``p = i - ((i - s) mod R)``. Head ``h`` keeps a valid slot iff
``p < sink or i - p < span - sink`` and the model's own attention pattern keeps it: ``window >
0`` a sliding window, ``i - p < window``; ``window < 0`` chunked local attention in chunks of
``C = -window`` tokens (Llama 4), ``p // C == i // C``, i.e. ``i - p < i mod C + 1``;
``window == 0`` nothing more (:func:`window_limit`). Scores are
``scale * q.k`` (soft-capped ``softcap * tanh(x / softcap)`` if ``softcap > 0``), then with
ALiBi (``alibi`` float32 ``[H]``, one slope per query head) minus ``alibi[h] * (i - p)``, in
natural-log units (the softmax's own); softmax over kept slots (and learned sinks, which take
no bias), times ``v``; a head with no kept slot gives zeros.

Shapes of the op: ``q`` ``[B, H, D]`` (one query token per row, no q-length axis) ->
``out`` ``[B, H, Dv]`` in ``q``'s dtype.

An FP8 cache (:mod:`moa_flex.kernels.quant`): ``k``/``v`` float8_e4m3fn with ``k_scale``/
``v_scale`` float32 ``[B, S]`` (one per slot); the keys and values read are ``k * k_scale`` and
``v * v_scale``. The kernel reads the FP8 bytes and folds the scales into the scores and the
probabilities, in registers.

Three implementations:

* :func:`ragged_decode_reference`: the twin, pure torch in float64, straight from the rule;
  the oracle of the tests and the CPU implementation.
* :func:`ragged_decode_triton`: the Triton kernel (flash-decoding / split-K). One program
  per (work item = group and chunk of its slots, row); all query heads of the group are
  handled in that program, so each K/V slot is read once. A second kernel combines the
  chunks' partial (max, sum, acc). By default the work list cuts every group into nearly
  equal items sized so that all programs of a call are resident on the GPU at once (one
  round, no tail of a few late programs: :func:`auto_work_list`). The work list depends only
  on the allocation (offsets, batch, chunk size), never on caps/pos/spans, so a captured CUDA graph stays valid
  across requests and steps; caps, pos and spans are applied inside the kernel. On CPU
  tensors it runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first
  imported: triton 3.9 reads it when ``@triton.jit`` decorates, its own library included).
* ``torch.ops.moa_flex.ragged_decode`` (registered in :mod:`moa_flex.runtime.ops`): the custom
  op (CUDA -> Triton, CPU -> twin) with a fake implementation, for torch.compile and CUDA graphs.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .quant import SCALE_DTYPE, dequantize_fp8, is_quantized
from .triton_support import FLOAT_DTYPES, interpreting, pow2, sm_count, tl, triton
LOG2E = 1.4426950408889634
DEFAULT_BLOCK_N = 64  # slots per inner tile
MAX_CHUNK = 8192  # slots per work item, upper bound of the fixed-chunk choice (auto_chunk)
# Programs of the partial kernel resident per SM in its default configuration (block_n 64,
# 4 warps, 2 stages, D 128, bf16): ~107 registers per thread and 38 KiB of shared memory
# on an H200 (triton 3.6), so 4 per SM; auto_work_list sizes one call to fit in that.
RESIDENT_PER_SM = 4
# Query heads of a group one program holds at widths past 128 (a latent cache: one group of
# every head): 16 at DeepSeek-V3's 576 / 512 take 129 KiB of an sm_90 block's 227 KiB of shared
# memory, all 128 of its heads 320 KiB, which Triton refuses at launch (tests/kernel_aot.py)
LATENT_HEADS = 16


@dataclass(frozen=True)
class Tiling:
    """The partial kernel's default tiles for one cache: ``block_n`` slots per inner tile,
    ``num_stages`` of software pipelining, and the programs an SM holds at once with them."""

    block_n: int
    num_stages: int
    resident_per_sm: int
    heads_per_program: int | None = None  # query heads of a group one program holds (None: all)


def default_tiling(head_dim: int, value_dim: int, quantized: bool) -> Tiling:
    """Default tiles by cache widths and dtype. bf16 at widths <= 128: 64 slots, 2 stages (38
    KiB of shared memory, 4 programs an SM). FP8 at widths <= 128: a tile of the same bytes
    needs twice the slots; 128 slots and 2 stages (41 KiB and 168 registers a thread, so 3
    programs an SM): with the V words converted natively, 1-4% faster than 3 stages (74 KiB,
    2 registers spilled) on an H100 (bench/RESULTS.md, 2026-12-06). Wider heads (a latent
    cache, one group of all heads): 32 slots, 2 stages, and at most :data:`LATENT_HEADS` heads a
    program (more programs over a group's heads, each reading the group's slots), 16 slots a
    tile past a width of 1024 (``tests/kernel_aot.py latent`` compiles them for sm_90)."""
    if max(head_dim, value_dim) > 1024:
        return Tiling(16, 2, RESIDENT_PER_SM, LATENT_HEADS)
    if max(head_dim, value_dim) > 128:
        return Tiling(32, 2, RESIDENT_PER_SM, LATENT_HEADS)
    if quantized:
        return Tiling(128, 2, 3)
    return Tiling(DEFAULT_BLOCK_N, 2, RESIDENT_PER_SM)


_CACHE_SIZE = 64  # allocations whose host offsets and work lists are kept


# ---------------------------------------------------------------------------------- checks
def check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    caps: torch.Tensor,
    spans: torch.Tensor,
    pos: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    softcap: float,
    float_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Validate shapes, dtypes and devices (metadata only: never syncs a device); an FP8 ``k``
    and ``v`` need ``k_scale``/``v_scale``.

    Raises TypeError for a wrong dtype, ValueError for a wrong shape, device or scalar.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("offsets", offsets), ("caps", caps), ("spans", spans), ("pos", pos)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in float_dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in float_dtypes)
        raise TypeError(f"q must be one of {names}, got {q.dtype}")
    check_cache_dtypes(q, k, v, k_scale, v_scale)
    for name, t, dt in (("offsets", offsets, torch.int32), ("caps", caps, torch.int32), ("spans", spans, torch.int32), ("pos", pos, torch.int64)):
        if t.dtype != dt:
            raise TypeError(f"{name} must be {dt}, got {t.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] (one query token per row), got shape {tuple(q.shape)}")
    if k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"k and v must be [B, S, D] and [B, S, Dv], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k and v must have B = {B} rows (q.shape[0]), got {k.shape[0]} and {v.shape[0]}")
    if k.shape[2] != D:
        raise ValueError(f"k.shape[2] must equal the head dim of q ({D}), got {k.shape[2]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v.shape[1] (slots) must equal k.shape[1] ({k.shape[1]}), got {v.shape[1]}")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D [G+1] with G >= 1, got shape {tuple(offsets.shape)}")
    G = offsets.shape[0] - 1
    if caps.shape != (B, G):
        raise ValueError(f"caps must be [B, G] = [{B}, {G}] (G = len(offsets) - 1), got {tuple(caps.shape)}")
    if H % G:
        raise ValueError(f"query heads H = {H} must be divisible by the KV groups G = {G} (len(offsets) - 1)")
    if spans.shape != (B, H):
        raise ValueError(f"spans must be [B, H] = [{B}, {H}], got {tuple(spans.shape)}")
    if pos.shape != (B,):
        raise ValueError(f"pos must be [B] = [{B}], got {tuple(pos.shape)}")
    for name, t in (("k", k), ("v", v), ("offsets", offsets), ("caps", caps), ("spans", spans), ("pos", pos)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    check_sink_and_window(sink, window)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")


def check_sink_and_window(sink: int, window: int) -> None:
    """ValueError unless ``sink`` is an integer >= 0 and ``window`` an integer (tokens; > 0 a
    sliding window, 0 none, < 0 chunked local attention of ``-window`` tokens)."""
    for name, x, low in (("sink", sink, 0), ("window", window, None)):
        if isinstance(x, torch.SymInt):  # tracing with a symbolic value (the cache's sink): checked when it runs
            continue
        if isinstance(x, bool) or not isinstance(x, int) or (low is not None and x < low):
            raise ValueError(f"{name} must be an integer{' >= 0' if low is not None else ''} (tokens), got {x!r}")


def window_limit(window: int, i: torch.Tensor) -> torch.Tensor | None:
    """The model's own pattern at query positions ``i``: a key at distance ``d = i - p`` is kept
    iff ``d < limit`` ([i's shape]; None: no pattern of its own). A sliding window keeps
    ``d < window``; chunked local attention of ``C = -window`` tokens keeps the query's own chunk,
    ``d < i mod C + 1`` (with ``0 <= d``)."""
    if window > 0:
        return torch.full_like(i, window)
    if window < 0:
        return torch.remainder(i, -window) + 1
    return None


def check_cache_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None,
                       v_scale: torch.Tensor | None) -> None:
    """K/V [B, S, D] in q's dtype, or both FP8 with float32 scales [B, S] on q's device."""
    if is_quantized(k.dtype) or is_quantized(v.dtype):
        if k.dtype != v.dtype:
            raise TypeError(f"an FP8 cache keeps K and V both in FP8, got {k.dtype} and {v.dtype}")
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if (not isinstance(t, torch.Tensor) or t.dtype != SCALE_DTYPE or tuple(t.shape) != tuple(k.shape[:2])
                    or t.device != q.device):
                raise ValueError(f"an FP8 cache needs {name} float32 [B, S] = {list(k.shape[:2])} on {q.device}, got "
                                 f"{(t.dtype, tuple(t.shape), str(t.device)) if isinstance(t, torch.Tensor) else t!r}")
        return
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}) or be float8_e4m3fn, got {t.dtype}")


def cache_values(k: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """What a reader sees of cached K or V: float64, dequantized if FP8 (the twins' input)."""
    return dequantize_fp8(k, scale) if is_quantized(k.dtype) else k.double()


def _check_offsets_values(offsets: list[int], S: int) -> None:
    if offsets[0] != 0 or offsets[-1] != S or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets must be non-decreasing from 0 to S = {S} (k.shape[1]), got {offsets}")


def check_decode_values(
    k: torch.Tensor, offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, pos: torch.Tensor
) -> None:
    """Validate the values of offsets/caps/spans/pos (reads them: syncs a device; not for hot paths)."""
    offs = [int(x) for x in offsets.tolist()]
    _check_offsets_values(offs, k.shape[1])
    widths = torch.tensor([b - a for a, b in zip(offs, offs[1:])], dtype=torch.int64)
    c = caps.detach().cpu().to(torch.int64)
    if bool((c < 0).any()) or bool((c > widths).any()):
        raise ValueError(f"caps must be in [0, offsets[g+1] - offsets[g]] = [0, {widths.tolist()}] per group, got {c.tolist()}")
    G, H = c.shape[1], spans.shape[1]
    s = spans.detach().cpu().to(torch.int64)
    head_caps = c.repeat_interleave(H // G, dim=1)
    if bool((s < 0).any()) or bool((s > head_caps).any()):
        raise ValueError(f"spans must be in [0, caps of the head's group], got spans {s.tolist()} for caps {c.tolist()}")
    if bool((pos < 0).any()):
        raise ValueError(f"pos must be >= 0 (logical position of the query), got {pos.tolist()}")


# ---------------------------------------------------------------------------------- the twin
def ragged_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    caps: torch.Tensor,
    spans: torch.Tensor,
    pos: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    softcap: float,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """The obviously-right twin: every slot's logical position and keep flag, float64 softmax.

    q [B, H, D], k [B, S, D], v [B, S, Dv] -> [B, H, Dv] in q's dtype. ``sinks`` [H]: learned
    sink logits, each a softmax term with no value (GPT-OSS). FP8 k/v: dequantized with
    ``k_scale``/``v_scale`` [B, S] first. ``alibi`` float32 [H]: ALiBi slopes, the score of a
    key at distance ``i - p`` less ``alibi[h] * (i - p)`` (after the soft-cap). ``select`` bool
    [B, S]: the slots an indexer selected for the row's query (DeepSeek Sparse Attention), the
    only ones attended besides the rule (None: all). Also checks
    values (offsets, caps, spans, pos), which reads them; accepts float64 too. Memory:
    O(B * H * S) float64.
    """
    check_decode_inputs(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, (*FLOAT_DTYPES, torch.float64),
                        k_scale, v_scale)
    check_sinks(sinks, q.shape[1], q.device)
    check_alibi(alibi, q.shape[1], q.device)
    check_select(select, k)
    check_decode_values(k, offsets, caps, spans, pos)
    B, H, _ = q.shape
    S, G = k.shape[1], offsets.shape[0] - 1
    dev = q.device
    offs = offsets.to(torch.int64)
    slot = torch.arange(S, device=dev)
    group = torch.searchsorted(offs[1:], slot, right=True)  # [S]: offs[g] <= slot < offs[g+1]
    local = slot - offs[group]  # [S], slot index inside its group
    cap = caps.to(torch.int64)[:, group]  # [B, S]
    i = pos.view(B, 1)
    valid = (local < cap) & (local <= i)
    ring = (cap - sink).clamp(min=1)  # only used where local >= sink, i.e. where cap > sink
    p = torch.where(local < sink, local.expand(B, S), i - torch.remainder(i - local, ring))  # [B, S]
    dist = (i - p).view(B, 1, S)
    head_group = torch.arange(H, device=dev) // (H // G)
    keep = valid.view(B, 1, S) & (group.view(1, 1, S) == head_group.view(1, H, 1))
    keep &= (p.view(B, 1, S) < sink) | (dist < (spans.to(torch.int64) - sink).view(B, H, 1))
    limit = window_limit(window, pos.view(B, 1, 1))
    if limit is not None:
        keep &= dist < limit
    if select is not None:
        keep &= select.view(B, 1, S)
    x = scale * torch.einsum("bhd,bsd->bhs", q.double(), cache_values(k, k_scale))
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    if alibi is not None:  # dist means nothing on slots that are not kept; they are masked next
        x = x - alibi.double().view(1, H, 1) * dist
    x = x.masked_fill(~keep, float("-inf"))
    probs = softmax_with_sinks(x, sinks)
    return torch.einsum("bhs,bsd->bhd", probs, cache_values(v, v_scale)).to(q.dtype)


def one_group_positions(caps: torch.Tensor, pos: torch.Tensor, sink: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, held), [B, S] each, for a cache of one KV group (``caps`` [B, 1], ``S`` slots) whose
    rows' newest position is ``pos`` [B]: the logical position each slot holds and whether it
    holds one. No host read (a CUDA graph may capture it)."""
    B = caps.shape[0]
    local = torch.arange(S, device=caps.device).view(1, S)
    cap = caps.to(torch.int64).view(B, 1)
    i = pos.view(B, 1)
    p = torch.where(local < sink, local, i - torch.remainder(i - local, (cap - sink).clamp(min=1)))
    return p, (local < cap) & (local <= i)


def slot_keep(offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, pos: torch.Tensor, sink: int,
              window: int, S: int) -> torch.Tensor:
    """Bool [B, S]: the slots of a one-group cache (``offsets`` [2]) whose token the rule keeps
    for each row's query at ``pos`` [B], for a layer whose heads share one rule (``spans``
    [B, H], all equal per row: checked on the CPU). The slots an indexer beside the cache may
    pick from (DeepSeek Sparse Attention); the twin's keep of any head, as the kernel keeps."""
    if offsets.shape[0] != 2:
        raise ValueError(f"slot_keep takes a cache of one KV group (a latent), got {offsets.shape[0] - 1} groups")
    if spans.device.type == "cpu" and not is_fake(spans) and bool((spans != spans[:, :1]).any()):
        raise ValueError("slot_keep needs one span per row for all heads (an indexer selects for all of them)")
    p, held = one_group_positions(caps, pos, sink, S)
    i = pos.view(-1, 1)
    keep = held & ((p < sink) | (i - p < spans[:, :1].to(torch.int64) - sink))
    limit = window_limit(window, i)
    return keep & (i - p < limit) if limit is not None else keep


def chunk_select_keep(offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, length: torch.Tensor,
                      start: torch.Tensor, sink: int, window: int, S: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool [B, C, S + C], positions int64 [B, S + C]) for a prefill chunk of ``C`` queries
    over a one-group cache of ``S`` slots holding ``length`` [B] tokens, for a layer whose heads
    share one rule: the columns are the cache's slots, then the chunk's keys, as an indexer beside
    the cache scores them (DeepSeek Sparse Attention). Query ``c`` is at ``i = start + c`` (``start``
    [B]; ``i < 0``: padding, keeps nothing); a slot keeps the token it holds, a chunk key ``c2 <= c``
    its position ``start + c2 >= 0``, where the rule keeps it for ``i``. ``positions``: each column's
    logical position (-1: a slot holding none), for the indexer's ties."""
    if offsets.shape[0] != 2:
        raise ValueError(f"chunk_select_keep takes a cache of one KV group (a latent), got {offsets.shape[0] - 1} groups")
    if spans.device.type == "cpu" and not is_fake(spans) and bool((spans != spans[:, :1]).any()):
        raise ValueError("chunk_select_keep needs one span per row for all heads (an indexer selects for all of them)")
    p, held = one_group_positions(caps, length - 1, sink, S)  # [B, S]: the cache before the chunk
    j = start.view(-1, 1) + torch.arange(C, device=start.device).view(1, C)  # [B, C]: the chunk's positions
    cols = torch.cat([p, j], dim=1)  # [B, S + C]
    real = torch.cat([held, j >= 0], dim=1)
    i = j.unsqueeze(-1)  # [B, C, 1]: the queries'
    key = cols.unsqueeze(1)
    causal = torch.cat([torch.ones(C, S, dtype=torch.bool, device=start.device),
                        torch.ones(C, C, dtype=torch.bool, device=start.device).tril()], dim=1)
    span = spans[:, :1].to(torch.int64).view(-1, 1, 1)
    keep = real.unsqueeze(1) & causal & (i >= 0) & ((key < sink) | (i - key < span - sink))
    limit = window_limit(window, i)
    if limit is not None:
        keep = keep & (i - key < limit)
    return keep, torch.where(real, cols, torch.full_like(cols, -1))


def check_sinks(sinks: torch.Tensor | None, H: int, device: torch.device) -> None:
    """ValueError unless ``sinks`` is None or a float tensor [H] on ``device``."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (H,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor [H] = [{H}] (a learned logit per query head), got "
                         f"{getattr(sinks, 'shape', sinks)!r}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")


def check_alibi(alibi: torch.Tensor | None, H: int, device: torch.device) -> None:
    """ValueError unless ``alibi`` is None or float32 [H] of finite slopes on ``device``."""
    if alibi is None:
        return
    if not isinstance(alibi, torch.Tensor) or alibi.shape != (H,) or alibi.dtype != torch.float32:
        got = (alibi.dtype, tuple(alibi.shape)) if isinstance(alibi, torch.Tensor) else alibi
        raise ValueError(f"alibi must be a float32 tensor [H] = [{H}] (an ALiBi slope per query head), got {got!r}")
    if alibi.device != device:
        raise ValueError(f"alibi is on {alibi.device} but q is on {device}")
    # the values only on the CPU: on a GPU reading them would sync every layer of every decode
    # step (the slopes are the model's constants); fake and meta tensors have none
    if alibi.device.type != "cpu" or is_fake(alibi):
        return
    if not bool(torch.isfinite(alibi).all()):
        raise ValueError(f"alibi slopes must be finite, got {alibi.tolist()}")


def check_select(select: torch.Tensor | None, k: torch.Tensor) -> None:
    """ValueError unless ``select`` is None or a bool tensor [B, S] (k's rows and slots) on k's device."""
    if select is None:
        return
    if not isinstance(select, torch.Tensor) or select.dtype != torch.bool or tuple(select.shape) != tuple(k.shape[:2]) \
            or select.device != k.device:
        got = (select.dtype, tuple(select.shape), str(select.device)) if isinstance(select, torch.Tensor) else select
        raise ValueError(f"select must be a bool tensor [B, S] = {list(k.shape[:2])} on {k.device}, got {got!r}")


def softmax_with_sinks(x: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of float64 scores ``x`` [B, H, ..., K] (-inf: not kept), with
    each head's learned sink logit as one more term that has no value; rows with nothing kept
    (and no sink) give zeros."""
    if sinks is None:
        return torch.softmax(x, dim=-1).nan_to_num(0.0)
    col = sinks.double().view(1, -1, *([1] * (x.dim() - 2))).expand(*x.shape[:-1], 1)
    return torch.softmax(torch.cat([x, col], dim=-1), dim=-1)[..., :-1]


# ---------------------------------------------------------------------------------- work list
@dataclass(frozen=True)
class DecodeWorkList:
    """Work items of one allocation: which group and which slots each program reads.

    ``items`` int32 [n_items, 4]: (group g, first slot of g in the flat cache, local start,
    local stop), at most ``chunk`` slots each; ``group_items`` int32 [G+1]: items of group g
    are ``group_items[g] .. group_items[g+1]-1``. Depends on the allocation (offsets; for the
    default list also the batch and the GPU) only.
    """

    items: torch.Tensor
    group_items: torch.Tensor
    n_items: int
    chunk: int
    max_items_per_group: int


_HOST_OFFSETS: OrderedDict = OrderedDict()
_WORK_LISTS: OrderedDict = OrderedDict()


def _remember(cache: OrderedDict, key: object, value: object) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def host_offsets(offsets: torch.Tensor, S: int) -> tuple[int, ...]:
    """The allocation's offsets as Python ints, read once per offsets tensor (then cached).

    The first call for a device tensor syncs (run one decode step before capturing a CUDA
    graph); the cache keeps a reference to the tensor, so its address is not reused, and
    keys on its version counter. Allocate a new tensor for a new allocation rather than
    writing into offsets in place under inference mode (no version counter there).
    """
    try:
        version = offsets._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    key = (offsets.data_ptr(), offsets.device, offsets.shape[0], offsets.stride(0), version)
    hit = _HOST_OFFSETS.get(key)
    if hit is not None and hit[1] is offsets:
        return hit[0]
    offs = tuple(int(x) for x in offsets.tolist())
    _check_offsets_values(list(offs), S)
    _remember(_HOST_OFFSETS, key, (offs, offsets))
    return offs


def auto_chunk(B: int, offsets: tuple[int, ...], device: torch.device, block_n: int = DEFAULT_BLOCK_N) -> int:
    """Slots per work item from the allocation alone: about 4 programs per SM (a power of two
    times block_n, at least 2 tiles, at most MAX_CHUNK slots)."""
    sms = sm_count(device)
    total = B * offsets[-1]
    want = -(-total // (4 * sms))
    chunk = 2 * block_n
    while chunk < want and chunk < MAX_CHUNK:
        chunk *= 2
    return chunk


def _work_list(offsets: tuple[int, ...], item_slots: Callable[[int], int], chunk: int,
               device: torch.device) -> DecodeWorkList:
    """Items of every group of width w cut into pieces of ``item_slots(w)`` slots."""
    rows, group_items, most = [], [0], 1
    for g, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        width = hi - lo
        size = item_slots(width)
        starts = list(range(0, width, size)) or [0]  # an empty group still gets one (empty) item
        rows += [(g, lo, s, min(s + size, width)) for s in starts]
        group_items.append(len(rows))
        most = max(most, len(starts))
    return DecodeWorkList(
        items=torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 4),
        group_items=torch.tensor(group_items, dtype=torch.int32, device=device),
        n_items=len(rows),
        chunk=chunk,
        max_items_per_group=most,
    )


def decode_work_list(offsets: tuple[int, ...], chunk: int, device: torch.device | str) -> DecodeWorkList:
    """The cached work list of an allocation cut in fixed chunks (offsets and chunk in slots)
    on `device`: every group in items of ``chunk`` slots, the last one shorter."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1 (slots), got {chunk!r}")
    device = torch.device(device)
    key = (tuple(offsets), chunk, device)
    hit = _WORK_LISTS.get(key)
    if hit is None:
        hit = _work_list(tuple(offsets), lambda width: chunk, chunk, device)
        _remember(_WORK_LISTS, key, hit)
    return hit


def _balanced_items(width: int, chunk: int, block_n: int) -> int:
    """Slots per item when a group of `width` slots is cut into ceil(width / chunk) nearly
    equal items (a multiple of block_n, at most chunk)."""
    n = max(1, -(-width // chunk))
    return max(block_n, -(-(-(-width // n)) // block_n) * block_n)


def auto_work_list(offsets: tuple[int, ...], batch: int, device: torch.device | str,
                   block_n: int = DEFAULT_BLOCK_N, resident_per_sm: int = RESIDENT_PER_SM) -> DecodeWorkList:
    """The default work list of an allocation for `batch` rows (cached).

    Every group is cut into nearly equal items of at most ``chunk`` slots, with ``chunk`` the
    smallest multiple of block_n (at least 2 tiles) for which ``batch x items`` fits in the
    programs the GPU holds at once (``resident_per_sm`` per SM): one round of programs, each
    with about the same number of slots, instead of a second round of a few programs that
    run with most of the GPU idle (bench/RESULTS.md, "Decode step breakdown": with this list
    and the one-pass append kernel, the density-0.25 decode kernel went from 70.3 to 64.5 us
    per layer at 4 x 64K on an H200).
    When even one item per group does not fit (large batches: several rounds anyway), fixed
    chunks of :func:`auto_chunk` slots.
    """
    device = torch.device(device)
    offsets = tuple(offsets)
    resident = resident_per_sm * sm_count(device)
    key = ("auto", offsets, batch, block_n, resident, device)
    hit = _WORK_LISTS.get(key)
    if hit is not None:
        return hit
    widths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    lo_tiles, hi_tiles = 2, max(2, -(-max(widths, default=0) // block_n))

    def programs(chunk: int) -> int:
        return batch * sum(-(-w // _balanced_items(w, chunk, block_n)) if w else 1 for w in widths)

    if programs(hi_tiles * block_n) > resident:
        wl = decode_work_list(offsets, auto_chunk(batch, offsets, device, block_n), device)
    else:
        while lo_tiles < hi_tiles:  # smallest chunk (in tiles) whose programs fit
            mid = (lo_tiles + hi_tiles) // 2
            lo_tiles, hi_tiles = (lo_tiles, mid) if programs(mid * block_n) <= resident else (mid + 1, hi_tiles)
        chunk = hi_tiles * block_n
        wl = _work_list(offsets, lambda width: _balanced_items(width, chunk, block_n), chunk, device)
    _remember(_WORK_LISTS, key, wl)
    return wl


def prepare_work(offsets: torch.Tensor, batch: int, tiling: Tiling | None = None) -> DecodeWorkList:
    """Read an allocation's offsets and build its default work list for ``tiling`` (the
    cache's :func:`default_tiling`) now (a cache calls this when it allocates), so that decode
    steps, and CUDA-graph warm-up and capture in particular, find both cached: nothing is read
    to the host nor allocated for them inside a graph."""
    tiling = tiling or default_tiling(128, 128, False)
    offs = host_offsets(offsets, int(offsets[-1]))
    return auto_work_list(offs, batch, offsets.device, tiling.block_n, tiling.resident_per_sm)


# ---------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def mma_dot(a, b, F32: tl.constexpr, IEEE: tl.constexpr):
        """``a @ b`` as the kernels take it: ``F32``: both operands in float32 first (Triton's
        interpreter); ``IEEE``: full float32 precision (float32 queries), else tensor-core
        precision."""
        if F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _fp8_pairs_to_f16(vw, PACKED: tl.constexpr):
        """int16 words of two e4m3 bytes -> (low byte, high byte) as float16 values, exact.

        A tensor-core operand whose contraction runs along the slots (V) loads 16-bit words
        from shared memory as transposed matrices, which 8-bit values cannot (Triton then loads
        them byte by byte); so V is read as words and split here. ``PACKED`` (compiled code):
        two words per 32-bit register in PTX: one byte permute gathers the two low bytes and
        the two high bytes, and each pair converts with the native e4m3x2 -> f16x2 conversion
        (4 instructions per register). The interpreter, which runs no PTX, takes bit operations:
        an e4m3 byte ``s eeee mmm`` becomes the float16 ``s 0eeee mmm0000000`` (the value times
        2^-8, subnormals included), times 256."""
        if PACKED:
            even, odd = tl.inline_asm_elementwise(
                "{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $2, 0, 0x3120; mov.b32 {lo, hi}, t; "
                "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
                "=r,=r,r", [vw], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            return even, odd
        even = ((vw & 0x80) << 8) | ((vw & 0x7F) << 7)
        odd = (vw & -32768) | ((vw >> 1) & 0x3F80)
        return even.to(tl.float16, bitcast=True) * 256.0, odd.to(tl.float16, bitcast=True) * 256.0

    @triton.jit
    def _slot_distance(s, sink, i, i_ring, ring):
        """``i - p`` for cache slots ``s``: a sink holds position ``s``; ring slot ``rs = s -
        sink`` sits at distance ``(i_ring - rs) mod ring`` (``i_ring``: the query's own ring
        slot), found by one compare and select instead of a division."""
        rs = s - sink
        return tl.where(rs < 0, i - s, i_ring - rs + tl.where(rs > i_ring, ring, 0))

    @triton.jit
    def _tile_kept_whole(start, BLOCK_N: tl.constexpr, hi, sink, i_ring, ring, reach):
        """Whether every slot of ``[start, start + BLOCK_N)`` is a valid ring slot closer than
        ``reach``: the tile's largest distance is at its first slot, or ``ring - 1`` where the
        ring wraps inside it."""
        a = start - sink
        b = a + BLOCK_N - 1
        far = tl.where(b <= i_ring, i_ring - a, tl.where(a > i_ring, i_ring - a + ring, ring - 1))
        return (a >= 0) & (start + BLOCK_N <= hi) & (far < reach)

    @triton.jit(do_not_specialize=["sink", "window_lim", "local_chunk"])
    def _decode_partial_kernel(
        q_ptr, k_ptr, v_ptr, items_ptr, caps_ptr, spans_ptr, pos_ptr, ks_ptr, vs_ptr, alibi_ptr, sel_ptr,
        m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kd,
        stride_vb, stride_vs, stride_vd,
        stride_cb, stride_cg, stride_sb, stride_sh, stride_pb, stride_ksb, stride_vsb, stride_selb,
        n_items, sink, window_lim, local_chunk, qk_scale, softcap,
        HPG: tl.constexpr, HB: tl.constexpr, HB_PAD: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
        QUANT: tl.constexpr, V_PAIRS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SELECT: tl.constexpr,
    ):
        """One (work item, row, block of HB heads): online softmax of HB of a group's HPG heads
        (all of them where HB = HPG) over a chunk of slots.
        ``HAS_ALIBI``: each head's score less its slope times the distance ``i - p``;
        ``HAS_SELECT``: only the slots an indexer selected (a byte per slot and row) are kept;
        ``QUANT``: FP8 K/V, dequantized in registers (scales folded into scores and probabilities);
        ``V_PAIRS``: both dots in float16 (queries cast once, times 2^-8; K's e4m3 converts to
        float16 natively) and V read as int16 words of two e4m3 values each, split into the
        even and odd columns by bit operations (see :func:`_fp8_pairs_to_f16`)."""
        item = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        g = tl.load(items_ptr + item * 4)
        base = tl.load(items_ptr + item * 4 + 1).to(tl.int64)
        lo = tl.load(items_ptr + item * 4 + 2)
        stop = tl.load(items_ptr + item * 4 + 3)
        cap = tl.load(caps_ptr + b * stride_cb + g * stride_cg)
        # logical position of the query; int32 slot arithmetic (positions < 2**31 tokens)
        i = tl.load(pos_ptr + b * stride_pb).to(tl.int32)
        # slots past the cap, past the query, or past the chunk are never read
        hi = tl.minimum(tl.minimum(stop, cap), i + 1)
        ring = tl.maximum(cap - sink, 1)
        # the ring slot of the query's own position (see _slot_distance), once per program
        i_ring = tl.maximum(i - sink, 0) % ring
        # chunked local attention (local_chunk > 0): the query's own chunk, d < i mod C + 1
        window_lim = tl.where(local_chunk > 0, i % tl.maximum(local_chunk, 1) + 1, window_lim)

        r0 = tl.arange(0, HB_PAD)
        r = tl.program_id(2) * HB + r0  # the group's heads this program holds
        head_ok = (r < HPG) & (r0 < HB)
        heads = g * HPG + r
        span = tl.load(spans_ptr + b * stride_sb + heads * stride_sh, mask=head_ok, other=0)
        win = span - sink  # a kept ring slot has i - p < win
        if HAS_ALIBI:  # the group's slopes, read once per program
            slope = tl.load(alibi_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
        d = tl.arange(0, D_PAD)
        dv = tl.arange(0, DV_PAD)
        qt = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
            mask=head_ok[:, None] & (d[None, :] < D), other=0.0,
        )
        if V_PAIRS:  # q / 256 in float16: no overflow below |q| = 2^24; qk_scale carries the 256
            qt = (qt.to(tl.float32) * 0.00390625).to(tl.float16)
            qk_scale = qk_scale * 256.0
        if DOT_F32:
            qt = qt.to(tl.float32)
        # scores go to log2 units (x log2 e) with the scale, one multiply an element, unless a
        # soft-cap or ALiBi needs them in natural-log units first
        x_scale = qk_scale if (HAS_SOFTCAP or HAS_ALIBI) else qk_scale * 1.4426950408889634
        m_i = tl.full([HB_PAD], float("-inf"), tl.float32)
        l_i = tl.full([HB_PAD], 0.0, tl.float32)
        acc = tl.full([HB_PAD, DV_PAD], 0.0, tl.float32)
        acc_e = tl.full([HB_PAD, DV_PAD // 2], 0.0, tl.float32)  # V_PAIRS: even and odd value columns
        acc_o = tl.full([HB_PAD, DV_PAD // 2], 0.0, tl.float32)
        w = tl.arange(0, DV_PAD // 2)
        # a tile of ring slots that every head keeps whole needs no mask: the nearest win (or
        # window) of the group's real heads bounds the distances such a tile may hold
        reach = tl.minimum(tl.min(tl.where(head_ok, win, 2**30), 0), window_lim)
        for start in range(lo, hi, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            valid = s < hi
            rows = base + s.to(tl.int64)
            kt = tl.load(
                k_ptr + b * stride_kb + rows[:, None] * stride_ks + d[None, :] * stride_kd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0,
            )
            if DOT_F32 or QUANT:
                kt = kt.to(qt.dtype)  # FP8 -> q's dtype is exact
            x = mma_dot(qt, tl.trans(kt), False, IEEE)
            if QUANT:
                k_sc = tl.load(ks_ptr + b * stride_ksb + rows, mask=valid, other=0.0)
                x = x * (x_scale * k_sc)[None, :]
            else:
                x = x * x_scale
            if HAS_SOFTCAP:
                y = x / softcap
                e = tl.exp2(-2.8853900817779268 * tl.abs(y))  # exp(-2|y|)
                t = (1.0 - e) / (1.0 + e)
                x = softcap * tl.where(y < 0, -t, t)
            if HAS_ALIBI:  # natural-log units, after the K scale and the soft-cap, as in the twin
                x = x - slope[:, None] * _slot_distance(s, sink, i, i_ring, ring).to(tl.float32)[None, :]
            if HAS_SOFTCAP or HAS_ALIBI:
                x = x * 1.4426950408889634  # log2 units (x log2 e) from here on
            if HAS_SELECT or not _tile_kept_whole(start, BLOCK_N, hi, sink, i_ring, ring, reach):
                dist = _slot_distance(s, sink, i, i_ring, ring)
                # one key per slot for the whole mask: a sink is kept by every head (far below
                # any win), a ring slot by a head whose win exceeds its distance, an invalid
                # slot by none; window_lim: the window, or 2**31 - 1 if none
                ok = valid & (dist < window_lim)
                if HAS_SELECT:
                    ok = ok & (tl.load(sel_ptr + b * stride_selb + rows, mask=valid, other=0) != 0)
                key = tl.where(ok, tl.where(s < sink, -(2**30), dist), 2**30)
                x = tl.where(key[None, :] < win[:, None], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            pr = tl.exp2(x - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            if V_PAIRS:  # v_ptr: int16 words (strides in words); each word two e4m3 values
                vw = tl.load(
                    v_ptr + b * stride_vb + rows[:, None] * stride_vs + w[None, :] * stride_vd,
                    mask=valid[:, None] & (w[None, :] < DV // 2), other=0,
                )
                v_even, v_odd = _fp8_pairs_to_f16(vw, not DOT_F32)
                v_sc = tl.load(vs_ptr + b * stride_vsb + rows, mask=valid, other=0.0)
                # p * v_scale * 16 in float16: overflows only past |v| ~ 1.8e6, keeps small scales
                # off float16's subnormals; the 16 is divided out at the end
                pv = (pr * (v_sc * 16.0)[None, :]).to(tl.float16)
                acc_e = acc_e * alpha[:, None] + mma_dot(pv, v_even, DOT_F32, DOT_F32)
                acc_o = acc_o * alpha[:, None] + mma_dot(pv, v_odd, DOT_F32, DOT_F32)
            else:
                vt = tl.load(
                    v_ptr + b * stride_vb + rows[:, None] * stride_vs + dv[None, :] * stride_vd,
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0,
                )
                if QUANT:  # the value scale rides on the probabilities: acc += (p * v_scale) . v8
                    v_sc = tl.load(vs_ptr + b * stride_vsb + rows, mask=valid, other=0.0)
                    pv = (pr * v_sc[None, :]).to(qt.dtype)
                    vt = vt.to(qt.dtype)
                else:
                    pv = pr.to(vt.dtype)  # probabilities in V's dtype, as the GPU MMA takes them
                acc = acc * alpha[:, None] + mma_dot(pv, vt, DOT_F32, IEEE)
            m_i = m_new
        if V_PAIRS:  # column 2j is word j's low byte: interleave the halves
            acc = tl.reshape(tl.join(acc_e, acc_o), [HB_PAD, DV_PAD]) * 0.0625
        row = (b * n_items + item) * HPG + r
        tl.store(m_ptr + row, m_i, mask=head_ok)
        tl.store(l_ptr + row, l_i, mask=head_ok)
        tl.store(acc_ptr + row[:, None] * DV_PAD + dv[None, :], acc, mask=head_ok[:, None])

    @triton.jit
    def _decode_combine_kernel(
        m_ptr, l_ptr, acc_ptr, group_items_ptr, sinks_ptr, out_ptr,
        stride_ob, stride_oh, stride_od, n_items,
        HPG: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        """One (head, row): merge the partial (max, sum, acc) of the group's chunks; with
        ``HAS_SINKS``, the head's learned sink adds exp(sink) to the denominator."""
        h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        g = h // HPG
        r = h % HPG
        c_lo = tl.load(group_items_ptr + g)
        c_hi = tl.load(group_items_ptr + g + 1)
        c = tl.arange(0, BLOCK_C)
        dv = tl.arange(0, DV_PAD)
        m_run = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            idx = c0 + c
            row = (b * n_items + idx) * HPG + r
            m_run = tl.maximum(m_run, tl.load(m_ptr + row, mask=idx < c_hi, other=float("-inf")))
        m_all = tl.max(m_run, 0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_run = tl.full([BLOCK_C], 0.0, tl.float32)
        acc = tl.full([BLOCK_C, DV_PAD], 0.0, tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            idx = c0 + c
            ok = idx < c_hi
            row = (b * n_items + idx) * HPG + r
            w = tl.exp2(tl.load(m_ptr + row, mask=ok, other=float("-inf")) - m_safe)
            l_run += w * tl.load(l_ptr + row, mask=ok, other=0.0)
            part = tl.load(acc_ptr + row[:, None] * DV_PAD + dv[None, :], mask=ok[:, None], other=0.0)
            acc += w[:, None] * part
        total = tl.sum(l_run, 0)
        if HAS_SINKS:  # m is in log2 units: the sink's term is exp2(sink log2 e - m)
            total += tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634 - m_safe)
        o = tl.sum(acc, 0) / tl.where(total > 0, total, 1.0)  # nothing kept -> zeros
        tl.store(out_ptr + b * stride_ob + h * stride_oh + dv * stride_od, o.to(out_ptr.dtype.element_ty), mask=dv < DV)


FP8_MODES = ("pairs", "q")
"""How the kernel reads an FP8 cache: ``pairs``: both dots in float16 (queries cast once), V
read as 16-bit words of two values (the fast form; 16-bit queries, an even value width >= 32,
unit stride along it); ``q``: dots in the queries' dtype, V read byte by byte (the form for
float32 queries, and the slow one; 2026-12-05 on an H100, 1.60-1.65x faster in pairs:
bench/RESULTS.md, docs/DESIGN.md "FP8 cache")."""


def default_fp8_mode(q: torch.Tensor, v: torch.Tensor) -> str:
    """``pairs`` where it applies (16-bit queries, even value width >= 32 with unit stride),
    else ``q``."""
    if q.dtype in (torch.bfloat16, torch.float16) and pairs_fit(v):
        return "pairs"
    return "q"


def pairs_fit(v: torch.Tensor) -> bool:
    """Whether an FP8 value tensor [B, S, Dv] can be read as int16 words: Dv even and >= 32,
    unit stride along it, even strides and storage offset."""
    Dv = v.shape[2]
    return (Dv % 2 == 0 and Dv >= 32 and v.stride(2) == 1 and v.stride(0) % 2 == 0 and v.stride(1) % 2 == 0
            and v.storage_offset() % 2 == 0)


def check_fp8_mode(mode: str | None, q: torch.Tensor, v: torch.Tensor) -> str:
    """The FP8 read mode to use: ``mode`` checked against :data:`FP8_MODES` and the inputs
    (ValueError naming what does not fit), or the default."""
    if mode is None:
        return default_fp8_mode(q, v)
    if mode not in FP8_MODES:
        raise ValueError(f"fp8_mode must be one of {FP8_MODES} or None, got {mode!r}")
    if mode == "pairs" and q.dtype == torch.float32:
        raise ValueError(f"fp8_mode={mode!r} computes the dots in float16; float32 queries take 'q'")
    if mode == "pairs" and not pairs_fit(v):
        raise ValueError(f"fp8_mode='pairs' reads V as int16 words: needs an even value width >= 32 with unit "
                         f"stride, got shape {tuple(v.shape)} strides {v.stride()}")
    return mode


def ragged_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    caps: torch.Tensor,
    spans: torch.Tensor,
    pos: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    softcap: float,
    *,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_mode: str | None = None,
    alibi: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
    heads_per_program: int | None = None,
) -> torch.Tensor:
    """The Triton kernel: q [B, H, D], k [B, S, D], v [B, S, Dv] -> out [B, H, Dv] (q's dtype);
    ``sinks`` [H]: learned sink logits, ``alibi`` float32 [H]: ALiBi slopes, ``select`` bool
    [B, S] (unit slot stride): an indexer's selected slots (all as in the twin); FP8 k/v with ``k_scale``/``v_scale`` float32 [B, S] (unit slot stride).
    ``fp8_mode``: how an FP8 cache is read (:data:`FP8_MODES`; None: :func:`default_fp8_mode`).

    ``chunk`` (slots per work item; default: :func:`auto_work_list`, from the allocation, the
    batch and the GPU's SM count) and
    ``block_n`` (slots per inner tile, a power of two >= 16) tune the split;
    ``heads_per_program`` (default: the tiling's, all of a group's heads below widths of 129)
    splits a group's query heads over programs, each reading the group's slots. ``out`` is written
    entirely. CUDA tensors run compiled; CPU tensors need Triton's interpreter
    (TRITON_INTERPRET=1 set before triton is first imported). Never reads caps/pos/spans on
    the host; the first call per offsets tensor reads offsets once (see :func:`host_offsets`).
    """
    if triton is None:
        raise RuntimeError("ragged_decode_triton needs triton (pip install 'moa-flex[dev]')")
    check_decode_inputs(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, FLOAT_DTYPES, k_scale, v_scale)
    check_sinks(sinks, q.shape[1], q.device)
    check_alibi(alibi, q.shape[1], q.device)
    check_select(select, k)
    if select is not None and select.stride(1) != 1:
        raise ValueError("select must have unit stride along the slots")
    quant = is_quantized(k.dtype)
    if quant and (k_scale.stride(1) != 1 or v_scale.stride(1) != 1):
        raise ValueError("k_scale and v_scale must have unit stride along the slots")
    mode = check_fp8_mode(fp8_mode, q, v) if quant else None
    if fp8_mode is not None and not quant:
        raise ValueError(f"fp8_mode is for an FP8 cache only; got {fp8_mode!r} with a {k.dtype} cache")
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "ragged_decode_triton on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (tests/conftest.py does so when CUDA is unavailable)"
        )
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"ragged_decode_triton runs on CUDA (or CPU under the interpreter), got {q.device}")
    B, H, D = q.shape
    S, Dv = k.shape[1], v.shape[2]
    G = offsets.shape[0] - 1
    hpg = H // G
    tiling = default_tiling(D, Dv, quant)
    block_n = tiling.block_n if block_n is None else block_n
    num_stages = tiling.num_stages if num_stages is None else num_stages
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (slots), got {block_n}")
    heads_per_program = tiling.heads_per_program if heads_per_program is None else heads_per_program
    if heads_per_program is not None and (isinstance(heads_per_program, bool) or not isinstance(heads_per_program, int)
                                          or heads_per_program < 1):
        raise ValueError(f"heads_per_program must be an integer >= 1, got {heads_per_program!r}")
    hb = hpg if heads_per_program is None else min(hpg, heads_per_program)
    offs = host_offsets(offsets, S)
    if chunk is None:  # residency as the default tiles have it (a measured property of those tiles)
        wl = auto_work_list(offs, B, q.device, block_n, tiling.resident_per_sm)
    else:
        wl = decode_work_list(offs, chunk, q.device)
    if out is None:
        out = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    elif out.shape != (B, H, Dv) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be [B, H, Dv] = [{B}, {H}, {Dv}] {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if B == 0 or H == 0:
        return out
    d_pad, dv_pad = pow2(D, 16), pow2(Dv, 16)
    m = torch.empty(B, wl.n_items, hpg, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B, wl.n_items, hpg, dv_pad, device=q.device, dtype=torch.float32)
    interp = interpreting()
    pairs = mode == "pairs"
    v_words = v.view(torch.int16) if pairs else None  # [B, S, Dv / 2]: two e4m3 values a word
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _decode_partial_kernel[(wl.n_items, B, triton.cdiv(hpg, hb))](
            q, k, v_words if pairs else v, wl.items, caps, spans, pos, k_scale if quant else pos,
            v_scale if quant else pos, m if alibi is None else alibi.contiguous(),  # slopes: unit stride
            pos if select is None else select.view(torch.uint8), m, l, acc,
            *q.stride(), *k.stride(), *(v_words.stride() if pairs else v.stride()), *caps.stride(), *spans.stride(), pos.stride(0),
            k_scale.stride(0) if quant else 0, v_scale.stride(0) if quant else 0, 0 if select is None else select.stride(0),
            wl.n_items, sink, window if window > 0 else 2**31 - 1, max(-window, 0), float(scale),
            float(softcap) if softcap > 0 else 1.0,
            HPG=hpg, HB=hb, HB_PAD=pow2(hb, 16), D=D, D_PAD=d_pad, DV=Dv, DV_PAD=dv_pad, BLOCK_N=block_n,
            HAS_SOFTCAP=softcap > 0, DOT_F32=interp, IEEE=q.dtype == torch.float32, QUANT=quant,
            V_PAIRS=pairs, HAS_ALIBI=alibi is not None, HAS_SELECT=select is not None, num_warps=num_warps,
            num_stages=num_stages,
        )
        _decode_combine_kernel[(H, B)](
            m, l, acc, wl.group_items, m if sinks is None else sinks, out, *out.stride(), wl.n_items,
            HPG=hpg, DV=Dv, DV_PAD=dv_pad, BLOCK_C=min(64, pow2(wl.max_items_per_group, 16)),
            HAS_SINKS=sinks is not None, num_warps=4,
        )
    return out
