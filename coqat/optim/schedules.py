"""Learning-rate and phase schedules: warm-up / stable / decay (WSD), FP phase -> QAT phase.

A run of ``total_steps`` has an optional full-precision (FP) phase followed by a QAT phase
that starts at ``qat_start``. Two shapes (compute-optimal QAT study, co_qat.md section 6):

fused (cool-down fused with QAT)::

    LR  /‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\
       warm-up      stable        decay (= the whole QAT phase, no re-warm-up)
       |---------- FP ----------|------- QAT -------|

unfused (FP cool-down, then QAT with its own warm-up and decay)::

    LR  /‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\__ /‾‾‾‾‾‾‾‾\\
       |------ FP --------|--- QAT ----|

An FP-only run (no QAT) and a QAT-only run (qat_start == 0: from scratch, or from trained
weights with init_from) are both plain WSD.
The decay is linear down to ``min_lr_ratio``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.1
    qat_start: int | None = None      # None: no QAT phase at all
    fused: bool = True

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError("total_steps must be positive")
        if self.qat_start is not None and not 0 <= self.qat_start <= self.total_steps:
            raise ValueError("qat_start must lie in [0, total_steps]")

    # ----- phases ---------------------------------------------------------------------
    def phase(self, step: int) -> str:
        """'fp' or 'qat' for the optimizer step with index ``step`` (0-based)."""
        if self.qat_start is None or step < self.qat_start:
            return "fp"
        return "qat"

    @property
    def qat_steps(self) -> int:
        return 0 if self.qat_start is None else self.total_steps - self.qat_start

    # ----- learning rate ----------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
        T = self.total_steps
        if self.qat_start is None or self.qat_start == 0 or self.qat_start >= T:
            return _wsd(step, 0, T, self.warmup_steps, self._decay_len(T), self.min_lr_ratio)
        if self.fused:
            # decay starts exactly where QAT starts, runs to the end; warm-up only at the start
            decay_len = T - max(self.qat_start, self.warmup_steps)
            return _wsd(step, 0, T, self.warmup_steps, decay_len, self.min_lr_ratio)
        if step < self.qat_start:
            L = self.qat_start
            return _wsd(step, 0, L, self.warmup_steps, self._decay_len(L), self.min_lr_ratio)
        L = T - self.qat_start
        warm = min(self.warmup_steps, max(0, L // 10)) if L > 1 else 0
        return _wsd(step, self.qat_start, L, warm, self._decay_len(L), self.min_lr_ratio)

    def lr(self, step: int, peak: float) -> float:
        """The learning rate of optimizer step ``step``: what the training loop sets and
        what CAGE's pull integral sums."""
        return peak * self.lr_factor(step)

    def _decay_len(self, length: int) -> int:
        return int(round(self.decay_frac * length))

    def describe(self) -> dict:
        d = asdict(self)
        d["qat_steps"] = self.qat_steps
        d["shape"] = ("fp-only" if self.qat_start is None else
                      "qat-only" if self.qat_start == 0 else
                      "fused" if self.fused else "unfused")
        return d


def _wsd(step: int, start: int, length: int, warmup: int, decay: int, floor: float) -> float:
    """Warm-up (linear from ~0), stable at 1, linear decay to ``floor`` over the last
    ``decay`` steps of the window [start, start + length)."""
    i = step - start
    warmup = min(warmup, length)
    decay = min(decay, length - warmup)
    if i < warmup:
        return (i + 1) / warmup
    decay_start = length - decay
    if i < decay_start or decay <= 0:
        return 1.0
    progress = (i - decay_start + 1) / decay
    return 1.0 - (1.0 - floor) * min(1.0, progress)
