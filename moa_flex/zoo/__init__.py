"""Small models that moa-flex trains on its own synthetic tasks (:mod:`moa_flex.data.synthetic`).

``needle/`` (package data) is the shipped one: a small Llama trained by
``python -m moa_flex.zoo.train`` to continue Markov filler (local attention) and to answer
key -> value questions over 1K-4K tokens (retrieval across the whole context), so its heads
really differ. Its folder holds ``model.safetensors``, ``config.json``,
``generation_config.json``, ``task.json`` (the exact task: vocabulary and Markov chain),
``train_log.json`` and a model card ``README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.synthetic import Task

NEEDLE_DIR = Path(__file__).resolve().parent / "needle"
WEIGHTS = "model.safetensors"
TASK_FILE = "task.json"


def load_needle_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple:
    """(model, task): the Llama model of a trained folder (the shipped ``needle/`` when ``path``
    is None), in eval mode with sdpa attention and weights in ``dtype``, and the synthetic
    :class:`~moa_flex.data.synthetic.Task` it was trained on. ValueError naming the missing file if
    the folder lacks its config, weights or task."""
    from transformers import LlamaForCausalLM

    folder = Path(NEEDLE_DIR if path is None else path)
    hint = f"train one with `python -m moa_flex.zoo.train --out {folder}`"
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; {hint}")
    for name, what in (("config.json", "model config"), (WEIGHTS, "weights"), (TASK_FILE, "synthetic task")):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name} ({what}): not a trained model folder; {hint}")
    task = Task.load(folder / TASK_FILE)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    if model.config.vocab_size < task.vocab_size:
        raise ValueError(f"{folder}: the model's vocab_size {model.config.vocab_size} is smaller than its task's {task.vocab_size}")
    return model.eval(), task


__all__ = ["NEEDLE_DIR", "load_needle_model"]
