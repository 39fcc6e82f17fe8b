"""Where a rewritten graph goes: inductor (with an inductor mode) or eager execution."""

from __future__ import annotations

from typing import Callable

import torch.fx


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, inner: str, mode: str | None) -> Callable:
    """A rewritten graph, compiled by inductor (with an inductor ``mode``) or run eagerly."""
    if inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
