"""Search settings: the keys of a space's ``[search]`` table that drive the search engine.

Example (every key optional; the values shown are the defaults)::

    [search]
    fp_steps = 400            # FP phase (cached per space+seed+settings); default: [train] steps
    search_steps = 200        # weight steps of the search phase; default: half of [train] steps
    weight_lr_scale = 0.1     # weight LR during the search, as a share of [train] lr (constant)
    arch_lr = 0.1             # SGD learning rate of the logits (on normalised gradients)
    arch_momentum = 0.0       # SGD momentum of the logits
    arch_every = 2            # one architecture step (on the holdout split) every N weight steps
    arch_batch_size = 8       # holdout batch of an arch step; default: half the [train] batch
                              # (keeps a search step <= 1.5 x a QAT step, see benchmarks/)
    relax = "soft"            # "soft" Gumbel-softmax mixing, or "hard" (straight-through)
    tau_start = 1.0           # Gumbel-softmax temperature, annealed exponentially ...
    tau_end = 0.1             # ... from tau_start at the first to tau_end at the last arch step
    eta_mu = 0.2              # dual ascent rate of the Lagrange multiplier mu
    mu_init = 0.0             # starting mu
    init = "budget"           # start logits with E[BOPs] = budget ("uniform": all zero)
    fill = 0.97               # repair: use at least this share of the budget's searchable part
    trace_every = 5           # per-decision probabilities in the trace every N arch steps
    proxy_batches = 2         # Optuna/random proxy: holdout batches per evaluated config
    optuna_trials = 0         # cap on Optuna trials (0: no cap, only the time limit)
    optuna_seconds = 0.0      # Optuna's wall-clock (0: the Gumbel search's, measured)

Why these choices: see ``coqat.search.gumbel`` (SGD for the logits so that mu's scale reaches
the bits; a normalised constraint so that eta_mu means the same on every model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from coqat.config import SearchSpace
from coqat.errors import CoqatError

RELAX_MODES = ("soft", "hard")
INIT_MODES = ("budget", "uniform")


@dataclass
class SearchSettings:
    fp_steps: int | None = None
    search_steps: int | None = None
    weight_lr_scale: float = 0.1
    arch_lr: float = 0.1
    arch_momentum: float = 0.0
    arch_every: int = 2
    arch_batch_size: int | None = None
    relax: str = "soft"
    tau_start: float = 1.0
    tau_end: float = 0.1
    eta_mu: float = 0.2
    mu_init: float = 0.0
    init: str = "budget"
    fill: float = 0.97
    trace_every: int = 5
    proxy_batches: int = 2
    optuna_trials: int = 0
    optuna_seconds: float = 0.0

    def validate(self, where: str = "[search]") -> "SearchSettings":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CoqatError(f"{where}: {msg}")

        def pos_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero
                                                                     else v > 0)
            need(ok, f"{name} must be a {'non-negative' if allow_zero else 'positive'}"
                     f" integer (got {v!r})")

        for name in ("fp_steps", "search_steps", "arch_batch_size"):
            pos_int(name, allow_none=True)
        for name in ("arch_every", "trace_every", "proxy_batches"):
            pos_int(name)
        pos_int("optuna_trials", allow_zero=True)
        for name in ("weight_lr_scale", "arch_lr", "tau_start", "tau_end", "eta_mu"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a number > 0 (got {v!r})")
        need(0 <= self.arch_momentum < 1, f"arch_momentum must be in [0, 1) (got "
                                          f"{self.arch_momentum!r})")
        need(self.mu_init >= 0, f"mu_init must be >= 0 (got {self.mu_init!r})")
        need(0 <= self.fill <= 1, f"fill must be in [0, 1] (got {self.fill!r})")
        need(self.optuna_seconds >= 0, "optuna_seconds must be >= 0")
        need(self.relax in RELAX_MODES,
             f"relax must be {' or '.join(RELAX_MODES)} (got {self.relax!r})")
        need(self.tau_end <= self.tau_start, "tau_end must not exceed tau_start")
        need(self.init in INIT_MODES,
             f"init must be {' or '.join(INIT_MODES)} (got {self.init!r})")
        return self

    def replace(self, **changes: Any) -> "SearchSettings":
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes).validate("options")

    def resolved_arch_batch(self, train_batch: int) -> int:
        """The holdout batch of an architecture step (default: half the train batch)."""
        return self.arch_batch_size or max(1, train_batch // 2)

    def resolved_steps(self, train_steps: int) -> tuple[int, int]:
        """(fp_steps, search_steps) with the defaults filled in from [train] steps."""
        fp = self.fp_steps if self.fp_steps is not None else train_steps
        search = self.search_steps if self.search_steps is not None else max(1, train_steps // 2)
        return fp, search


def parse_search_settings(space: SearchSpace | Mapping[str, Any]) -> SearchSettings:
    """The search settings of a space (its leftover ``[search]`` keys), validated."""
    table = space.search if isinstance(space, SearchSpace) else dict(space)
    where = f"{space.path or space.name} [search]" if isinstance(space, SearchSpace) else \
        "[search]"
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise CoqatError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: layers,"
                         f" pinned, ties, {', '.join(sorted(fields))}")
    try:
        return SearchSettings(**table).validate(where)
    except TypeError as e:  # pragma: no cover - unknown keys are caught above
        raise CoqatError(f"{where}: {e}") from None
