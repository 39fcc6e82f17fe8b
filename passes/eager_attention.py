"""FX pass: attention a model computes in its own code, made one SDPA call the other passes rewrite.

Some transformers families (GPT-Neo, ...) compute attention with their own tensor operations
instead of calling SDPA or the attention-function interface. On a Dynamo graph this pass finds
each such computation, of exactly this form (4-D tensors [B, H, T, D]):

    S = matmul(q, k.transpose(-1, -2))        # q, k possibly cast; or bmm / baddbmm(zeros, ..., alpha)
                                              # on their [B * H, T, D] views (3-D scores, viewed 4-D and back);
                                              # or k permuted from [B, T, H, D] straight to [B, H, D, T] (GPT)
    S = S * c | S / c | S.to(dtype)           # constant scales, casts, any number, any order
    S = where(m, S, fill) | S.masked_fill(m, fill) | S + mask   # masks (below)
    S = S * m + fill * (1 - m)                # a 0/1 float mask m (OpenAI GPT's tril buffer)
    S = S + alibi                             # or baddbmm(alibi, q, k^T, beta, alpha): ALiBi (below)
    S = max(S, fill)                          # a floor at a mask's fill (XGLM)
    P = softmax(S, dim=-1)                    # optionally cast after, dropout in eval (p or training off)
    O = matmul(P, v)

and puts ``scaled_dot_product_attention(q, k, v, attn_mask=M, scale=c)`` in its place, computed in
the scores' dtype (v and M cast to it, the output cast back), or ``moa_flex::sdpa_alibi`` (SDPA's
arguments plus per-head slopes) for a model with ALiBi. What counts as a mask, so that no
term that changes attention beyond dropping keys (ALiBi, relative-position biases) can pass as
one: a ``where`` over a boolean condition whose other branch is a constant at or below -1e4 (it
only removes keys), and an additive term computed from the forward's 2-D ``attention_mask``
input and constants alone (no parameter or other input, no product by a per-head table of
constants such as ALiBi's slopes): HF's padding-and-causal mask; and ``S * m + fill * (1 - m)``
with m a float tensor and fill a constant at or below -1e4, read as ``where(m != 0, S, fill)``,
which it is for an m of 0s and 1s (OpenAI GPT's lower-triangular buffer; what m holds is a
value, which the first-call check confirms). Anything
else, including a scale that is not a constant, leaves the computation as it is, and the graph
then has no attention call for the other passes, which refuse it by name. Scores written in
place: a ``masked_fill_`` of a mask before the next read (XLM) is a mask; any other in-place
write leaves the computation alone (data flow would not show it).

ALiBi (BLOOM, MPT): an additive term ``slopes * positions`` (through views, slices, repeats and
casts), where ``slopes`` is a float tensor of one value per query head computed from constants
alone and ``positions`` a tensor made from the 2-D attention_mask, integer inputs and constants
(integers, or counts in floats), the term broadcast over the queries (one value per key). moa-flex reads it as the
bias ``-slope_h * (i - j)`` for a query at position i and a key at j, which differs from
``slope_h * position(j)`` by a constant per query, which softmax ignores; the first-call check
confirms the reading on real inputs. The product must be float32 or wider and stay so: a term
rounded to 16 bits (BLOOM or Falcon in bfloat16, whose bias then carries errors that grow with
the position) is not read as ALiBi.

With ``keep_original=True`` (the first-call check's graph) the model's own computation stays in
the graph and the new SDPA node names its output (``node.meta[MODEL_OUTPUT]``), so the check
compares moa-flex attention with what the model computed, not with this pass's reading of it.
That check is required for such models (``compile(..., verify=False)`` is refused at the first
call): what a mask lets through is a value, not a structure, and only the check sees that the
model's mask is causal (transformers 5.17 builds a bidirectional one for some BERT-family
decoders, which the check catches).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.sdpa_alibi)

from .mask_sources import is_bias_source, mask_sources
from .nodes import padding_mask_input

MODEL_OUTPUT = "moa_flex_model_output"  # meta key: the model's own attention output an SDPA node replaced
MATMULS = (torch.matmul, operator.matmul, torch.bmm)
SOFTMAXES = (torch.nn.functional.softmax, torch.softmax)
MASK_FILL_MAX = -1e4  # a where's fill at or below this removes a key (HF uses the dtype's minimum)
_CAST_METHODS = ("to", "float", "half", "bfloat16", "type_as", "contiguous")
_SHAPE_METHODS = ("view", "reshape", "squeeze", "unsqueeze", "expand", "repeat", "contiguous")
_WIDE = (torch.float32, torch.float64)


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _method(node: Any, *names: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in names


def _value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _dtype_only(node: torch.fx.Node) -> bool:
    """A cast that changes nothing but the dtype (no device move, no copy semantics)."""
    if node.target != "to":
        return True
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return all(isinstance(a, torch.dtype) or a in (False, None) for a in rest)


def _uncast(node: Any) -> Any:
    """``node`` with dtype casts and ``contiguous`` peeled off."""
    while _method(node, *_CAST_METHODS) and _dtype_only(node):
        node = node.args[0]
    return node


def _eval_dropout(node: Any) -> bool:
    """``F.dropout(x, p, training=False)`` or with p = 0: the identity."""
    if not _call(node, torch.nn.functional.dropout):
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return training is False or p == 0


def _constant(node: Any) -> float | None:
    """A Python number, or a one-element ``torch.tensor(number)`` / ``torch.full((), number)``
    node; None otherwise."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if _call(node, torch.tensor) and isinstance(node.args[0], (int, float)) and not isinstance(node.args[0], bool):
        return float(node.args[0])
    if (_call(node, torch.full) and len(node.args) == 2 and node.args[0] in ((), [])
            and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)):
        return float(node.args[1])
    return None


def _unview(node: Any) -> Any:
    """``node`` with dtype casts, ``contiguous`` and views that only merge or split the leading
    dims ([B, H, ...] <-> [B * H, ...], the last two kept) peeled off."""
    while True:
        node = _uncast(node)
        if not (_method(node, "view", "reshape") and isinstance(node.args[0], torch.fx.Node)):
            return node
        a, b = _value(node.args[0]), _value(node)
        if a is None or b is None or a.shape[-2:] != b.shape[-2:] or {a.dim(), b.dim()} != {3, 4}:
            return node
        node = node.args[0]


def _as_4d(node: Any) -> Any:
    """The [B, H, T, D] tensor a 3-D [B * H, T, D] operand is a view of (or the 4-D operand)."""
    node = _uncast(node)
    val = _value(node)
    if val is not None and val.dim() == 3:
        src = _unview(node)
        return src if _value(src) is not None and _value(src).dim() == 4 else None
    return node if val is not None and val.dim() == 4 else None


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _zero(node: Any) -> bool:
    """0, or a ``torch.zeros``/``torch.tensor(0)`` of one element."""
    if _constant(node) == 0.0:
        return True
    return _call(node, torch.zeros) and _value(node) is not None and _value(node).numel() == 1


def _is_where_mask(node: Any) -> bool:
    """``where(boolean, 0, fill)`` with fill at or below -1e4 (through casts, views, slices and
    expansions): an additive mask whatever its condition came from (HF's eager masks)."""
    while isinstance(node, torch.fx.Node) and (
            (_method(node, *_CAST_METHODS) and _dtype_only(node)) or _method(node, "expand", "view", "reshape")
            or _call(node, operator.getitem)):
        node = node.args[0]
    if not _call(node, torch.where) or len(node.args) != 3:
        return False
    cond, zero, fill = node.args
    c, val = _constant(fill), _value(cond)
    return _zero(zero) and c is not None and c <= MASK_FILL_MAX and val is not None and val.dtype == torch.bool


def _multiplier_mask(a: Any, b: Any) -> tuple[torch.fx.Node, torch.fx.Node, float] | None:
    """(S, m, fill) where ``a + b`` is ``S * m + fill * (1 - m)`` (factors and terms in either
    order) with ``m`` a floating-point tensor node and fill a constant at or below -1e4: OpenAI
    GPT's causal mask, a 0/1 lower-triangular buffer. For m of 0s and 1s it is ``where(m != 0,
    S, fill)``; that m holds nothing else is a value, which the first-call check confirms."""
    for first, second in ((a, b), (b, a)):
        if not (_call(first, operator.mul, torch.mul) and _call(second, operator.mul, torch.mul)):
            continue
        if len(first.args) != 2 or len(second.args) != 2:
            continue
        fills = [_constant(x) for x in second.args]
        if fills.count(None) != 1:
            continue
        fill, rest = next(f for f in fills if f is not None), second.args[fills.index(None)]
        if fill > MASK_FILL_MAX or not (_call(rest, operator.sub, torch.sub) and len(rest.args) == 2
                                        and _constant(rest.args[0]) == 1.0):
            continue
        m = rest.args[1]
        val = _value(m)
        if not isinstance(m, torch.fx.Node) or val is None or not val.dtype.is_floating_point or m not in first.args:
            continue
        kept = first.args[1] if first.args[0] is m else first.args[0]
        if isinstance(kept, torch.fx.Node) and kept is not m:
            return kept, m, fill
    return None


def _is_mask_term(node: Any, padding: torch.fx.Node | None) -> bool:
    """An additive term that is a mask: ``where(boolean, 0, fill)`` (:func:`_is_where_mask`), or
    a term made from the 2-D attention_mask input, integer inputs (positions, cache lengths) and
    constants: no parameter, hidden state or other float input reaches it."""
    if not isinstance(node, torch.fx.Node):
        return False
    if _is_where_mask(node):
        return True
    if padding is None:
        return False
    nodes = _ancestors(node)
    inputs = {n for n in nodes if n.op in ("placeholder", "get_attr")}
    if padding not in inputs or any(_float_table_product(n) for n in nodes):
        return False
    others = [_value(n) for n in inputs - {padding}]
    return all(isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and not v.dtype.is_complex
               for v in others)


def _float_table_product(node: torch.fx.Node) -> bool:
    """A product with a float tensor of several values computed from constants alone (ALiBi's
    slopes, rounded or not): such a term varies per head, which no mask does (HF's masks scale by
    Python numbers)."""
    if not (_call(node, operator.mul, torch.mul) and len(node.args) == 2):
        return False
    for factor in node.args:
        val = _value(factor)
        if (isinstance(factor, torch.fx.Node) and isinstance(val, torch.Tensor) and val.dtype.is_floating_point
                and val.numel() > 1 and not any(n.op in ("placeholder", "get_attr") for n in _ancestors(factor))):
            return True
    return False


def _integer_input(node: torch.fx.Node) -> bool:
    """An input that is an integer tensor or a size (a symbolic int under dynamic shapes)."""
    val = _value(node)
    if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
        return True
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and not val.dtype.is_complex


def _made_from_integers(node: torch.fx.Node) -> bool:
    """Whether every input ``node`` is computed from is an integer tensor or a size (no float
    input, no parameter)."""
    inputs = [n for n in _ancestors(node) if n.op in ("placeholder", "get_attr")]
    return all(n.op == "placeholder" and _integer_input(n) for n in inputs)


def _alibi_slopes(node: Any) -> Any:
    """The slopes node of an ALiBi term (module docstring: ``slopes * positions``, key-only,
    float32 or wider throughout), else None."""
    val = _value(node)
    if val is None or val.dim() < 2 or val.shape[-2] != 1:
        return None
    while (_method(node, *_CAST_METHODS) and _dtype_only(node)) or _method(node, *_SHAPE_METHODS) or _call(
            node, operator.getitem):
        if _value(node) is None or _value(node).dtype not in _WIDE:
            return None
        node = node.args[0]
    if not (_call(node, operator.mul, torch.mul) and len(node.args) == 2) or _value(node) is None:
        return None
    a, b = node.args
    va, vb = _value(a), _value(b)
    if _value(node).dtype not in _WIDE or not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return None
    if va.dtype.is_floating_point != vb.dtype.is_floating_point:  # integer positions
        slopes, positions = (a, b) if va.dtype.is_floating_point else (b, a)
    else:  # positions in floats (transformers 5.17's BLOOM counts a float mask): the slopes vary along no key
        slopes, positions = (a, b) if va.shape[-1:] == (1,) and vb.shape[-1:] != (1,) else (b, a)
    vs, vp = _value(slopes), _value(positions)
    if vs.dtype not in _WIDE or vs.shape[-1:] not in ((1,), ()) and vs.dim() > 1 or vp.dtype.is_complex or (
            vp.dtype == torch.bool):
        return None
    constant = all(n.op == "placeholder" and isinstance(_value(n), (int, torch.SymInt))
                   for n in _ancestors(slopes) if n.op in ("placeholder", "get_attr"))  # sizes at most
    if not constant or not _made_from_integers(positions):
        return None
    return slopes


def _written_masks(node: Any, reader: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The ``masked_fill_`` nodes that mask ``node`` in place before ``reader`` reads it (XLM),
    each with a boolean condition and a fill at or below -1e4; None if anything else writes
    ``node`` in place (data flow would not show it), or a mask comes after the read."""
    if not isinstance(node, torch.fx.Node):
        return []
    writes = []
    for u in node.users:
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if not (isinstance(name, str) and name.endswith("_") and not name.startswith("_") and u.args
                and u.args[0] is node):
            continue
        fill = _constant(u.args[2]) if len(u.args) == 3 else None
        cond = _value(u.args[1]) if len(u.args) == 3 else None
        if name != "masked_fill_" or u.users or fill is None or fill > MASK_FILL_MAX or cond is None or (
                cond.dtype != torch.bool):
            return None
        writes.append(u)
    if writes:
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        if any(order[w] > order[reader] for w in writes):
            return None
    return writes


class _Permuted:
    """A permutation of a graph node that the graph does not hold yet (the rewrite inserts it):
    the [B, H, K, D] key of a model that permutes its [B, K, H, D] keys straight to
    [B, H, D, K] for ``q @ k`` (OpenAI GPT's ``split_heads(k, k=True)``)."""

    def __init__(self, source: torch.fx.Node, dims: tuple[int, ...]) -> None:
        self.source, self.dims = source, dims

    @property
    def value(self) -> Any:
        val = _value(self.source)
        return None if val is None else val.permute(self.dims)


def _permute_dims(node: Any) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function, dims listed or in one tuple), else None."""
    if not (_method(node, "permute") or _call(node, torch.permute)):
        return None
    dims = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else node.kwargs.get("dims"))
    return tuple(dims) if dims is not None and all(isinstance(d, int) for d in dims) else None


def _key_transposed(node: Any) -> Any:
    """k [B, H, K, D] where ``node`` is k (or its 3-D view) transposed in its last two dims (or
    a 4-D tensor permuted to [B, H, D, K]: a :class:`_Permuted`), else None."""
    node = _uncast(node)
    dims = _permute_dims(node)
    if dims is not None and len(dims) == 4 and _value(node.args[0]) is not None and _value(node.args[0]).dim() == 4:
        dims = tuple(d % 4 for d in dims)
        key_dims = dims[:2] + (dims[3], dims[2])  # the permutation that gives k itself
        return node.args[0] if key_dims == (0, 1, 2, 3) else _Permuted(node.args[0], key_dims)
    if not (_method(node, "transpose") or _call(node, torch.transpose)):
        return None
    val = _value(node)
    n = val.dim() if val is not None else 0
    dims = {d % n for d in node.args[1:3] if isinstance(d, int)} if n in (3, 4) else set()
    return _as_4d(node.args[0]) if dims == {n - 2, n - 1} else None


def _query(node: Any) -> tuple[Any, float]:
    """(q [B, H, Q, D], c) for a query operand that is ``q`` (or its 3-D view) times constants c."""
    c = 1.0
    while True:
        node = _uncast(node)
        if _call(node, operator.mul) and len(node.args) == 2:
            consts = [_constant(a) for a in node.args]
            if consts.count(None) == 1:
                c *= next(x for x in consts if x is not None)
                node = node.args[consts.index(None)]
                continue
        return _as_4d(node), c


def _scores_product(s: torch.fx.Node) -> tuple[Any, Any, float, Any, float] | None:
    """(q, k, scale, bias, beta) of ``q @ k^T`` (matmul, bmm, or baddbmm, function or method, with
    its alpha; constant factors on q join the scale): ``bias`` is baddbmm's input (None for
    zeros), added times ``beta``; else None."""
    if _call(s, *MATMULS) and len(s.args) == 2:
        q, c = _query(s.args[0])
        return q, _key_transposed(s.args[1]), c, None, 0.0
    if not (_call(s, torch.baddbmm) or _method(s, "baddbmm")):
        return None
    names = ("input", "batch1", "batch2")
    operands = list(s.args[:3]) + [s.kwargs.get(n) for n in names[len(s.args):]]
    if len(operands) != 3 or any(x is None for x in operands):
        return None
    alpha, beta = _constant(s.kwargs.get("alpha", 1.0)), _constant(s.kwargs.get("beta", 1.0))
    if alpha is None or beta is None:
        return None
    bias, q1, k1 = operands
    q, c = _query(q1)
    return q, _key_transposed(k1), alpha * c, None if _call(bias, torch.zeros) else bias, beta


class _Match:
    """One recognized attention computation."""

    def __init__(self, out: torch.fx.Node, scores: torch.fx.Node, q: Any, k: Any, v: Any, scale: float,
                 conds: list[tuple[torch.fx.Node, float, bool]], adds: list[torch.fx.Node],
                 alibi: tuple[torch.fx.Node, float] | None, writes: list[torch.fx.Node]) -> None:
        self.out, self.scores, self.q, self.k, self.v = out, scores, q, k, v
        self.scale, self.conds, self.adds = scale, conds, adds  # conds: (condition, fill, keep where it is True)
        self.alibi = alibi  # (slopes node, its factor), or None
        self.writes = writes  # masked_fill_ nodes that mask the scores in place


def _match(out: torch.fx.Node, padding: torch.fx.Node | None) -> _Match | None:
    if not _call(out, *MATMULS) or len(out.args) != 2:
        return None
    p, v = out.args[0], _as_4d(out.args[1])
    while True:
        p = _unview(p)
        if _eval_dropout(p):
            p = p.args[0]
            continue
        break
    if not _call(p, *SOFTMAXES):
        return None
    dim = p.args[1] if len(p.args) > 1 else p.kwargs.get("dim")
    if dim not in (-1, 3):
        return None
    s, scale, conds, adds, alibi, reader, writes = p.args[0], 1.0, [], [], None, p, []
    while True:
        s = _unview(s)
        written = _written_masks(s, reader)
        if written is None:
            return None
        writes += written
        conds += [(w.args[1], _constant(w.args[2]), False) for w in written]
        reader = s
        product = _scores_product(s)
        if product is not None:
            q, k, alpha, bias, beta = product
            if q is None or k is None:
                return None
            if bias is not None:
                slopes = _alibi_slopes(bias)
                if slopes is None or alibi is not None:
                    return None
                alibi = (slopes, scale * beta)
            scale *= alpha
            break
        floor = _constant(s.args[1]) if _call(s, torch.max, torch.maximum) and len(s.args) == 2 else None
        if floor is not None and floor <= MASK_FILL_MAX:
            s = s.args[0]  # a floor at the masks' fill (XGLM): moves no kept score, masked ones stay masked
            continue
        if _call(s, *MATMULS):
            return None
        if _call(s, operator.mul) and len(s.args) == 2:
            c = [_constant(a) for a in s.args]
            if c[0] is not None and c[1] is None:
                scale, s = scale * c[0], s.args[1]
            elif c[1] is not None and c[0] is None:
                scale, s = scale * c[1], s.args[0]
            else:
                return None
        elif _call(s, operator.truediv) and len(s.args) == 2 and _constant(s.args[1]):
            scale, s = scale / _constant(s.args[1]), s.args[0]
        elif _call(s, torch.where) and len(s.args) == 3:
            cond, kept, fill = s.args
            c = _constant(fill)
            val = _value(cond)
            if c is None or c > MASK_FILL_MAX or val is None or val.dtype != torch.bool:
                return None
            conds.append((cond, c, True))
            s = kept
        elif (_method(s, "masked_fill") or _call(s, torch.masked_fill)) and len(s.args) == 3:
            _, cond, fill = s.args
            c, val = _constant(fill), _value(cond)
            if c is None or c > MASK_FILL_MAX or val is None or val.dtype != torch.bool:
                return None
            conds.append((cond, c, False))
            s = s.args[0]
        elif _call(s, operator.add) and len(s.args) == 2 and (multiplied := _multiplier_mask(*s.args)) is not None:
            s, factor, fill = multiplied
            conds.append((factor, fill, True))
        elif _call(s, operator.add) and len(s.args) == 2:
            a, b = s.args
            slopes = [None if alibi is not None else _alibi_slopes(t) for t in (b, a)]
            if slopes != [None, None]:  # before masks: BLOOM-style ALiBi is made from the attention_mask too
                side = 0 if slopes[0] is not None else 1
                alibi, s = (slopes[side], scale), (a, b)[side]
            elif _is_mask_term(b, padding):
                adds.append(b)
                s = a
            elif _is_mask_term(a, padding):
                adds.append(a)
                s = b
            else:
                return None
        else:
            return None
    vals = [x.value if isinstance(x, _Permuted) else _value(x) for x in (q, k, v)]
    if v is None or any(x is None or x.dim() != 4 for x in vals) or _value(out).dim() not in (3, 4):
        return None
    if alibi is not None and _value(alibi[0]).numel() != vals[0].shape[1]:
        return None  # one slope per query head
    return _Match(out, s, q, k, v, scale, conds, adds, alibi, writes)


def _insert(graph: torch.fx.Graph, op: Any, args: tuple, kwargs: dict, fake: Any, meta_from: torch.fx.Node,
            method: bool = False) -> torch.fx.Node:
    node = (graph.call_method if method else graph.call_function)(op, args, kwargs)
    node.meta = {k_: v_ for k_, v_ in meta_from.meta.items() if k_ in ("stack_trace", "nn_module_stack")}
    values = [_value(a) if isinstance(a, torch.fx.Node) else a for a in args]
    if all(not isinstance(a, torch.fx.Node) or isinstance(v_, torch.Tensor) for a, v_ in zip(args, values)):
        node.meta["example_value"] = fake(*values)
    return node


def _cast(graph: torch.fx.Graph, x: Any, dtype: torch.dtype, meta_from: torch.fx.Node) -> Any:
    val = _value(x)
    if val is None or val.dtype == dtype:
        return x
    return _insert(graph, "to", (x, dtype), {}, lambda t, d: t.to(d), meta_from, method=True)


def _rewrite(graph: torch.fx.Graph, m: _Match, keep_original: bool) -> torch.fx.Node:
    dtype = _value(m.scores).dtype
    out = m.out
    with graph.inserting_before(out.next):  # after the model's output: the first-call check reads it
        key = m.k
        if isinstance(key, _Permuted):
            key = _insert(graph, "permute", (key.source, *key.dims), {}, lambda t, *d: t.permute(d), out, method=True)
        q, k, v = (_cast(graph, x, dtype, out) for x in (m.q, key, m.v))
        mask = None
        for cond, fill, keep in m.conds:  # where(cond, S, fill) == S + where(cond, 0, fill); masked_fill inverts
            if _value(cond).dtype != torch.bool:  # a 0/1 multiplier (_multiplier_mask): its nonzeros keep
                cond = _insert(graph, operator.ne, (cond, 0), {}, operator.ne, out)
            term = _insert(graph, torch.where, (cond, 0.0, fill) if keep else (cond, fill, 0.0), {},
                           lambda c, z, f: c.new_zeros(c.shape, dtype=torch.get_default_dtype()), out)
            term = _cast(graph, term, dtype, out)
            mask = term if mask is None else _insert(graph, operator.add, (mask, term), {}, operator.add, out)
        for add in m.adds:
            term = _cast(graph, add, dtype, out)
            mask = term if mask is None else _insert(graph, operator.add, (mask, term), {}, operator.add, out)
        scale = m.scale
        if m.alibi is None:
            sdpa = _insert(graph, torch._C._nn.scaled_dot_product_attention, (q, k, v, mask, 0.0, False),
                           {"scale": scale}, lambda *a: torch._C._nn.scaled_dot_product_attention(*a, scale=scale), out)
        else:
            slopes = _insert(graph, "reshape", (m.alibi[0], -1), {}, lambda t, n: t.reshape(n), out, method=True)
            slopes = _cast(graph, slopes, torch.float32, out)
            if m.alibi[1] != 1.0:
                slopes = _insert(graph, operator.mul, (slopes, m.alibi[1]), {}, operator.mul, out)
            args = (q, k, v, mask, 0.0, False, scale, False, slopes)
            sdpa = _insert(graph, torch.ops.moa_flex.sdpa_alibi.default, args, {},
                           lambda *a: torch.ops.moa_flex.sdpa_alibi.default(*a), out)
        new = sdpa
        if _value(out).dim() == 3:  # the model's [B * H, Q, Dv] (bmm)
            new = _insert(graph, "flatten", (sdpa, 0, 1), {}, lambda t, a, b: t.flatten(a, b), out, method=True)
        new = _cast(graph, new, _value(out).dtype, out)
    out.replace_all_uses_with(new)
    if keep_original:  # the first-call check compares with it ([B * H, Q, Dv] for a bmm: verify views it)
        sdpa.meta[MODEL_OUTPUT] = out
    return sdpa


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` and the inputs only it used, recursively (pure tensor ops of one computation)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo.extend(inputs)


def has_eager_attention(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` computes attention in the recognized own-code form (before rewriting)."""
    padding = padding_mask_input(graph)
    return any(_match(n, padding) is not None for n in graph.nodes)


def _is_product(node: torch.fx.Node) -> bool:
    """A product of two tensors, such as the scores' (``matmul``, ``bmm``, ``baddbmm``)."""
    return _call(node, *MATMULS, torch.baddbmm) or _method(node, "matmul", "bmm", "baddbmm")


def _added_terms(softmax: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors added to the scores before ``softmax``: from its input back along the chain
    that reaches the scores' product (through scales, casts, views, wheres and fills)."""
    terms, s = [], softmax.args[0] if softmax.args else None
    for _ in range(64):
        s = _unview(s)
        if not isinstance(s, torch.fx.Node) or _is_product(s):
            break
        if _call(s, operator.add, torch.add) and len(s.args) == 2:
            a, b = s.args
            main = a if isinstance(a, torch.fx.Node) and any(_is_product(x) for x in _ancestors(a)) else b
            terms += [t for t in (a, b) if t is not main and isinstance(t, torch.fx.Node)]
            s = main
        elif _call(s, torch.where) and len(s.args) == 3:
            s = s.args[1]
        elif s.args and (_call(s, operator.mul, operator.truediv, torch.masked_fill, torch.max, torch.maximum)
                         or _method(s, "masked_fill", "masked_fill_", "mul", "div", "float", "to")):
            s = s.args[0]
        else:
            break
    return terms


def unread_score_biases(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """Score terms of attention computed in the model's own code that are made from
    floating-point parameters or activations (a relative-position bias: ProphetNet's), which
    the rewrite does not read: (the term, its float sources) per such term."""
    found = []
    for n in graph.nodes:
        if _call(n, *SOFTMAXES) and (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) in (-1, 3):
            for term in _added_terms(n):
                sources = [x for x in mask_sources(term) if is_bias_source(x)]
                if sources:
                    found.append((term, sources))
    return found


def rewrite_eager_attention(graph: torch.fx.Graph, keep_original: bool = False) -> list[torch.fx.Node]:
    """Make each recognized attention computation of ``graph`` one SDPA call (module docstring);
    returns the new SDPA nodes in graph order. Graphs that already call SDPA are left alone."""
    padding = padding_mask_input(graph)
    matches = [m for m in (_match(n, padding) for n in list(graph.nodes)) if m is not None]
    made = []
    for m in matches:
        made.append(_rewrite(graph, m, keep_original))
        if not keep_original:
            for w in m.writes:  # the in-place masks: nothing reads them once the scores are gone
                graph.erase_node(w)
            _erase_unused(graph, m.out)
    if made:
        graph.lint()
    return made
