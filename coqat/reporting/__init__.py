"""Reading finished runs back: Pareto fronts, paired statistics, terminal and HTML reports.

Reports only read what runs and sweeps wrote (``RunRecord``, ``BitConfig``, the search
trace); they never recompute a cost.
"""
