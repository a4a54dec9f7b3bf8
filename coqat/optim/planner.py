"""Compute-optimal split of a token budget between full-precision training and QAT.

From the compute-optimal QAT study (Dremov et al., arXiv 2509.22935; facts in
reference/co_qat.md): with S = D_total / (N * B / 8) the tokens per byte of quantized
parameters, the loss-optimal share of the budget spent in QAT is predicted as

    f = exp(-a / ln S),    a = 6.7297,

clipped to [0, 1]. The fit covers S from about 10 to 1e5 (the study's runs); outside that
range the prediction is an extrapolation and ``QatPlan.in_fitted_range`` says so. For
S <= 1 (fewer tokens than parameter bytes) ln S <= 0 and the formula has no meaning; we
return f = 0, the limit from above.

For mixed precision, B is the parameter-weighted mean weight bit width (coqat's extension;
the study validated one bit width per run, weight-only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from coqat.errors import CoqatError

QAT_FRACTION_A = 6.7297
FITTED_S_RANGE = (10.0, 1e5)


@dataclass(frozen=True)
class QatPlan:
    tokens: float
    params: float
    bits: float
    tokens_per_param_byte: float
    qat_fraction: float
    fp_tokens: float
    qat_tokens: float

    @property
    def in_fitted_range(self) -> bool:
        lo, hi = FITTED_S_RANGE
        return lo <= self.tokens_per_param_byte <= hi

    @property
    def note(self) -> str | None:
        """Why the prediction should not be trusted as is (None inside the fitted range)."""
        s, (lo, hi) = self.tokens_per_param_byte, FITTED_S_RANGE
        if s <= 1.0:
            return (f"S = {s:.3g} <= 1 (fewer tokens than parameter bytes): the formula does"
                    " not apply; QAT fraction set to 0, the limit from above")
        if s < lo:
            return f"S = {s:.3g} is below the fitted range ({lo:g}..{hi:g}): an extrapolation"
        if s > hi:
            return f"S = {s:.3g} is above the fitted range ({lo:g}..{hi:g}): an extrapolation"
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in_fitted_range"] = self.in_fitted_range
        d["note"] = self.note
        d["formula"] = f"f = exp(-{QAT_FRACTION_A} / ln S), S = D / (N*B/8)"
        return d


def tokens_per_param_byte(tokens: float, params: float, bits: float) -> float:
    """S = D / (N * B / 8): training tokens per byte of quantized weights."""
    if not all(math.isfinite(v) and v > 0 for v in (tokens, params, bits)):
        raise CoqatError(f"tokens ({tokens}), params ({params}) and bits ({bits}) must be"
                         " positive finite numbers")
    return tokens / (params * bits / 8.0)


def predict_qat_fraction(tokens: float, params: float, bits: float) -> float:
    """The predicted loss-optimal share of ``tokens`` to spend in QAT, in [0, 1]."""
    s = tokens_per_param_byte(tokens, params, bits)
    if s <= 1.0:
        return 0.0
    return min(1.0, max(0.0, math.exp(-QAT_FRACTION_A / math.log(s))))


def plan(tokens: float, params: float, bits: float) -> QatPlan:
    f = predict_qat_fraction(tokens, params, bits)
    return QatPlan(tokens=tokens, params=params, bits=bits,
                   tokens_per_param_byte=tokens_per_param_byte(tokens, params, bits),
                   qat_fraction=f, fp_tokens=tokens * (1 - f), qat_tokens=tokens * f)
