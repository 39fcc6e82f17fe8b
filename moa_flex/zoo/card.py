"""The model card (README.md) of a trained zoo model, written from its run's train_log.json alone."""

from __future__ import annotations

from ..data.synthetic import NUM_SPECIAL


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def accuracy_table(ev: dict) -> str:
    """Markdown table: one row per length, one column per needle depth, and the row mean."""
    head = "| length (tokens) | " + " | ".join(f"depth {d:g}" for d in ev["depths"]) + " | all depths |"
    rule = "|---:|" + "---:|" * (len(ev["depths"]) + 1)
    rows = [f"| {L} | " + " | ".join(_pct(a) for a in accs) + f" | **{_pct(m)}** |"
            for L, accs, m in zip(ev["lengths"], ev["accuracy"], ev["by_length"])]
    foot = "| all lengths | " + " | ".join(_pct(a) for a in ev["by_depth"]) + f" | **{_pct(ev['overall'])}** |"
    return "\n".join([head, rule, *rows, foot])


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


def _induction(cfg: dict) -> str:
    """The warm-up sentence of the card ('' when the run had none)."""
    n = cfg.get("induction_steps", 0)
    if not n:
        return ""
    return (f"The first {n} steps train content induction on {cfg['induction_length']}-token rows of random tokens "
            "followed by a rotated copy (`moa_flex.data.synthetic.make_induction_batch`). ")


def render_card(log: dict) -> str:
    """README.md text of a trained model from its train log (see moa_flex/zoo/train.py)."""
    cfg, task, env, ev = log["config"], log["task"], log["environment"], log["eval"]
    hw = env.get("gpu") or f"CPU ({env['cpu']}, {env['torch_threads']} torch threads)"
    last = log["log"][-1] if log["log"] else {}
    K, V = task["key_len"], task["value_len"]
    return f"""# needle: a small Llama that retrieves across its whole context

Trained by moa-flex (`moa_flex/zoo/train.py`) on a synthetic token-level task
(`moa_flex/synthetic.py`, exact task in `task.json`), so that its attention heads differ: the
filler is an order-2 Markov chain (predicting it needs distances 1-2), the answers are
key -> value lookups anywhere in the context. Load it with

```python
from moa_flex.zoo import load_needle_model
model, task = load_needle_model()      # or load_needle_model("path/to/folder")
```

## Model

Llama architecture (transformers `LlamaForCausalLM`): {cfg['layers']} layers, hidden size {cfg['hidden']},
{cfg['heads']} query heads / {cfg['kv_heads']} KV heads of dimension {cfg['head_dim']} (GQA), MLP {cfg['intermediate']},
RoPE (base {cfg['rope_theta']:g}), tied embeddings; {log['params'] / 1e6:.2f}M parameters, saved in
{cfg['save_dtype']} ({log['weights_bytes'] / 2 ** 20:.1f} MiB). Vocabulary: {task['num_keys']} key, {task['num_values']} value and
{task['num_filler']} filler tokens after {NUM_SPECIAL} special ones; keys of {_tokens(K)}, values of {_tokens(V)}.

## Training

    {log['command']}

Seed {log['seed']}; {log['steps_done']} steps (stopped by {log['stopped_by']}), {log['tokens'] / 1e6:.1f}M tokens, about
{cfg['tokens_per_step']} tokens per step. {_induction(cfg)}Task steps: lengths {', '.join(map(str, cfg['lengths']))} (the longest
allowed growing over the first {_pct(cfg['curriculum'])} of the task steps); one record per {cfg['record_spacing']} context
tokens, one question per {cfg['question_spacing']} tokens; loss = {cfg.get('filler_weight', 1.0):g} x filler + {cfg['answer_weight']:g} x answers
(nats/token). AdamW, lr {cfg['lr']:g} -> {cfg['min_lr']:g}.
Training took {log['train_seconds']:.0f} s ({log['tokens_per_second'] / 1e3:.0f}K tokens/s), evaluation {log['eval_seconds']:.0f} s,
the whole run {log['wall_seconds']:.0f} s on {hw}; torch {env['torch']}, transformers {env['transformers']}.
Last logged training losses (nats/token): filler {last.get('filler_loss', float('nan')):.3f}, answers {last.get('answer_loss', float('nan')):.3f}.

## Retrieval accuracy

Exact match of the whole {V}-token value, teacher forced, on the saved weights: {ev['samples']} sequences
per cell, each with one question whose record sits at the given depth of the context (0 = its
start, 1 = its end) among one record per {ev['record_spacing']} context tokens.

{accuracy_table(ev)}

All numbers on this page come from this run's `train_log.json`.
"""
