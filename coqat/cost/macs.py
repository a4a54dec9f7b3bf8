"""Count MACs per layer with fvcore, and find layers that read the same input tensor.

Conventions (DESIGN.md §4):

- MACs come from fvcore's ``FlopCountAnalysis`` on the float model, one fused multiply-add
  = one MAC. fvcore already counts conv / linear / matmul that way.
- Only two kinds of work count towards BOPs:
  * ``nn.Linear`` and ``nn.Conv2d`` leaf modules ("layers"; these are what coqat quantizes);
  * activation x activation matmuls (attention QK^T and PV): ``aten::scaled_dot_product_attention``
    and ``aten::matmul / mm / bmm / einsum`` that run directly inside any module other than a
    layer. They become pseudo-layers named ``f"{owner}.sdpa"`` (or ``.matmul``, ``.mm``,
    ``.bmm``, ``.einsum``), summed per owner module and op.
- Everything else fvcore counts (batch_norm, layer_norm, pooling, upsample, and also
  conv/linear work outside an ``nn.Linear``/``nn.Conv2d`` leaf, e.g. ``nn.Conv1d`` or a
  functional ``F.linear``) is *excluded* from BOPs and reported by op name with fvcore's count.
  Ops fvcore has no formula for (add, max_pool2d, softmax, ...) are reported as *uncounted*
  with their number of occurrences. Nothing is dropped silently.

SDPA convention: MACs = B*H*L*S*E (QK^T) + B*H*L*S*Ev (PV), the full L x S score matrix even
when the attention is causal; a causal mask is not discounted (kernels differ in how much of
the masked half they skip, so the dense count is the one number every backend agrees on).
With grouped-query attention, k/v may have fewer heads than q; the count is per *query* head.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import einsum_flop_jit, get_shape
from torch import nn

from coqat.errors import CoqatError

# fvcore op names (after its "aten::" stripping) that make up a Linear/Conv2d layer's MACs.
LAYER_OPS = frozenset({"linear", "addmm", "conv", "mm", "matmul", "bmm", "einsum"})
# Op names that, outside a layer, are activation x activation matmuls -> pseudo-layer suffix.
ATTENTION_OPS = {
    "scaled_dot_product_attention": "sdpa",
    "matmul": "matmul",
    "mm": "mm",
    "bmm": "bmm",
    "einsum": "einsum",
}
# Weight-style ops that, found outside a layer, mean BOPs understate the model (warned about).
_WEIGHT_OPS = frozenset({"linear", "addmm", "conv"})


def fvcore_version() -> str:
    try:
        return importlib.metadata.version("fvcore")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored installs
        return "unknown"


def is_layer(module: nn.Module) -> bool:
    """A module coqat quantizes and counts in BOPs: an nn.Linear or nn.Conv2d leaf."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) and next(module.children(), None) is None


# ----- fvcore handlers -------------------------------------------------------------------
def _shape(value: Any, what: str) -> list[int]:
    shape = get_shape(value)
    if shape is None:
        raise RuntimeError(f"fvcore trace gave no complete shape for the {what} operand")
    return list(shape)


def sdpa_macs_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, ...)``.

    q: (*batch, L, E), k: (*batch_kv, S, E), v: (*batch_kv, S, Ev). QK^T costs
    prod(batch)*L*S*E and PV prod(batch)*L*S*Ev, counted over q's batch dims so that GQA
    (fewer k/v heads) is counted per query head. Causal masks are not discounted.
    """
    q = _shape(inputs[0], "query")
    k = _shape(inputs[1], "key")
    v = _shape(inputs[2], "value")
    *batch, length, e = q
    s = k[-2]
    ev = v[-1]
    return int(prod(batch) * length * s * (e + ev))


def matmul_macs_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::matmul`` / ``aten::mm``: every output element costs K MACs.

    Unlike fvcore's default, this is right for broadcast batch dims and 1-D operands.
    """
    a = _shape(inputs[0], "left")
    out = _shape(outputs[0], "output")
    return int(prod(out) * a[-1])


def einsum_macs_jit(inputs: list[Any], outputs: list[Any]) -> int | float:
    """MACs of ``aten::einsum``, contracting operands left to right.

    fvcore's own handler materialises ``np.zeros`` of every operand shape to ask numpy for
    a path, which for attention-sized einsums allocates gigabytes; this one only uses shapes.
    Equations with an ellipsis are left to fvcore's handler.
    """
    equation = str(inputs[0].toIValue()).replace(" ", "")
    if "..." in equation:
        return einsum_flop_jit(inputs, outputs)
    shapes = [_shape(v, "einsum") for v in inputs[1].node().inputs()]
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:  # implicit output: the letters that appear once, sorted
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        for c, n in zip(term, shape):
            sizes[c] = max(sizes.get(c, 1), int(n))
    if len(terms) < 2:
        return 0  # a transpose / reduction of one operand: no multiplies
    macs = 0
    current = list(terms[0])
    for i in range(1, len(terms)):
        union = list(dict.fromkeys(current + list(terms[i])))
        macs += prod(sizes[c] for c in union)
        needed = set(rhs).union(*[set(t) for t in terms[i + 1:]])
        current = [c for c in union if c in needed]
    return int(macs)


_HANDLERS = {
    "aten::scaled_dot_product_attention": sdpa_macs_jit,
    "aten::matmul": matmul_macs_jit,
    "aten::mm": matmul_macs_jit,
    "aten::einsum": einsum_macs_jit,
}


# ----- counting --------------------------------------------------------------------------
@dataclass
class MacCount:
    """What fvcore saw, split the way BOPs need it (all dicts in model order)."""

    layers: dict[str, int] = field(default_factory=dict)      # layer FQN -> MACs
    attention: dict[str, int] = field(default_factory=dict)   # pseudo-layer -> MACs
    excluded: dict[str, int] = field(default_factory=dict)    # fvcore op -> fvcore count
    uncounted: dict[str, int] = field(default_factory=dict)   # op without formula -> calls


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _EvalNoGrad:
    """Eval mode and no grad for the duration; restores every module's own training flag."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []
        self.no_grad = torch.no_grad()

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.no_grad.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def count_macs(model: nn.Module, example_inputs: Any) -> MacCount:
    """Trace ``model(*example_inputs)`` with fvcore (eval mode, no grad) and split the counts.

    Returns per-layer MACs for every ``nn.Linear``/``nn.Conv2d`` leaf that ran (in
    ``named_modules`` order), attention pseudo-layers, excluded and uncounted ops.
    """
    inputs = _as_tuple(example_inputs)
    with _EvalNoGrad(model):
        analysis = FlopCountAnalysis(model, inputs).set_op_handle(**_HANDLERS)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        try:
            per_module = analysis.by_module_and_operator()
        except Exception as e:  # the tracer's errors are not actionable as they come
            first = " ".join(str(e).split())[:200]
            raise CoqatError(
                f"fvcore could not trace the model ({type(e).__name__}: {first}); make forward "
                "take the example tensors positionally and return tensors") from e
        uncounted = dict(analysis.unsupported_ops(""))

    direct = _direct_counts(per_module)
    result = MacCount(uncounted={k: int(v) for k, v in uncounted.items()})
    excluded: Counter[str] = Counter()
    weight_ops_outside: Counter[str] = Counter()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen or name not in direct:
            continue
        seen.add(id(module))
        ops = direct[name]
        if is_layer(module):
            macs = sum(int(v) for op, v in ops.items() if op in LAYER_OPS)
            if macs > 0:
                result.layers[name] = macs
            excluded.update({op: v for op, v in ops.items() if op not in LAYER_OPS})
            continue
        for op, v in ops.items():
            if op in ATTENTION_OPS:
                pseudo = f"{name}.{ATTENTION_OPS[op]}" if name else ATTENTION_OPS[op]
                result.attention[pseudo] = result.attention.get(pseudo, 0) + int(v)
            else:
                excluded[op] += v
                if op in _WEIGHT_OPS:
                    weight_ops_outside[op] += v
    result.excluded = {op: int(round(v)) for op, v in excluded.items() if v}
    result.attention = {k: v for k, v in result.attention.items() if v > 0}
    _check_totals(per_module.get("", Counter()), result)
    if weight_ops_outside:
        what = ", ".join(f"{op}={int(v):,}" for op, v in weight_ops_outside.items())
        warnings.warn(
            f"MACs of conv/linear ops outside nn.Linear/nn.Conv2d modules ({what}) are not in "
            "BOPs (coqat cannot quantize them); they are listed under excluded ops",
            stacklevel=2)
    return result


def _direct_counts(per_module: dict[str, Counter]) -> dict[str, Counter]:
    """Per-module counts of ops run directly in that module, not in a submodule.

    fvcore (ancestor mode "owner") adds an op to its owner and to every prefix of the
    owner's name, so a module's direct ops are its count minus its direct children's.
    """
    children: dict[str, list[str]] = defaultdict(list)
    for name in per_module:
        if name:
            children[name.rpartition(".")[0]].append(name)
    direct = {}
    for name, counts in per_module.items():
        d = Counter(dict(counts))
        for child in children.get(name, ()):
            d.subtract(per_module[child])
        direct[name] = Counter({op: v for op, v in d.items() if v})
    return direct


def _check_totals(root: Counter, result: MacCount) -> None:
    """Every MAC fvcore counted must land in exactly one of layers / attention / excluded."""
    fv_total = sum(root.values())
    ours = (sum(result.layers.values()) + sum(result.attention.values())
            + sum(result.excluded.values()))
    if abs(fv_total - ours) > max(1.0, 1e-9 * fv_total):
        raise RuntimeError(
            f"MAC bookkeeping mismatch: fvcore counted {fv_total}, coqat split {ours}")


# ----- tie groups ------------------------------------------------------------------------
def find_tie_groups(model: nn.Module, example_inputs: Any) -> list[tuple[str, ...]]:
    """Layers that read the same input tensor (so share one activation quantizer).

    One plain forward pass (eval mode, no grad) with pre-hooks on the Linear/Conv2d leaves,
    grouping calls by the identity of the input tensor object. Every recorded input is kept
    alive until the pass ends so no id can be reused by a later tensor. A layer called on
    several tensors joins every group it touches. Returns groups of >= 2 layers, members in
    model order, groups ordered by their first member.
    """
    inputs = _as_tuple(example_inputs)
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) not in seen and is_layer(module):
            seen.add(id(module))
            layers.append((name, module))
    order = {name: i for i, (name, _) in enumerate(layers)}

    keep_alive = []  # every recorded input stays alive, so no storage is reused mid-pass
    readers: dict[int, list[str]] = defaultdict(list)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            if tensors:
                keep_alive.append(tensors[0])
                readers[id(tensors[0])].append(name)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in layers]
    try:
        with _EvalNoGrad(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()

    # union-find over layers that shared an input tensor
    parent = {name: name for name in order}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for names in readers.values():
        for other in names[1:]:
            a, b = root(names[0]), root(other)
            if a != b:
                parent[max(a, b, key=order.get)] = min(a, b, key=order.get)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in order:
        groups[root(name)].append(name)
    keep_alive.clear()
    result = [tuple(g) for g in groups.values() if len(g) >= 2]
    return sorted(result, key=lambda g: order[g[0]])


def tensor_shapes(example_inputs: Sequence[Any]) -> list[list[int]]:
    return [list(t.shape) for t in _as_tuple(example_inputs) if isinstance(t, torch.Tensor)]
