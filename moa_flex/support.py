"""The support matrix: every causal-LM model type of the installed transformers, checked.

    python -m moa_flex.support                        # every type; writes docs/SUPPORT.md
    python -m moa_flex.support --types llama mixtral  # some types, table on stdout
    make support

For each model type in transformers' causal-LM mapping: a tiny random config (2-4 layers,
hidden 64, 4 query / 2 KV heads of 16, vocab 128; a hybrid keeps one layer of each of its
layer types), the model in fp32 on the CPU, and three checks through
``moa_flex.compile(..., backend="eager")`` (with the first-call guard on):

1. dense: a dense plan's logits equal the stock model's (max abs <= 1e-5);
2. sparse: a random sparse plan's logits equal the independent reference
   (:mod:`moa_flex.reference`, float64 softmax under the brute-force keep rule) within 1e-4;
3. generate: greedy ``generate`` of a left-padded batch is token-exact against the reference's
   argmax at every step, planned for the request's length.

Status per type: ``supported`` (all three pass), ``refused`` (moa-flex declines it at compile
time, with the reason it gives), ``fails`` (a check disagrees, or an error past compile: a
bug to fix), ``not built`` (no tiny model could be made from the config: the reason).
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

TINY = {  # config fields set when the type's config has them
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "intermediate_size_mlp": 128, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 512,
    "n_positions": 512, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": False,
}
PROMPT, NEW, BATCH = 40, 4, 2
DENSE_TOL, SPARSE_TOL = 1e-5, 1e-4


@dataclass
class Result:
    """One model type's row of the matrix."""

    model_type: str
    status: str  # supported / refused / fails / not built
    detail: str = ""
    seconds: float = 0.0


class _Timeout(Exception):
    pass


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type`` (the fields of :data:`TINY` it has; one layer of each of
    a hybrid's layer types, at least two layers)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs = {k: v for k, v in TINY.items() if hasattr(default, k)}
    types = getattr(default, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        picked = list(dict.fromkeys(types))  # one layer of each kind, in order of appearance
        picked = (picked * 2)[:max(2, len(picked))]
        hybrid = {**kwargs, "layer_types": picked}
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if name in hybrid:
                hybrid[name] = len(picked)
        try:
            return cls(**hybrid)
        except (TypeError, ValueError, AttributeError):  # layer_types derived by the config itself
            pass
    return cls(**kwargs)


MAX_PARAMETERS = 20_000_000  # a "tiny" model above this kept a size field the tool does not set


def _build(model_type: str) -> Any:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):  # count first: a config with an unset size field could fill the memory
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {count / 1e6:.0f}M parameters (a size field this tool does not "
                         "set)")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):  # no sdpa: its eager attention (moa_flex.compile switches to sdpa or refuses)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # greedy runs its NEW tokens (an EOS would end a row early)
    return model.float().eval()


def _ids(vocab: int, length: int, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def _random_plan(config: Any, seed: int = 0) -> Any:
    """Heterogeneous per-head spans well below the prompt, so the plan really cuts."""
    from moa_flex.plan import ModelShape, Plan

    shape = ModelShape.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randint(4, 13, (shape.num_layers, shape.num_kv_heads), generator=gen).double().tolist()
    beta = (torch.randint(0, 3, (shape.num_layers, shape.num_kv_heads), generator=gen) / 8).tolist()
    return Plan(shape, alpha, beta, granularity="kv_head", sink=4, min_span=8, span_multiple=4)


def check_type(model_type: str) -> Result:
    """Build, compile and check one model type (module docstring)."""
    import moa_flex
    from moa_flex.plan import Plan
    from moa_flex.reference import planned_logits, reference_logits

    t0 = time.perf_counter()
    try:
        model = _build(model_type)
    except Exception as e:  # noqa: BLE001 - any failure to build is this type's status
        return Result(model_type, "not built", _short(e), time.perf_counter() - t0)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else 128
    ids = _ids(vocab, PROMPT, 1, 1)
    try:
        with torch.no_grad():
            stock = model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001
        return Result(model_type, "not built", f"stock forward: {_short(e)}", time.perf_counter() - t0)
    try:
        moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    except (ValueError, NotImplementedError, TypeError) as e:  # declined before anything changed
        return Result(model_type, "refused", _short(e), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return Result(model_type, "fails", f"compile: {type(e).__name__}: {_short(e)}", time.perf_counter() - t0)
    try:
        with torch.no_grad():
            dense = model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001
        return Result(model_type, *_refused_or_failed(e), time.perf_counter() - t0)
    diff = float((dense - stock).abs().max())
    if not diff <= DENSE_TOL:
        return Result(model_type, "fails", f"dense plan differs from the stock model by {diff:.3g}", time.perf_counter() - t0)
    try:
        sparse = _random_plan(model.config)
        model.moa_flex.set_plan(sparse)
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
        want = reference_logits(model, sparse, input_ids=ids)
        diff = float((got - want).abs().max())
        if not diff <= SPARSE_TOL:
            return Result(model_type, "fails", f"sparse plan differs from the reference by {diff:.3g}",
                          time.perf_counter() - t0)
        batch = _ids(vocab, PROMPT, BATCH, 2)
        mask = torch.ones_like(batch)
        mask[0, :5] = 0
        with torch.no_grad():
            seq = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(BATCH, NEW, dtype=mask.dtype)], dim=1)
        ref = planned_logits(model, sparse, PROMPT + NEW, seq[:, :-1], full_mask[:, :-1])  # the request's plan
        predicted = ref[:, PROMPT - 1:].argmax(-1)
        if not torch.equal(predicted, seq[:, PROMPT:]):
            return Result(model_type, "fails", "greedy generate differs from the reference's tokens",
                          time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return Result(model_type, *_refused_or_failed(e), time.perf_counter() - t0)
    return Result(model_type, "supported", "dense, sparse and generate match", time.perf_counter() - t0)


def _refused_or_failed(e: BaseException) -> tuple[str, str]:
    """After compile: moa-flex's own refusals (a ValueError / NotImplementedError raised in
    moa-flex's code, naming what it does not model; at the first call, when the pass sees the
    traced graph: said so) vs anything else (a failure: a bug)."""
    from moa_flex.runtime.verify import VerifyError

    inner = getattr(e, "inner_exception", None) or e  # Dynamo wraps the backend's error (BackendCompilerFailed)
    if isinstance(inner, VerifyError):
        return "fails", _short(inner)
    tb = traceback.extract_tb(inner.__traceback__)
    ours = bool(tb) and any(Path(tb[-1].filename).resolve().is_relative_to(root) for root in _package_roots())
    if isinstance(inner, (ValueError, NotImplementedError)) and ours:
        return "refused", f"(at the first call) {_short(inner)}"
    return "fails", f"{type(inner).__name__}: {_short(inner)}"


def _package_roots() -> list[Path]:
    """Where moa-flex's own code lives (the passes are a package of their own folder)."""
    import moa_flex
    import moa_flex.passes

    return [Path(moa_flex.__file__).resolve().parent, Path(moa_flex.passes.__file__).resolve().parent]


def _short(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def run(types: Sequence[str], timeout: int, progress: bool = True) -> list[Result]:
    """Check ``types``, each under a ``timeout`` (seconds; 0: none), a line per type on stderr."""
    results = []
    for i, model_type in enumerate(types):
        if timeout:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(timeout)
        try:
            r = check_type(model_type)
        except _Timeout:
            r = Result(model_type, "fails", f"timed out after {timeout} s", float(timeout))
        finally:
            if timeout:
                signal.alarm(0)
        torch._dynamo.reset()
        results.append(r)
        if progress:
            print(f"[{i + 1}/{len(types)}] {model_type}: {r.status} ({r.seconds:.1f} s) {r.detail[:160]}",
                  file=sys.stderr, flush=True)
    return results


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def markdown(results: Sequence[Result], command: str) -> str:
    """docs/SUPPORT.md: counts, then one row per model type."""
    import transformers

    counts = {s: sum(r.status == s for r in results) for s in ("supported", "refused", "fails", "not built")}
    lines = [
        "# Support matrix", "",
        f"Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
        f"transformers {transformers.__version__} and torch {torch.__version__} (CPU, fp32, tiny random configs; "
        "what each check does: `moa_flex/support.py`).", "",
        f"{len(results)} causal-LM model types: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
        "- supported: a dense plan equals the stock model (1e-5), a random sparse plan equals the independent "
        "reference (1e-4), and greedy generate of a left-padded batch is token-exact against the reference.",
        "- refused: moa-flex declines the type with the reason shown, at compile time or (where marked) at the first "
        "call, before any result (nothing is rewritten).",
        "- fails: a check disagrees or an error past compile: an open bug.",
        "- not built: no tiny model could be made from the type's config on the CPU (the reason shown).", "",
        "| model type | status | detail |", "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.model_type} | {r.status} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moa_flex.support", description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=None, help="model types (default: every causal-LM type)")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: docs/SUPPORT.md for all "
                                                "types, stdout for --types)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per type (0: none)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    known = causal_lm_types()
    types = args.types if args.types else known
    unknown = [t for t in types if t not in known]
    if unknown:
        ap.error(f"not causal-LM model types of this transformers: {unknown}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 65536)
    results = run(types, args.timeout, progress=not args.quiet)
    command = "python -m moa_flex.support" + (f" --types {' '.join(args.types)}" if args.types else "")
    text = markdown(results, command)
    out = args.out or (None if args.types else str(Path(__file__).resolve().parent.parent / "docs" / "SUPPORT.md"))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0 if not any(r.status == "fails" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
