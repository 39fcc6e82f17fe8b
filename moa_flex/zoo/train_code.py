"""Train the code model: a small Llama on real Python sources (``python -m moa_flex.zoo.train_code``).

One call does everything, from this machine's installed packages to a folder that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:

1. **Corpus** (:mod:`moa_flex.data.code_corpus`): the ``.py`` files of the site-packages
   directories (``--roots`` overrides them), filtered and deduplicated by ``build_corpus``,
   minus every file whose bytes equal a standard-library file's (the standard library is the
   held-out set). The kept files are put in a seeded random order (seed ``(seed, 0xD0C5)``);
   ``--max-corpus-bytes`` keeps only the documents of that order that fit in that many bytes.
2. **Tokenizer** (:mod:`moa_flex.data.code_tokenizer`): byte-level BPE of ``--vocab-size``
   tokens trained on ``--tokenizer-sample-bytes`` of whole documents (seeded by ``seed``; 0:
   all of them). Ids 0/1/2 are ``<|bos|>``/``<|eos|>``/``<|pad|>``.
3. **Token stream**: every document in that order as ``<|bos|> tokens <|eos|>``, concatenated
   into one uint16 array (batch-encoded by ``tokenizers`` on all cores).
4. **Training**: step ``s`` uses one length ``L`` from the needle trainer's
   :func:`moa_flex.zoo.train.length_schedule` (uniform over the ``--lengths`` allowed so far, the
   longest allowed growing from the shortest to the longest over the first ``--curriculum``
   fraction of the steps) and ``tokens_per_step // L`` windows of ``L + 1`` tokens at uniform
   random offsets of the stream (seed ``(seed, s)``); windows cross document boundaries, which
   the ``<|eos|>``/``<|bos|>`` pair marks. Loss: plain next-token cross-entropy (nats/token).
   AdamW (decay on matrices except the tied embedding), linear warmup, cosine decay, gradient
   clipping; bf16 autocast and sdpa (flash/cuDNN) attention on a GPU.
5. **Validation**: at every logged row, the mean loss (nats/token) and bits per byte of
   ``--val-docs`` held-out documents of ``--val-length`` tokens (standard-library files in a
   seeded order, joined by blank lines: :func:`moa_flex.zoo.text_eval.documents`).
6. **Evaluation and outputs**: the weights are rounded to ``--save-dtype``, bits per byte and
   far-copy accuracy are measured on ``--eval-docs`` held-out documents per ``--eval-lengths``
   (dense model, plain PyTorch forward; definitions of :mod:`moa_flex.zoo.text_eval`), and the
   out folder gets ``model.safetensors``, ``config.json``, ``generation_config.json``, the
   tokenizer files, ``corpus_manifest.json``, ``train_log.json`` and a model card ``README.md``.

Determinism: the same site-packages and stdlib (corpus hash in the manifest), flags and seed
give the same tokenizer, stream, batches and initial weights; on a GPU the attention backward
kernels may still differ in the last bits between runs.

Time budget. ``--max-minutes`` counts from the start of the run (corpus, tokenizer and stream
included) to the end of the training loop, which stops early (``stopped_by: time budget``,
the learning rate then not fully decayed) when it runs out; evaluation and saving follow
(~10-30 s). The defaults are sized for one call of at most ~9 minutes on one NVIDIA H200 with
16 CPU cores; assumed, not measured there:

* corpus + tokenizer + stream about 0.5-1 minute (measured on a contended 2-core CPU: 3.5 s
  corpus with a warm page cache, 7 s tokenizer on 32 MB, 54 s to encode 179 MiB = 59M tokens
  on about one core; the encoding runs in parallel over documents);
* training throughput: 1000 steps of 131072 tokens (131M tokens) at a mean length of 3938
  tokens are ~22 PFLOP (6 x 14.2M parameters per token for the matmuls, about the same again for
  causal attention at these lengths, forward + backward). The 5M-parameter needle model ran at
  an effective ~66 TFLOP/s by the same count on an H200 (bf16 autocast, sdpa, no
  torch.compile), which gives ~5.6 minutes; larger matmuls and head_dim 64 should do better
  (~100 TFLOP/s: ~3.7 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.code_corpus import (
    Corpus,
    build_corpus,
    file_hashes,
    heldout_files,
    training_files,
)
from ..data.code_tokenizer import train_tokenizer
from .text_eval import (
    DEFAULT_K,
    DEFAULT_WINDOW,
    Scores,
    documents,
    far_copy_positions,
    score_document,
)
from .train import (
    DTYPES,
    _opt,
    environment,
    length_schedule,
    lr_at,
    make_optimizer,
    round_weights,
    save_weights,
)

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # code_tokenizer's special ids
ORDER_SEED_TAG = 0xD0C5  # training documents are shuffled with seed (seed, tag)
HELDOUT_SEED_TAG = 0x5EED  # held-out (stdlib) files are shuffled with seed (seed, tag)
PROG = "python -m moa_flex.zoo.train_code"
CODE_DIR = Path(__file__).resolve().parent / "code"


@dataclass
class CodeTrainConfig:
    """Everything a code-model run depends on (each field is a ``--flag``)."""

    out: str = _opt("output folder", default=str(CODE_DIR))
    seed: int = _opt("seed of the document order, tokenizer sample, batches and weights", default=0)
    steps: int = _opt("optimizer steps", default=1000)
    tokens_per_step: int = _opt("tokens per step (batch = tokens_per_step // length)", default=131072)
    lengths: tuple[int, ...] = _opt("training sequence lengths (tokens)", default=(512, 1024, 2048, 4096, 8192, 16384))
    curriculum: float = _opt("fraction of the steps over which the longest allowed length grows to the maximum", default=0.5)
    lr: float = _opt("peak learning rate", default=2e-3)
    min_lr: float = _opt("final learning rate (cosine decay)", default=2e-4)
    warmup: int = _opt("linear warmup steps", default=100)
    weight_decay: float = _opt("AdamW weight decay (matrices only)", default=0.1)
    grad_clip: float = _opt("gradient norm clip (0: none)", default=1.0)
    layers: int = _opt("decoder layers", default=8)
    hidden: int = _opt("hidden size", default=384)
    heads: int = _opt("query heads", default=6)
    kv_heads: int = _opt("key/value heads (GQA)", default=2)
    head_dim: int = _opt("head dimension", default=64)
    intermediate: int = _opt("MLP intermediate size", default=1024)
    rope_theta: float = _opt("RoPE base", default=500000.0)
    max_position: int = _opt("max_position_embeddings written to the config (>= the longest length)", default=16384)
    vocab_size: int = _opt("tokenizer vocabulary (3 specials + 256 bytes + merges; <= 65536)", default=4096)
    tokenizer_sample_bytes: int = _opt("UTF-8 bytes of whole documents the tokenizer trains on (0: all)", default=32_000_000)
    roots: tuple[str, ...] = _opt("site-packages folders to read (default: this interpreter's)", default=())
    max_corpus_bytes: int = _opt("keep at most this many bytes of training documents (0: all)", default=0)
    max_minutes: float = _opt("wall-clock budget in minutes from the run's start to the end of the training loop (0: none)",
                              default=7.5)
    fit_steps: bool = _opt("with --max-minutes: time each training length first and lower --steps so that the whole "
                           "schedule (curriculum and learning-rate decay) ends within the budget", default=True)
    val_length: int = _opt("held-out validation document length (tokens)", default=2048)
    val_docs: int = _opt("held-out validation documents (scored at every logged row)", default=4)
    eval_lengths: tuple[int, ...] = _opt("final held-out evaluation lengths (tokens)", default=(2048, 16384))
    eval_docs: int = _opt("final held-out evaluation documents per length", default=4)
    device: str = _opt("torch device (default: cuda when available, else cpu)", default="")
    amp: str = _opt("autocast dtype: bf16, fp16 or none (default: bf16 on cuda, none on cpu)", default="")
    compile: bool = _opt("torch.compile the model (one compile per training length)", default=False)
    threads: int = _opt("torch CPU threads (0: leave as is)", default=0)
    save_dtype: str = _opt("dtype of the saved weights: bf16, fp16 or fp32", default="bf16")
    log_every: int = _opt("steps between logged rows (training loss and held-out validation)", default=50)
    progress: bool = _opt("show progress bars", default=True)
    verbose: bool = _opt("print every logged row", default=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: Sequence[str] | None = None) -> CodeTrainConfig:
    """A :class:`CodeTrainConfig` from command-line flags (``--tokens-per-step`` for ``tokens_per_step``)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scalar = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(CodeTrainConfig):
        flag = _flag(f.name)
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind.startswith("tuple["):
            p.add_argument(flag, nargs="*", type=scalar[kind[6:].split(",")[0]], **kw)
        else:
            p.add_argument(flag, type=scalar[kind], **kw)
    args = vars(p.parse_args(argv))
    return CodeTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def check_config(cfg: CodeTrainConfig) -> None:
    """ValueError naming the first bad field (as its ``--flag``)."""
    for name in ("steps", "tokens_per_step", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                 "val_length", "val_docs", "eval_docs", "log_every", "max_position"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "weight_decay", "grad_clip", "tokenizer_sample_bytes", "max_corpus_bytes", "max_minutes",
                 "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"--heads ({cfg.heads}) must be a multiple of --kv-heads ({cfg.kv_heads})")
    for name in ("lengths", "eval_lengths"):
        values = getattr(cfg, name)
        if not values or min(values) < 16:
            raise ValueError(f"{_flag(name)} must be non-empty, each >= 16 tokens, got {values}")
        if max(values) > cfg.max_position:
            raise ValueError(f"{_flag(name)} must be <= --max-position ({cfg.max_position}), got {values}")
    if cfg.tokens_per_step < max(cfg.lengths):
        raise ValueError(f"--tokens-per-step ({cfg.tokens_per_step}) must be >= the longest length ({max(cfg.lengths)})")
    if not 0 <= cfg.curriculum <= 1:
        raise ValueError(f"--curriculum must be in [0, 1], got {cfg.curriculum}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"--lr/--min-lr: need 0 <= min_lr <= lr and lr > 0, got {cfg.min_lr}, {cfg.lr}")
    if not 3 + 256 <= cfg.vocab_size <= 65536:
        raise ValueError(f"--vocab-size must be in [259, 65536] (3 specials + 256 bytes; uint16 ids), got {cfg.vocab_size}")
    if cfg.rope_theta <= 0:
        raise ValueError(f"--rope-theta must be > 0, got {cfg.rope_theta}")
    if cfg.save_dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--save-dtype must be bf16, fp16 or fp32, got {cfg.save_dtype!r}")
    if cfg.amp not in ("", "bf16", "fp16", "none"):
        raise ValueError(f"--amp must be bf16, fp16 or none, got {cfg.amp!r}")


# --------------------------------------------------------------------------------------------
# Data


def load_corpus(cfg: CodeTrainConfig) -> tuple[Corpus, list[str], int]:
    """(corpus, its texts in the seeded training order, documents left out by ``max_corpus_bytes``).
    The returned corpus (and so its manifest) holds only the documents kept."""
    roots = list(cfg.roots) or None
    corpus = build_corpus(training_files(roots), exclude_sha256=file_hashes(heldout_files()), roots=roots,
                          progress=cfg.progress)
    texts = list(corpus.documents())
    order = np.random.default_rng([cfg.seed, ORDER_SEED_TAG]).permutation(len(texts))
    keep, total = [], 0
    for i in order.tolist():  # like sample_documents: skip a document that would overflow the cap
        if not cfg.max_corpus_bytes or total + corpus.files[i].nbytes <= cfg.max_corpus_bytes:
            keep.append(i)
            total += corpus.files[i].nbytes
    capped = len(texts) - len(keep)
    kept = Corpus(files=[corpus.files[i] for i in sorted(keep)], dropped=corpus.dropped,
                  settings={**corpus.settings, "max_corpus_bytes": cfg.max_corpus_bytes})
    return kept, [texts[i] for i in keep], capped


def heldout_texts(seed: int) -> list[str]:
    """The standard library's files (:func:`heldout_files`) in a seeded order."""
    files = heldout_files()
    order = np.random.default_rng([seed, HELDOUT_SEED_TAG]).permutation(len(files))
    return [files[i].read_text(encoding="utf-8") for i in order.tolist()]


def token_stream(tokenizer: Any, texts: Sequence[str], batch: int = 1024) -> np.ndarray:
    """uint16 [n]: every text as ``<|bos|> tokens <|eos|>``, in order, concatenated.
    Encoded by the ``tokenizers`` backend in batches (parallel over the CPU cores)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster where it exists
    parts: list[np.ndarray] = []
    edge = np.array([BOS_ID], dtype=np.uint16), np.array([EOS_ID], dtype=np.uint16)
    for i in range(0, len(texts), batch):
        for enc in encode(list(texts[i:i + batch]), add_special_tokens=False):
            parts += [edge[0], np.array(enc.ids, dtype=np.uint16), edge[1]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def schedule(cfg: CodeTrainConfig) -> list[int]:
    """The training length (tokens) of every step: the needle trainer's curriculum without its
    induction phase (seeded by ``cfg.seed``)."""
    return length_schedule(SimpleNamespace(lengths=cfg.lengths, seed=cfg.seed, steps=cfg.steps, curriculum=cfg.curriculum,
                                           induction_steps=0, induction_length=0))


def window_starts(n_tokens: int, length: int, count: int, seed: int, step: int) -> np.ndarray:
    """int64 [count]: uniform random offsets of windows of ``length + 1`` tokens in a stream of
    ``n_tokens`` tokens, deterministic in ``(seed, step)``."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - length, size=count)


def step_batch(stream: torch.Tensor, cfg: CodeTrainConfig, step: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [tokens_per_step // length, length] of ``step``, gathered from
    ``stream`` (int32 on the training device)."""
    starts = window_starts(stream.numel(), length, max(1, cfg.tokens_per_step // length), cfg.seed, step)
    idx = torch.from_numpy(starts).to(stream.device)[:, None] + torch.arange(length + 1, device=stream.device)
    rows = stream[idx].long()
    return rows[:, :-1], rows[:, 1:]


# --------------------------------------------------------------------------------------------
# Model


def model_config(cfg: CodeTrainConfig, vocab: int) -> Any:
    """LlamaConfig: GQA, RoPE, tied embeddings, vocabulary ``vocab`` rounded up to 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-vocab // 64) * 64, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="sdpa",
    )


def build_model(cfg: CodeTrainConfig, vocab: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialized LlamaForCausalLM (initialized on the CPU, seeded by ``cfg.seed``) in
    train mode on ``device``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, vocab)).to(device)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               max_new_tokens=256)
    return model.train()


# --------------------------------------------------------------------------------------------
# Scoring


def spelled_bytes(tokenizer: Any, ids: Sequence[int]) -> int:
    """UTF-8 bytes that ``ids`` spell."""
    return len(tokenizer.decode(list(ids), clean_up_tokenization_spaces=False).encode("utf-8"))


@torch.no_grad()
def validation(model: torch.nn.Module, docs: torch.Tensor, doc_bytes: int, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    """(mean loss in nats/token, bits per byte) of ``docs`` [n, L] (token ids on the model's
    device); ``doc_bytes``: the UTF-8 bytes of their predicted tokens (``docs[:, 1:]``)."""
    was_training = model.training
    model.eval()
    with torch.autocast(docs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids=docs, use_cache=False).logits
    nats = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), docs[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return nats / docs[:, 1:].numel(), nats / math.log(2) / doc_bytes


@torch.no_grad()
def heldout_eval(model: torch.nn.Module, tokenizer: Any, docs: dict[int, list[list[int]]], amp_dtype: torch.dtype | None,
                 k: int = DEFAULT_K, window: int = DEFAULT_WINDOW) -> dict[str, dict[str, Any]]:
    """Per length (str): documents, tokens, bytes, bits per byte and far-copy tokens / accuracy /
    loss (nats) of the dense model on ``docs`` (length -> token-id documents), one document per
    forward; the definitions of :mod:`moa_flex.zoo.text_eval`. NaN (no far-copy tokens) is None."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, Any]] = {}
    for n in sorted(docs):
        s = Scores()
        for d in docs[n]:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(input_ids=torch.tensor([d], device=device), use_cache=False).logits[0]
            score_document(logits.float().cpu(), d, far_copy_positions(d, k, window), spelled_bytes(tokenizer, d[1:]), s)
        row = {**vars(s), "bits_per_byte": s.bits_per_byte, "far_accuracy": s.far_accuracy, "far_loss": s.far_loss}
        out[str(n)] = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in row.items()}
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Training


def train_step(cfg: CodeTrainConfig, model: torch.nn.Module, forward: Any, opt: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, lr: float, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimizer step; returns the mean cross-entropy (nats/token, on the device, no sync)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(input_ids=inputs, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def fit(cfg: CodeTrainConfig, model: torch.nn.Module, stream: torch.Tensor, val: tuple[torch.Tensor, int],
        amp_dtype: torch.dtype | None, deadline: float | None) -> dict:
    """The training loop, up to ``cfg.steps`` or the ``deadline`` (time.perf_counter seconds):
    ``{"log", "steps_done", "stopped_by", "tokens", "seconds"}``. Each log row: the mean training
    loss of the steps since the previous row and the held-out validation loss / bits per byte."""
    from tqdm import tqdm

    lengths = schedule(cfg)
    forward = torch.compile(model) if cfg.compile else model
    opt = make_optimizer(cfg, model, stream.device)
    rows: list[dict] = []
    loss_sum, n_sum = torch.zeros((), device=stream.device), 0
    steps_done, tokens, stopped, t0 = 0, 0, "steps", time.perf_counter()

    def log_row() -> None:
        nonlocal loss_sum, n_sum
        val_loss, val_bpb = validation(model, val[0], val[1], amp_dtype)
        rows.append({"step": steps_done, "length": lengths[steps_done - 1], "loss": round(loss_sum.item() / n_sum, 4),
                     "val_loss": round(val_loss, 4), "val_bpb": round(val_bpb, 4), "lr": lr_at(cfg, steps_done - 1),
                     "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)})
        loss_sum, n_sum = torch.zeros((), device=stream.device), 0
        if cfg.verbose:
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))

    bar = tqdm(total=cfg.steps, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for step in range(cfg.steps):
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time budget"
                break
            inputs, targets = step_batch(stream, cfg, step, lengths[step])
            loss_sum += train_step(cfg, model, forward, opt, inputs, targets, lr_at(cfg, step), amp_dtype)
            n_sum += 1
            steps_done, tokens = step + 1, tokens + inputs.numel()
            bar.update()
            if steps_done % cfg.log_every == 0 or steps_done == cfg.steps:
                log_row()
    finally:
        bar.close()
    if n_sum:  # steps since the last row (stopped by the time budget)
        log_row()
    return {"log": rows, "steps_done": steps_done, "stopped_by": stopped, "tokens": tokens, "seconds": time.perf_counter() - t0}


def time_lengths(cfg: CodeTrainConfig, model: torch.nn.Module, stream: torch.Tensor, amp_dtype: torch.dtype | None,
                 repeats: int = 2) -> dict[int, float]:
    """Seconds of one training step (forward + backward; the optimizer step is not run) at each
    training length, the median of ``repeats`` timed steps after one untimed. The gradients are
    dropped: the weights and the batches of the real run are unchanged."""
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else (lambda: None)
    out: dict[int, float] = {}
    for L in sorted(set(cfg.lengths)):
        inputs, targets = step_batch(stream, cfg, 0, L)
        times = []
        for i in range(repeats + 1):
            sync()
            t = time.perf_counter()
            with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(input_ids=inputs, use_cache=False).logits
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
            del logits
            sync()
            if i:
                times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out[L] = sorted(times)[len(times) // 2]
    return out


def steps_within(cfg: CodeTrainConfig, step_seconds: dict[int, float], seconds: float, overhead: float = 1.1) -> int:
    """The most steps (at most ``cfg.steps``) whose whole schedule, at ``step_seconds`` per step of
    each length times ``overhead`` (optimizer, validation rows), fits in ``seconds``."""
    def cost(steps: int) -> float:
        sched = schedule(dataclasses.replace(cfg, steps=steps))
        return overhead * sum(step_seconds[L] for L in sched)

    lo, hi = 0, cfg.steps
    while lo < hi:  # the cost grows with the step count: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    if lo < max(cfg.warmup + 1, 10):
        raise ValueError(f"only {lo} training steps fit in --max-minutes {cfg.max_minutes} (measured seconds per step by "
                         f"length: {step_seconds}); raise --max-minutes or lower --tokens-per-step")
    return lo


# --------------------------------------------------------------------------------------------
# The card and the run


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def loss_table(rows: list[dict], max_rows: int = 24) -> str:
    """Markdown table of the logged rows (evenly thinned to about ``max_rows``, the last kept)."""
    every = max(1, math.ceil(len(rows) / max_rows))
    pick = [r for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1]
    head = ["| step | length | train loss (nats/token) | held-out loss (nats/token) | held-out bits/byte | lr | tokens | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(head + [f"| {r['step']} | {r['length']} | {r['loss']:.3f} | {r['val_loss']:.3f} | {r['val_bpb']:.3f} | "
                             f"{r['lr']:.2e} | {r['tokens'] / 1e6:.1f}M | {r['seconds']:.0f} |" for r in pick])


def eval_table(ev: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per evaluated length."""
    head = ["| length (tokens) | documents | bits/byte | far-copy tokens | far-copy accuracy | far-copy loss (nats) |",
            "|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(head + [f"| {n} | {s['documents']} | {_fmt(s['bits_per_byte'])} | {s['far_tokens']} | "
                             f"{_fmt(s['far_accuracy'], '.3f')} | {_fmt(s['far_loss'], '.3f')} |" for n, s in ev.items()])


def package_table(manifest: dict, top: int = 15) -> str:
    """Markdown table of the ``top`` distributions by kept bytes (the rest summed)."""
    pk = sorted(manifest["packages"].items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
    rows = ["| distribution | version | files | MiB |", "|---|---|---:|---:|"]
    rows += [f"| {name} | {e['version'] or '-'} | {e['files']} | {e['bytes'] / 2 ** 20:.1f} |" for name, e in pk[:top]]
    if len(pk) > top:
        rest = pk[top:]
        rows.append(f"| {len(rest)} others | | {sum(e['files'] for _, e in rest)} | "
                    f"{sum(e['bytes'] for _, e in rest) / 2 ** 20:.1f} |")
    return "\n".join(rows)


def fitted_note(log: dict) -> str:
    """A line on the step count fitted to the time budget (empty when none was)."""
    f = log.get("fitted_steps")
    if not f:
        return ""
    per = ", ".join(f"{k}: {v:.3f}" for k, v in f["step_seconds"].items())
    return (f"\nThe run fitted its step count to `--max-minutes {log['config']['max_minutes']:g}` before training: "
            f"{f['steps']} of {f['requested_steps']} requested steps, from the measured seconds per step by length "
            f"({per}); the command above fixes that count.\n")


def render_card(log: dict, manifest: dict) -> str:
    """README.md text of a trained code model from its train log and corpus manifest."""
    cfg, env, data = log["config"], log["environment"], log["data"]
    hw = env.get("gpu") or f"CPU ({env['cpu']}, {env['torch_threads']} torch threads)"
    dropped = ", ".join(f"{r} {n}" for r, n in manifest["dropped"].items() if n) or "none"
    stop = "" if log["stopped_by"] == "steps" else " (stopped early by the time budget: the learning rate had not fully decayed)"
    cap = f"; {data['capped_documents']} more left out by `--max-corpus-bytes {cfg['max_corpus_bytes']}`" \
        if data["capped_documents"] else ""
    return f"""# code: a small Llama trained on real Python sources

A {log['params'] / 1e6:.1f}M-parameter code language model trained from scratch by moa-flex
(`moa_flex/zoo/train_code.py`) on the Python files of one machine's installed packages, with a
length curriculum up to {max(cfg['lengths'])} tokens, so that moa-flex's sparse attention plans can be
measured on real text. The Python standard library is held out for evaluation. It is small
and was trained for minutes: expect plausible-looking, often wrong Python.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
ids = tokenizer("<|bos|>import os\\n", return_tensors="pt").input_ids   # encode adds no special tokens
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))
```

## Model

Llama architecture (transformers `LlamaForCausalLM`): {cfg['layers']} layers, hidden size {cfg['hidden']},
{cfg['heads']} query heads / {cfg['kv_heads']} KV heads of dimension {cfg['head_dim']} (GQA), SwiGLU MLP {cfg['intermediate']},
RoPE (base {cfg['rope_theta']:g}), tied embeddings, max_position_embeddings {cfg['max_position']};
{log['params'] / 1e6:.2f}M parameters, saved in {cfg['save_dtype']} ({_mib(log['weights_bytes'])}).

Tokenizer: byte-level BPE (`moa_flex/data/code_tokenizer.py`), {data['tokenizer_vocab']} tokens (`<|bos|>` 0,
`<|eos|>` 1, `<|pad|>` 2, the 256 bytes, merges), trained on {_mib(data['tokenizer_sample_bytes'])} of whole
training documents; {data['bytes_per_token']:.2f} bytes per token on the training corpus. Exact round trip of any text.

## Data

{manifest['files']} Python files, {_mib(manifest['bytes'])}, from {len(manifest['packages'])} distribution(s)
(`moa_flex/data/code_corpus.py`; filtered and deduplicated; dropped: {dropped}{cap}).
Corpus content hash (sha256 over the kept files' sorted sha256 digests): `{manifest['sha256']}`;
the full list of distributions and versions is in `corpus_manifest.json`.

{package_table(manifest)}

Training stream: every file as `<|bos|> tokens <|eos|>` in a seeded order, {data['stream_tokens'] / 1e6:.1f}M tokens.
Held out: the standard library of Python {env['python']} (files whose bytes equal a standard-library file's are
also dropped from training).

## Training

    {log['command']}

Seed {log['seed']}; {log['steps_done']} of {cfg['steps']} steps{stop}, {log['tokens'] / 1e6:.1f}M tokens
({log['tokens'] / max(data['stream_tokens'], 1):.1f} passes over the stream), about {cfg['tokens_per_step']} tokens per step:
random windows of one length per step, lengths {', '.join(map(str, cfg['lengths']))} (uniform over those allowed so far,
the longest allowed growing over the first {100 * cfg['curriculum']:.0f}% of the steps). Next-token cross-entropy; AdamW,
lr {cfg['lr']:g} -> {cfg['min_lr']:g} (warmup {cfg['warmup']}, cosine), weight decay {cfg['weight_decay']:g}, gradient clip {cfg['grad_clip']:g}.
Timings: corpus {log['timings']['corpus']:.0f} s, tokenizer {log['timings']['tokenizer']:.0f} s, stream {log['timings']['stream']:.0f} s,
training {log['train_seconds']:.0f} s ({log['tokens_per_second'] / 1e3:.0f}K tokens/s), evaluation {log['eval_seconds']:.0f} s,
the whole run {log['wall_seconds']:.0f} s on {hw}; torch {env['torch']}, transformers {env['transformers']}.

Loss curve (train loss: mean over the steps since the previous row; held-out: {cfg['val_docs']} standard-library
documents of {cfg['val_length']} tokens):

{loss_table(log['log'])}

## Evaluation

Held-out standard library, saved ({cfg['save_dtype']}) weights, dense attention, one document per forward
(`moa_flex/zoo/text_eval.py` definitions: bits per byte = summed cross-entropy in bits over the UTF-8 bytes
of the predicted tokens; far-copy tokens: predictable only by copying from more than {log['eval_window']} tokens back,
k = {log['eval_k']}).

{eval_table(log['eval'])}

## Reproduce

On a machine with the same installed packages (same corpus hash) and the same standard library:

    {log.get('reproduce') or log['command']}
{fitted_note(log)}

All numbers on this page come from this run's `train_log.json` and `corpus_manifest.json`.
"""


def reproduce_command(cfg: CodeTrainConfig, fitted: bool) -> str:
    """The command that retrains this model: the run's flags, with the fitted step count fixed and
    no time budget when the steps were fitted to one."""
    argv = [a for f in dataclasses.fields(CodeTrainConfig) if getattr(cfg, f.name) != f.default
            for a in _as_flags(f, getattr(cfg, f.name))]
    if fitted:
        argv += ["--max-minutes", "0"]
    return PROG + ("" if not argv else " " + shlex.join(argv))


def _as_flags(f: dataclasses.Field, value: Any) -> list[str]:
    if f.name in ("out", "max_minutes", "progress", "verbose"):
        return []
    if isinstance(value, bool):
        return [_flag(f.name) if value else "--no-" + _flag(f.name)[2:]]
    if isinstance(value, tuple):
        return [_flag(f.name), *map(str, value)]
    return [_flag(f.name), str(value)]


def write_outputs(out: Path, model: torch.nn.Module, tokenizer: Any, manifest: dict, log: dict, save_dtype: torch.dtype) -> None:
    """Weights (in ``save_dtype``), configs, tokenizer, corpus_manifest.json, train_log.json, README.md."""
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out, save_dtype)
    tokenizer.save_pretrained(out)
    (out / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log["weights_bytes"] = (out / "model.safetensors").stat().st_size
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (out / "README.md").write_text(render_card(log, manifest))


def train(cfg: CodeTrainConfig, argv: Sequence[str] | None = None) -> tuple[torch.nn.Module, Any, dict]:
    """Build the corpus, tokenizer and stream, train, evaluate and save as the module docstring
    says; returns (model, tokenizer, log). ``argv`` is recorded as the command (default: this
    process's arguments)."""
    check_config(cfg)
    t_start = time.perf_counter()
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = DTYPES[cfg.amp or ("bf16" if device.type == "cuda" else "none")]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    corpus, texts, capped = load_corpus(cfg)
    heldout = heldout_texts(cfg.seed)
    timings["corpus"] = time.perf_counter() - t
    if not texts:
        raise ValueError("the corpus is empty: no training file was kept (see --roots, --max-corpus-bytes)")

    t = time.perf_counter()
    sample = cfg.tokenizer_sample_bytes or None
    tokenizer = train_tokenizer(texts, cfg.vocab_size, sample_bytes=sample, seed=cfg.seed)
    sample_bytes = corpus.nbytes if sample is None else min(sample, corpus.nbytes)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    stream_np = token_stream(tokenizer, texts)
    del texts
    if len(stream_np) <= max(cfg.lengths) + 1:
        raise ValueError(f"the token stream ({len(stream_np)} tokens) is shorter than the longest length + 1 "
                         f"({max(cfg.lengths) + 1}): not enough training text")
    stream = torch.from_numpy(stream_np.astype(np.int32)).to(device)
    val_docs = documents(tokenizer, heldout, cfg.val_length, cfg.val_docs)
    eval_docs = {n: documents(tokenizer, heldout, n, cfg.eval_docs) for n in sorted(set(cfg.eval_lengths))}
    if len(val_docs) < cfg.val_docs or any(len(d) < cfg.eval_docs for d in eval_docs.values()):
        raise ValueError("the held-out standard library is too short for --val-docs/--eval-docs at those lengths")
    val = (torch.tensor(val_docs, device=device), sum(spelled_bytes(tokenizer, d[1:]) for d in val_docs))
    timings["stream"] = time.perf_counter() - t

    model = build_model(cfg, len(tokenizer), device)
    fitted = None
    if deadline is not None and cfg.fit_steps:
        t = time.perf_counter()
        step_seconds = time_lengths(cfg, model, stream, amp_dtype)
        steps = steps_within(cfg, step_seconds, deadline - time.perf_counter())
        fitted = {"requested_steps": cfg.steps, "steps": steps,
                  "step_seconds": {str(k): round(v, 4) for k, v in step_seconds.items()}}
        timings["step_timing"] = time.perf_counter() - t
        if steps < cfg.steps:
            print(f"train_code: {steps} of {cfg.steps} steps fit in --max-minutes {cfg.max_minutes} "
                  f"(seconds per step by length: {fitted['step_seconds']})", file=sys.stderr, flush=True)
        cfg = dataclasses.replace(cfg, steps=steps)
    run = fit(cfg, model, stream, val, amp_dtype, deadline)
    save_dtype = DTYPES[cfg.save_dtype]
    round_weights(model, save_dtype)
    t_eval = time.perf_counter()
    ev = heldout_eval(model, tokenizer, eval_docs, amp_dtype)
    argv = sys.argv[1:] if argv is None else list(argv)
    n_docs = len(corpus.files)
    log = {
        "command": PROG + ("" if not argv else " " + shlex.join(argv)),
        "reproduce": reproduce_command(cfg, fitted is not None),
        "fitted_steps": fitted,
        "config": dataclasses.asdict(cfg), "seed": cfg.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "data": {"documents": n_docs, "bytes": corpus.nbytes, "capped_documents": capped, "corpus_sha256": corpus.sha256,
                 "stream_tokens": int(len(stream_np)), "tokenizer_vocab": len(tokenizer),
                 "tokenizer_sample_bytes": sample_bytes,
                 "bytes_per_token": corpus.nbytes / max(1, len(stream_np) - 2 * n_docs),
                 "heldout_files": len(heldout), "val_bytes": val[1]},
        "steps_done": run["steps_done"], "stopped_by": run["stopped_by"], "tokens": run["tokens"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "train_seconds": round(run["seconds"], 1), "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "tokens_per_second": round(run["tokens"] / max(run["seconds"], 1e-9)),
        "environment": environment(device), "log": run["log"],
        "eval_k": DEFAULT_K, "eval_window": DEFAULT_WINDOW, "eval": ev,
    }
    tokenizer.model_max_length = cfg.max_position  # set only now: encoding whole files above must not warn
    write_outputs(Path(cfg.out), model, tokenizer, corpus.manifest(), log, save_dtype)
    return model, tokenizer, log


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    _, _, log = train(cfg, argv)
    d = log["data"]
    print(f"corpus {d['documents']} files, {d['bytes'] / 2 ** 20:.1f} MiB, {d['stream_tokens'] / 1e6:.1f}M tokens "
          f"(sha256 {d['corpus_sha256'][:12]}); {log['params'] / 1e6:.2f}M parameters")
    print(f"{log['steps_done']} steps ({log['stopped_by']}), {log['tokens'] / 1e6:.1f}M tokens, "
          f"{log['tokens_per_second'] / 1e3:.0f}K tok/s, wall {log['wall_seconds']:.0f} s -> {cfg.out}")
    if log["log"]:
        first, last = log["log"][0], log["log"][-1]
        print(f"loss {first['loss']:.3f} -> {last['loss']:.3f} nats/token; held-out {last['val_bpb']:.3f} bits/byte")
    print("held-out bits/byte by length: " + ", ".join(f"{n}: {_fmt(s['bits_per_byte'], '.3f')}" for n, s in log["eval"].items()))


if __name__ == "__main__":
    main()
