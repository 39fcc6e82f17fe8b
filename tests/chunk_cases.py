"""The chunk kernel's cases: random layouts (hypothesis), their tensors, and the brute-force
whole-prompt attention the kernel and its twin are checked against (tests/test_chunk.py,
test_fp8.py); an indexer's random selections and a brute force of one chunk call from the
definition (:func:`chunk_oracle`), selection included.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st


def whole_prompt_attention(q, k, v, pads, spans, sink, window, scale, softcap, sinks=None, alibi=None):  # noqa: ANN001, ANN201
    """Brute force over the whole prompt, no cache: q [B, H, T, D], k/v [B, G, T, D] at padded
    indices; row b's index t is logical position t - pads[b] (negative: padding, zeros out).
    Keep rule with each head's span, the model window, soft-capping, ALiBi slopes ``alibi``
    [H] (score less alibi[h] * (i - j)), learned sink logits ``sinks`` [H] (a softmax column
    without a value); float64."""
    B, H, T, _ = q.shape
    G = k.shape[1]
    kk = k.repeat_interleave(H // G, 1).double()
    vv = v.repeat_interleave(H // G, 1).double()
    pos = torch.arange(T).view(1, T) - torch.as_tensor(pads).view(B, 1)  # [B, T]
    i = pos.view(B, 1, T, 1)
    j = pos.view(B, 1, 1, T)
    dist = i - j
    keep = (j >= 0) & (i >= 0) & (dist >= 0) & ((j < sink) | (dist < (spans.long() - sink).view(B, H, 1, 1)))
    if window > 0:
        keep &= dist < window
    elif window < 0:  # chunked local attention: the query's own chunk of -window positions
        keep &= torch.div(j, -window, rounding_mode="floor") == torch.div(i, -window, rounding_mode="floor")
    x = scale * (q.double() @ kk.transpose(-1, -2))
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    if alibi is not None:
        x = x - alibi.double().view(1, H, 1, 1) * dist
    x = x.masked_fill(~keep, float("-inf"))
    if sinks is None:
        return torch.softmax(x, -1).nan_to_num(0.0) @ vv
    col = sinks.double().view(1, H, 1, 1).expand(B, H, T, 1)
    out = torch.softmax(torch.cat([x, col], -1), -1)[..., :-1] @ vv
    return out * (i >= 0)  # padding queries give zeros


@st.composite
def layouts(draw):  # noqa: ANN001, ANN201
    """A batch of prompts with left padding, a group/head layout, per-row spans and caps (the
    cache holds each group's largest span), a chunk size, sink, window and soft-cap."""
    B = draw(st.integers(1, 2))
    G = draw(st.integers(1, 2))
    hpg = draw(st.sampled_from([1, 2, 3]))
    H = G * hpg
    sink = draw(st.sampled_from([0, 3, 8]))
    T = draw(st.integers(1, 70))
    pads = [draw(st.integers(0, min(T - 1, 9))) for _ in range(B)]
    spans = torch.tensor([[draw(st.integers(1, T)) for _ in range(H)] for _ in range(B)], dtype=torch.int32)
    caps = torch.stack([spans[:, g * hpg:(g + 1) * hpg].amax(1) for g in range(G)], 1)  # [B, G]
    caps = torch.maximum(caps, torch.full_like(caps, sink + 1))  # plans: spans >= min_span > sink
    extra = [draw(st.integers(0, 4)) for _ in range(G)]  # allocation wider than the widest row
    widths = (caps.amax(0) + torch.tensor(extra, dtype=torch.int32)).tolist()
    return dict(B=B, G=G, H=H, sink=sink, T=T, pads=pads, spans=spans, caps=caps.to(torch.int32),
                offsets=torch.tensor([0, *torch.tensor(widths).cumsum(0).tolist()], dtype=torch.int32),
                chunk=draw(st.integers(1, T + 5)), window=draw(st.sampled_from([0, 0, 5, 23, -7, -16])),
                softcap=draw(st.sampled_from([0.0, 0.0, 1.5])), D=draw(st.sampled_from([8, 16])),
                seed=draw(st.integers(0, 2**16)))


def tensors(lay: dict, dtype: torch.dtype = torch.float32) -> tuple:
    gen = torch.Generator().manual_seed(lay["seed"])
    B, G, H, T, D = lay["B"], lay["G"], lay["H"], lay["T"], lay["D"]
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    k = torch.randn(B, G, T, D, generator=gen).to(dtype)
    v = torch.randn(B, G, T, D, generator=gen).to(dtype)
    return q, k, v


def real_rows(x: torch.Tensor, pads: list[int]) -> list[torch.Tensor]:
    return [x[b, :, p:] for b, p in enumerate(pads)]


def random_select(B: int, C: int, S: int, gen: torch.Generator, density: float) -> torch.Tensor:
    """An indexer's selection, bool [B, C, S + C]: every key with probability ``density`` (1:
    all), and below 1 about one query in four left with no key at all."""
    if density >= 1:
        return torch.ones(B, C, S + C, dtype=torch.bool)
    select = torch.rand(B, C, S + C, generator=gen) < density
    return select & (torch.rand(B, C, 1, generator=gen) >= 0.25)


def held_positions(cap: int, n: int, sink: int, width: int) -> list[int]:
    """The position each of a group's ``width`` slots holds once positions ``0 .. n-1`` were
    written one by one (sink slot ``p`` for ``p < sink``, else ring slot ``sink + (p - sink)
    mod (cap - sink)``, overwriting); -1: nothing. Needs ``cap > sink``."""
    held = [-1] * width
    for p in range(n):
        held[p if p < sink else sink + (p - sink) % (cap - sink)] = p
    return held


def rule_keeps(i: int, p: int, span: int, sink: int, window: int) -> bool:
    """The keep rule for a query at position ``i`` and a key at ``p`` (both real)."""
    if p > i or not (p < sink or i - p < span - sink):
        return False
    if window > 0:
        return i - p < window
    return window == 0 or p // -window == i // -window  # window < 0: chunks of -window positions


def chunk_oracle(q, k_new, v_new, k, v, offsets, caps, spans, length, start, sink, window, scale, softcap,  # noqa: ANN001, ANN201
                 sinks=None, alibi=None, select=None):
    """Brute force of the chunk attention from its definition, one (row, head, query) at a time:
    each cache slot's position from :func:`held_positions`, the chunk's key ``c'`` at ``start +
    c'``, a key attended iff :func:`rule_keeps` and ``select`` (column: flat slot, or ``S + c'``)
    allow it, float64 softmax with the sink logit as a term without value; a query with nothing
    attended (or padding) gives zeros. Inputs as the twin's, dequantized already."""
    B, H, C, _ = q.shape
    S, G = k.shape[1], offsets.shape[0] - 1
    out = torch.zeros(B, H, C, v_new.shape[3], dtype=torch.float64)
    chosen = None if select is None else select.tolist()  # python lists: read per (query, key)
    for b in range(B):
        n, first = int(length[b]), int(start[b])
        for g in range(G):
            lo, hi = int(offsets[g]), int(offsets[g + 1])
            held = held_positions(int(caps[b, g]), n, sink, hi - lo)
            # every key the group has: its column in select, its position, its key and value rows
            cols = [lo + s for s, p in enumerate(held) if p >= 0] + [S + c2 for c2 in range(C) if first + c2 >= 0]
            pos = [p for p in held if p >= 0] + [first + c2 for c2 in range(C) if first + c2 >= 0]
            keys = torch.cat([k[b], k_new[b, g]]).double()[cols]  # rows: slots, then S + c'
            vals = torch.cat([v[b], v_new[b, g]]).double()[cols]
            for h in range(g * (H // G), (g + 1) * (H // G)):
                scores = scale * (q[b, h].double() @ keys.T)  # [C, keys]
                for c in range(C):
                    i = first + c
                    seen = [t for t, (col, p) in enumerate(zip(cols, pos)) if i >= 0
                            and rule_keeps(i, p, int(spans[b, h]), sink, window) and (chosen is None or chosen[b][c][col])]
                    if seen:
                        out[b, h, c] = attend_one(scores[c, seen], vals[seen], [i - pos[t] for t in seen], softcap,
                                                  None if alibi is None else float(alibi[h]),
                                                  None if sinks is None else float(sinks[h]))
    return out


def attend_one(x: torch.Tensor, vals: torch.Tensor, dist: list[int], softcap: float, slope: float | None,
               sink_logit: float | None) -> torch.Tensor:
    """One query over its attended keys: scores ``x`` [K] (scaled), soft-cap, ALiBi bias
    ``-slope * dist``, then the softmax (with the sink logit as a term without value) times ``vals``."""
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    if slope is not None:
        x = x - slope * torch.tensor(dist, dtype=torch.float64)
    m = float(x.max()) if sink_logit is None else max(float(x.max()), sink_logit)
    e = torch.exp(x - m)
    denom = e.sum() + (0.0 if sink_logit is None else math.exp(sink_logit - m))
    return (e / denom) @ vals
