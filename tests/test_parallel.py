"""Tensor parallelism through transformers' tp_plan: each rank runs its shard of the heads
(Plan.shard), and 2 processes (gloo, CPU) give the single process's logits and tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moa_flex.masks import reference_mask
from tiny_models import H, KVH, sparse_plan, tiny_model


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_shards_keep_their_heads_rules(granularity: str) -> None:
    plan = sparse_plan(tiny_model().config, granularity, seed=2)
    full = reference_mask(plan, 1, 200)
    for index in range(2):
        part = plan.shard(index, 2)
        assert (part.num_heads, part.num_kv_heads, part.meta["shard"]) == (H // 2, KVH // 2, [index, 2])
        assert torch.equal(reference_mask(part, 1, 200), full[index * H // 2:(index + 1) * H // 2])
    with pytest.raises(ValueError, match="cannot be split evenly over 4"):
        plan.shard(0, 4)
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 2\)"):
        plan.shard(2, 2)


@pytest.mark.slow  # two torchrun processes: about 40 s on the CI machine (make test-slow)
def test_two_tensor_parallel_processes_equal_one(tmp_path) -> None:  # noqa: ANN001
    """torchrun, 2 ranks: logits (every real position) and greedy tokens of a left-padded batch
    prefilled in chunks equal the one-process model's, for kv_head and head plans."""
    folder = tmp_path / "model"
    tiny_model(layers=2).save_pretrained(folder)
    worker = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(folder),
                          str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for granularity, r in result.items():
            assert r["local_heads"] == [H // 2, KVH // 2], granularity
            assert r["logits_diff"] <= 1e-5 and r["tokens_equal"], (rank, granularity, r)
            assert r["cuts"] > 1e-3, "the plan really cuts"
