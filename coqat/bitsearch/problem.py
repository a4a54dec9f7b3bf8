"""The search problem: which decisions a bit-width search makes, and what each one costs.

A configuration is a set of *decisions*, each a categorical choice over bit widths:

- one **weight decision** per searchable layer (its ``w_bits``), or one per tie group when
  the deployment target ties weights too (``Target.tie_weights``, e.g. vLLM's fused q/k/v);
- one **activation decision** per tie group (DESIGN.md §4: layers that read the same tensor
  share one input quantizer, so one ``a_bits``), and one per untied searchable layer.

Choices come from the space's layer rules (``ResolvedSpace.candidates``), intersected over
the members of a tie group and with the target's legal bit sets. Pinned layers are not
decisions; their BOPs, and the attention matmuls', are a fixed part ``F`` of every config.

BOPs of an assignment are ``F + sum_l MACs_l * w(l) * a(l)`` with ``w(l)``, ``a(l)`` the
choices of the decisions layer ``l`` belongs to: exactly ``CostModel.bops`` of the BitConfig
that ``config()`` builds (tested), so search, repair and reports count the same number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.config import ResolvedSpace
from coqat.cost import CostModel, format_bops
from coqat.errors import CoqatError
from coqat.targets import get_target


@dataclass(frozen=True)
class Decision:
    """One categorical choice: the weight bits of ``layers`` (kind "w") or their shared
    input-activation bits (kind "a"). ``choices`` are sorted ascending."""

    kind: str
    layers: tuple[str, ...]
    choices: tuple[int, ...]

    @property
    def name(self) -> str:
        """``w:model.layers.0.mlp.down_proj`` or ``a:model.layers.0.self_attn.q_proj+2``."""
        extra = f"+{len(self.layers) - 1}" if len(self.layers) > 1 else ""
        return f"{self.kind}:{self.layers[0]}{extra}"


@dataclass(frozen=True)
class Assignment:
    """Chosen bits, one per decision: ``w[i]`` for ``problem.w_decisions[i]``, ``a[j]``
    for ``problem.a_decisions[j]``."""

    w: tuple[int, ...]
    a: tuple[int, ...]


@dataclass
class SearchProblem:
    layer_names: list[str]                  # every Linear/Conv2d of the model, model order
    macs: dict[str, int]                    # layer -> MACs (from the CostModel)
    pinned: dict[str, LayerBits]
    w_decisions: list[Decision]
    a_decisions: list[Decision]
    fixed_bops: int                         # attention + pinned layers: no decision moves it
    tie_groups: list[tuple[str, ...]]
    quantizer: str = "quest"
    target: str | None = None
    layer_w: dict[str, int] = field(default_factory=dict)   # layer -> index in w_decisions
    layer_a: dict[str, int] = field(default_factory=dict)   # layer -> index in a_decisions

    def __post_init__(self) -> None:
        if not self.layer_w:
            self.layer_w = {n: i for i, d in enumerate(self.w_decisions) for n in d.layers}
        if not self.layer_a:
            self.layer_a = {n: i for i, d in enumerate(self.a_decisions) for n in d.layers}

    # ----- construction ------------------------------------------------------------
    @classmethod
    def build(cls, resolved: ResolvedSpace, cost: CostModel, quantizer: str = "quest",
              target: str | None = None) -> "SearchProblem":
        """Decisions of ``resolved`` on ``cost``'s model, restricted to ``target``'s bits."""
        tgt = get_target(target) if target is not None else None
        names = list(cost.layers)
        searchable = [n for n in names if n in resolved.candidates]
        if not searchable:
            raise CoqatError("the space pins every layer, so there is nothing to search; "
                             "add a [[search.layers]] rule for some layers")
        pinned = dict(resolved.pinned)
        if tgt is not None:
            bad = [f"{n}={b.label}" for n, b in pinned.items()
                   if not b.is_float and not tgt.allows(b.w_bits, b.a_bits)]
            if bad:
                raise CoqatError(f"pinned layer(s) {', '.join(bad[:3])} are not legal for target"
                                 f" {tgt.name}; pin them to bits it serves (or to w16a16)")

        def w_options(n: str) -> set[int]:
            opts = set(resolved.candidates[n].w_bits)
            if tgt is not None:
                opts &= set(tgt.weight_bits) if cost.layers[n].op in tgt.ops else {FLOAT_BITS}
            return opts

        def a_options(n: str) -> set[int]:
            opts = set(resolved.candidates[n].a_bits)
            if tgt is not None:
                opts &= set(tgt.act_bits) if cost.layers[n].op in tgt.ops else {FLOAT_BITS}
            return opts

        def need(opts: set[int], what: str) -> tuple[int, ...]:
            if not opts:
                hint = (f" with target {tgt.name} (weights {sorted(tgt.weight_bits)},"
                        f" activations {sorted(tgt.act_bits)})" if tgt else "")
                raise CoqatError(f"{what} has no legal bit width{hint}; widen the layer rule's"
                                 " w_bits/a_bits or pin the layer")
            return tuple(sorted(opts))

        groups = [tuple(g) for g in resolved.tie_groups]
        grouped = {n for g in groups for n in g}
        a_decisions: list[Decision] = []
        w_decisions: list[Decision] = []
        tied_w: set[str] = set()
        for g in groups:
            members = [n for n in g if n in resolved.candidates]
            pins = {pinned[n].a_bits for n in g if n in pinned}
            if len(pins) > 1:
                raise CoqatError(f"tie group ({', '.join(g)}) has pinned members with different"
                                 " a_bits; pin them alike")
            if not members:
                continue
            opts = set.intersection(*(a_options(n) for n in members))
            if pins:
                opts &= pins
            a_decisions.append(Decision("a", tuple(members),
                                        need(opts, f"tie group ({', '.join(g)})")))
            if tgt is not None and tgt.tie_weights and len(members) > 1:
                wopts = set.intersection(*(w_options(n) for n in members))
                wpins = {pinned[n].w_bits for n in g if n in pinned}
                if wpins:
                    wopts &= wpins
                w_decisions.append(Decision("w", tuple(members),
                                            need(wopts, f"tied weights of ({', '.join(g)})")))
                tied_w.update(members)
        for n in searchable:
            if n not in grouped:
                a_decisions.append(Decision("a", (n,), need(a_options(n), f"layer {n}")))
            if n not in tied_w:
                w_decisions.append(Decision("w", (n,), need(w_options(n), f"layer {n}")))
        order = {n: i for i, n in enumerate(names)}
        a_decisions.sort(key=lambda d: order[d.layers[0]])
        w_decisions.sort(key=lambda d: order[d.layers[0]])
        fixed = cost.attention_bops() + sum(
            cost.layer_bops(n, b) for n, b in pinned.items() if n in cost.layers)
        return cls(layer_names=names, macs={n: lc.macs for n, lc in cost.layers.items()},
                   pinned=pinned, w_decisions=w_decisions, a_decisions=a_decisions,
                   fixed_bops=int(fixed), tie_groups=groups, quantizer=quantizer,
                   target=target)

    # ----- queries -------------------------------------------------------------------
    @property
    def searchable(self) -> list[str]:
        return [n for n in self.layer_names if n in self.layer_w]

    @property
    def decisions(self) -> list[Decision]:
        return self.w_decisions + self.a_decisions

    def bits_of(self, asg: Assignment, layer: str) -> tuple[int, int]:
        return asg.w[self.layer_w[layer]], asg.a[self.layer_a[layer]]

    def bops(self, asg: Assignment) -> int:
        """Total BOPs of ``asg`` (the fixed part included); equals CostModel.bops(config)."""
        total = self.fixed_bops
        for n in self.searchable:
            w, a = self.bits_of(asg, n)
            total += self.macs[n] * w * a
        return total

    def extreme(self, pick) -> Assignment:
        """All decisions at ``pick(choices)`` (min: the cheapest config, max: the dearest)."""
        return Assignment(tuple(pick(d.choices) for d in self.w_decisions),
                          tuple(pick(d.choices) for d in self.a_decisions))

    def bops_range(self) -> tuple[int, int]:
        """BOPs of the cheapest and of the most expensive configuration (costs grow with
        every bit width, so these are all-min and all-max)."""
        return self.bops(self.extreme(min)), self.bops(self.extreme(max))

    def check_budget(self, budget: int, expr: str | None = None) -> None:
        """One-line CoqatError unless some configuration meets ``budget`` and the budget is
        not above the most expensive one (which would leave nothing to search)."""
        lo, hi = self.bops_range()
        what = f"budget {expr!r} = {budget / 1e9:.4g} GBOPs" if expr else \
            f"budget {budget / 1e9:.4g} GBOPs"
        span = f"feasible budgets for this space lie in [{lo / 1e9:.4g}, {hi / 1e9:.4g}] GBOPs"
        if self.target:
            span += f" with target {self.target}"
        if budget < lo:
            raise CoqatError(f"{what} is below the cheapest configuration; {span}"
                             " (raise the budget or allow lower bits)")
        if budget > hi:
            raise CoqatError(f"{what} is above the most expensive configuration, so there is"
                             f" nothing to trade; {span} (lower the budget or allow more bits)")

    def config(self, asg: Assignment, meta: Mapping | None = None) -> BitConfig:
        """The BitConfig of ``asg``: searchable layers at their choices, pins kept."""
        layers = {}
        for n in self.layer_names:
            if n in self.pinned:
                layers[n] = self.pinned[n]
            else:
                w, a = self.bits_of(asg, n)
                layers[n] = LayerBits(w, a, self.quantizer)
        return BitConfig(layers, list(self.tie_groups), dict(meta or {}))

    def assignment_of(self, cfg: BitConfig) -> Assignment:
        """The assignment a BitConfig encodes (CoqatError if it is not one of this space)."""
        def pick(d: Decision, attr: str) -> int:
            vals = {getattr(cfg.layers[n], attr) for n in d.layers}
            if len(vals) != 1 or next(iter(vals)) not in d.choices:
                raise CoqatError(f"the config gives {d.name} bits {sorted(vals)}, outside the"
                                 f" search space's choices {list(d.choices)}")
            return vals.pop()

        return Assignment(tuple(pick(d, "w_bits") for d in self.w_decisions),
                          tuple(pick(d, "a_bits") for d in self.a_decisions))

    def uniform(self, w: int, a: int) -> Assignment | None:
        """Every decision at (w, a), or None if some decision does not allow it."""
        if any(w not in d.choices for d in self.w_decisions) or \
                any(a not in d.choices for d in self.a_decisions):
            return None
        return Assignment((w,) * len(self.w_decisions), (a,) * len(self.a_decisions))

    def describe_range(self) -> str:
        lo, hi = self.bops_range()
        return f"{format_bops(lo)}BOPs .. {format_bops(hi)}BOPs"

    def distance(self, x: Assignment, y: Assignment) -> int:
        """Number of searchable layers whose (w, a) differ between ``x`` and ``y``."""
        return sum(self.bits_of(x, n) != self.bits_of(y, n) for n in self.searchable)


def hamming_bits(problem: SearchProblem, configs: Sequence[Assignment]) -> float:
    """Mean pairwise distance (layers with different bits) over ``configs``: how much the
    chosen configurations of several seeds disagree (0 = identical)."""
    pairs = [(i, j) for i in range(len(configs)) for j in range(i + 1, len(configs))]
    if not pairs:
        return 0.0
    return sum(problem.distance(configs[i], configs[j]) for i, j in pairs) / len(pairs)
