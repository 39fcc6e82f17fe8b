"""Chunk attention: the queries of a prefill chunk over the ragged MoA cache plus the chunk itself.

Chunked prefill (docs/DESIGN.md, "Long contexts") runs a prompt through the model a chunk of
``C`` tokens at a time. In every layer the chunk's queries attend what the cache keeps (each
group's sink and ring, written by the chunks before) and the chunk's own keys, under the keep
rule; only then are the chunk's kept tokens written into the cache. This module computes that
attention straight from the cache's flat layout, in place: nothing is gathered into a dense
K/V, no mask tensor exists.

Inputs, per layer (shapes of the ragged decode kernel, :mod:`moa_flex.kernels.decode`):

* ``q`` ``[B, H, C, D]``: the chunk's queries; ``k_new`` ``[B, G, C, D]``, ``v_new``
  ``[B, G, C, Dv]``: the chunk's keys (after RoPE) and values per KV group;
* ``k`` ``[B, S, D]``, ``v`` ``[B, S, Dv]``: the layer's flat cache before this chunk,
  ``offsets`` int32 ``[G+1]``, ``caps`` int32 ``[B, G]``, ``spans`` int32 ``[B, H]`` (tokens);
* ``length`` int64 ``[B]``: real tokens in the cache per row (``n``); the cache holds logical
  positions ``0 .. n-1`` through the slot map;
* ``start`` int64 ``[B]``: logical position of the chunk's index 0 per row (negative where the
  chunk begins with left padding: index ``c`` is padding iff ``start + c < 0``);
* ``select`` bool ``[B, C, S + C]`` or None (DeepSeek Sparse Attention): the keys an indexer
  picked for each query; column ``s < S`` is the flat cache slot ``s``, column ``S + c'`` the
  chunk's key ``c'``.

An FP8 cache (:mod:`moa_flex.kernels.quant`) passes ``k``/``v`` as float8_e4m3fn with
``k_scale``/``v_scale`` float32 ``[B, S]``; the chunk's own keys may be FP8 too (``k_new``/
``v_new`` with ``kn_scale``/``vn_scale`` ``[B, G, C]``: what the chunk's write will store, so
the chunk's queries see the values later queries will see). Keys and values read are
``x8 * scale``; the kernel folds the scales into scores and probabilities in registers.

Query ``c`` of row ``b`` is at logical position ``i = start[b] + c`` (a padding query gives
zeros). It sees (a) the cache slots of its group: slot ``s < min(cap, n)`` holds ``p = s`` if
``s < sink``, else ``p = (n-1) - ((n-1-s) mod (cap - sink))``; and (b) the chunk's keys ``c' <= c``
at ``j = start + c'`` (``j >= 0``). A key at position ``p`` is kept iff ``p < sink or i - p <
span - sink`` and the model's own pattern keeps it (``window`` > 0: a sliding window, ``i - p <
window``; < 0: chunked local attention in chunks of ``-window`` tokens, ``p // C == i // C``;
:func:`moa_flex.kernels.decode.window_limit`). Scores are ``scale * q.k`` (soft-capped if
``softcap > 0``), then with ALiBi slopes ``alibi`` float32 ``[H]`` (None: no bias) less
``alibi[h] * (i - p)`` for query head ``h``, in natural-log units like the scores (the kernel
converts both to log2 units); softmax over kept keys. With ``select``, a key is kept only where
the rule keeps it and ``select[b, c, column]`` is True. A query with no kept key (padding, or a
selection that drops all its keys) gives zeros, with learned ``sinks`` too (the sink takes all
the probability and has no value).

Implementations:

* :func:`chunk_attention_reference`: the twin, float64, every key's position and keep flag from
  the definition above (queries in tiles to bound memory); the CPU path and the tests' oracle.
* :func:`chunk_attention_triton`: one program per (block of ``BLOCK_Q`` queries, query head,
  row), like a FlashAttention forward: prefill is compute-bound, so each head walks only the
  key ranges its own span can keep (heads of one group can have very different spans), and K/V
  tiles are re-read per head from L2. The ranges: the cache's sink slots, the ring's positions
  from ``i_min - reach`` on (in position order, so the ring's wrap needs no special case), the
  chunk's sink keys and its causal window; online softmax in fp32, int32 position arithmetic
  (positions < 2**31). Tiles whose every key every query of the block keeps (the interior of
  the window, for blocks without padding) skip the keep rule's masks, like FlexAttention's full
  blocks; a selection is applied on every tile, full ones too. Runs compiled on CUDA, in
  Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .decode import (cache_values, check_alibi, check_cache_dtypes, check_sink_and_window, check_sinks,
                     softmax_with_sinks, window_limit)
from .slot_map import slot_positions
from .quant import is_quantized
from .triton_support import FLOAT_DTYPES, interpreting, pow2, tl, triton

BLOCK_Q = 128  # queries per program
QUERY_TILE = 256  # queries per step of the reference (bounds its float64 score tile)
LOG2E = 1.4426950408889634


def check_chunk_inputs(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, length: torch.Tensor, start: torch.Tensor,
    sink: int, window: int, scale: float, softcap: float, float_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kn_scale: torch.Tensor | None = None, vn_scale: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
) -> None:
    """Validate shapes, dtypes and devices (metadata only: never syncs a device); FP8 K/V need
    their scales; ``select`` None or bool [B, C, S + C]."""
    named = (("q", q), ("k_new", k_new), ("v_new", v_new), ("k", k), ("v", v), ("offsets", offsets), ("caps", caps),
             ("spans", spans), ("length", length), ("start", start))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in float_dtypes:
        raise TypeError(f"q must be one of {', '.join(str(d).removeprefix('torch.') for d in float_dtypes)}, got {q.dtype}")
    check_cache_dtypes(q, k, v, k_scale, v_scale)
    check_cache_dtypes(q, k_new.flatten(1, 2), v_new.flatten(1, 2), None if kn_scale is None else kn_scale.flatten(1),
                       None if vn_scale is None else vn_scale.flatten(1))
    for name, t, dt in (("offsets", offsets, torch.int32), ("caps", caps, torch.int32), ("spans", spans, torch.int32),
                        ("length", length, torch.int64), ("start", start, torch.int64)):
        if t.dtype != dt:
            raise TypeError(f"{name} must be {dt}, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, C, D], got shape {tuple(q.shape)}")
    B, H, C, D = q.shape
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D [G+1] with G >= 1, got shape {tuple(offsets.shape)}")
    G = offsets.shape[0] - 1
    if H % G:
        raise ValueError(f"query heads H = {H} must be divisible by the KV groups G = {G}")
    if k_new.shape != (B, G, C, D) or v_new.dim() != 4 or v_new.shape[:3] != (B, G, C):
        raise ValueError(f"k_new must be [B, G, C, D] = {[B, G, C, D]} and v_new [B, G, C, Dv], got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
    Dv = v_new.shape[3]
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D or v.shape != (B, k.shape[1], Dv):
        raise ValueError(f"k and v must be [B, S, D] and [B, S, Dv] with B = {B}, D = {D}, Dv = {Dv}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    for name, t, shape in (("caps", caps, (B, G)), ("spans", spans, (B, H)), ("length", length, (B,)),
                           ("start", start, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    for name, t in named[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    check_sink_and_window(sink, window)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
    check_chunk_select(select, B, C, k.shape[1], q.device)


def check_chunk_select(select: torch.Tensor | None, B: int, C: int, S: int, device: torch.device) -> None:
    """ValueError unless ``select`` is None or a bool tensor [B, C, S + C] on ``device`` (metadata only)."""
    if select is None:
        return
    want = [B, C, S + C]
    if not isinstance(select, torch.Tensor):
        raise ValueError(f"select must be a bool tensor [B, C, S + C] = {want}, got {type(select).__name__}")
    if select.dtype != torch.bool or list(select.shape) != want:
        raise ValueError(f"select must be a bool tensor [B, C, S + C] = {want} (cache slots, then the chunk's keys), "
                         f"got {select.dtype} {tuple(select.shape)}")
    if select.device != device:
        raise ValueError(f"select is on {select.device} but q is on {device}")


def chunk_attention_reference(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, length: torch.Tensor, start: torch.Tensor,
    sink: int, window: int, scale: float, softcap: float, sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kn_scale: torch.Tensor | None = None, vn_scale: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
    *, select: torch.Tensor | None = None,
) -> torch.Tensor:
    """The twin: keys of the cache and of the chunk with their logical positions, the keep rule
    evaluated on every (query, key), float64 softmax (``sinks`` [H]: learned sink logits, a
    softmax term with no value; ``alibi`` float32 [H]: ALiBi slopes, the bias ``-alibi[h] (i -
    p)``; ``select`` bool [B, C, S + C]: an indexer's keys per query, and-ed into the keep
    mask); FP8 keys and values dequantized first. [B, H, C, Dv] in q's dtype; a query with
    no kept key gives zeros."""
    check_chunk_inputs(q, k_new, v_new, k, v, offsets, caps, spans, length, start, sink, window, scale, softcap,
                       (*FLOAT_DTYPES, torch.float64), k_scale, v_scale, kn_scale, vn_scale, select)
    k, v = cache_values(k, k_scale), cache_values(v, v_scale)
    k_new, v_new = cache_values(k_new, kn_scale), cache_values(v_new, vn_scale)
    check_sinks(sinks, q.shape[1], q.device)
    check_alibi(alibi, q.shape[1], q.device)
    B, H, C, _ = q.shape
    S = k.shape[1]
    G = offsets.shape[0] - 1
    hpg = H // G
    offs = [int(x) for x in offsets.tolist()]
    pos = slot_positions(caps, offsets, sink, length - 1)  # [B, S]: the position each slot holds
    out = torch.zeros(B, H, C, v_new.shape[3], dtype=torch.float64, device=q.device)
    for b in range(B):
        j = start[b] + torch.arange(C, device=q.device)  # chunk keys' positions
        for g in range(G):
            p_cache = pos[b, offs[g]:offs[g + 1]]
            keys = torch.cat([k[b, offs[g]:offs[g + 1]], k_new[b, g]]).double()
            vals = torch.cat([v[b, offs[g]:offs[g + 1]], v_new[b, g]]).double()
            p = torch.cat([p_cache, j])  # [W + C]
            valid = torch.cat([p_cache >= 0, j >= 0])
            heads = slice(g * hpg, (g + 1) * hpg)
            # the selection's columns of this group's keys: its cache slots, then the chunk's keys
            cols = torch.cat([torch.arange(offs[g], offs[g + 1]), S + torch.arange(C)]).to(q.device)
            win = (spans[b, heads].to(torch.int64) - sink).view(hpg, 1, 1)
            slopes = None if alibi is None else alibi[heads].double().view(hpg, 1, 1)
            for c0 in range(0, C, QUERY_TILE):
                i = (start[b] + torch.arange(c0, min(c0 + QUERY_TILE, C), device=q.device)).view(1, -1, 1)
                dist = i - p.view(1, 1, -1)
                keep = valid.view(1, 1, -1) & (dist >= 0) & (i >= 0) & ((p.view(1, 1, -1) < sink) | (dist < win))
                limit = window_limit(window, i)
                if limit is not None:
                    keep &= dist < limit
                if select is not None:
                    keep &= select[b, c0:c0 + QUERY_TILE][:, cols].unsqueeze(0)
                x = scale * (q[b, heads, c0:c0 + QUERY_TILE].double() @ keys.T)
                if softcap > 0:
                    x = softcap * torch.tanh(x / softcap)
                if slopes is not None:
                    x = x - slopes * dist
                probs = softmax_with_sinks(x.masked_fill(~keep, float("-inf")).unsqueeze(0),
                                           None if sinks is None else sinks[heads])[0]
                out[b, heads, c0:c0 + QUERY_TILE] = probs @ vals
    return out.to(q.dtype)


if triton is not None:
    from .decode import mma_dot  # the kernels' one dot (interpreter and float32 precision)

    @triton.jit
    def _attend_tile(
        m_i, l_i, acc, qt, k_rows, v_rows, ks_rows, vs_rows, sel_keys, sel_q, p, key_ok, i, win, sink, q_lim, qk_scale,
        softcap, slope, stride_kd, stride_vd, d, dv,
        D: tl.constexpr, DV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
        MASKED: tl.constexpr, QUANT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SELECT: tl.constexpr,
    ):
        """One tile of keys at positions ``p`` [N] (int32; K rows at pointers ``k_rows``): masks,
        scores and the online-softmax update of (m_i, l_i, acc) for the program's queries ``i``.
        ``MASKED=False``: a full tile (every key valid and kept for every query): no masks.
        ``QUANT``: FP8 rows with their scales at ``ks_rows``/``vs_rows``. ``HAS_ALIBI``: the
        bias ``-slope (i - p)``, ``slope`` in log2 units (full tiles too). ``HAS_SELECT``: only
        the keys an indexer selected, a byte at ``sel_keys[n] + sel_q[query]`` (full tiles too:
        the rule keeps them whole, the selection need not)."""
        if MASKED:
            dist = i[:, None] - p[None, :]
            keep = key_ok[None, :] & (dist >= 0) & ((p[None, :] < sink) | (dist < win)) & (dist < q_lim[:, None])
        if HAS_SELECT:  # padding queries (i < 0, the block's rows past C too) keep nothing: no read
            chosen = tl.load(sel_keys[None, :] + sel_q[:, None], mask=key_ok[None, :] & (i[:, None] >= 0), other=0) != 0
            if MASKED:
                keep = keep & chosen
            else:
                keep = chosen
        kt = tl.load(k_rows[:, None] + d[None, :] * stride_kd, mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
        if DOT_F32 or QUANT:
            kt = kt.to(qt.dtype)  # FP8 -> q's dtype is exact
        x = mma_dot(qt, tl.trans(kt), False, IEEE)
        # without a softcap qk_scale carries log2(e): log2 units from here on
        if QUANT:
            x = x * (qk_scale * tl.load(ks_rows, mask=key_ok, other=0.0))[None, :]
        else:
            x = x * qk_scale
        if HAS_SOFTCAP:
            y = x / softcap
            e = tl.exp2(-2.8853900817779268 * tl.abs(y))  # exp(-2|y|)
            t = (1.0 - e) / (1.0 + e)
            x = softcap * tl.where(y < 0, -t, t) * 1.4426950408889634
        if HAS_ALIBI:  # after the soft-cap (the bias is not capped); masked keys are overwritten below
            x = x - slope * (i[:, None] - p[None, :]).to(tl.float32)
        if MASKED or HAS_SELECT:
            x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(x - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        vt = tl.load(v_rows[:, None] + dv[None, :] * stride_vd, mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if QUANT:  # the value scale rides on the probabilities
            pv = (pr * tl.load(vs_rows, mask=key_ok, other=0.0)[None, :]).to(qt.dtype)
            vt = vt.to(qt.dtype)
        else:
            pv = pr.to(vt.dtype)
        acc = acc * alpha[:, None] + mma_dot(pv, vt, DOT_F32, IEEE)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["C", "sink", "window_lim", "local_chunk"])
    def _chunk_kernel(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, offsets_ptr, caps_ptr, spans_ptr, length_ptr, start_ptr, sinks_ptr,
        alibi_ptr, out_ptr,
        ks_ptr, vs_ptr, kns_ptr, vns_ptr, sel_ptr, seln_ptr,
        stride_qb, stride_qh, stride_qc, stride_qd,
        stride_knb, stride_kng, stride_knc, stride_knd,
        stride_vnb, stride_vng, stride_vnc, stride_vnd,
        stride_kb, stride_ks, stride_kd,
        stride_vb, stride_vs, stride_vd,
        stride_cb, stride_cg, stride_sb, stride_sh,
        stride_ob, stride_oh, stride_oc, stride_od,
        stride_ksb, stride_vsb, stride_knsb, stride_knsg, stride_vnsb, stride_vnsg,
        stride_selb, stride_selc, stride_sels,
        C, sink, window_lim, local_chunk, qk_scale, softcap,
        HPG: tl.constexpr, BLOCK_Q: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
        FULL_TILES: tl.constexpr, HAS_SINKS: tl.constexpr, QUANT: tl.constexpr, QUANT_NEW: tl.constexpr,
        HAS_ALIBI: tl.constexpr, HAS_SELECT: tl.constexpr,
    ):
        """One (query block, head, row): the head's queries over the keys its span can keep
        (``HAS_SELECT``: and an indexer selected, bytes at ``sel_ptr`` for cache slots and at
        ``seln_ptr`` for the chunk's keys)."""
        qb = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        g = h // HPG
        c = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # chunk index of each query (int32)
        row_ok = c < C
        start = tl.load(start_ptr + b).to(tl.int32)
        n = tl.load(length_ptr + b).to(tl.int32)
        i = start + c  # logical position of each query (< 0: padding)
        i = tl.where(row_ok & (i >= 0), i, -1)  # padding rows see nothing (dist < 0 for every key)
        win = tl.load(spans_ptr + b * stride_sb + h * stride_sh) - sink  # the head's window (a kept key: dist < win)
        if HAS_ALIBI:  # the head's slope in the scores' log2 units
            slope = tl.load(alibi_ptr + h).to(tl.float32) * 1.4426950408889634
        else:
            slope = 0.0  # unused: HAS_ALIBI=False compiles no bias
        d = tl.arange(0, D_PAD)
        dv = tl.arange(0, DV_PAD)
        qt = tl.load(q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + c[:, None].to(tl.int64) * stride_qc
                     + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        if DOT_F32:
            qt = qt.to(tl.float32)
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_Q], 0.0, tl.float32)
        acc = tl.full([BLOCK_Q, DV_PAD], 0.0, tl.float32)

        c_last = tl.minimum(qb * BLOCK_Q + BLOCK_Q, C) - 1
        i_lo = start + qb * BLOCK_Q  # smallest query position of the block (may be padding)
        i_hi = start + c_last
        reach = tl.minimum(win, window_lim)  # kept non-sink keys: p > i - reach
        p_from = i_lo - reach + 1
        # the model's pattern per query: a key at distance d is kept iff d < q_lim (window_lim, or
        # with chunked local attention the query's own chunk, d < i mod C + 1; window_lim is then C)
        chunk_c = tl.maximum(local_chunk, 1)
        q_lim = tl.where(local_chunk > 0, i % chunk_c + 1, window_lim)
        full_lo = tl.where(local_chunk > 0, i_hi - i_hi % chunk_c, -2147483647)  # keys every query's chunk holds
        any_real = i_hi >= 0
        cap = tl.load(caps_ptr + b * stride_cb + g * stride_cg)
        base = tl.load(offsets_ptr + g)
        ring = tl.maximum(cap - sink, 1)
        filled = tl.minimum(cap, n)
        kc = k_ptr + b * stride_kb
        vc = v_ptr + b * stride_vb
        ksc = ks_ptr + b * stride_ksb  # the cache's scales (QUANT)
        vsc = vs_ptr + b * stride_vsb
        selc = sel_ptr + b * stride_selb  # the row's selection of cache slots (HAS_SELECT), by flat slot
        seln = seln_ptr + b * stride_selb  # ... and of the chunk's keys, by chunk index
        sel_q = c.to(tl.int64) * stride_selc  # each query's selection row
        # (a) the cache's sink slots: position = slot
        sink_end = tl.where(any_real, tl.minimum(filled, sink), 0)
        for s0 in range(0, sink_end, BLOCK_N):
            p = s0 + tl.arange(0, BLOCK_N)
            ok = p < sink_end
            rows = (base + p).to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kc + rows * stride_ks, vc + rows * stride_vs, ksc + rows, vsc + rows,
                                         selc + rows * stride_sels, sel_q, p, ok, i, win,
                                         sink, q_lim, qk_scale, softcap, slope, stride_kd, stride_vd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT, HAS_ALIBI, HAS_SELECT)
        # (b) the ring, walked in position order: positions [max(sink, n - ring, p_from), n); the
        # keys from f0 on are kept by every query of a block without padding: full tiles, no masks
        ring_lo = tl.maximum(tl.maximum(sink, n - ring), p_from)
        ring_hi = tl.where(any_real & (cap > sink), n, ring_lo)
        block_full = (i_lo >= 0) & (qb * BLOCK_Q + BLOCK_Q <= C) & FULL_TILES
        f0 = tl.minimum(tl.where(block_full, tl.maximum(ring_lo, tl.maximum(i_hi - reach + 1, full_lo)), ring_hi), ring_hi)
        f1 = f0 + (ring_hi - f0) // BLOCK_N * BLOCK_N
        for p0 in range(ring_lo, f0, BLOCK_N):
            p = p0 + tl.arange(0, BLOCK_N)
            ok = p < f0
            rows = (base + sink + (p - sink) % ring).to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kc + rows * stride_ks, vc + rows * stride_vs, ksc + rows, vsc + rows,
                                         selc + rows * stride_sels, sel_q, p, ok, i, win,
                                         sink, q_lim, qk_scale, softcap, slope, stride_kd, stride_vd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT, HAS_ALIBI, HAS_SELECT)
        for p0 in range(f0, f1, BLOCK_N):
            p = p0 + tl.arange(0, BLOCK_N)
            rows = (base + sink + (p - sink) % ring).to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kc + rows * stride_ks, vc + rows * stride_vs, ksc + rows, vsc + rows,
                                         selc + rows * stride_sels, sel_q, p, p >= 0, i,
                                         win, sink, q_lim, qk_scale, softcap, slope, stride_kd, stride_vd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, False, QUANT, HAS_ALIBI, HAS_SELECT)
        for p0 in range(f1, ring_hi, BLOCK_N):
            p = p0 + tl.arange(0, BLOCK_N)
            ok = p < ring_hi
            rows = (base + sink + (p - sink) % ring).to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kc + rows * stride_ks, vc + rows * stride_vs, ksc + rows, vsc + rows,
                                         selc + rows * stride_sels, sel_q, p, ok, i, win,
                                         sink, q_lim, qk_scale, softcap, slope, stride_kd, stride_vd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT, HAS_ALIBI, HAS_SELECT)
        # (c) the chunk's own keys: its sink keys, then its window up to the block's last query
        kn = kn_ptr + b * stride_knb + g.to(tl.int64) * stride_kng
        vn = vn_ptr + b * stride_vnb + g.to(tl.int64) * stride_vng
        kns = kns_ptr + b * stride_knsb + g.to(tl.int64) * stride_knsg  # the chunk's scales (QUANT_NEW)
        vns = vns_ptr + b * stride_vnsb + g.to(tl.int64) * stride_vnsg
        first = tl.maximum(-start, 0)  # first real key of the chunk
        c_end = tl.where(any_real, c_last + 1, first)
        sink_hi = tl.minimum(tl.maximum(sink - start, first), c_end)
        for k0 in range(first, sink_hi, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            ok = kk < sink_hi
            rows = kk.to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kn + rows * stride_knc, vn + rows * stride_vnc, kns + rows, vns + rows,
                                         seln + rows * stride_sels, sel_q,
                                         start + kk, ok,
                                         i, win, sink, q_lim, qk_scale, softcap, slope, stride_knd, stride_vnd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT_NEW, HAS_ALIBI, HAS_SELECT)
        # its window: keys up to the block's first query and from i_hi - reach + 1 on are kept by
        # every query of a block without padding: full tiles there, masked tiles around them
        win_lo = tl.maximum(sink_hi, p_from - start)
        g0 = tl.minimum(tl.where(block_full, tl.maximum(win_lo, tl.maximum(i_hi - reach + 1, full_lo) - start), c_end),
                        c_end)
        g1 = g0 + tl.maximum(tl.minimum(c_end, qb * BLOCK_Q + 1) - g0, 0) // BLOCK_N * BLOCK_N
        for k0 in range(win_lo, g0, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            ok = kk < g0
            rows = kk.to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kn + rows * stride_knc, vn + rows * stride_vnc, kns + rows, vns + rows,
                                         seln + rows * stride_sels, sel_q,
                                         start + kk, ok,
                                         i, win, sink, q_lim, qk_scale, softcap, slope, stride_knd, stride_vnd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT_NEW, HAS_ALIBI, HAS_SELECT)
        for k0 in range(g0, g1, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            rows = kk.to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kn + rows * stride_knc, vn + rows * stride_vnc, kns + rows, vns + rows,
                                         seln + rows * stride_sels, sel_q,
                                         start + kk,
                                         kk >= 0, i, win, sink, q_lim, qk_scale, softcap, slope, stride_knd, stride_vnd, d,
                                         dv, D, DV, HAS_SOFTCAP, DOT_F32, IEEE, False, QUANT_NEW, HAS_ALIBI, HAS_SELECT)
        for k0 in range(g1, c_end, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            ok = kk < c_end
            rows = kk.to(tl.int64)
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, qt, kn + rows * stride_knc, vn + rows * stride_vnc, kns + rows, vns + rows,
                                         seln + rows * stride_sels, sel_q,
                                         start + kk, ok,
                                         i, win, sink, q_lim, qk_scale, softcap, slope, stride_knd, stride_vnd, d, dv,
                                         D, DV, HAS_SOFTCAP, DOT_F32, IEEE, True, QUANT_NEW, HAS_ALIBI, HAS_SELECT)
        if HAS_SINKS:  # m_i is in log2 units: the head's sink adds exp2(sink log2 e - m) to the denominator
            m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
            l_i += tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634 - m_fin)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # nothing kept (padding) -> zeros
        tl.store(out_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + c[:, None].to(tl.int64) * stride_oc
                 + dv[None, :] * stride_od, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def chunk_attention_triton(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, length: torch.Tensor, start: torch.Tensor,
    sink: int, window: int, scale: float, softcap: float, *, out: torch.Tensor | None = None,
    block_q: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    full_tiles: bool = True, sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kn_scale: torch.Tensor | None = None, vn_scale: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel: [B, H, C, Dv] in q's dtype (``out`` written entirely; ``sinks`` [H]:
    learned sink logits, ``alibi`` float32 [H]: ALiBi slopes, ``select`` bool [B, C, S + C]
    (any strides, read in place): an indexer's keys per query, as in the twin). CUDA tensors
    run compiled; CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is
    first imported). Reads no tensor value on the host (``alibi``'s finiteness is checked on
    CPU tensors only): safe inside a CUDA graph.
    ``full_tiles=False`` masks every tile (the same result; for tests and the benchmark).
    Tiles: ``block_q`` x ``block_n`` with ``num_stages`` (default 128 x 64 or 32, 3 stages; for
    heads wider than 256, a latent cache's 576 / 512, 32 x 32 and 2 stages; past 2048 bytes a
    row, 16 x 16: these fit a Hopper SM's shared memory, tests/kernel_aot.py).
    FP8 cache / chunk: ``k_scale``/``v_scale`` [B, S], ``kn_scale``/``vn_scale`` [B, G, C]
    (float32, unit stride along slots / tokens)."""
    if triton is None:
        raise RuntimeError("chunk_attention_triton needs triton (pip install 'moa-flex[dev]')")
    check_chunk_inputs(q, k_new, v_new, k, v, offsets, caps, spans, length, start, sink, window, scale, softcap,
                       FLOAT_DTYPES, k_scale, v_scale, kn_scale, vn_scale, select)
    check_sinks(sinks, q.shape[1], q.device)
    check_alibi(alibi, q.shape[1], q.device)
    quant, quant_new = is_quantized(k.dtype), is_quantized(k_new.dtype)
    for t in (k_scale, v_scale, kn_scale, vn_scale):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("the FP8 scales must have unit stride along the slots / tokens")
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError("chunk_attention_triton on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported")
    B, H, C, D = q.shape
    G, Dv = offsets.shape[0] - 1, v_new.shape[3]
    # tiles of more than 512 bytes a row (a latent cache's 576 / 512 in bf16; keys with a bias column,
    # 129 -> 256 lanes, in fp32): smaller tiles, 2 stages, within a Hopper SM's shared memory
    row_bytes = max(pow2(D, 16), pow2(Dv, 16)) * max(q.element_size(), k.element_size())
    wide = row_bytes > 512
    # past 2048 bytes a row (dots3's sliding latent, 1088 / 1024 in bf16): 16 x 16 tiles
    widest = row_bytes > 2048
    block_q = (16 if widest else 32 if wide else BLOCK_Q) if block_q is None else block_q
    num_stages = (2 if wide else 3) if num_stages is None else num_stages
    if block_q < 16 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 16 (queries), got {block_q}")
    if block_n is None:
        block_n = 64 if max(D, Dv) <= 128 else 16 if widest else 32
    if out is None:
        out = torch.empty(B, H, C, Dv, device=q.device, dtype=q.dtype)
    elif out.shape != (B, H, C, Dv) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be [B, H, C, Dv] = {[B, H, C, Dv]} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if B == 0 or C == 0:
        return out
    interp = interpreting()
    S = k.shape[1]
    # bytes (bool's storage): the cache slots' columns and, from column S on, the chunk's keys'
    sel = (length, length) if select is None else (select.view(torch.uint8), select.view(torch.uint8)[:, :, S:])
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _chunk_kernel[(triton.cdiv(C, block_q), H, B)](
            q, k_new, v_new, k, v, offsets, caps, spans, length, start, length if sinks is None else sinks,
            length if alibi is None else alibi.contiguous(), out,  # the kernel reads slope h at alibi_ptr + h
            *(k_scale, v_scale) if quant else (length, length), *(kn_scale, vn_scale) if quant_new else (length, length),
            *sel, *q.stride(), *k_new.stride(), *v_new.stride(), *k.stride(), *v.stride(), *caps.stride(), *spans.stride(),
            *out.stride(),
            *(k_scale.stride(0), v_scale.stride(0)) if quant else (0, 0),
            *(kn_scale.stride(0), kn_scale.stride(1), vn_scale.stride(0), vn_scale.stride(1)) if quant_new else (0,) * 4,
            *(0, 0, 0) if select is None else select.stride(),
            C, sink, window if window > 0 else -window if window < 0 else 2**31 - 1, max(-window, 0),
            float(scale) * (1.0 if softcap > 0 else LOG2E),
            float(softcap) if softcap > 0 else 1.0,
            HPG=H // G, BLOCK_Q=block_q, D=D, D_PAD=pow2(D, 16), DV=Dv, DV_PAD=pow2(Dv, 16),
            BLOCK_N=block_n, HAS_SOFTCAP=softcap > 0, DOT_F32=interp, IEEE=q.dtype == torch.float32,
            FULL_TILES=full_tiles, HAS_SINKS=sinks is not None, QUANT=quant, QUANT_NEW=quant_new,
            HAS_ALIBI=alibi is not None, HAS_SELECT=select is not None,
            num_warps=num_warps or (8 if block_q >= 128 else 4), num_stages=num_stages,
        )
    return out
