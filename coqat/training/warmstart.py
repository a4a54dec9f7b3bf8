"""Warm starts: a new run whose model starts from another run's trained float weights.

``Runtime.init_from`` (``coqat train/search --init-from RUN``) names a finished float run
(``coqat train --bits fp``, or a search's cached FP phase). The new run builds its model as
usual, then loads that run's final weights (``model.safetensors``) into it; the optimizer,
schedule and data order are the new run's own. This is QAT of an already trained model,
the pretrained setting in which mixed precision is known to pay (reference regimes.md):

    coqat train --bits fp --out runs --name trunk                  # train the FP model once
    coqat train --bits w2a4 --init-from runs/trunk --steps 500     # QAT from it
    coqat search --budget wa9 --method sensitivity --init-from runs/trunk --steps 500

With ``qat_fraction = "auto"`` a warm-started quantized run is QAT for all its steps (the
compute-optimal split assumes training from scratch; here the FP phase is already done).
In a search the given run *is* the FP phase: the search reads it instead of training or
reusing a cached one, and the chosen config's QAT (and every baseline's) starts from it,
so all of a budget's arms share one trained model.

Only weights are read (safetensors: no code), and only from the directory named in this
invocation or recorded by the run being resumed. The run records where its weights came
from and their SHA-256 (``config.json`` -> ``init``); resuming refuses weights that changed.
Unlike a branch, nothing else of the source run carries over, so any settings may differ,
but the model must be the same (every tensor name and shape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.rundir import CONFIG, WEIGHTS, RunDir
from coqat.util import sha256_file

__all__ = ["load_initial_weights"]


def load_initial_weights(path: str | Path, model: nn.Module,
                         expect_sha256: str | None = None) -> dict[str, Any]:
    """Load the final weights of the float run at ``path`` into ``model`` and return the
    ``init`` record of config.json: {"from", "weights_sha256", "metric_name", "metric"}.
    One-line CoqatError when the run is unfinished, quantized, damaged or of another model,
    or (``expect_sha256``, a resumed run) when its weights are not the ones it started from."""
    run = RunDir.open(path)
    where = f"--init-from {run.path}"
    if not run.finished:
        raise CoqatError(f"{where}: the run has not finished; finish it first (coqat train"
                         f" --resume {run.path})")
    bits = run.read_json(CONFIG).get("bits")
    if bits != "fp":
        raise CoqatError(f"{where}: a quantized run ({bits}); start from a float run"
                         " (coqat train --bits fp), whose weights are the trained FP model")
    sha = sha256_file(run.file(WEIGHTS)) if run.has(WEIGHTS) else None
    if expect_sha256 is not None and sha != expect_sha256:
        raise CoqatError(f"{where}: its {WEIGHTS} is not the one this run started from"
                         f" (SHA-256 {str(sha)[:12]}, recorded {expect_sha256[:12]}); restore"
                         " it, or start a new run")
    weights = run.load_weights()
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    extra = [k for k in weights if k not in mine]
    if missing or extra:
        k, side = (missing[0], "lacks") if missing else (extra[0], "has an extra")
        raise CoqatError(f"{where}: its weights are of another model: it {side} tensor {k!r}"
                         f" ({len(missing)} missing, {len(extra)} extra); start from a run"
                         " of this model")
    for k, v in mine.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CoqatError(f"{where}: its weights are of another model: {k!r} is"
                             f" {tuple(weights[k].shape)} there, {tuple(v.shape)} here;"
                             " start from a run of this model")
    model.load_state_dict(weights)
    rec = RunRecord.read(run)
    return {"from": str(run.path), "weights_sha256": sha, "metric_name": rec.metric_name,
            "metric": rec.metric}
