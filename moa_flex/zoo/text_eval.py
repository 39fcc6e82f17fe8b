"""Quality on real text: bits per byte, far-copy tokens and effective context, per plan and length.

What the paper's claims are about, measured on held-out text a model never trained on (for the
code model: the Python standard library) cut into documents of ``L`` tokens:

* **bits per byte**: the summed cross-entropy of every predicted token (bits) over the UTF-8
  bytes those tokens spell; independent of the tokenizer.
* **far-copy tokens** (natural retrieval): target positions ``t`` whose token is predictable
  only by copying from more than ``window`` tokens back. With ``g`` the ``k`` tokens before
  ``t``: ``g`` occurred earlier, ending at some ``e`` with ``t - e > window`` and followed by the
  target token (``ids[e] == ids[t]``), and ``g`` did not occur ending within ``window`` tokens of
  ``t`` (:func:`far_copy_positions`). Their mean loss (nats) and top-1 accuracy.
* **effective context** of a plan: the longest evaluated length up to which its far-copy
  accuracy stays at least ``fraction`` (0.9) of the dense model's at every length, lengths with
  fewer than ``MIN_FAR_TOKENS`` far-copy tokens skipped.

Every plan runs through one ``moa_flex.compile`` (``set_plan`` between plans), each document
as one plain forward planned for its length.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

DEFAULT_K = 6  # tokens of context a copy must match
DEFAULT_WINDOW = 1024  # tokens: a far copy's source lies further back than this
MIN_FAR_TOKENS = 100  # far-copy tokens (dense model, all documents of a length) for a length to count


def far_copy_positions(ids: Sequence[int], k: int = DEFAULT_K, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Bool [len(ids)]: True at target positions ``t`` predictable only by a copy from more
    than ``window`` tokens back (module docstring). One pass, O(len(ids) * k)."""
    ids = [int(i) for i in ids]
    n = len(ids)
    far = torch.zeros(n, dtype=torch.bool)
    last_end: dict[tuple, int] = {}  # k-gram -> the latest e with ids[e-k:e] == gram (e < t)
    released: dict[tuple, set] = defaultdict(set)  # k-gram -> next tokens of its occurrences ending > window back
    pending: list[tuple[int, tuple]] = []  # (e, gram) not yet more than window back, in order of e
    head = 0
    for t in range(k, n):
        while head < len(pending) and t - pending[head][0] > window:
            e, gram = pending[head]
            released[gram].add(ids[e])
            head += 1
        gram = tuple(ids[t - k:t])
        near = gram in last_end and t - last_end[gram] <= window
        far[t] = not near and ids[t] in released.get(gram, ())
        last_end[gram] = t
        pending.append((t, gram))
    return far


@dataclass
class Scores:
    """Sums over the documents of one length (nats, bytes, tokens)."""

    documents: int = 0
    tokens: int = 0
    nats: float = 0.0
    bytes: int = 0
    far_tokens: int = 0
    far_correct: int = 0
    far_nats: float = 0.0

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def far_accuracy(self) -> float:
        return self.far_correct / self.far_tokens if self.far_tokens else float("nan")

    @property
    def far_loss(self) -> float:
        """Mean far-copy loss (nats per token)."""
        return self.far_nats / self.far_tokens if self.far_tokens else float("nan")


@dataclass
class TextEval:
    """Results: ``scores[name][length]`` for every evaluated plan name (``"dense"`` first)."""

    lengths: list[int]
    k: int
    window: int
    scores: dict[str, dict[int, Scores]] = field(default_factory=dict)

    def effective_context(self, name: str, fraction: float = 0.9, dense: str = "dense",
                          min_far_tokens: int = MIN_FAR_TOKENS) -> int:
        """The longest evaluated length up to which ``name``'s far-copy accuracy stays at least
        ``fraction`` of the dense model's at every length (0 if it falls short at the first).
        Lengths where the dense model has fewer than ``min_far_tokens`` far-copy tokens are
        skipped (too few to tell a difference), as are lengths without any."""
        best = 0
        for n in self.lengths:
            mine, ref = self.scores[name][n], self.scores[dense][n]
            if ref.far_tokens < max(1, min_far_tokens) or math.isnan(mine.far_accuracy):
                continue
            if mine.far_accuracy < fraction * ref.far_accuracy:
                break
            best = n
        return best

    def table(self) -> str:
        """One row per plan and length: bits per byte, far-copy tokens, accuracy and loss."""
        rows = [f"{'plan':<22} {'length':>7} {'docs':>5} {'bits/byte':>10} {'far tokens':>10} {'far acc':>8} "
                f"{'far loss':>9}"]
        for name, by_length in self.scores.items():
            for n in self.lengths:
                s = by_length[n]
                rows.append(f"{name:<22} {n:>7} {s.documents:>5} {s.bits_per_byte:>10.4f} {s.far_tokens:>10} "
                            f"{s.far_accuracy:>8.3f} {s.far_loss:>9.3f}")
        rows.append(f"effective context (far-copy accuracy stays >= 90% of dense; lengths with < {MIN_FAR_TOKENS} far-copy "
                    "tokens skipped): " + ", ".join(
            f"{name} {self.effective_context(name)}" for name in self.scores))
        return "\n".join(rows)

    def bars(self, densities: Sequence[float], length: int) -> list[str]:
        """The code-model issue's quality bars per density, at ``length`` tokens, for plans named
        ``"MoA d=<d>"`` and ``"uniform d=<d>"``: MoA's bits per byte within 3% of dense, its
        far-copy accuracy at least 90% of dense, its far-copy loss increase at most a third of
        the uniform plan's, and its effective context at least twice the uniform plan's."""
        dense = self.scores["dense"][length]
        out = []
        for d in densities:
            moa, uni = self.scores.get(f"MoA d={d}", {}).get(length), self.scores.get(f"uniform d={d}", {}).get(length)
            if moa is None or uni is None:
                continue
            bpb = moa.bits_per_byte / dense.bits_per_byte - 1
            acc = moa.far_accuracy / dense.far_accuracy if dense.far_accuracy else float("nan")
            rise, uni_rise = moa.far_loss - dense.far_loss, uni.far_loss - dense.far_loss
            ctx, uni_ctx = self.effective_context(f"MoA d={d}"), self.effective_context(f"uniform d={d}")
            out.append(
                f"d={d} at {length} tokens: bits/byte {moa.bits_per_byte:.4f} vs dense {dense.bits_per_byte:.4f} "
                f"({bpb:+.1%}; bar <= +3%: {'met' if bpb <= 0.03 else 'missed'}); far-copy accuracy {moa.far_accuracy:.3f} "
                f"= {acc:.0%} of dense (bar >= 90%: {'met' if acc >= 0.9 else 'missed'}); far-copy loss rise {rise:+.3f} "
                f"vs uniform's {uni_rise:+.3f} nats (bar <= 1/3: {'met' if rise <= uni_rise / 3 else 'missed'}); "
                f"effective context {ctx} vs uniform's {uni_ctx} (bar >= 2x: {'met' if ctx >= 2 * uni_ctx and ctx else 'missed'})")
        return out

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "k": self.k, "window": self.window,
                "plans": {name: {str(n): {**vars(s), "bits_per_byte": s.bits_per_byte, "far_accuracy": s.far_accuracy,
                                          "far_loss": s.far_loss} for n, s in by.items()}
                          for name, by in self.scores.items()},
                "effective_context": {name: self.effective_context(name) for name in self.scores}}


def documents(tokenizer: Any, texts: Iterable[str], length: int, count: int, separator: str = "\n\n") -> list[list[int]]:
    """Up to ``count`` documents of exactly ``length`` tokens: ``texts`` (files, in order)
    joined by ``separator`` into one token stream, cut into consecutive pieces."""
    out: list[list[int]] = []
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer.encode(text + separator, add_special_tokens=False))
        while len(buf) >= length and len(out) < count:
            out.append(buf[:length])
            buf = buf[length:]
        if len(out) >= count:
            break
    return out


def score_document(logits: torch.Tensor, ids: list[int], far: torch.Tensor, token_bytes: int, into: Scores) -> None:
    """Add one document's sums: ``logits`` [L, V] of the forward over ``ids`` (position t
    predicts ids[t + 1]); ``token_bytes``: UTF-8 bytes of the predicted tokens ids[1:]."""
    target = torch.tensor(ids[1:])
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    nll = -logp.gather(1, target[:, None])[:, 0]
    pick = far[1:]
    into.documents += 1
    into.tokens += len(ids) - 1
    into.nats += float(nll.sum())
    into.bytes += token_bytes
    into.far_tokens += int(pick.sum())
    into.far_correct += int((logp.argmax(-1) == target)[pick].sum())
    into.far_nats += float(nll[pick].sum())


def evaluate(model: Any, tokenizer: Any, plans: dict[str, Any], docs: dict[int, list[list[int]]], *,
             k: int = DEFAULT_K, window: int = DEFAULT_WINDOW, backend: str = "inductor",
             progress: bool = True) -> TextEval:
    """Score the dense model and every plan of ``plans`` (name -> Plan) on ``docs`` (length ->
    documents of that many token ids). The model is compiled once and left as it was."""
    import moa_flex
    from moa_flex.plan import Plan

    from tqdm import tqdm

    lengths = sorted(docs)
    result = TextEval(lengths, k, window)
    far = {n: [far_copy_positions(d, k, window) for d in docs[n]] for n in lengths}
    spelled = {n: [len(tokenizer.decode(d[1:], clean_up_tokenization_spaces=False).encode("utf-8")) for d in docs[n]]
               for n in lengths}
    device = next(model.parameters()).device
    moa_flex.compile(model, Plan.dense(model.config), backend=backend, progress=False)
    try:
        for name, plan in {"dense": Plan.dense(model.config), **plans}.items():
            model.moa_flex.set_plan(plan)
            result.scores[name] = {}
            for n in lengths:
                s = result.scores[name][n] = Scores()
                for d, f, b in tqdm(list(zip(docs[n], far[n], spelled[n])), desc=f"{name} @ {n}", leave=False,
                                    disable=not progress):
                    with torch.no_grad():
                        logits = model(input_ids=torch.tensor([d], device=device), use_cache=False).logits[0]
                    score_document(logits.float().cpu(), d, f, b, s)
    finally:
        moa_flex.uncompile(model)
    return result


def plot(result: TextEval, path: str) -> None:
    """Bits per byte and far-copy accuracy against length, one line per plan (PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, by in result.scores.items():
        ax1.plot(result.lengths, [by[n].bits_per_byte for n in result.lengths], marker="o", label=name)
        ax2.plot(result.lengths, [by[n].far_accuracy for n in result.lengths], marker="o", label=name)
    for ax, label in ((ax1, "bits per byte"), (ax2, f"far-copy top-1 accuracy (k={result.k}, > {result.window} back)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=120)
