"""Run directories, Pareto fronts, terminal and HTML reports."""

from coqat.report.rundir import RunDir

__all__ = ["RunDir"]
