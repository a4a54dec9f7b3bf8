"""Gumbel-softmax bit-width search under a BOPs budget (Lagrangian), budget repair, baselines."""
