"""Skinny linear kernels: Triton kernel vs twin, the public functions, the torch ops, bad input.

Oracle: the twins ``grouped_linear_reference`` / ``gated_mlp_reference`` (fp32 torch), checked
against float64 once. Without CUDA the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); with CUDA they run
compiled on the GPU. Interpreter shapes are small: a program costs ~10 ms there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_flex.kernels import linear
from moa_flex.kernels.linear import (
    LinearConfig,
    gated_mlp,
    gated_mlp_reference,
    gated_mlp_triton,
    grouped_linear,
    grouped_linear_reference,
    grouped_linear_triton,
    linear_config,
)

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    linear.triton is None or (KERNEL_DEVICE == "cpu" and not linear.interpreting()),
    reason="Triton kernel needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max abs error / output scale
MAX_PROGRAMS = 48  # keeps an interpreted call under ~0.5 s


# ---------------------------------------------------------------------------------- helpers
def make(M: int, K: int, widths: list[int], dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple:
    """x [M, K] and weights [N_i, K], random normal, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    ws = [torch.randn(n, K, generator=gen) / K**0.5 for n in widths]
    return x.to(device, dtype), [w.to(device, dtype) for w in ws]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over the output scale (max |want|, at least 1)."""
    if got.numel() == 0:
        return 0.0
    scale = max(1.0, want.float().abs().max().item())
    return (got.float().cpu() - want.float().cpu()).abs().max().item() / scale


def programs(M: int, widths: list[int], K: int, cfg: LinearConfig) -> int:
    chunk = linear._k_chunk(K, cfg.split_k, cfg.block_k)
    return sum(-(-n // cfg.block_n) for n in widths) * -(-M // cfg.block_m) * max(1, -(-K // chunk))


@st.composite
def problems(draw: st.DrawFn, max_weights: int = 3) -> dict:
    """Random M, K, widths, dtype and tiles: the heuristic's, or small ones that give several row
    blocks, column tiles and K splits (ragged tails everywhere), at most MAX_PROGRAMS programs."""
    M = draw(st.integers(1, 40))
    K = draw(st.integers(1, 300))
    widths = draw(st.lists(st.integers(1, 200), min_size=1, max_size=max_weights))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    cfg = linear_config(M, widths, K, dtype, 8, gated=max_weights == 1)
    if draw(st.booleans()):
        cfg = dataclasses.replace(
            cfg,
            block_m=draw(st.sampled_from([16, 32])),
            block_n=draw(st.sampled_from([16, 32, 64])),
            block_k=draw(st.sampled_from([16, 32, 64])),
            split_k=draw(st.integers(1, 4)),
        )
        while programs(M, widths, K, cfg) > MAX_PROGRAMS:  # coarser tiles until the interpreter is quick
            cfg = dataclasses.replace(cfg, block_n=2 * cfg.block_n, block_m=min(64, 2 * cfg.block_m))
    return {"M": M, "K": K, "widths": widths, "dtype": dtype, "cfg": cfg, "seed": draw(st.integers(0, 2**16))}


# ---------------------------------------------------------------------------------- the twins
def test_twins_match_float64() -> None:
    x, (wg, wu, w3) = make(5, 70, [9, 9, 4], torch.float32, 0)
    want = [(x.double() @ w.double().T).float() for w in (wg, wu, w3)]
    for got, ref in zip(grouped_linear_reference(x, [wg, wu, w3]), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    gated = torch.nn.functional.silu(want[0].double()) * want[1].double()
    torch.testing.assert_close(gated_mlp_reference(x, wg, wu), gated.float(), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert grouped_linear_reference(xb, [wg.bfloat16()])[0].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- the kernels
@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_grouped_kernel_matches_twin(p: dict) -> None:
    x, ws = make(p["M"], p["K"], p["widths"], p["dtype"], p["seed"], KERNEL_DEVICE)
    outs = [torch.full((p["M"], n), float("nan"), dtype=p["dtype"], device=KERNEL_DEVICE) for n in p["widths"]]
    got = grouped_linear_triton(x, ws, out=outs, config=p["cfg"])
    assert all(g is o for g, o in zip(got, outs))
    for g, want in zip(got, grouped_linear_reference(x.cpu(), [w.cpu() for w in ws])):
        assert not g.isnan().any(), "output not fully written"
        assert rel_error(g, want) <= TOL[p["dtype"]], f"{p['cfg']}"


@needs_kernel
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_weights=1))
def test_gated_kernel_matches_twin(p: dict) -> None:
    N = p["widths"][0]
    x, (wg, wu) = make(p["M"], p["K"], [N, N], p["dtype"], p["seed"], KERNEL_DEVICE)
    out = torch.full((p["M"], N), float("nan"), dtype=p["dtype"], device=KERNEL_DEVICE)
    assert gated_mlp_triton(x, wg, wu, out=out, config=p["cfg"]) is out
    assert not out.isnan().any(), "output not fully written"
    assert rel_error(out, gated_mlp_reference(x.cpu(), wg.cpu(), wu.cpu())) <= TOL[p["dtype"]], f"{p['cfg']}"


@needs_kernel
def test_kernel_fp16_split_k_and_edges() -> None:
    """fp16 with a split K; K = 0 gives zeros; M = 0 and N = 0 give empty outputs, the other weights' stay right."""
    x, ws = make(7, 200, [50, 3], torch.float16, 1, KERNEL_DEVICE)
    cfg = LinearConfig(16, 16, 32, 3, 4, 2)
    for got, want in zip(grouped_linear_triton(x, ws, config=cfg), grouped_linear_reference(x, ws)):
        assert rel_error(got, want) <= TOL[torch.float16]
    got = gated_mlp_triton(x, ws[0], ws[0].flip(0), config=cfg)
    assert rel_error(got, gated_mlp_reference(x, ws[0], ws[0].flip(0))) <= TOL[torch.float16]
    x0, w0 = make(3, 0, [5, 5], torch.float32, 2, KERNEL_DEVICE)
    assert grouped_linear_triton(x0, w0[:1], out=[torch.full((3, 5), float("nan"), device=KERNEL_DEVICE)])[0].eq(0).all()
    assert gated_mlp_triton(x0, *w0).eq(0).all()
    xm, wm = make(0, 8, [5, 0], torch.float32, 3, KERNEL_DEVICE)
    assert [tuple(y.shape) for y in grouped_linear_triton(xm, wm)] == [(0, 5), (0, 0)]
    xn, wn = make(4, 40, [5, 0, 3], torch.float32, 4, KERNEL_DEVICE)
    got = grouped_linear_triton(xn, wn)
    assert [tuple(y.shape) for y in got] == [(4, 5), (4, 0), (4, 3)]
    for g, want in zip(got, grouped_linear_reference(xn, wn)):
        assert rel_error(g, want) <= TOL[torch.float32]


@needs_kernel
def test_public_functions_take_leading_dims_and_strided_x() -> None:
    """x [..., K], non-contiguous: outputs [..., N_i], the twin's values."""
    base, ws = make(24, 60, [20, 12], torch.float32, 4, KERNEL_DEVICE)
    x = base.view(2, 12, 60)[:, ::2]  # [2, 6, 60], strided rows
    xt = base[:6, :].T.contiguous().T  # [6, 60] column-major
    for xx in (x, xt, base[0]):
        got = grouped_linear(xx, ws)
        for g, w, want in zip(got, ws, grouped_linear_reference(xx, ws)):
            assert g.shape == (*xx.shape[:-1], w.shape[0])
            assert rel_error(g, want) <= TOL[torch.float32]
    got = gated_mlp(x, ws[0], ws[0] * 0.5)
    assert got.shape == (2, 6, 20)
    assert rel_error(got, gated_mlp_reference(x, ws[0], ws[0] * 0.5)) <= TOL[torch.float32]


def test_linear_config_on_an_h200() -> None:
    """The rule at Llama-3-8B shapes on 132 SMs: SMs busy, splits cover K, pipeline within budget."""
    shapes = [([4096, 1024, 1024], 4096, False), ([4096], 4096, False), ([14336], 4096, True), ([4096], 14336, False)]
    for M in (1, 4, 8, 16, 32, 85, 128, 300):
        for widths, K, gated in shapes:
            cfg = linear_config(M, widths, K, torch.bfloat16, 132, gated)
            cfg.check()
            assert cfg == linear_config(M, widths, K, torch.bfloat16, 132, gated)  # deterministic
            assert cfg.block_m == min(128, max(16, 1 << (M - 1).bit_length()))
            chunk = linear._k_chunk(K, cfg.split_k, cfg.block_k)
            split = -(-K // chunk)
            assert chunk % cfg.block_k == 0 and (split - 1) * chunk < K <= split * chunk
            if M <= 64:
                assert programs(M, widths, K, cfg) >= 132, f"idle SMs at M={M}, {widths}x{K}: {cfg}"
            if split > 1:  # fp32 partials at most a quarter of the weight bytes
                assert split * M * 4 <= K * 2 / 4
            planes = 2 if gated else 1
            assert (planes * cfg.block_n + cfg.block_m) * cfg.block_k * 2 * cfg.num_stages <= linear.SMEM_BUDGET
    assert linear_config(1, [14336], 4096, torch.bfloat16, 132, True).split_k == 1  # 224 tiles: no split
    assert linear_config(1, [4096], 4096, torch.bfloat16, 132).split_k > 1  # 64 tiles: split K


# ---------------------------------------------------------------------------------- the ops
def test_ops_cpu_under_torch_compile_match_twins() -> None:
    def step(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor) -> tuple:
        q, k = torch.ops.moa_flex.grouped_linear(x, [wq, wk])
        return q, k, torch.ops.moa_flex.gated_mlp(x, wg, wu)

    fn = torch.compile(step, fullgraph=True)
    x, (wq, wk, wg, wu) = make(6, 32, [16, 8, 24, 24], torch.float32, 5)
    x = x.view(2, 3, 32)
    q, k, h = fn(x, wq, wk, wg, wu)
    want_q, want_k = grouped_linear_reference(x, [wq, wk])
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(h, gated_mlp_reference(x, wg, wu), rtol=0, atol=0)
    assert q.shape == (2, 3, 16) and h.shape == (2, 3, 24)


def test_ops_fake_impl_and_opcheck() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, (wq, wk, wg, wu) = make(4, 32, [16, 8, 24, 24], torch.bfloat16, 6)
    x = x.view(2, 2, 32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k = torch.ops.moa_flex.grouped_linear(mode.from_tensor(x), [mode.from_tensor(wq), mode.from_tensor(wk)])
        h = torch.ops.moa_flex.gated_mlp(mode.from_tensor(x), mode.from_tensor(wg), mode.from_tensor(wu))
    assert (q.shape, k.shape, h.shape) == ((2, 2, 16), (2, 2, 8), (2, 2, 24))
    assert q.dtype == h.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.moa_flex.grouped_linear.default, (x, [wq, wk]))
    torch.library.opcheck(torch.ops.moa_flex.gated_mlp.default, (x, wg, wu))


# ---------------------------------------------------------------------------------- bad input
def _bad(what: str) -> tuple:
    x, (w1, w2) = make(3, 16, [8, 8], torch.float32, 7)
    return {
        "K mismatch": (x, [w1, w2[:, :15]], "x has K = 16"),
        "weight rank": (x, [w1[None]], "2-D"),
        "x rank": (x[0, 0], [w1], "0-d"),
        "dtype mismatch": (x, [w1, w2.double()], "dtype"),
        "x dtype": (x.int(), [w1.int()], "x must be one of"),
        "no weights": (x, [], "1 to 3 weights"),
        "four weights": (x, [w1] * 4, "1 to 3 weights"),
        "gate/up shapes": (x, [w1, w2[:5]], "one shape"),
    }[what]


BAD = ["K mismatch", "weight rank", "x rank", "dtype mismatch", "x dtype", "no weights", "four weights"]


@pytest.mark.parametrize("what", BAD)
def test_bad_input_grouped(what: str) -> None:
    x, ws, text = _bad(what)
    for fn in (grouped_linear_reference, grouped_linear, torch.ops.moa_flex.grouped_linear):
        with pytest.raises(ValueError, match=text):
            fn(x, ws)


@pytest.mark.parametrize("what", ["K mismatch", "weight rank", "x rank", "dtype mismatch", "gate/up shapes"])
def test_bad_input_gated(what: str) -> None:
    x, ws, text = _bad(what)
    for fn in (gated_mlp_reference, gated_mlp, torch.ops.moa_flex.gated_mlp):
        with pytest.raises(ValueError, match=text):
            fn(x, ws[0], ws[-1])


@needs_kernel
def test_kernel_bad_out_config_and_rank() -> None:
    x, ws = make(3, 16, [8], torch.float32, 8, KERNEL_DEVICE)
    with pytest.raises(ValueError, match="out\\[0\\] must be"):
        grouped_linear_triton(x, ws, out=[torch.empty(3, 7, device=KERNEL_DEVICE)])
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        grouped_linear_triton(x, ws, config=LinearConfig(16, 24, 16, 1, 4, 2))
    with pytest.raises(ValueError, match="2-D"):
        gated_mlp_triton(x[None], ws[0], ws[0])
