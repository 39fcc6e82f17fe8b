"""Where an attention call's mask comes from: positions and padding, or a score bias.

The passes replace the ``attn_mask`` of every SDPA call by MoA's keep rule (plus the forward's
padding mask, or the model's own window read from the mask's values). That is exact only while
the model's mask is a mask: made from the 2-D ``attention_mask`` input, integer inputs (positions,
cache lengths), boolean or integer buffers (or any buffer compared with a constant: OpenAI GPT's float
0/1 causal buffer) and constants. A mask computed from a floating-point
parameter or activation is a score bias (a learned relative-position bias, a bias conditioned on
the hidden states, Inkling's): dropping it would change the model silently, and the first-call
guard would see it only where it runs (``verify=True``). :func:`check_masks_are_masks` refuses
such a graph when it is rewritten.

The walk follows values only: an input read for its shape, dtype or device alone (``size``,
``new_zeros``, ``*_like``, a symbolic size) does not count as a source.
"""

from __future__ import annotations

import collections
import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx

from .nodes import arg, recorded_value

# ops that read their first argument for its metadata only (shape, dtype, device)
_META_METHODS = {"size", "dim", "numel", "stride", "element_size", "get_device", "is_contiguous",
                 "new_zeros", "new_ones", "new_full", "new_empty"}
_META_OF_OTHER = {"expand_as", "view_as", "reshape_as", "type_as"}  # x.expand_as(y): y's shape (or dtype) only
_META_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
             torch.ops.aten.sym_size, torch.ops.aten.sym_numel, torch.ops.aten.sym_stride}
_MASK_INPUT = re.compile(r"(^|_)attention_mask_?$")


def _value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs whose values (not only metadata) flow into ``node``."""
    if node.op == "call_method" and node.target in _META_OF_OTHER and len(node.args) == 2:
        return [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
    if node.op == "call_method" and node.target in _META_METHODS or (
            node.op == "call_function" and node.target in _META_FUNCTIONS):
        return [n for n in node.all_input_nodes if n is not node.args[0]] if node.args else []
    if node.op == "call_function" and (node.target in _SIZE_OPS or (
            node.target in (getattr, operator.attrgetter) and len(node.args) > 1 and node.args[1] in _META_ATTRS)):
        return []
    return list(node.all_input_nodes)


def _carries_shape_only(node: torch.fx.Node) -> bool:
    """A symbolic size or other integer computed in the graph (not a tensor, not ``.item()``)."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(value, (int, torch.SymInt, torch.Size)) and not (
        node.op == "call_method" and node.target in ("item", "tolist"))


_COMPARISONS = {operator.ne, operator.eq, operator.lt, operator.le, operator.gt, operator.ge,
                torch.ne, torch.eq, torch.lt, torch.le, torch.gt, torch.ge}


def _is_buffer(node: torch.fx.Node) -> bool:
    """A module buffer as a graph input: Dynamo's ``..._buffers_...`` placeholder, or a
    ``get_attr`` of a registered buffer."""
    if node.op == "placeholder":
        return "_buffers_" in str(node.target)
    if node.op == "get_attr":
        owner, _, name = str(node.target).rpartition(".")
        module = _attr_of(node.graph.owning_module, owner) if owner else node.graph.owning_module
        return isinstance(module, torch.nn.Module) and name in dict(module.named_buffers(recurse=False))
    return False


def _buffer_comparison(node: torch.fx.Node) -> bool:
    """A tensor made from buffers alone, compared with a constant: a boolean buffer (OpenAI GPT's
    float 0/1 causal buffer compared with 0), position data whatever its float dtype."""
    if not (node.op == "call_function" and node.target in _COMPARISONS and len(node.args) == 2):
        return False
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(tensors) != 1 or not isinstance(next(a for a in node.args if a is not tensors[0]), (int, float)):
        return False
    sources = [n for n in mask_sources(tensors[0]) if not _carries_shape_only(n)]  # symbolic sizes slice it
    return bool(sources) and all(_is_buffer(n) for n in sources)


def mask_sources(mask: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph inputs (placeholders, ``get_attr``) whose values reach ``mask``, nearest first
    (an error names the bias's own parameters before the embeddings it also reaches)."""
    return mask_sources_until(mask, None)


def mask_sources_until(mask: torch.fx.Node, stop: Callable[[torch.fx.Node], bool] | None) -> list[torch.fx.Node]:
    """:func:`mask_sources`, not walking past the nodes where ``stop`` is true (a selection of
    keys by content that the caller keeps as a mask: passes/indexed.py)."""
    seen: set[torch.fx.Node] = set()
    todo, sources = collections.deque([mask]), []
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if stop is not None and stop(n):
            continue
        if n.op in ("placeholder", "get_attr"):
            sources.append(n)
        elif _buffer_comparison(n):
            continue
        elif not _carries_shape_only(n):
            todo.extend(_value_inputs(n))
    return sources


def is_bias_source(node: torch.fx.Node) -> bool:
    """A floating-point input of more than one value that is not an attention-mask input: a
    parameter, the hidden states or embeddings, a float buffer."""
    if node.op == "placeholder" and _MASK_INPUT.search(str(node.target)):
        return False
    value = recorded_value(node)
    if value is None and node.op == "get_attr":
        value = _attr(node)
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel() > 1


def _attr(node: torch.fx.Node) -> Any:
    return _attr_of(node.graph.owning_module, str(node.target))


def _attr_of(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _input_name(node: torch.fx.Node) -> str:
    """A readable name for a graph input: Dynamo's ``L_self_modules_x_parameters_w_`` -> ``x.w``."""
    name = re.sub(r"^[Ll]_", "", str(node.target))
    name = re.sub(r"^(self|args_\d+)_(?=(modules|parameters|buffers)_)", "", name)
    return re.sub(r"(^|_)(modules|parameters|buffers)_", lambda m: "." if m.group(1) else "", name).strip("._")


def described(sources: list[torch.fx.Node], most: int = 3) -> str:
    """``sources`` as readable names with shapes, at most ``most`` of them."""
    shown = [f"{_input_name(n)} {list(getattr(recorded_value(n), 'shape', []))}" for n in sources[:most]]
    return ", ".join(shown) + (f" and {len(sources) - most} more" if len(sources) > most else "")


def check_masks_are_masks(calls: Iterable[tuple[torch.fx.Node, int]],
                          kept: Callable[[torch.fx.Node], bool] | None = None) -> None:
    """ValueError if an attention node (with its plan layer) takes an ``attn_mask`` computed from a
    floating-point parameter, activation or buffer: a score bias, which a MoA plan's rules would
    drop. ``kept``: the nodes of a selection the caller keeps ANDed in (an indexer's top-k), not
    walked past. Layers sharing one mask node (most models) walk it once."""
    walked: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node, layer in calls:
        mask = arg(node, 3, "attn_mask", None)
        if not isinstance(mask, torch.fx.Node):
            continue
        if mask not in walked:
            walked[mask] = [n for n in mask_sources_until(mask, kept) if is_bias_source(n)]
        if walked[mask]:
            raise ValueError(
                f"the attention mask of layer {layer} (node {node.name}) is computed from floating-point tensors "
                f"({described(walked[mask])}): a score bias (a learned relative-position bias, one conditioned on "
                "the hidden states) or a mask chosen by content, not a mask of positions and padding alone. A MoA "
                "plan's rules replace the mask and would drop what it adds, so moa-flex does not rewrite this model"
            )
