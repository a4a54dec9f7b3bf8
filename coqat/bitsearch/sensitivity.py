"""Per-tensor sensitivity: how much the loss moves when ONE tensor is quantized.

For every decision of a ``SearchProblem`` (each searchable layer's weight, each tie group's
shared input activation) and every candidate width ``b`` of it, the diagnostic quantizes only
that tensor to ``b`` bits, leaves every other layer in float (pinned layers included), and
measures the workload's loss on a fixed list of holdout batches::

    delta[decision][b] = mean_i ( loss_i(that tensor at b bits) - loss_i(all float) )

The batches are the same for every cell, so the per-batch differences are paired: their
standard error (``se``) is the noise of a cell, and ``baseline_se`` (the s.e. of the float
loss over the batches) is the noise of the absolute loss. A cell whose ``delta`` is within a
few ``se`` of another one cannot be told from it on these batches.

The quantized tensor goes through the search's own mixing layers
(``coqat.bitsearch.relax``) at a hard choice, which compute exactly ``QuantLinear`` /
``QuantConv2d`` at those bits (the space's quantizer: QuEST with its Hadamard rotation, or
RTN), so the diagnostic and training quantize identically.

Cost: ``1 + sum over decisions of (its widths measured, float excluded)`` forward passes,
each over ``batches`` batches, without gradients; e.g. lm-tiny with widths {2,3,4,6,8} for
its 28 weights and {4,6,8} for its 16 activation groups: 1 + 28*5 + 16*3 = 189 passes.

This is the input of ``--method sensitivity``: ``values`` turns the table into a value per
choice (minus the loss change, float = 0), which the exact knapsack (``repair``) maximises
under the budget, assuming the changes add up over decisions (the HAWQ-V3 / AutoQuantize
assumption; ``predicted_delta`` is that sum for a config). By default the method first makes
each row non-negative and non-increasing in bits (``monotone_row``: the cells that break
that are noise, and a knapsack buys noise), ``[search] sensitivity_clean = "none"`` reads the
raw table.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.config import SENSITIVITY_CLEAN, SENSITIVITY_ESTIMATES, RunConfig
from coqat.cost import Budget
from coqat.errors import CoqatError
from coqat.bitsearch.job import SearchJob
from coqat.bitsearch.baselines import fill_floor
from coqat.bitsearch.knapsack import RepairResult, repair, total_value
from coqat.bitsearch.problem import Assignment, Decision, SearchProblem
from coqat.bitsearch.relax import set_assignment, to_search_model
from coqat.training import runner
from coqat.training.loop import autocast
from coqat.util import atomic_write_text, read_json
from coqat.workloads.base import Workload, batch_items, to_device

__all__ = ["SCHEMA", "ESTIMATES", "FILE", "DecisionSensitivity", "Sensitivity", "measure",
           "estimate", "table", "check_widths", "fp_job", "monotone_row", "values",
           "knapsack", "predicted_delta", "cache_name"]

SCHEMA = "coqat.sensitivity/v1"
ESTIMATES = SENSITIVITY_ESTIMATES
FILE = "sensitivity.json"


@dataclass
class DecisionSensitivity:
    """One decision's row: the loss change at each measured width."""

    name: str                 # w:<layer> or a:<first layer of the tie group>+N
    kind: str                 # "w" (weight) | "a" (input activation)
    layers: list[str]
    macs: int                 # MACs of its layers: what a bit of it costs
    widths: list[int]         # measured widths, ascending
    delta: list[float]        # mean loss change per width (math.inf: the loss was not finite)
    se: list[float | None]    # standard error of that mean (None: one batch, no estimate)

    def at(self, bits: int) -> float | None:
        """The loss change at ``bits`` (0 for float), None when not measured."""
        if bits == FLOAT_BITS:
            return 0.0
        return self.delta[self.widths.index(bits)] if bits in self.widths else None


@dataclass
class Sensitivity:
    """The diagnostic's result (``sensitivity.json``)."""

    source: str               # the space, or the user model
    weights: str              # where the weights came from (a run, the FP phase, as given)
    quantizer: str
    split: str
    batches: int
    batch_size: int
    baseline_loss: float      # all float, mean over the batches
    baseline_se: float | None  # s.e. of the float loss over the batches
    decisions: list[DecisionSensitivity]
    forward_passes: int
    wall_s: float
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def widths(self) -> list[int]:
        return sorted({b for d in self.decisions for b in d.widths})

    def noise(self) -> float | None:
        """The typical noise of a cell: the median s.e. over all measured cells."""
        ses = [s for d in self.decisions for s in d.se if s is not None]
        return statistics.median(ses) if ses else None

    def spread(self) -> list[dict[str, Any]]:
        """Per (kind, width): the least and the most sensitive decision, and ``p_alike``:
        the p-value of "every decision changes the loss equally at this width" (Cochran's Q,
        the cells weighted by 1/s.e.^2 and taken as independent; the shared batches make
        the cells positively correlated, which makes the test conservative). ``p_alike``
        >= 0.05: the decisions cannot be told apart at that width on these batches, so a
        per-layer choice has nothing to gain there. Unlike the largest minus the smallest
        cell, Q does not grow with the number of decisions under noise alone."""
        from scipy.stats import chi2

        out = []
        for kind in ("w", "a"):
            for b in self.widths:
                cells = [(d.at(b), d.se[d.widths.index(b)], d.name) for d in self.decisions
                         if d.kind == kind and b in d.widths]
                cells = [c for c in cells if math.isfinite(c[0])]
                if len(cells) < 2:
                    continue
                lo, hi = min(cells), max(cells)
                weighted = [(v, 1 / se ** 2) for v, se, _ in cells if se]
                p = None
                if len(weighted) >= 2:
                    mean = sum(v * w for v, w in weighted) / sum(w for _, w in weighted)
                    q = sum(w * (v - mean) ** 2 for v, w in weighted)
                    p = float(chi2.sf(q, len(weighted) - 1))
                out.append({"kind": kind, "bits": b, "min": lo[0], "min_decision": lo[2],
                            "max": hi[0], "max_decision": hi[2], "p_alike": p})
        return out

    def to_dict(self) -> dict[str, Any]:
        doc = {"schema": SCHEMA, **dataclasses.asdict(self)}
        for d in doc["decisions"]:       # JSON has no infinity: a non-finite loss is null
            d["delta"] = [v if math.isfinite(v) else None for v in d["delta"]]
        doc["noise"] = self.noise()
        doc["spread"] = self.spread()
        return doc

    @classmethod
    def from_dict(cls, doc: Any, where: str = FILE) -> "Sensitivity":
        if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA:
            raise CoqatError(f"{where} is not a coqat sensitivity table (schema {SCHEMA});"
                             " measure it again with coqat sensitivity")
        try:
            rows = [DecisionSensitivity(
                name=str(d["name"]), kind=str(d["kind"]), layers=[str(x) for x in d["layers"]],
                macs=int(d["macs"]), widths=[int(b) for b in d["widths"]],
                delta=[math.inf if v is None else float(v) for v in d["delta"]],
                se=[None if v is None else float(v) for v in d["se"]])
                for d in doc["decisions"]]
            names = {f.name for f in dataclasses.fields(cls)} - {"decisions"}
            out = cls(decisions=rows, **{k: doc[k] for k in names if k in doc})
        except (KeyError, TypeError, ValueError) as e:
            raise CoqatError(f"{where} is damaged ({type(e).__name__}: {e}); measure it again"
                             " with coqat sensitivity") from None
        if any(len(d.delta) != len(d.widths) or len(d.se) != len(d.widths) for d in rows):
            raise CoqatError(f"{where} is damaged (a row's widths and values differ in"
                             " length); measure it again with coqat sensitivity")
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        return cls.from_dict(read_json(path, "a sensitivity table",
                                       "measure it again with coqat sensitivity"), str(path))


# ----- measuring ---------------------------------------------------------------------------------
def check_widths(problem: SearchProblem, bits: Sequence[int] | None) -> list[int]:
    """The widths to measure: ``bits`` (each a candidate of some decision) or every
    candidate of the space; float is never measured (its change is 0 by definition)."""
    offered = sorted({b for d in problem.decisions for b in d.choices if b != FLOAT_BITS})
    if bits is None:
        return offered
    wanted = sorted(set(int(b) for b in bits))
    bad = [b for b in wanted if b not in offered]
    if bad or not wanted:
        w = sorted({b for d in problem.w_decisions for b in d.choices})
        a = sorted({b for d in problem.a_decisions for b in d.choices})
        what = f"width(s) {', '.join(map(str, bad))} are" if bad else "no width is"
        raise CoqatError(f"{what} not a candidate of this search space (weights {w},"
                         f" activations {a}); pick widths from those")
    return wanted


def _probe_problem(problem: SearchProblem) -> SearchProblem:
    """The problem with float added to every decision and no pins: the mixing layers can
    then hold every other tensor in float while one is quantized."""
    def wide(d: Decision) -> Decision:
        return dataclasses.replace(d, choices=tuple(sorted({*d.choices, FLOAT_BITS})))

    return dataclasses.replace(problem, pinned={},
                               w_decisions=[wide(d) for d in problem.w_decisions],
                               a_decisions=[wide(d) for d in problem.a_decisions],
                               layer_w={}, layer_a={})


def _one_hot(probe: SearchProblem, kind: str, index: int, bits: int) -> Assignment:
    """Every decision in float except decision ``index`` of ``kind`` at ``bits``."""
    w = [FLOAT_BITS] * len(probe.w_decisions)
    a = [FLOAT_BITS] * len(probe.a_decisions)
    (w if kind == "w" else a)[index] = bits
    return Assignment(tuple(w), tuple(a))


def _se(xs: Sequence[float]) -> float | None:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def _probe_model(model: nn.Module, problem: SearchProblem, bits: Sequence[int] | None,
                 batches: int, batch_size: int, device: torch.device | str):
    """Checked arguments and a copy of ``model`` with mixing layers for every decision
    (float added to each): (widths, device, probe problem, copy, FQN -> mixing layer)."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise CoqatError(f"batches must be an integer >= 1 (got {batches!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CoqatError(f"batch size must be an integer >= 1 (got {batch_size!r})")
    widths = check_widths(problem, bits)
    device = torch.device(device)
    probe = _probe_problem(problem)
    net = copy.deepcopy(model).to(device).eval()
    return widths, device, probe, net, to_search_model(net, probe, problem.quantizer)


def measure(model: nn.Module, problem: SearchProblem, workload: Workload, *,
            bits: Sequence[int] | None = None, batches: int = 8, batch_size: int = 32,
            device: torch.device | str = "cpu", split: str = "holdout",
            source: str = "", weights: str = "",
            on_cell: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Measure the table on ``model``'s current weights (the model itself is not changed:
    a copy is probed). ``bits``: the widths to measure (default: every candidate).
    ``on_cell(done, total)`` is called after each forward pass over the batches."""
    t0 = time.perf_counter()
    widths, device, probe, net, modules = _probe_model(model, problem, bits, batches,
                                                       batch_size, device)
    data = [to_device(workload.get_batch(split, i, batch_size), device) for i in range(batches)]

    def losses(asg: Assignment) -> list[float]:
        set_assignment(modules, probe, asg)
        with torch.no_grad(), autocast(device):
            return [float(workload.loss(net, b)) for b in data]

    cells = [(kind, i, d, [b for b in widths if b in d.choices])
             for kind, ds in (("w", problem.w_decisions), ("a", problem.a_decisions))
             for i, d in enumerate(ds)]
    total = 1 + sum(len(ws) for *_, ws in cells)
    base = losses(probe.extreme(max))             # every decision at 16 bits: all float
    if not all(math.isfinite(x) for x in base):
        raise CoqatError("the float model's loss on the holdout batches is not finite; check"
                         " the weights (train the model first) and the data")
    done = 1
    if on_cell is not None:
        on_cell(done, total)
    rows = []
    for kind, i, d, ws in cells:
        delta, se = [], []
        for b in ws:
            diffs = [q - f for q, f in zip(losses(_one_hot(probe, kind, i, b)), base)]
            finite = all(math.isfinite(x) for x in diffs)
            delta.append(statistics.fmean(diffs) if finite else math.inf)
            se.append(_se(diffs) if finite else None)
            done += 1
            if on_cell is not None:
                on_cell(done, total)
        rows.append(DecisionSensitivity(d.name, kind, list(d.layers),
                                        sum(problem.macs[n] for n in d.layers), ws, delta, se))
    return Sensitivity(source=source, weights=weights, quantizer=problem.quantizer,
                       split=split, batches=batches, batch_size=batch_size,
                       baseline_loss=statistics.fmean(base), baseline_se=_se(base),
                       decisions=rows, forward_passes=total,
                       wall_s=round(time.perf_counter() - t0, 2), device=str(device))


def estimate(model: nn.Module, problem: SearchProblem, workload: Workload, *,
             bits: Sequence[int] | None = None, batches: int = 8, batch_size: int = 32,
             device: torch.device | str = "cpu", split: str = "holdout",
             source: str = "", weights: str = "") -> Sensitivity:
    """The same table as ``measure``, estimated to second order from gradients instead of
    measured by forward passes (the Fisher estimate; ``coqat sensitivity --estimate fisher``).

    For a tensor T (a weight, or a tie group's shared input on a batch) quantized at b bits,
    with e = Q_b(T) - T the perturbation the layer sees (rotated, quantized, rotated back:
    ``quant_error``) and g the gradient of the batch's mean loss with respect to T, all float:

        delta ~= 1/2 * N * sum(g^2 * e^2)

    the loss Hessian replaced by its diagonal empirical Fisher, N * g^2 for a batch whose
    loss is the mean of N terms (a batch-mean gradient has 1/N of the per-term variance; N
    is ``batch_items``: the targets of a classifier, the tokens of a language model, whose
    terms are not independent, so there the scale is approximate). The first-order term
    is left out (zero in expectation at a trained point). Unlike a measured cell it cannot be
    negative and it grows as b falls, and it costs one forward and backward pass per batch
    however many decisions and widths there are. ``se`` is the standard error over the
    batches. It is an estimate of the measured table, not the same number: compare them
    with ``coqat sensitivity`` before trusting either for a search.
    """
    t0 = time.perf_counter()
    widths, device, probe, net, modules = _probe_model(model, problem, bits, batches,
                                                       batch_size, device)
    for prm in net.parameters():
        prm.requires_grad_(True)
    set_assignment(modules, probe, probe.extreme(max))            # all float
    w_cells = [(i, d, [b for b in widths if b in d.choices])
               for i, d in enumerate(problem.w_decisions)]
    a_cells = [(i, d, [b for b in widths if b in d.choices])
               for i, d in enumerate(problem.a_decisions)]
    # weight perturbations do not depend on the batch: computed once
    w_err = {(i, b): [modules[n].quant_error("w", modules[n].w_choices.index(b),
                                             modules[n].weight.detach()) for n in d.layers]
             for i, d, ws in w_cells for b in ws}
    w_vals: dict[tuple[int, int], list[float]] = {k: [] for k in w_err}
    a_vals: dict[tuple[int, int], list[float]] = {(i, b): [] for i, d, ws in a_cells for b in ws}
    losses = []
    for k in range(batches):
        batch = to_device(workload.get_batch(split, k, batch_size), device)
        n_samples = max(1, batch_items(batch))
        inputs: dict[str, torch.Tensor] = {}
        handles = []
        for i, d, ws in a_cells:     # the group's shared input, as its first layer receives it
            def keep(mod, args, _name=d.layers[0]):
                x = args[0]
                if not x.requires_grad:          # the model's own input: a leaf of its own
                    x = x.detach().requires_grad_(True)
                    args = (x, *args[1:])
                x.retain_grad()
                inputs[_name] = x
                return args
            handles.append(modules[d.layers[0]].register_forward_pre_hook(keep))
        net.zero_grad(set_to_none=True)
        try:
            loss = workload.loss(net, batch)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise CoqatError("the float model's loss on the holdout batches is not finite;"
                             " check the weights (train the model first) and the data")
        with torch.no_grad():
            for (i, b), errs in w_err.items():
                d = problem.w_decisions[i]
                total = sum(float((modules[n].weight.grad.float() ** 2
                                   * e.float() ** 2).sum()) for n, e in zip(d.layers, errs))
                w_vals[(i, b)].append(0.5 * n_samples * total)
            for i, d, ws in a_cells:
                m = modules[d.layers[0]]
                x = inputs[d.layers[0]]
                g2 = x.grad.float() ** 2
                for b in ws:
                    e = m.quant_error("a", m.a_choices.index(b), x.detach())
                    a_vals[(i, b)].append(0.5 * n_samples * float((g2 * e.float() ** 2).sum()))
    rows = []
    for kind, cells, vals in (("w", w_cells, w_vals), ("a", a_cells, a_vals)):
        for i, d, ws in cells:
            rows.append(DecisionSensitivity(
                d.name, kind, list(d.layers), sum(problem.macs[n] for n in d.layers), ws,
                [statistics.fmean(vals[(i, b)]) for b in ws],
                [_se(vals[(i, b)]) for b in ws]))
    return Sensitivity(source=source, weights=weights, quantizer=problem.quantizer,
                       split=split, batches=batches, batch_size=batch_size,
                       baseline_loss=statistics.fmean(losses), baseline_se=_se(losses),
                       decisions=rows, forward_passes=batches,
                       wall_s=round(time.perf_counter() - t0, 2), device=str(device),
                       notes=["Fisher estimate: 1/2 N sum(g^2 e^2) per tensor, one forward and"
                              " backward pass per batch (not measured loss changes)"])


def table(how: str, model: nn.Module, problem: SearchProblem, workload: Workload,
          on_cell: Callable[[int, int], None] | None = None, **kw: Any) -> Sensitivity:
    """The table ``how`` says (one of ``ESTIMATES``): ``measure`` or ``estimate``, with the
    same keyword arguments (``on_cell`` reports the measured cells only)."""
    if how == "fisher":
        return estimate(model, problem, workload, **kw)
    return measure(model, problem, workload, on_cell=on_cell, **kw)


def cache_name(problem: SearchProblem, batches: int, batch_size: int,
               device: torch.device | str, how: str = "measured") -> str:
    """The file name of ``problem``'s table in a cached FP phase's directory: it names what
    the table depends on besides the weights (decisions and their widths, quantizer, batches,
    device type), so a search of another space or another proxy never reads it."""
    doc = {"schema": SCHEMA, "estimate": how, "quantizer": problem.quantizer,
           "batches": batches, "batch_size": batch_size, "device": torch.device(device).type,
           "decisions": [[d.name, list(d.layers), list(d.choices)] for d in problem.decisions]}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return f"sensitivity-{key}.json"


# ----- the FP phase the search caches ----------------------------------------------------------
def fp_job(config: RunConfig) -> SearchJob:
    """A job whose FP phase is exactly the one ``coqat search`` trains and caches for this
    space, seed and settings (same cache key), so measuring first and searching later train
    it once. It has no budget of its own: it carries the dearest configuration's BOPs."""
    fp_steps, search_steps = config.search.resolved_steps(config.train.steps)
    prep = runner.prepare(config.fp_phase(fp_steps), bits="fp")
    problem = SearchProblem.build(prep.resolved, prep.cost, config.train.quantizer)
    dearest = problem.bops(problem.extreme(max))
    return SearchJob(config, "sensitivity", Budget(str(dearest), dearest), problem, prep,
                     fp_steps, search_steps)


# ----- the table as knapsack values ------------------------------------------------------------
def monotone_row(bits: Sequence[int], delta: Sequence[float]) -> list[float]:
    """A row's loss changes made non-negative and non-increasing in bits (same order).

    A measured cell is a float model with ONE tensor quantized, so a change below zero, or
    below the change at fewer bits, is measurement noise (quantizing a tensor does not make
    the float model better, and more bits do not make it worse). Left in, the knapsack buys
    that noise: it picks the cells that happen to read lowest (on MiniLM 38-45% of the cells
    at 3-4 bits read < 0), and at a budget that every top width fits it drops bits for
    nothing (on SmolLM2 at w8a8 the raw table's config is 0.0015 nats worse than uniform
    w8a8 after QAT, 6 of 6 seeds). The fix is the least-squares non-increasing fit
    (pool-adjacent-violators over the widths, equal weights; a non-finite cell pools to
    inf), then clipped at 0. With it, a budget that fits every decision's widest choice
    gets exactly that config (the knapsack breaks ties towards the dearer config).
    """
    order = sorted(range(len(bits)), key=lambda i: -bits[i])   # widest first
    blocks: list[tuple[float, int]] = []                        # (sum, count) per pooled block
    for i in order:
        blocks.append((float(delta[i]), 1))
        # widest first, the changes must not decrease: pool a block that falls below the last
        while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] < blocks[-2][0] / blocks[-2][1]:
            (t2, n2), (t1, n1) = blocks.pop(), blocks.pop()
            blocks.append((t1 + t2, n1 + n2))
    fitted = [max(0.0, t / n) for t, n in blocks for _ in range(n)]
    out = [0.0] * len(bits)
    for i, v in zip(order, fitted):
        out[i] = v
    return out


def values(table: Sensitivity, problem: SearchProblem, clean: str = "none"
           ) -> tuple[list[list[float]], list[list[float]]]:
    """Knapsack values per choice: minus the measured loss change (float: 0; a non-finite
    loss: -inf, never chosen); ``clean="monotone"`` reads each row through ``monotone_row``
    first. CoqatError if the table lacks a choice of the problem."""
    if clean not in SENSITIVITY_CLEAN:
        raise CoqatError(f"clean must be {' or '.join(SENSITIVITY_CLEAN)} (got {clean!r})")
    rows = {d.name: d for d in table.decisions}

    def row_values(d: Decision) -> list[float]:
        r = rows.get(d.name)
        out = []
        for b in d.choices:
            v = None if r is None else r.at(b)
            if v is None:
                raise CoqatError(f"the sensitivity table has no value for {d.name} at {b} bits;"
                                 " measure every width of the space")
            out.append(v)
        if clean == "monotone":
            out = monotone_row(d.choices, out)
        return [-v for v in out]

    return ([row_values(d) for d in problem.w_decisions],
            [row_values(d) for d in problem.a_decisions])


def knapsack(table: Sensitivity, problem: SearchProblem, budget: int, fill: float,
             clean: str = "monotone") -> RepairResult:
    """What ``--method sensitivity`` picks from ``table``: the config of least predicted loss
    change (rows read per ``clean``) with ``fill * budget <= BOPs <= budget`` on the
    searchable part (``fill_floor``), found by the exact knapsack ``repair``."""
    return repair(problem, *values(table, problem, clean), budget,
                  lo=fill_floor(problem, budget, fill))


def predicted_delta(table: Sensitivity, problem: SearchProblem, asg: Assignment,
                    clean: str = "none") -> float:
    """The loss change the table predicts for ``asg``: the sum of its decisions' changes
    (read through ``monotone_row`` with ``clean="monotone"``)."""
    return -total_value(problem, asg, *values(table, problem, clean))
