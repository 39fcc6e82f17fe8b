"""The chunk kernel's cases: random layouts (hypothesis), their tensors, and the brute-force
whole-prompt attention the kernel and its twin are checked against (tests/test_chunk.py,
test_fp8.py).
"""

from __future__ import annotations

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
