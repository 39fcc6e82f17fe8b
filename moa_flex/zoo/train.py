"""Train the needle model: a small Llama on a synthetic lookup task (``python -m moa_flex.zoo.train``).

Two phases. The first ``induction_steps`` steps train content induction on rows of random
tokens followed by a rotated copy of them (:func:`moa_flex.data.synthetic.make_induction_batch`):
the model learns to find the earlier occurrence of the current token and copy what followed
it, which is exactly how a question's key finds its record's value. Then the task: every
sequence is Markov filler with one key -> value record per ``record_spacing`` context tokens
and one question (followed by its answer and EOS) per ``question_spacing`` tokens at the end
(:func:`moa_flex.data.synthetic.make_batch`). The loss is ``filler_weight`` times the mean
cross-entropy of the chain-determined filler tokens (teaches local heads, distances 1-2) plus
``answer_weight`` times the mean cross-entropy of the answers' value and EOS tokens (teaches
retrieval across the whole context). Both parts matter: without the induction phase, or with
the filler weighted like the answers, retrieval stays near chance for thousands of steps (the
filler's few tokens recur constantly, so copying what followed an earlier occurrence is
wrong there, and the filler's many targets train the induction heads away); see
bench/RESULTS.md. Each task step holds about ``tokens_per_step`` tokens: ``tokens_per_step //
L`` sequences of one length L, drawn uniformly from the training lengths up to a maximum that
grows linearly from the shortest to the longest over the first ``curriculum`` fraction of the
task steps. AdamW, linear warmup, cosine decay; bf16 autocast and sdpa attention on a GPU.

At the end the weights are rounded to ``save_dtype``, retrieval accuracy is measured on them
by length and needle depth (:mod:`moa_flex.zoo.evaluate`), and the out folder gets
``model.safetensors``, ``config.json``, ``generation_config.json``, ``task.json``,
``train_log.json`` and a model card ``README.md``. Runs are deterministic in ``--seed``: the
data of step s comes from seed ``(seed, s)`` whatever the number of data workers; on a GPU
the attention backward kernels may still differ in the last bits between runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import BOS, EOS, Batch, Task, batch_correct, default_num_records, make_batch, make_induction_batch
from . import NEEDLE_DIR, TASK_FILE
from .card import render_card
from .evaluate import eval_records, retrieval_accuracy

SCHEDULE_SEED_TAG = 0xC0FFEE  # the length schedule's seed is (seed, tag); step s's data seed is (seed, s)


def _opt(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run depends on (each field is a ``--flag``)."""

    out: str = _opt("output folder", default=str(NEEDLE_DIR))
    seed: int = _opt("seed of the weights, data and length schedule", default=0)
    steps: int = _opt("optimizer steps", default=3500)
    tokens_per_step: int = _opt("tokens per step (batch = tokens_per_step // length)", default=131072)
    lengths: tuple[int, ...] = _opt("training sequence lengths (tokens)", default=(256, 512, 1024, 2048, 3072, 4096))
    curriculum: float = _opt("fraction of the task steps over which the longest allowed length grows to the maximum", default=0.5)
    record_spacing: int = _opt("one record per this many context tokens", default=32)
    question_spacing: int = _opt("one question (with its answer) per this many sequence tokens", default=64)
    answer_weight: float = _opt("weight of the answer loss", default=1.0)
    filler_weight: float = _opt("weight of the filler loss (a small one keeps the filler from training the induction heads away)", default=0.2)
    induction_steps: int = _opt("first steps on content-induction rows (synthetic.make_induction_batch) before the task", default=1000)
    induction_length: int = _opt("length (tokens) of the induction rows", default=128)
    lr: float = _opt("peak learning rate", default=2e-3)
    min_lr: float = _opt("final learning rate (cosine decay)", default=2e-4)
    warmup: int = _opt("linear warmup steps", default=100)
    weight_decay: float = _opt("AdamW weight decay (matrices only)", default=0.1)
    grad_clip: float = _opt("gradient norm clip (0: none)", default=1.0)
    layers: int = _opt("decoder layers", default=5)
    hidden: int = _opt("hidden size", default=256)
    heads: int = _opt("query heads", default=8)
    kv_heads: int = _opt("key/value heads (GQA)", default=4)
    head_dim: int = _opt("head dimension", default=32)
    intermediate: int = _opt("MLP intermediate size", default=1024)
    rope_theta: float = _opt("RoPE base", default=10000.0)
    max_position: int = _opt("max_position_embeddings written to the config", default=8192)
    task: str = _opt("JSON object of synthetic Task fields overriding Task()'s defaults",
                     default='{"key_len": 1, "value_len": 1, "num_keys": 256, "num_values": 256}')
    device: str = _opt("torch device (default: cuda when available, else cpu)", default="")
    amp: str = _opt("autocast dtype: bf16, fp16 or none (default: bf16 on cuda, none on cpu)", default="")
    compile: bool = _opt("torch.compile the model (one compile per training length)", default=False)
    workers: int = _opt("data worker processes (default: 4 on cuda, 0 on cpu)", default=-1)
    threads: int = _opt("torch CPU threads (0: leave as is)", default=0)
    max_minutes: float = _opt("wall-clock budget of training in minutes (0: none); evaluation and saving follow", default=0.0)
    eval_lengths: tuple[int, ...] = _opt("evaluation lengths (tokens)", default=(1024, 2048, 3072, 4096))
    eval_depths: tuple[float, ...] = _opt("evaluation needle depths (0: context start, 1: end)", default=(0.0, 0.25, 0.5, 0.75, 1.0))
    eval_samples: int = _opt("evaluation sequences per length and depth", default=64)
    save_dtype: str = _opt("dtype of the saved weights: bf16, fp16 or fp32", default="bf16")
    log_every: int = _opt("steps between logged losses", default=25)
    progress: bool = _opt("show progress bars", default=True)
    verbose: bool = _opt("print every logged row of losses", default=True)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "none": None}


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line flags (``--tokens-per-step`` for ``tokens_per_step``)."""
    p = argparse.ArgumentParser(prog="python -m moa_flex.zoo.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif str(f.type).startswith("tuple"):
            p.add_argument(flag, nargs="+", type=float if "float" in str(f.type) else int, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)], **kw)
    args = vars(p.parse_args(argv))
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first bad field."""
    for name in ("steps", "tokens_per_step", "induction_length", "record_spacing", "question_spacing", "layers", "hidden", "heads",
                 "kv_heads", "head_dim", "intermediate", "eval_samples", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"--heads ({cfg.heads}) must be a multiple of --kv-heads ({cfg.kv_heads})")
    if not cfg.lengths or min(cfg.lengths) < 16:
        raise ValueError(f"--lengths must be >= 16 tokens, got {cfg.lengths}")
    if not 0 <= cfg.induction_steps < cfg.steps:
        raise ValueError(f"--induction-steps must be in [0, --steps), got {cfg.induction_steps} (--steps {cfg.steps})")
    if cfg.induction_length < 9:
        raise ValueError(f"--induction-length must be >= 9, got {cfg.induction_length}")
    if cfg.answer_weight < 0 or cfg.filler_weight < 0 or cfg.answer_weight + cfg.filler_weight == 0:
        raise ValueError(f"--answer-weight and --filler-weight must be >= 0, not both 0, got {cfg.answer_weight}, {cfg.filler_weight}")
    if not 0 <= cfg.curriculum <= 1:
        raise ValueError(f"--curriculum must be in [0, 1], got {cfg.curriculum}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got {cfg.min_lr}, {cfg.lr}")
    if cfg.save_dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--save-dtype must be bf16, fp16 or fp32, got {cfg.save_dtype!r}")
    if cfg.amp not in ("", "bf16", "fp16", "none"):
        raise ValueError(f"--amp must be bf16, fp16 or none, got {cfg.amp!r}")
    if cfg.max_minutes < 0:
        raise ValueError(f"--max-minutes must be >= 0, got {cfg.max_minutes}")


def make_task(cfg: TrainConfig) -> Task:
    """The synthetic task: the defaults with ``--task`` overrides."""
    over = json.loads(cfg.task) if cfg.task else {}
    if not isinstance(over, dict):
        raise ValueError(f"--task must be a JSON object, got {cfg.task!r}")
    return Task(**over)


def model_config(cfg: TrainConfig, task: Task) -> Any:
    """LlamaConfig: GQA, RoPE, tied embeddings, vocabulary = the task's rounded up to 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-task.vocab_size // 64) * 64, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, attn_implementation="sdpa",
    )


# --------------------------------------------------------------------------------------------
# Data


def sequence_layout(cfg: TrainConfig, task: Task, length: int) -> tuple[int, int]:
    """(questions, records) of a training sequence of ``length`` tokens."""
    n = max(1, length // cfg.question_spacing)
    C = length - 1 - n * task.qa_len
    return n, default_num_records(task, C, n, spacing=cfg.record_spacing)


def length_schedule(cfg: TrainConfig) -> list[int]:
    """The training length (tokens) of every step: ``induction_length`` for the induction
    steps, then uniform over the task lengths allowed so far (the curriculum counts task steps)."""
    lengths = sorted(set(cfg.lengths))
    rng = np.random.default_rng([cfg.seed, SCHEDULE_SEED_TAG])
    task_steps = cfg.steps - cfg.induction_steps
    ramp = max(1.0, cfg.curriculum * task_steps)
    out = [cfg.induction_length] * cfg.induction_steps
    for s in range(task_steps):
        top = lengths[0] + (lengths[-1] - lengths[0]) * min(1.0, s / ramp)
        allowed = [L for L in lengths if L <= top + 1e-9]
        out.append(int(allowed[rng.integers(len(allowed))]))
    return out


def step_batch(cfg: TrainConfig, task: Task, step: int, length: int) -> Batch:
    """The batch of one step (deterministic in ``(cfg.seed, step)``): induction rows for the
    first ``induction_steps`` steps, then the task."""
    if step < cfg.induction_steps:
        return make_induction_batch(task, max(1, cfg.tokens_per_step // length), length, (cfg.seed, step))
    n, R = sequence_layout(cfg, task, length)
    return make_batch(task, max(1, cfg.tokens_per_step // length), length, (cfg.seed, step), num_questions=n, num_records=R)


def _worker_batch(args: tuple) -> Batch:
    return step_batch(*args)


class Batches:
    """The batches of steps 0, 1, ... in order, made ahead by ``workers`` processes (in
    process when 0) with at most ``2 * workers`` waiting."""

    def __init__(self, cfg: TrainConfig, task: Task, schedule: list[int], workers: int) -> None:
        self.cfg, self.task, self.schedule = cfg, task, schedule
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
        self.ahead = 2 * workers
        self.pending: collections.deque = collections.deque()
        self.next_step = 0

    def _submit(self) -> None:
        s = self.next_step
        self.pending.append(self.pool.apply_async(_worker_batch, ((self.cfg, self.task, s, self.schedule[s]),)))
        self.next_step += 1

    def get(self, step: int) -> Batch:
        """The batch of ``step`` (steps are asked for in order)."""
        if self.pool is None:
            return step_batch(self.cfg, self.task, step, self.schedule[step])
        while self.next_step < len(self.schedule) and len(self.pending) < self.ahead + 1:
            self._submit()
        return self.pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# --------------------------------------------------------------------------------------------
# Optimization


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``step``: linear warmup to ``lr``, cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup - 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on the 2-D weights except the (tied) embedding."""
    emb = model.get_input_embeddings().weight
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not emb]
    rest = [p for p in model.parameters() if p.dim() < 2 or p is emb]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def losses(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean filler cross-entropy, mean answer cross-entropy) in nats per token."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100,
                         reduction="none").view(batch.targets.shape)
    fm, am = batch.filler_mask.float(), batch.answer_mask.float()
    return (ce * fm).sum() / fm.sum().clamp(min=1), (ce * am).sum() / am.sum().clamp(min=1)


def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to ``dtype`` in place (kept in its own dtype): the shipped weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def save_weights(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    """save_pretrained with the weights in ``dtype``; the model itself (and its fp32 RoPE
    buffers) stays as it is. Tied weights stay one tensor."""
    cast: dict[int, torch.Tensor] = {}
    state = {k: cast.setdefault(v.data_ptr(), v.detach().to(dtype)) for k, v in model.state_dict().items()}
    old = model.config.dtype
    model.config.dtype = dtype
    try:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
    finally:
        model.config.dtype = old


# --------------------------------------------------------------------------------------------
# The run


def environment(device: torch.device) -> dict:
    """Versions and hardware of this run."""
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "device": str(device), "cpu": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device))
    return env


def _log_row(sums: torch.Tensor, step: int, length: int, lr: float, tokens: int, t0: float, phase: str) -> dict:
    """Means of the steps summed in ``sums`` (filler loss, answer loss, answer accuracy, count),
    which it then zeroes. ``phase``: "induction" or "task" (a row never mixes the two)."""
    f, a, c = (sums[:3] / sums[3]).tolist()
    sums.zero_()
    return {"step": step, "phase": phase, "length": length, "filler_loss": round(f, 4), "answer_loss": round(a, 4), "answer_acc": round(c, 4),
            "lr": lr, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)}


def _phase(cfg: TrainConfig, step: int) -> str:
    return "induction" if step < cfg.induction_steps else "task"


def build_model(cfg: TrainConfig, task: Task, device: torch.device) -> torch.nn.Module:
    """A freshly initialized LlamaForCausalLM (seeded by ``cfg.seed``) in train mode on ``device``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, task)).to(device)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, do_sample=False,
                                               max_new_tokens=task.value_len + 1)
    return model.train()


def train_step(cfg: TrainConfig, model: torch.nn.Module, forward: Any, opt: torch.optim.Optimizer, batch: Batch,
               lr: float, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimizer step; returns [filler loss, answer loss, answer exact-match rate] (on the device, no sync).
    On induction batches the "answers" are the copy targets."""
    for g in opt.param_groups:
        g["lr"] = lr
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(input_ids=batch.input_ids, use_cache=False).logits
    filler_loss, answer_loss = losses(logits, batch)
    (cfg.filler_weight * filler_loss + cfg.answer_weight * answer_loss).backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        acc = batch_correct(logits.detach(), batch).float().mean()
        return torch.stack([filler_loss.detach(), answer_loss.detach(), acc])


def fit(cfg: TrainConfig, task: Task, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
        deadline: float | None) -> dict:
    """The training loop, up to ``cfg.steps`` or the ``deadline`` (time.perf_counter seconds):
    ``{"log", "steps_done", "stopped_by", "tokens", "seconds"}``."""
    from tqdm import tqdm

    schedule = length_schedule(cfg)
    workers = cfg.workers if cfg.workers >= 0 else (4 if device.type == "cuda" else 0)
    forward = torch.compile(model) if cfg.compile else model
    opt = make_optimizer(cfg, model, device)
    batches = Batches(cfg, task, schedule, workers)
    rows: list[dict] = []
    sums = torch.zeros(4, device=device)  # filler loss, answer loss, answer accuracy, steps
    steps_done, tokens, stopped, t0 = 0, 0, "steps", time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for step in range(cfg.steps):
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time budget"
                break
            batch = batches.get(step)
            if device.type == "cuda":
                batch = Batch(**{f.name: getattr(batch, f.name).pin_memory() for f in dataclasses.fields(batch)})
            batch = batch.to(device, non_blocking=True)
            sums[:3] += train_step(cfg, model, forward, opt, batch, lr_at(cfg, step), amp_dtype)
            sums[3] += 1
            steps_done, tokens = step + 1, tokens + batch.input_ids.numel()
            bar.update()
            if steps_done % cfg.log_every == 0 or steps_done in (cfg.steps, cfg.induction_steps):
                rows.append(_log_row(sums, steps_done, schedule[step], lr_at(cfg, step), tokens, t0, _phase(cfg, step)))
                if cfg.verbose:
                    tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
    finally:
        bar.close()
        batches.close()
    if sums[3] > 0:  # steps since the last logged row (run stopped by the time budget)
        rows.append(_log_row(sums, steps_done, schedule[steps_done - 1], lr_at(cfg, steps_done - 1), tokens, t0,
                             _phase(cfg, steps_done - 1)))
    return {"log": rows, "steps_done": steps_done, "stopped_by": stopped, "tokens": tokens, "seconds": time.perf_counter() - t0}


def write_outputs(out: Path, model: torch.nn.Module, task: Task, log: dict, save_dtype: torch.dtype) -> None:
    """Weights (in ``save_dtype``), config, generation config, task.json, train_log.json, README.md."""
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out, save_dtype)
    task.save(out / TASK_FILE)
    log["weights_bytes"] = (out / "model.safetensors").stat().st_size
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (out / "README.md").write_text(render_card(log))


def train(cfg: TrainConfig, argv: Sequence[str] | None = None) -> tuple[torch.nn.Module, Task, dict]:
    """Train, evaluate and save as the module docstring says; returns (model, task, log).
    ``argv`` is recorded as the command (default: this process's arguments)."""
    check_config(cfg)
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = DTYPES[cfg.amp or ("bf16" if device.type == "cuda" else "none")]
    task = make_task(cfg)
    if cfg.induction_steps:
        make_induction_batch(task, 1, cfg.induction_length, 0)
    for L in sorted(set(cfg.lengths)):  # fail now, not mid-run, on a length too short for its records
        make_batch(task, 1, L, 0, *sequence_layout(cfg, task, L))
    for L in sorted(set(cfg.eval_lengths)):
        make_batch(task, 1, L, 0, 1, eval_records(task, L, cfg.record_spacing), depth=0.5)

    model = build_model(cfg, task, device)
    run = fit(cfg, task, model, device, amp_dtype, t_start + 60 * cfg.max_minutes if cfg.max_minutes else None)
    save_dtype = DTYPES[cfg.save_dtype]
    round_weights(model, save_dtype)
    t_eval = time.perf_counter()
    accuracy = retrieval_accuracy(model, task, cfg.eval_lengths, cfg.eval_depths, cfg.eval_samples, seed=cfg.seed,
                                  record_spacing=cfg.record_spacing, amp_dtype=amp_dtype, progress=cfg.progress)
    argv = sys.argv[1:] if argv is None else list(argv)
    log = {
        "command": "python -m moa_flex.zoo.train" + ("" if not argv else " " + shlex.join(argv)),
        "config": dataclasses.asdict(cfg), "task": task.to_dict(), "seed": cfg.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "steps_done": run["steps_done"], "stopped_by": run["stopped_by"], "tokens": run["tokens"],
        "train_seconds": round(run["seconds"], 1), "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "tokens_per_second": round(run["tokens"] / max(run["seconds"], 1e-9)),
        "environment": environment(device), "log": run["log"], "eval": accuracy,
    }
    write_outputs(Path(cfg.out), model, task, log, save_dtype)
    return model, task, log


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    _, _, log = train(cfg, argv)
    ev = log["eval"]
    print(f"{log['steps_done']} steps ({log['stopped_by']}), {log['tokens'] / 1e6:.1f}M tokens, "
          f"{log['tokens_per_second'] / 1e3:.0f}K tok/s, wall {log['wall_seconds']:.0f} s -> {cfg.out}")
    print("retrieval accuracy by length: " + ", ".join(f"{L}: {a:.3f}" for L, a in zip(ev["lengths"], ev["by_length"])))


if __name__ == "__main__":
    main()
