"""Retrieval accuracy (moa_flex.zoo.evaluate) against brute-force lookup models: a model that
reads the whole context scores 1 at every depth, one that only sees a recent window scores
exactly the depths whose record lies inside it, with one sequence per depth or all depths in
one sequence; and the shipped needle model retrieves."""

from __future__ import annotations

import pytest
import torch

from moa_flex.data.synthetic import QUESTION, REC, Task
from moa_flex.zoo import NEEDLE_DIR, load_needle_model
from moa_flex.zoo.evaluate import retrieval_accuracy


class LookupModel(torch.nn.Module):
    """Predicts, after ``QUESTION k``, the value of the record ``REC k v`` found by scanning the
    last ``window`` tokens (None: all of them); anything else predicts token 0. K = V = 1."""

    def __init__(self, task: Task, window: int | None) -> None:
        super().__init__()
        self.task, self.window = task, window
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):  # noqa: ARG002
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.task.vocab_size)
        for b in range(B):
            x = input_ids[b].tolist()
            for t in range(1, T):
                if x[t - 1] != QUESTION:
                    continue
                lo = 0 if self.window is None else max(0, t - self.window)
                for j in range(lo, t - 2):
                    if x[j] == REC and x[j + 1] == x[t]:
                        logits[b, t, x[j + 2]] = 1.0
        return type("Out", (), {"logits": logits})()


TASK = Task(key_len=1, value_len=1, num_keys=64, num_values=64)
DEPTHS = [0.0, 0.5, 1.0]


@pytest.mark.parametrize("per_sequence", [False, True])
def test_accuracy_counts_exactly_the_reachable_depths(per_sequence):
    kw = dict(lengths=[300, 600], depths=DEPTHS, samples=3, progress=False, record_spacing=32, per_sequence=per_sequence)
    full = retrieval_accuracy(LookupModel(TASK, None), TASK, **kw)
    assert full["accuracy"] == [[1.0] * 3] * 2 and full["overall"] == 1.0 and full["per_sequence"] is per_sequence
    near = retrieval_accuracy(LookupModel(TASK, 60), TASK, **kw)  # only a record at depth 1 is within 60 tokens
    assert near["accuracy"] == [[0.0, 0.0, 1.0]] * 2
    assert near["by_depth"] == [0.0, 0.0, 1.0] and near["by_length"] == [pytest.approx(1 / 3)] * 2


def test_shipped_needle_model_retrieves():
    if not (NEEDLE_DIR / "model.safetensors").is_file():
        pytest.fail(f"the needle model is not shipped in {NEEDLE_DIR}")
    model, task = load_needle_model()
    acc = retrieval_accuracy(model, task, lengths=[1024], depths=[0.1, 0.5, 0.9], samples=4, progress=False,
                             record_spacing=32, per_sequence=True)
    assert acc["overall"] == 1.0
