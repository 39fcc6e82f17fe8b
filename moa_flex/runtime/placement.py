"""Models placed by accelerate (``device_map=...``): its hooks become traceable device moves.

accelerate's ``AlignDevicesHook`` moves each module's inputs to the module's execution device
and, for offloaded modules, loads weights on the fly; its forward wrapper calls
``torch.compiler.disable``, so Dynamo cannot trace a hooked model into one graph.
``moa_flex.compile`` therefore replaces the hooks of a model whose weights all sit on their
execution devices (one GPU, several GPUs, or the CPU) by device moves of the tensor arguments
to the module's execution device, which Dynamo traces: a forward pre-hook on the outermost
module, and across several devices a wrapped forward on every other placed module
(:class:`_MovedForward`; on one device only the outermost moves, :func:`_needing_moves`), and restores
accelerate's hooks on ``moa_flex.uncompile``. A model with modules offloaded to the CPU or
disk (weights loaded per call) is refused, naming the first offloaded module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map


def _align_hooks(hook: Any) -> list[Any]:
    """The AlignDevicesHooks inside a module's hook (a SequentialHook holds several)."""
    inner = getattr(hook, "hooks", None)
    hooks = list(inner) if inner is not None else [hook]
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def hooked_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module carrying an accelerate hook."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None]


def check_placement(model: torch.nn.Module) -> None:
    """ValueError if accelerate offloads any module (its weights live off its execution
    device and are loaded per call), naming the first; nothing is changed."""
    for name, module in hooked_modules(model):
        for hook in _align_hooks(module._hf_hook):
            on_meta = any(p.device.type == "meta" for p in module.parameters(recurse=False))
            if getattr(hook, "offload", False) or on_meta:
                raise ValueError(
                    f"the model is offloaded by accelerate (device_map with 'cpu' or 'disk' offload; first offloaded "
                    f"module {name or 'the model'!r}): moa-flex compiles models whose weights sit on their execution "
                    "devices; load it with a device_map that places every layer on a GPU (or all on the CPU)"
                )
        if not _align_hooks(module._hf_hook):
            raise ValueError(f"module {name or 'the model'!r} carries an accelerate hook of type "
                             f"{type(module._hf_hook).__name__}, which moa-flex cannot replace by device moves")


def _mover(device: torch.device) -> Any:
    def move(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def to(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x

        return tree_map(to, args), tree_map(to, kwargs)

    return move


class _MovedForward:
    """An inner module's forward that moves its tensor arguments to ``device`` first, set on the
    instance (``module.forward``): Dynamo inlines it like the module's own code, with no hook
    dict for AOT precompile to guard (docs/DESIGN.md, "Precompiled graphs")."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.own = module, module.__dict__.get("forward")
        original, move = module.forward, _mover(device)

        def forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = move(module, args, kwargs)
            return original(*args, **kwargs)

        module.forward = forward

    def remove(self) -> None:
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own


def replace_hooks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any, Any]]:
    """Swap accelerate's hooks for device moves (:func:`check_placement` first): a forward
    pre-hook on the outermost module, a wrapped forward (:class:`_MovedForward`) on any other
    that :func:`_needing_moves` names; returns what :func:`restore_hooks` needs."""
    from accelerate.hooks import remove_hook_from_module

    check_placement(model)
    hooked = hooked_modules(model)
    where = {name: _execution_device(module) for name, module in hooked}
    movers = _needing_moves(where)
    swapped = []
    for name, module in hooked:
        hook = module._hf_hook
        remove_hook_from_module(module)
        handle = None
        if name == "" and name in movers:
            handle = module.register_forward_pre_hook(_mover(where[name]), with_kwargs=True)
        elif name in movers:
            handle = _MovedForward(module, where[name])
        swapped.append((module, hook, handle))
    return swapped


def _execution_device(module: torch.nn.Module) -> torch.device | None:
    devices = [h.execution_device for h in _align_hooks(module._hf_hook) if h.execution_device is not None]
    return torch.device(devices[0]) if devices else None


def _needing_moves(where: dict[str, torch.device | None]) -> set[str]:
    """Hooked modules that move their inputs to their device: every one with an execution device when
    the model spans several devices; on one device only the outermost (what the caller hands
    in, on any device, goes there; everything inside is computed there already): fewer moves
    inside the traced forward for Dynamo to trace and guard."""
    placed = {n: d for n, d in where.items() if d is not None}
    if len(set(placed.values())) > 1:
        return set(placed)
    return {n for n in placed if not any(o != n and (o == "" or n.startswith(o + ".")) for o in placed)}


def restore_hooks(swapped: list[tuple[torch.nn.Module, Any, Any]]) -> None:
    """Put accelerate's hooks back (``moa_flex.uncompile``)."""
    from accelerate.hooks import add_hook_to_module

    for module, hook, handle in swapped:
        if handle is not None:
            handle.remove()
        add_hook_to_module(module, hook)
