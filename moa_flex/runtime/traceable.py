"""What ``moa_flex.compile`` changes on a model so that Dynamo traces its forward as one graph;
each change keeps the model's results and is undone by ``moa_flex.uncompile``.

Buffer markers. A tensor registered through ``nn.Buffer`` keeps ``_is_buffer`` and
``persistent`` attributes, which ``nn.Module.__setattr__`` reads when a forward assigns the
buffer again (CTRL: ``self.pos_encoding = self.pos_encoding.to(device, dtype)``), and Dynamo
cannot read a Python attribute of a tensor (torch 2.11-2.13: "Unsupported python_type() call").
The module already records each buffer and whether it is persistent (``_buffers``,
``_non_persistent_buffers_set``), which ``__setattr__`` reads for an unmarked tensor, so the
markers are taken off the registered tensors: the assignment registers the same buffer, as
persistent as before.
"""

from __future__ import annotations

import torch

_MARKS = ("_is_buffer", "persistent")


def unmark_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, dict[str, object]]]:
    """Take the ``nn.Buffer`` markers off every registered buffer of ``model``; returns what
    :func:`mark_buffers` puts back."""
    taken, seen = [], set()
    for buffer in model.buffers():
        if id(buffer) in seen or not any(name in buffer.__dict__ for name in _MARKS):
            continue
        seen.add(id(buffer))
        marks = {name: buffer.__dict__.pop(name) for name in _MARKS if name in buffer.__dict__}
        taken.append((buffer, marks))
    return taken


def mark_buffers(taken: list[tuple[torch.Tensor, dict[str, object]]]) -> None:
    """Put back the markers :func:`unmark_buffers` took (``moa_flex.uncompile``)."""
    for buffer, marks in taken:
        for name, value in marks.items():
            setattr(buffer, name, value)
