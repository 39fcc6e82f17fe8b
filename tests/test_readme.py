"""Every Python block of README.md runs, so a README example can never break silently.

Blocks are extracted from the file. Each is named by the HTML comment on the line before its
fence, ``<!-- example: NAME -->``; ``<!-- example: NAME; skip: REASON -->`` marks a block
that needs a real model or a GPU, which is only compiled (syntax). The others run in README
order in one namespace, like a notebook, in a temporary folder, with ``model`` a tiny random
Llama loaded from a local folder ``model_dir`` and ``ids`` a batch of 2 x 300 token ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import transformers

from tiny_models import ids_of, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^<!-- example: ([\w-]+)(?:; skip: (.+?))? -->\n```python\n(.*?)^```", re.M | re.S)
VOCAB = 256  # the synthetic task's default vocabulary (164 tokens) fits


def blocks() -> list[tuple[str, str | None, str]]:
    """(name, skip reason or None, code) of every named Python block, in README order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _BLOCK.finditer(README.read_text(encoding="utf-8"))]


def test_every_python_block_is_named_once() -> None:
    text = README.read_text(encoding="utf-8")
    fences = len(re.findall(r"^```python$", text, re.M))
    names = [name for name, _, _ in blocks()]
    assert len(names) == fences, "a ```python block without an <!-- example: NAME --> line before it"
    assert len(set(names)) == len(names), f"duplicate example names: {names}"


_STATE: dict = {}


@pytest.fixture(scope="module")
def namespace(tmp_path_factory) -> dict:
    """The namespace the blocks share, created once: the tiny model from a local folder."""
    if "ns" not in _STATE:
        work = tmp_path_factory.mktemp("readme")
        model_dir = work / "model"
        tiny_model(vocab=VOCAB).save_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        _STATE.update(ns={"model": model, "model_dir": str(model_dir), "ids": ids_of(300, vocab=VOCAB)}, work=work, ran=[])
    return _STATE["ns"]


def _run(name: str, code: str, ns: dict) -> None:
    cwd = os.getcwd()
    os.chdir(_STATE["work"])
    try:
        exec(compile(code, f"README.md [{name}]", "exec"), ns)  # noqa: S102
    finally:
        os.chdir(cwd)
    _STATE["ran"].append(name)


@pytest.mark.parametrize("name", [name for name, _, _ in blocks()])
def test_readme_block(name: str, namespace: dict) -> None:
    for other, skip, code in blocks():  # the blocks before this one first, as a reader runs them
        if skip is not None:
            compile(code, f"README.md [{other}]", "exec")
            if other == name:
                pytest.skip(f"README block {name!r}: {skip}")
            continue
        if other not in _STATE["ran"]:
            _run(other, code, namespace)
        if other == name:
            return
