"""Tensor parallelism through transformers' ``tp_plan``: which shard of the attention heads
this process runs.

A model loaded with ``tp_plan="auto"`` under ``torchrun`` holds DTensor weights; its q/k/v
projections are sharded by output rows ("colwise"), so each rank's attention calls see a
contiguous slice of the query heads and of the KV heads, and run on local tensors.
``moa_flex.compile`` runs :meth:`moa_flex.plan.Plan.shard` of the plan for that slice: each
rank's runtime, passes and MoA cache see its own heads only, and the model's own collectives
(the row-sharded output projection's all-reduce) are untouched.
"""

from __future__ import annotations

import re

import torch

_Q_PROJ = re.compile(r"(?:layers|\bh|blocks|\blayer)\.\d+\.(?:self_attn|attn|attention|self_attention)\.q_proj\.weight$")


def tensor_parallel_shard(model: torch.nn.Module) -> tuple[int, int] | None:
    """(index, count): this process's shard of the attention heads of a tensor-parallel model,
    or None for a model whose attention weights are not sharded. NotImplementedError for a
    sharding moa-flex does not map to heads (anything but colwise q/k/v)."""
    from torch.distributed.tensor import DTensor, Shard

    for name, param in model.named_parameters():
        if not _Q_PROJ.search(name):
            continue
        if not isinstance(param, DTensor):
            return None
        mesh, placements = param.device_mesh, tuple(param.placements)
        if all(not isinstance(p, Shard) for p in placements):
            return None
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise NotImplementedError(f"{name} is sharded as {placements} over {mesh}; moa-flex maps tensor "
                                      "parallelism to heads for colwise (Shard(0)) q/k/v projections only")
        return mesh.get_local_rank(), mesh.size()
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise NotImplementedError("the model holds sharded (DTensor) weights but moa-flex found no attention q_proj "
                                  "weight to tell which heads this process runs")
    return None
