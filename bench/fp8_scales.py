"""FP8 cache: which scale granularity, measured on a model trained on real text.

    python bench/fp8_scales.py [--length 4096] [--docs 4] [--record]

The shipped code model (``moa_flex/zoo/code``, trained on Python) reads held-out standard
library files (``moa_flex.data.code_corpus.heldout_files``, documents of ``--length`` tokens).
Each row runs the model with its keys (after RoPE) and values stored one way and read back,
dense causal attention otherwise (transformers' sdpa over the stored-and-read K/V):

* ``exact``: float32, the reference;
* ``bf16``: a bf16 cache (what the FP8 cache is compared with in the runtime);
* ``fp8 per token``: e4m3 with one scale per token and KV head (moa-flex's FP8 cache,
  :func:`moa_flex.kernels.quant.quantize_fp8`);
* ``fp8 per head``: one scale per layer and KV head, the prompt's own amax (a calibrated
  per-tensor scale: the optimistic case, calibrated on the very tokens it stores);
* ``fp8 unscaled``: e4m3 of the raw values (scale 1).

Below the table: the error of ragged decode over an FP8 cache against the bf16 cache it was
quantized from, on random normal q/K/V (D = 128, 4096 cached tokens, heads keeping 16 to 2048
of them; tests/test_fp8.py bounds it).

Reported per row: cross-entropy (nats per token) over every predicted token, its change
against ``exact``, the mean KL divergence exact || stored (nats per token), the largest logit
difference, and the share of greedy (argmax) tokens equal to exact's.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from harness import record
from moa_flex.kernels.quant import FP8, FP8_MAX, dequantize_fp8, quantize_fp8

STORE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # the active storage (set per row)


def per_token(x: torch.Tensor) -> torch.Tensor:
    """moa-flex's FP8 cache: one scale per token and KV head ([B, G, T, D]: the last axis)."""
    return dequantize_fp8(*quantize_fp8(x), dtype=torch.float32)


def per_head(x: torch.Tensor) -> torch.Tensor:
    """One scale per (row, KV head) over all the prompt's tokens: amax / 448."""
    scale = (x.abs().amax(dim=(-2, -1), keepdim=True) / FP8_MAX).clamp(min=1e-30)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "exact": None,
    "bf16": lambda x: x.bfloat16().float(),
    "fp8 per token": per_token,
    "fp8 per head": per_head,
    "fp8 unscaled": lambda x: x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float(),
}


def stored_attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN201
    """sdpa over the keys and values as the active storage keeps them."""
    store = STORE.get("fn")
    if store is not None:
        key, value = store(key), store(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def run(model, docs: list[list[int]], store) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(logits [docs, T, V] float32, targets [docs, T-1])."""
    STORE["fn"] = store
    ids = torch.tensor(docs)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return logits, ids[:, 1:]


def measure(model, docs: list[list[int]]) -> list[dict]:  # noqa: ANN001
    exact, targets = run(model, docs, None)
    ref_logp = F.log_softmax(exact[:, :-1], -1)
    rows = []
    for name, store in ROWS.items():
        logits = exact if store is None else run(model, docs, store)[0]
        logp = F.log_softmax(logits[:, :-1], -1)
        ce = F.nll_loss(logp.flatten(0, 1), targets.flatten()).item()
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        same = (logits[:, :-1].argmax(-1) == exact[:, :-1].argmax(-1)).float().mean().item()
        rows.append(dict(name=name, ce=ce, kl=kl, max_logit=(logits - exact).abs().max().item(), same=same))
    base = rows[0]["ce"]
    for r in rows:
        r["dce"] = r["ce"] - base
    return rows


def random_decode_error() -> str:
    """Max abs and max relative-norm error of FP8 against bf16 ragged decode on random inputs."""
    from moa_flex.kernels.decode import ragged_decode_reference

    gen = torch.Generator().manual_seed(0)
    B, H, G, N, D = 2, 8, 2, 4096, 128
    q = torch.randn(B, H, D, generator=gen, dtype=torch.float64)
    k, v = torch.randn(B, N, D, generator=gen).bfloat16(), torch.randn(B, N, D, generator=gen).bfloat16()
    layout = (torch.tensor([0, N // 2, N], dtype=torch.int32), torch.full((B, G), N // 2, dtype=torch.int32),
              torch.tensor([[64, 2048, 512, 2048, 16, 2048, 1024, 2048]] * B, dtype=torch.int32),
              torch.full((B,), 10**5), 4, 0, D**-0.5, 0.0)
    bf16 = ragged_decode_reference(q, k.double(), v.double(), *layout)
    (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
    err = (ragged_decode_reference(q, k8, v8, *layout, k_scale=ks, v_scale=vs) - bf16).abs()
    return (f"Random inputs (D = 128, 4096 cached tokens, spans 16-2048): FP8 against bf16 ragged decode, max abs "
            f"{err.max().item():.3f}, max relative norm {(err.norm(dim=-1) / bf16.norm(dim=-1)).max().item():.1%}.")


def table(rows: list[dict]) -> str:
    out = ["| K/V storage | cross-entropy (nats/token) | change | KL exact‖stored | max logit diff | greedy tokens = exact |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['ce']:.4f} | {r['dce']:+.4f} | {r['kl']:.2e} | {r['max_logit']:.3f} | "
                   f"{r['same']:.2%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096, help="tokens per document")
    ap.add_argument("--docs", type=int, default=4, help="held-out documents")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    from moa_flex.code_demo import load_code_model
    from moa_flex.data.code_corpus import heldout_files
    from moa_flex.zoo.text_eval import documents

    AttentionInterface.register("moa_fp8_bench", stored_attention)
    model, tokenizer = load_code_model()
    model.set_attn_implementation("moa_fp8_bench")
    texts = (p.read_text(encoding="utf-8") for p in heldout_files())
    docs = documents(tokenizer, texts, args.length, args.docs)
    rows = measure(model, docs)
    text = table(rows) + "\n\n" + random_decode_error()
    print(text)
    if args.record:
        record("FP8 cache: scale granularity on the code model", text, device="cpu",
               details=f"The shipped code model over {args.docs} held-out standard-library documents of {args.length} "
                       "tokens; dense causal attention over K/V stored as each row says.")

if __name__ == "__main__":
    main()
