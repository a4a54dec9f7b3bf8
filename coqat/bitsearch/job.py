"""A search job: everything a search method needs, validated before any file is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from coqat.config import RunConfig, SearchSettings
from coqat.cost import Budget
from coqat.bitsearch.problem import Assignment, SearchProblem
from coqat.rundir import RunDir
from coqat.training.runner import Prepared

__all__ = ["SearchJob", "SearchContext", "Choice"]


@dataclass
class SearchJob:
    """One (budget, method) search of one space and seed."""

    config: RunConfig                 # final QAT settings, search settings, runtime
    method: str
    budget: Budget
    problem: SearchProblem
    fp_prep: Prepared                 # FP phase: fresh model, cost, resolved space, workload
    fp_steps: int
    search_steps: int
    target: str | None = None

    @property
    def settings(self) -> SearchSettings:
        return self.config.search

    @property
    def seed(self) -> int:
        return self.config.runtime.seed


@dataclass
class SearchContext:
    """Where a method reports while it runs, and its time box."""

    trace: Callable[[dict[str, Any]], None]   # one JSON line of search/trace.jsonl
    say: Callable[[str], None]                # one-line phase notes for people
    seconds: float | None = None              # time limit of time-boxed methods (Optuna)
    run: RunDir | None = None                 # the search's run directory (files under search/)
    fp_dir: Path | None = None                # the cached FP phase the weights came from


@dataclass
class Choice:
    """A method's answer: the configuration (meets the budget) and notes on how it was
    found (the ``SearchRecord`` phase fields: repair, uniform, optuna, mu_final, ...)."""

    assignment: Assignment
    info: dict[str, Any]
