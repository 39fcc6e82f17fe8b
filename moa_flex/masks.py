"""Masks of a plan: the brute-force reference, the FlexAttention mask_mod and BlockMask.

Coordinates: query row ``r`` of a call is the logical position ``i = q_offset + r``; key
column ``j`` is the logical position ``j`` (0 = first real token). The keep rule of a query
head with span ``S`` (docs/DESIGN.md) is ``j <= i and (j < sink or i - j < S - sink)``.

The BlockMask is computed analytically from the spans: for a tile of queries ``[i0, i1]`` and
keys ``[j0, j1]`` (inclusive, real positions only),

* something is kept  iff ``j0 <= i1 and (j0 < sink or (W >= 1 and i0 - j1 <= W - 1))``
* everything is kept iff ``j1 <= i0 and (j1 < sink or i1 - max(j0, sink) <= W - 1)``

with ``W = S - sink``. Both are monotone in the block index, so per query block the kept key
blocks are the sink blocks plus one window interval, and the full ones likewise: their ends
come from binary searches over the block boundaries and the block lists are written
directly. No token-level Q x KV mask (nor a block-level boolean one) is ever formed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from .plan import Plan

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_query_window(N: int, q_len: int | None, q_offset: int | None, kv_len: int | None) -> tuple[int, int, int]:
    """Fill defaults and validate (q_len, q_offset, kv_len), all in tokens.

    Defaults: the whole request (q_len = N, q_offset = 0); with only q_len, the last q_len
    positions; kv_len = q_offset + q_len (every key up to the last query).
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N (planned length in tokens) must be an integer >= 1, got {N!r}")
    if q_len is None:
        q_len = N - (q_offset or 0)
    if q_offset is None:
        q_offset = N - q_len
    if q_len < 1:
        raise ValueError(f"q_len must be >= 1, got {q_len}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if q_offset + q_len > N:
        raise ValueError(f"q_offset + q_len ({q_offset} + {q_len}) exceeds the planned length N={N}")
    if kv_len is None:
        kv_len = q_offset + q_len
    if kv_len < q_offset + q_len:
        raise ValueError(f"kv_len ({kv_len}) must cover every query position (>= q_offset + q_len = {q_offset + q_len})")
    return q_len, q_offset, kv_len


def allowed_from_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """A model's attention mask as bool "may attend" (bool as is; additive: finite, not min)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


def is_causal_left_padded(allowed: torch.Tensor, pads: torch.Tensor, q_offset: int) -> bool:
    """True if a bool mask [B, 1 or H, Q, K] is exactly causal with `pads` left-pad keys per row
    (query rows at or before the pad may differ: their outputs are never used)."""
    B, _, Q, K = allowed.shape
    i = torch.arange(Q, device=allowed.device).view(1, Q, 1) + q_offset
    j = torch.arange(K, device=allowed.device).view(1, 1, K)
    p = pads.to(allowed.device).view(B, 1, 1)
    expect = (j <= i) & (j >= p)
    real_rows = (i >= p).expand(B, Q, K)
    return bool(((allowed == expect.unsqueeze(1)) | ~real_rows.unsqueeze(1)).all())


def padding_info(attn_mask: torch.Tensor) -> torch.Tensor:
    """A model's mask -> LongTensor [B + 1]: left-pad tokens of every row, then 1 if the mask is
    exactly causal + left padding (the body of the op ``moa_flex::mask_info``, which the
    compile pass puts in the graph once per mask, not per layer).

    Accepts the 2-D padding mask [B, K] (1 = real token) or a 4-D attention mask
    [B, 1 or H, Q, K] (bool or additive; queries are the last Q positions).
    """
    if attn_mask.dim() == 2:
        real = attn_mask.bool()
        # a row without a real token is all padding (a prefill chunk inside a long left padding)
        pads = torch.where(real.any(-1), real.int().argmax(-1), torch.full_like(real[:, 0], real.shape[-1],
                                                                                dtype=torch.long))
        j = torch.arange(real.shape[-1], device=real.device).view(1, -1)
        simple = bool((real == (j >= pads.view(-1, 1))).all())
        return torch.cat([pads, pads.new_tensor([int(simple)])])
    allowed = allowed_from_mask(attn_mask)
    q_offset = allowed.shape[-1] - allowed.shape[-2]
    # Keys some query may see; rows that see everything are skipped: HF opens fully masked
    # (pad) query rows to all keys so that SDPA returns no NaN.
    visible = (allowed & ~allowed.all(dim=-1, keepdim=True)).any(dim=1).any(dim=1)  # [B, K]
    pads = torch.where(visible.any(-1), visible.int().argmax(-1), torch.zeros_like(visible[:, 0], dtype=torch.long))
    simple = is_causal_left_padded(allowed, pads, q_offset)
    return torch.cat([pads, pads.new_tensor([int(simple)])])


def _check_layer(plan: Plan, layer: int) -> None:
    if not 0 <= layer < plan.num_layers:
        raise ValueError(f"layer must be in [0, {plan.num_layers}), got {layer}")


def reference_mask(
    plan: Plan,
    layer: int,
    N: int,
    q_len: int | None = None,
    q_offset: int | None = None,
    kv_len: int | None = None,
) -> torch.Tensor:
    """Bool [H, q_len, kv_len] straight from the keep rule. Test oracle; never used at run time."""
    _check_layer(plan, layer)
    q_len, q_offset, kv_len = resolve_query_window(N, q_len, q_offset, kv_len)
    spans = plan.head_spans(N)[layer]  # [H]
    i = torch.arange(q_offset, q_offset + q_len).view(1, -1, 1)
    j = torch.arange(kv_len).view(1, 1, -1)
    window = (spans - plan.sink).view(-1, 1, 1)
    return (j <= i) & ((j < plan.sink) | (i - j < window))


def selection_keep(spans: torch.Tensor, sink: int, pads: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Bool [B, Q, K]: the keep rule of one layer whose heads share one span per row (``spans``
    [B], tokens), over a call's queries (the last ``q_len`` of ``kv_len`` positions) and keys,
    each row's positions starting after its ``pads`` [B] left pads. Dense, for an indexer that
    scores every (query, key) pair itself (DeepSeek Sparse Attention, passes/indexed.py): its
    top-k then picks among the keys the rule keeps."""
    dev = spans.device
    i = torch.arange(kv_len - q_len, kv_len, device=dev).view(1, -1, 1)
    j = torch.arange(kv_len, device=dev).view(1, 1, -1)
    p = pads.to(dev, torch.long).view(-1, 1, 1)
    window = (spans.to(torch.long) - sink).view(-1, 1, 1)
    return (j >= p) & (j <= i) & ((j - p < sink) | (i - j < window))


def mask_mod(plan: Plan, layer: int, N: int, q_offset: int = 0, device: torch.device | str | None = None) -> MaskMod:
    """The FlexAttention mask_mod of one layer at planned length N (q_offset in tokens)."""
    _check_layer(plan, layer)
    spans = plan.head_spans(N)[layer].to(device)
    return span_mask_mod(spans, plan.sink, torch.tensor(q_offset, dtype=torch.long, device=device))


def _count_le(sorted_vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Number of entries of an ascending 1-D tensor that are <= each x."""
    return torch.searchsorted(sorted_vals, x, right=True)


def _count_lt(sorted_vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Number of entries of an ascending 1-D tensor that are < each x."""
    return torch.searchsorted(sorted_vals, x, right=False)


Intervals = list[tuple[torch.Tensor, torch.Tensor]]  # half-open [start, end) per row, int64 [R]


def _segments(kept: Intervals, full: Intervals, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row at every interval endpoint: (starts, partial ends, full ends), int64 [R, m].

    A segment [start, end) lies entirely inside or outside every interval, so it is partial
    (kept but not full), full, or skipped; a segment of another class gets end = start.
    """
    rows = (kept + full)[0][0].shape[0]
    ends = [e for iv in (kept, full) for pair in iv for e in pair]
    edges = torch.stack([torch.zeros_like(ends[0]), torch.full_like(ends[0], n_cols), *ends], 1)
    edges = edges.clamp(0, n_cols).sort(dim=1).values
    lo, hi = edges[:, :-1], edges[:, 1:]

    def inside(ivs: Intervals) -> torch.Tensor:
        m = torch.zeros_like(lo, dtype=torch.bool)
        for st, en in ivs:
            m |= (lo >= st.view(rows, 1)) & (lo < en.view(rows, 1))
        return m

    in_full = inside(full)
    in_partial = inside(kept) & ~in_full
    return lo, torch.where(in_partial, hi, lo), torch.where(in_full, hi, lo)


def _write_ordered(starts: torch.Tensor, ends: torch.Tensor, count_out: torch.Tensor, idx_out: torch.Tensor) -> None:
    """Disjoint ascending segments [start, end) per row -> count int32 [R] and the ascending
    column indices int32 [R, C] they cover (entries past the count: valid filler indices)."""
    n_cols = idx_out.shape[-1]
    lens = ends - starts
    # Empty segments go last (stable), so the first m segments of every row are its real ones.
    order = torch.sort((lens == 0).to(torch.int8), dim=1, stable=True).indices
    starts, lens = starts.gather(1, order), lens.gather(1, order)
    cum = lens.cumsum(1)
    count_out.copy_(cum[:, -1])
    m = int((lens > 0).sum(1).max()) if lens.numel() else 0
    t = torch.arange(n_cols, dtype=torch.int32, device=idx_out.device).view(1, -1)
    torch.add(t, starts[:, :1].to(torch.int32), out=idx_out)
    for k in range(1, m):
        # Past position cum[k-1] the row continues at segment k: shift by the gap before it.
        gap = (starts[:, k] - starts[:, k - 1] - lens[:, k - 1]).to(torch.int32).view(-1, 1)
        idx_out.add_(torch.where(t >= cum[:, k - 1 : k], gap, 0))
    idx_out.clamp_(0, n_cols - 1)


def _block_bounds(length: int, block: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last logical position (inclusive, int64) of every block of a length."""
    first = torch.arange(0, length, block, device=device)
    last = (first + block).clamp(max=length) - 1
    return first + offset, last + offset


def _build_side(
    span: int, sink: int, pad: int, q_len: int, q_offset: int, kv_len: int, q_block: int, kv_block: int,
    device: torch.device, kv_side: bool, merge_full: bool, counts: tuple[torch.Tensor, torch.Tensor],
    indices: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Write (partial, full) block lists of one span: per q block (kv side) or per kv block.

    Index space: query row r is at ``i = q_offset + r``, key column c at ``j = c``; the first
    ``pad`` keys are padding (never kept) and logical positions are ``index - pad``, so the
    sink is keys [pad, pad + sink). ``merge_full`` lists every kept block as partial.
    """
    i0, i1 = _block_bounds(q_len, q_block, q_offset, device)
    j0, j1 = _block_bounds(kv_len, kv_block, 0, device)
    w = span - sink  # window keys: i - j <= w - 1
    top = pad + sink  # sink keys: pad <= j < top
    if kv_side:  # rows: q blocks; columns: kv blocks, found by searching j0 / j1
        first_real = _count_lt(j1, torch.full_like(i0, pad))  # blocks ending before the pad
        live = i1 >= pad  # rows with a real key at or before them
        kept = []
        if sink > 0:
            end = _count_le(j0, torch.clamp(i1, max=top - 1))
            kept.append((first_real, torch.where(live, end, first_real)))
        if w >= 1:
            end = _count_le(j0, i1)
            kept.append((_count_lt(j1, torch.clamp(i0 - (w - 1), min=pad)), torch.where(live, end, first_real)))
        all_real = _count_lt(j0, torch.full_like(i0, pad))  # first block starting at or after pad
        lim = i1 - (w - 1)
        full = [
            (all_real, _count_le(j1, torch.clamp(i0, max=top - 1))),
            (_count_lt(j0, torch.where(lim <= top, torch.full_like(lim, pad), lim)), _count_le(j1, i0)),
        ]
        n_cols = j0.numel()
    else:  # rows: kv blocks; columns: q blocks, found by searching i0 / i1
        n_cols = i0.numel()
        all_q = torch.full_like(j0, n_cols)
        a = j0.clamp(min=pad)  # first real key of the block
        start = _count_lt(i1, a)  # first q block with i1 >= a
        end = torch.where(a < top, all_q, _count_le(i0, j1 + (w - 1)) if w >= 1 else start)
        end = torch.where(j1 >= pad, end, start)
        f_start = _count_lt(i0, j1)  # first q block with i0 >= j1
        f_end = torch.where(j1 < top, all_q, _count_le(i1, j0.clamp(min=top) + (w - 1)))
        f_end = torch.where(j0 >= pad, f_end, f_start)
        kept, full = [(start, end)], [(f_start, f_end)]
    if merge_full:
        kept, full = kept + full, []
    lo, partial_end, full_end = _segments(kept, full, n_cols)
    _write_ordered(lo, partial_end, counts[0], indices[0])
    _write_ordered(lo, full_end, counts[1], indices[1])


def mask_bytes(mask: BlockMask) -> int:
    """Bytes held by a BlockMask's index tensors."""
    tensors = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
               mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


MASK_CACHE_BYTES = 512 * 2**20  # default bound of the shared BlockMask cache (bytes, on any device)


class _MaskCache:
    """LRU of built BlockMasks keyed by (spans, sink, lengths, blocks, device), bounded by the
    bytes its masks hold (:data:`MASK_CACHE_BYTES` unless ``max_bytes`` says otherwise): the
    least recently used go first, and a mask larger than the bound is not kept."""

    def __init__(self, max_bytes: int = MASK_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple, tuple[BlockMask, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> BlockMask | None:
        hit = self._store.get(key)
        if hit is None:
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return hit[0]

    def put(self, key: tuple, mask: BlockMask) -> None:
        self.misses += 1
        size = mask_bytes(mask)
        if size > self.max_bytes:
            return
        self._store[key] = (mask, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._store.popitem(last=False)
            self.bytes -= old

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0
        self.hits = self.misses = 0


BLOCK_MASK_CACHE = _MaskCache()


def span_mask_mod(
    spans: torch.Tensor, sink: int, q_offset: torch.Tensor, pads: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
) -> MaskMod:
    """FlexAttention mask_mod of the keep rule.

    ``spans``: LongTensor [H] or [B, H] (tokens); ``q_offset``: 0-dim LongTensor, index of query
    row 0; ``pads``: LongTensor [B] of left-pad tokens per row (logical = index - pad);
    ``dense_mask``: optional bool [B, 1 or H, Q, K] that is ANDed in. All are captured
    tensors: new values need no recompilation.
    """
    per_row = spans.dim() == 2

    def moa_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        i = q_idx + q_offset
        span = spans[b, h] if per_row else spans[h]
        if pads is None:
            keep = (kv_idx <= i) & ((kv_idx < sink) | (i - kv_idx < span - sink))
        else:
            pad = pads[b]
            keep = (kv_idx >= pad) & (kv_idx <= i) & ((kv_idx < pad + sink) | (i - kv_idx < span - sink))
        if dense_mask is not None:
            keep = keep & dense_mask[b, h if dense_mask.shape[1] > 1 else 0, q_idx, kv_idx]
        return keep

    return moa_mask


def block_mask_from_spans(
    spans: torch.Tensor,
    sink: int,
    q_len: int,
    q_offset: int,
    kv_len: int,
    block_size: int | tuple[int, int] = 128,
    device: torch.device | str | None = None,
    compute_q_blocks: bool = True,
    pads: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
) -> BlockMask:
    """BlockMask of per-head spans (tokens), built analytically.

    ``spans`` is [H] (one mask broadcast over the batch) or [B, H] (one per row); ``pads``
    [B] left-pad tokens per row; ``dense_mask`` an extra bool [B, 1 or H, q_len, kv_len]
    (e.g. a model's own sliding window) that is ANDed in, every kept block then being
    partial. Without a dense mask the result is cached by value; heads (and rows) with equal
    (span, pad) share one computation. ``compute_q_blocks=False`` skips the q-side indices
    (only the backward pass needs them), halving the memory.
    """
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    if q_block < 1 or kv_block < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    span_rows = spans.view(1, -1) if spans.dim() == 1 else spans
    B, H = span_rows.shape
    pad_list = [0] * B if pads is None else [int(p) for p in pads.tolist()]
    if len(pad_list) != B:
        raise ValueError(f"pads has {len(pad_list)} rows, spans has {B}")
    if pads is not None and spans.dim() == 1:
        raise ValueError("pads need per-row spans [B, H]")
    spans_key = tuple(tuple(int(x) for x in row) for row in span_rows.tolist())
    # per-row spans of one row and spans broadcast over the batch give the same blocks but not the same
    # mask_mod: its per-row form indexes row b, which a broadcast mask is called with for every row
    key = (spans.dim(), pads is None, spans_key, tuple(pad_list), sink, q_len, q_offset, kv_len, q_block, kv_block,
           str(device), compute_q_blocks)
    if dense_mask is None:
        cached = BLOCK_MASK_CACHE.get(key)
        if cached is not None:
            return cached

    where: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b, row in enumerate(spans_key):
        for h, span in enumerate(row):
            where.setdefault((span, pad_list[b]), []).append((b, h))
    n_q, n_kv = -(-q_len // q_block), -(-kv_len // kv_block)
    sides = 4 if compute_q_blocks else 2
    shapes = [(n_q, n_kv), (n_q, n_kv), (n_kv, n_q), (n_kv, n_q)][:sides]
    counts = [torch.empty((B, H, r), dtype=torch.int32, device=device) for r, _ in shapes]
    flat = torch.empty(sum(B * H * r * c for r, c in shapes), dtype=torch.int32, device=device)
    indices = [t.view(B, H, r, c) for t, (r, c) in zip(flat.split([B * H * r * c for r, c in shapes]), shapes)]
    for (span, pad), places in where.items():
        b0, h0 = places[0]
        for side in range(sides // 2):
            _build_side(
                span, sink, pad, q_len, q_offset, kv_len, q_block, kv_block, device, side == 0,
                dense_mask is not None,
                (counts[2 * side][b0, h0], counts[2 * side + 1][b0, h0]),
                (indices[2 * side][b0, h0], indices[2 * side + 1][b0, h0]),
            )
        for k in range(sides):
            for b, h in places[1:]:
                counts[k][b, h].copy_(counts[k][b0, h0])
                indices[k][b, h].copy_(indices[k][b0, h0])
    kv_num, full_kv_num, q_num, full_q_num = (counts + [None, None])[:4]
    kv_idx, full_kv_idx, q_idx, full_q_idx = (indices + [None, None])[:4]

    mask = BlockMask(
        seq_lengths=(q_len, kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=span_mask_mod(
            spans.to(device=device, dtype=torch.long), sink, torch.tensor(q_offset, dtype=torch.long, device=device),
            None if pads is None else pads.to(device=device, dtype=torch.long),
            None if dense_mask is None else dense_mask.to(device=device, dtype=torch.bool),
        ),
    )
    if dense_mask is None:
        BLOCK_MASK_CACHE.put(key, mask)
    return mask


def block_mask(
    plan: Plan,
    layer: int,
    N: int,
    q_len: int | None = None,
    q_offset: int | None = None,
    block_size: int | tuple[int, int] = 128,
    device: torch.device | str | None = None,
    kv_len: int | None = None,
    compute_q_blocks: bool = True,
) -> BlockMask:
    """FlexAttention BlockMask of one layer at planned length N, over query heads.

    Built analytically from the spans, never from a dense Q x KV mask. ``q_len``/``q_offset``
    select a window of query positions (decode, chunked prefill); lengths need not be
    multiples of ``block_size`` (tokens, or a (q, kv) pair). Layers whose spans are equal
    share one cached mask.
    """
    _check_layer(plan, layer)
    q_len, q_offset, kv_len = resolve_query_window(N, q_len, q_offset, kv_len)
    return block_mask_from_spans(
        plan.head_spans(N)[layer], plan.sink, q_len, q_offset, kv_len, block_size, device, compute_q_blocks
    )
