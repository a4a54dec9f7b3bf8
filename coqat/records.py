"""Typed records of what a run produced: ``final.json`` and the search summary.

``RunRecord`` is the only reader and writer of a run's ``final.json``; ``SearchRecord`` is
the part a search adds (budget, achieved BOPs, how the configuration was chosen). Every
command returns these records and every report reads them, so a field has one name and
one meaning everywhere::

    rec = RunRecord.read(run)            # run: a RunDir
    rec.metric, rec.bops, rec.method
    rec.search.achieved_over_budget      # None for a plain `coqat train` run

On disk ``final.json`` stays one flat JSON object (the search fields beside the training
ones), as earlier versions wrote it; files written before ``method`` was recorded get it
derived once, here, from their bits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from coqat.errors import CoqatError
from coqat.rundir import FINAL, RunDir

__all__ = ["CageRecord", "RunRecord", "SearchRecord", "METHOD_FP", "METHOD_TRAIN",
           "METHOD_UNIFORM"]

#: ``method`` of runs that were not searched: a float run, a uniform wNaM run, a run of a
#: given bitconfig.json
METHOD_FP, METHOD_UNIFORM, METHOD_TRAIN = "fp", "uniform", "train"


@dataclass
class SearchRecord:
    """How a search chose its configuration and what it achieved against the budget."""

    method: str                        # gumbel | optuna | random | uniform | ...
    budget_expr: str
    budget_bops: int
    achieved_bops: int
    achieved_over_budget: float
    fixed_bops: int                    # BOPs no decision can change (pinned, attention)
    searchable_budget_bops: int        # budget_bops - fixed_bops
    searchable_over_budget: float
    fill_floor_bops: int
    bits_histogram: dict[str, int]
    assignment: dict[str, list[int]]
    target: str | None = None
    # phase notes; absent (None) when the method has no such phase
    search_wall_s: float | None = None
    search_phase_wall_s: float | None = None
    repair: dict[str, Any] | None = None
    uniform: str | None = None
    fp_phase: dict[str, Any] | None = None
    optuna: dict[str, Any] | None = None
    mu_final: float | None = None
    arch_steps: int | None = None
    # the searchable layers' MAC-weighted mean w_bits*a_bits: achieved, and what the budget
    # allows them (the budget on the searchable layers, the EdMIPS convention; ``waX``)
    mean_wa: float | None = None
    budget_mean_wa: float | None = None

    _REQUIRED = ("method", "budget_expr", "budget_bops", "achieved_bops")

    def to_dict(self) -> dict[str, Any]:
        """Flat fields; optional phase notes only where present."""
        d = dataclasses.asdict(self)
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        return {k: v for k, v in d.items() if not (k in optional and v is None and
                                                   k != "target")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchRecord | None":
        """The search fields of a flat ``final.json``; None when the run was not searched."""
        if not all(k in d for k in cls._REQUIRED):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("achieved_over_budget", d["achieved_bops"] / max(1, d["budget_bops"]))
        for k in ("fixed_bops", "searchable_budget_bops", "fill_floor_bops"):
            kw.setdefault(k, 0)
        kw.setdefault("searchable_over_budget", math.nan)
        kw.setdefault("bits_histogram", {})
        kw.setdefault("assignment", {})
        return cls(**kw)


@dataclass
class CageRecord:
    """The CAGE term a run applied: ``lam`` as used (derived from ``pull`` when the run was
    given a pull integral), its ramp and the per-layer ``scale`` (coqat.optim.cage)."""

    mode: str                          # decoupled | coupled
    lam: float
    silence: float
    schedule: str                      # linear | constant
    qat_start: int
    qat_steps: int
    scale: str = "none"                # none | step
    pull: float | None = None          # the pull integral lam was derived from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CageRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunRecord:
    """A finished run (``final.json``): its metric, its compute and how it was made."""

    metric_name: str
    metric: float | None               # None: a search stopped before the final QAT
    higher_is_better: bool
    bits: str                          # fp | w4a4 | mixed
    bops: int
    space: str
    seed: int
    method: str                        # fp | uniform | train | a search method
    fp32_bops: int = 0
    bops_fraction_of_fp32: float | None = None
    steps: int = 0
    qat_steps: int = 0
    workload: str = ""
    schedule: str = ""
    wall_s: float = 0.0
    eval: dict[str, Any] = field(default_factory=dict)
    budget_bops: int | None = None
    resumed: bool | None = None
    final_qat: bool = True
    run_dir: str | None = None
    search: SearchRecord | None = None
    #: the run stopped after this many of its ``steps`` (a trunk for branches)
    stopped_at: int | None = None
    #: the run this one branched from, and the step it branched at
    branch_of: str | None = None
    branch_step: int | None = None
    cage: CageRecord | None = None

    # ----- derived ---------------------------------------------------------------------------
    @property
    def budget_expr(self) -> str | None:
        return self.search.budget_expr if self.search else None

    @property
    def gbops(self) -> float:
        return self.bops / 1e9

    # ----- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat ``final.json`` object (search fields beside the training ones)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "search"}
        for k in ("budget_bops", "resumed", "run_dir", "bops_fraction_of_fp32", "stopped_at",
                  "branch_of", "branch_step", "cage"):
            if d[k] is None:
                del d[k]
        if self.cage is not None:
            d["cage"] = self.cage.to_dict()
        if self.final_qat:
            del d["final_qat"]
        if self.search is not None:
            d.update(self.search.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = FINAL) -> "RunRecord":
        """Parse a ``final.json`` object; a damaged one is a one-line error naming it."""
        if not isinstance(d, Mapping):
            raise CoqatError(f"{source} is not a JSON object; the run directory is damaged"
                             " (rerun it, or resume it with coqat train --resume)")
        try:
            search = SearchRecord.from_dict(d)
            rec = cls(
                metric_name=str(d["metric_name"]),
                metric=None if d.get("metric") is None else _finite(d["metric"], "metric"),
                higher_is_better=bool(d.get("higher_is_better", False)),
                bits=str(d.get("bits", "?")),
                bops=_int(d["bops"], "bops"),
                space=str(d.get("space", "?")),
                seed=_int(d.get("seed", 0), "seed"),
                method=str(d.get("method") or (search.method if search else
                                               _legacy_method(d.get("bits")))),
                fp32_bops=_int(d.get("fp32_bops", 0), "fp32_bops"),
                bops_fraction_of_fp32=d.get("bops_fraction_of_fp32"),
                steps=_int(d.get("steps", 0), "steps"),
                qat_steps=_int(d.get("qat_steps", 0), "qat_steps"),
                workload=str(d.get("workload", "")),
                schedule=str(d.get("schedule", "")),
                wall_s=float(d.get("wall_s", 0.0)),
                eval=dict(d.get("eval") or {}),
                budget_bops=None if d.get("budget_bops") is None else _int(d["budget_bops"],
                                                                           "budget_bops"),
                resumed=d.get("resumed"),
                final_qat=bool(d.get("final_qat", True)),
                run_dir=d.get("run_dir"),
                search=search,
                stopped_at=None if d.get("stopped_at") is None else _int(d["stopped_at"],
                                                                         "stopped_at"),
                branch_of=d.get("branch_of"),
                branch_step=None if d.get("branch_step") is None else _int(d["branch_step"],
                                                                           "branch_step"),
                cage=CageRecord.from_dict(d["cage"]) if isinstance(d.get("cage"), Mapping)
                else None,
            )
        except KeyError as e:
            raise CoqatError(f"{source} lacks the field {e.args[0]!r}; the run directory is"
                             " damaged or was not written by coqat") from None
        except (TypeError, ValueError) as e:
            raise CoqatError(f"{source} has a malformed field ({e}); the run directory is"
                             " damaged") from None
        return rec

    def write(self, run: RunDir) -> None:
        run.write_json(FINAL, self.to_dict())

    @classmethod
    def read(cls, run: RunDir) -> "RunRecord":
        return cls.from_dict(run.read_json(FINAL), source=str(run.file(FINAL)))


def _legacy_method(bits: Any) -> str:
    """``method`` of a final.json written before it was recorded."""
    if bits == "fp":
        return METHOD_FP
    return METHOD_TRAIN if bits in (None, "mixed") else METHOD_UNIFORM


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} = {v!r} is not a number")
    return int(v)


def _finite(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} = {v!r} is not a number")
    return float(v)
