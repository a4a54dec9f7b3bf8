"""Budgets written the way people say them: ``w4a4``, ``0.5*w8a8``, ``34.7G``, ``0.02``.

Grammar (parsed with ``ast`` against a whitelist; nothing is evaluated by Python):

- ``wNaM``: the BOPs of the model with every layer at w=N, a=M, pinned layers at their pins;
- ``waX``: a budget on the quantized layers (the EdMIPS convention): their MAC-weighted mean
  w_bits x a_bits is X (any number, ``wa6``, ``wa7.5``), pinned layers and attention matmuls
  at their fixed cost. ``wa9`` equals ``w3a3``; ``wa6`` lies between the uniform points;
- ``fp32``: the FP32 reference BOPs (every MAC at 32 x 32);
- a number, optionally with a K/M/G/T suffix (x1e3/1e6/1e9/1e12, any case): ``34.7G``;
- ``+ - * /`` and parentheses: ``0.5*w8a8``, ``w4a4+0.25*(w8a8-w4a4)``.

An expression made of plain numbers only (no term, no suffix) whose value is <= 1 is a
fraction of the FP32 BOPs (``0.02``); above 1 it is an absolute count of BOPs.

Quantities carry a unit so that nonsense is refused rather than computed: terms and suffixed
numbers are BOPs, plain numbers are scalars. BOPs may be added to BOPs (a plain number added
to BOPs is read as BOPs) and scaled by scalars, but not multiplied by or divided by BOPs.
Arithmetic is exact (fractions); the result is rounded down to an integer number of BOPs.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Mapping

from coqat.bitconfig import LayerBits
from coqat.cost.bops import CostModel
from coqat.errors import CoqatError

ACCEPTED = ("accepted forms: wNaM (e.g. w4a4, uniform bits with pinned layers kept), waX (mean "
            "w_bits*a_bits X on the quantized layers, e.g. wa6), fp32, "
            "BOPs with an optional K/M/G/T suffix (34.7G), a fraction of FP32 BOPs (0.02), "
            "combined with + - * / and parentheses (0.5*w8a8, w4a4+0.25*(w8a8-w4a4))")

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER = r"(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SUFFIXED = re.compile(rf"(?<![\w.])({_NUMBER})\s*([kKmMgGtT])(?!\w)")
_TERM = re.compile(r"^w(\d+)a(\d+)$", re.IGNORECASE)
_MEAN_TERM = re.compile(r"(?<![\w.])wa\s*(\d+(?:\.\d*)?|\.\d+)(?![\w.])", re.IGNORECASE)
_PLACEHOLDER = "__coqat_bops_{}__"
_MEAN_PLACEHOLDER = "__coqat_mean_wa_{}__"
_MAX_LEN = 500
_MAX_EXPONENT = 30  # 1e30 BOPs is far past any model; bounds the exact arithmetic
_MAX_BOPS = 10**40  # a product of such numbers can still be huge: refused above this


class _BudgetSyntaxError(Exception):
    """Internal: what is wrong with the expression (becomes a CoqatError)."""


def _number(text: str) -> Fraction:
    try:
        d = Decimal(text.replace("_", ""))
    except InvalidOperation:
        raise _BudgetSyntaxError(f"{text!r} is not a number") from None
    if not d.is_finite() or (d != 0 and abs(d.adjusted()) > _MAX_EXPONENT):
        raise _BudgetSyntaxError(f"number {text!r} is out of range")
    return Fraction(d)


class _Evaluator:
    """Walks the whitelisted AST; returns (value, dim) with dim 1 = BOPs, 0 = scalar."""

    def __init__(self, source: str, suffixed: list[Fraction], cost: CostModel,
                 pinned: Mapping[str, LayerBits], means: Mapping[str, Fraction] | None = None):
        self.source = source
        self.suffixed = suffixed
        self.means = dict(means or {})
        self.cost = cost
        self.pinned = pinned
        self.plain_only = True  # no term, no suffix: the "fraction of FP32" reading applies

    def eval(self, node: ast.AST) -> tuple[Fraction, int]:
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise _BudgetSyntaxError(f"{node.value!r} is not a number or term")
            text = ast.get_source_segment(self.source, node) or repr(node.value)
            return _number(text), 0
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value, dim = self.eval(node.operand)
            return (-value if isinstance(node.op, ast.USub) else value), dim
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub,
                                                                ast.Mult, ast.Div)):
            (a, da), (b, db) = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Add):
                return a + b, max(da, db)
            if isinstance(node.op, ast.Sub):
                return a - b, max(da, db)
            if isinstance(node.op, ast.Mult):
                if da + db > 1:
                    raise _BudgetSyntaxError("it multiplies two BOPs quantities; scale a term "
                                             "by a plain number instead")
                return a * b, da + db
            if db:
                raise _BudgetSyntaxError("it divides by a BOPs quantity; divide by a plain "
                                         "number instead")
            if b == 0:
                raise _BudgetSyntaxError("it divides by zero")
            return a / b, da
        what = type(node).__name__
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            what = type(node.op).__name__
        raise _BudgetSyntaxError(f"{what} is not allowed (only numbers, terms, + - * / and "
                                 "parentheses)")

    def _name(self, name: str) -> tuple[Fraction, int]:
        self.plain_only = False
        for i, value in enumerate(self.suffixed):
            if name == _PLACEHOLDER.format(i):
                return value, 1
        if name.lower() == "fp32":
            return Fraction(self.cost.fp32_bops()), 1
        m = _TERM.match(name)
        if not m and name in self.means:
            return mean_wa_bops(self.means[name], self.cost, self.pinned), 1
        if not m:
            raise _BudgetSyntaxError(f"{name!r} is not a term")
        try:
            bits = LayerBits(int(m.group(1)), int(m.group(2)))
        except CoqatError as e:
            raise _BudgetSyntaxError(f"{name} has unsupported bits ({e})") from None
        return Fraction(self.cost.uniform_bops(bits, self.pinned)), 1


def quantized_macs(cost: CostModel, pinned: Mapping[str, LayerBits] | None = None
                   ) -> tuple[int, int]:
    """(F, M) of ``cost``'s model: every uniform config w/a costs F + w*a*M BOPs, F the
    pinned layers and attention matmuls, M the MACs of the other (quantized) layers."""
    pinned = dict(pinned or {})
    low = cost.uniform_bops(LayerBits(2, 2), pinned)
    high = cost.uniform_bops(LayerBits(4, 4), pinned)
    macs = (high - low) // 12
    return low - 4 * macs, macs


def mean_wa_bops(mean: Fraction, cost: CostModel,
                 pinned: Mapping[str, LayerBits] | None = None) -> Fraction:
    """The BOPs of ``waX``: F + X * M (``quantized_macs``)."""
    fixed, macs = quantized_macs(cost, pinned)
    if macs <= 0:
        raise _BudgetSyntaxError("the model has no quantized layers for a waX term (every "
                                 "layer is pinned)")
    return fixed + Fraction(mean) * macs


def mean_wa(bops: float, cost: CostModel,
            pinned: Mapping[str, LayerBits] | None = None) -> float | None:
    """The inverse of ``waX``: the mean w_bits*a_bits of the quantized layers at ``bops``
    (None when every layer is pinned)."""
    fixed, macs = quantized_macs(cost, pinned)
    return (bops - fixed) / macs if macs > 0 else None


@dataclass(frozen=True)
class Budget:
    """A budget parsed once: the expression as written, its BOPs for one model, and a
    filesystem-safe slug (run and sweep-point directories are named with it)."""

    expr: str
    bops: int

    @classmethod
    def parse(cls, expr: str, cost: CostModel,
              pinned: Mapping[str, LayerBits] | None = None) -> "Budget":
        return cls(str(expr).strip(), parse_budget(expr, cost, pinned))

    @property
    def slug(self) -> str:
        return budget_slug(self.expr)

    def describe(self, cost: CostModel) -> str:
        return describe_budget(self.expr, self.bops, cost)


def budget_slug(expr: str) -> str:
    """``"w4a4+0.5*(w8a8-w4a4)"`` -> ``"w4a4_0.5xw8a8_w4a4"``: letters, digits, '.' and '_'
    only, at most 40 characters (``*`` reads as ``x``)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", str(expr).strip().replace("*", "x"))
    return slug.strip("_")[:40] or "budget"


def parse_budget(expr: str, cost: CostModel,
                 pinned: Mapping[str, LayerBits] | None = None) -> int:
    """The budget ``expr`` in BOPs (int, > 0) for ``cost``'s model; see the module doc.

    ``pinned`` are the space's pinned layers: ``wNaM`` means uniform bits everywhere else.
    Any malformed expression raises a one-line CoqatError naming the problem and the forms.
    """
    pinned = dict(pinned or {})
    text = "" if expr is None else str(expr).strip()

    def fail(problem: str) -> CoqatError:
        return CoqatError(f"budget {text!r}: {problem}; {ACCEPTED}")

    if not text:
        raise fail("it is empty")
    if len(text) > _MAX_LEN:
        raise fail(f"it is longer than {_MAX_LEN} characters")

    suffixed: list[Fraction] = []
    means: dict[str, Fraction] = {}

    def replace(m: re.Match) -> str:
        suffixed.append(_number(m.group(1)) * _SUFFIX[m.group(2).lower()])
        return _PLACEHOLDER.format(len(suffixed) - 1)

    def replace_mean(m: re.Match) -> str:
        name = _MEAN_PLACEHOLDER.format(len(means))
        means[name] = _number(m.group(1))
        return name

    try:
        source = _SUFFIXED.sub(replace, _MEAN_TERM.sub(replace_mean, text))
        tree = ast.parse(source, mode="eval")
        evaluator = _Evaluator(source, suffixed, cost, pinned, means)
        value, dim = evaluator.eval(tree)
    except _BudgetSyntaxError as e:
        raise fail(str(e)) from None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise fail("it is not a valid expression") from None

    if dim == 0 and evaluator.plain_only and value <= 1:
        value = value * cost.fp32_bops()
    bops = math.floor(value)
    if bops <= 0:
        raise fail(f"it comes to {bops} BOPs; a budget must be positive")
    if bops > _MAX_BOPS:
        raise fail(f"it comes to more than {_MAX_BOPS:.0e} BOPs, far beyond any model")
    return int(bops)


def _scaled(n: float) -> tuple[str, str]:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}", prefix
    return f"{n:.0f}", ""


def format_bops(n: float) -> str:
    """``34714419200`` -> ``"34.71 G"`` (two decimals, K/M/G/T prefix)."""
    value, prefix = _scaled(n)
    return f"{value} {prefix}".rstrip()


def describe_budget(expr: str, bops: int, cost: CostModel) -> str:
    """``"w4a4 = 34.71 GBOPs (1.87% of FP32)"``."""
    value, prefix = _scaled(bops)
    share = 100.0 * bops / cost.fp32_bops() if cost.fp32_bops() else 0.0
    return f"{str(expr).strip()} = {value} {prefix}BOPs ({share:.2f}% of FP32)"
