"""The decode kernel's cases: random ragged layouts (hypothesis), their tensors and scalars, and
the naive per-head decode the kernel and its twin are checked against (tests/test_decode_kernel.py,
test_fp8.py).
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st


def cached_positions(cap: int, sink: int, i: int) -> list[int | None]:
    """Replay the writes of positions 0..i into a group of `cap` slots: slot -> position held."""
    slots: list[int | None] = [None] * cap
    for p in range(i + 1):
        if p < sink:
            s = p
        elif cap > sink:
            s = sink + (p - sink) % (cap - sink)
        else:
            continue  # no ring: the position has nowhere to go
        if s < cap:
            slots[s] = p
    return slots


@st.composite
def layouts(
    draw: st.DrawFn,
    max_b: int = 3,
    max_g: int = 3,
    max_hpg: int = 3,
    max_width: int = 24,
    dims: tuple[int, ...] = (8,),
    min_hpg: int = 1,
) -> dict:
    """A random allocation, per-row caps/spans/pos, rule scalars and a seed."""
    B = draw(st.integers(1, max_b))
    G = draw(st.integers(1, max_g))
    hpg = draw(st.integers(min_hpg, max_hpg))
    sink = draw(st.integers(0, 4))
    widths = draw(st.lists(st.integers(0, max_width), min_size=G, max_size=G))
    caps = [[draw(st.integers(0, w)) for w in widths] for _ in range(B)]
    spans = [[draw(st.integers(0, caps[b][h // hpg])) for h in range(G * hpg)] for b in range(B)]
    pos = []
    for b in range(B):
        top = max(caps[b])
        regime = draw(st.sampled_from(["before sink", "filling", "wrapped"]))
        if regime == "before sink":
            pos.append(draw(st.integers(0, max(sink - 1, 0))))
        elif regime == "filling":
            pos.append(draw(st.integers(0, max(top - 1, 0))))
        else:  # the ring went round several times
            pos.append(draw(st.integers(top, 6 * top + 30)))
    D = draw(st.sampled_from(dims))
    return {
        "B": B, "G": G, "hpg": hpg, "sink": sink, "widths": widths, "caps": caps, "spans": spans,
        "pos": pos, "D": D, "Dv": D if draw(st.booleans()) else draw(st.sampled_from([16, 32])),
        "window": draw(st.one_of(st.just(0), st.integers(1, 30), st.integers(-30, -1))),
        "softcap": draw(st.sampled_from([0.0, 0.0, 0.7, 5.0, 30.0])),
        "scale": draw(st.sampled_from([0.25, 1.0 / math.sqrt(D), 1.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


def tensors(lay: dict, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple:
    """(q, k, v, offsets, caps, spans, pos) for a layout, random normal q/k/v."""
    gen = torch.Generator().manual_seed(lay["seed"])
    B, H, S = lay["B"], lay["G"] * lay["hpg"], sum(lay["widths"])
    offsets = torch.tensor([0, *torch.tensor(lay["widths"]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(B, H, lay["D"], generator=gen)
    k = torch.randn(B, S, lay["D"], generator=gen)
    v = torch.randn(B, S, lay["Dv"], generator=gen)
    ints = [
        offsets,
        torch.tensor(lay["caps"], dtype=torch.int32).view(B, lay["G"]),
        torch.tensor(lay["spans"], dtype=torch.int32).view(B, H),
        torch.tensor(lay["pos"], dtype=torch.int64),
    ]
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v)) + tuple(t.to(device) for t in ints)


def scalars(lay: dict) -> tuple:
    return lay["sink"], lay["window"], lay["scale"], lay["softcap"]


def naive_decode(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, sinks=None, alibi=None,  # noqa: ANN001
                 select=None) -> torch.Tensor:  # noqa: ANN001
    """Per (row, head): the kept cached positions, then softmax attention over them, float64
    (``sinks``: each head's learned logit, one more softmax term without a value; ``alibi``:
    each head's slope, the score less slope times the distance from the simulated position;
    ``select`` bool [B, S]: only the slots selected are attended)."""
    B, H, _ = q.shape
    G = offsets.numel() - 1
    hpg = H // G
    out = torch.zeros(B, H, v.shape[2], dtype=torch.float64)
    for b in range(B):
        i = int(pos[b])
        for h in range(H):
            g = h // hpg
            held = cached_positions(int(caps[b, g]), sink, i)
            span = int(spans[b, h])
            kept_pos = [
                (int(offsets[g]) + s, p)
                for s, p in enumerate(held)
                if p is not None
                and (p < sink or i - p < span - sink)
                and (window <= 0 or i - p < window)
                and (window >= 0 or p // -window == i // -window)  # chunked local attention: one chunk
                and (select is None or bool(select[b, int(offsets[g]) + s]))
            ]
            if not kept_pos:
                continue
            kept = [s for s, _ in kept_pos]
            x = scale * (k[b, kept].double() @ q[b, h].double())
            if softcap > 0:
                x = softcap * torch.tanh(x / softcap)
            if alibi is not None:
                x = x - float(alibi[h]) * torch.tensor([float(i - p) for _, p in kept_pos], dtype=torch.float64)
            if sinks is not None:
                x = torch.cat([x, sinks[h].double().view(1)])
            p = torch.softmax(x, 0)
            out[b, h] = p[:len(kept)] @ v[b, kept].double()
    return out
