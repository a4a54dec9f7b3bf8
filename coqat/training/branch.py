"""Branching: a new run that starts from another run's checkpoint.

A *trunk* is an ordinary run told to stop early (``Runtime.stop_at``, ``coqat train
--stop-at N``): its schedules (LR, QAT phase, CAGE ramp) still span all its ``steps``, it
evaluates and saves its checkpoint at step N and records ``stopped_at = N``. A *branch*
(``Runtime.branch_from``, ``coqat train --branch-from TRUNK``) is a new run directory whose
training starts from that checkpoint: model, optimizer state and torch's RNG states; the
data position is the step itself (batches are a function of the seed and the step). It
runs to the end of the schedule, so a branch with the parent's own options ends exactly
where the uninterrupted run would have, bit for bit.

Only the options in ``coqat.config.BRANCH_FREE_SETTINGS`` (optimizer, the CAGE settings)
may differ from the parent's, and only so far as the branch's CAGE term is identical to the
parent's before the branch step (for a QuEST trunk: silent there). Everything that shapes
the trajectory up to the branch step (space and model, data, seed, steps, bits, batch, LR
schedule, quantizer, evaluation) must equal the parent's; otherwise the branch is refused
before anything is written. The parent must have finished (stopped at its ``stop_at``):
the checkpoint of a run still training moves under the branch. The branch records its parent and the step
(``config.json`` -> ``branch``, ``final.json`` -> ``branch_of`` / ``branch_step``), and
needs its parent's directory while it runs or resumes.

Paired arms from one trunk (``benchmarks/cage_branch.py`` does this per seed)::

    trunk = coqat.train("lm-tiny", "w3a3", steps=1000, stop_at=800)
    quest = coqat.train(branch_from=trunk.run_dir)                     # plain continuation
    cage = coqat.train(branch_from=trunk.run_dir, optimizer="cage-d", cage_pull=1.6)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from coqat.bitconfig import BitConfig
from coqat.config import (BRANCH_FREE_SETTINGS, RunConfig, Runtime, SearchSettings,
                          TrainSettings, run_config_from_json)
from coqat.errors import CoqatError
from coqat.optim.schedules import Schedule
from coqat.rundir import BITCONFIG, CONFIG, RunDir
from coqat.training.cage import CageHooks

__all__ = ["BranchPoint", "branch_config", "branch_point", "cage_hooks"]


@dataclass
class BranchPoint:
    """Where a branch starts: the parent run, its checkpoint step and the state to copy."""

    parent: Path
    step: int
    state: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The ``branch`` section of the branch's config.json."""
        return {"parent": str(self.parent), "step": self.step}

    def start_state(self) -> dict[str, Any]:
        """The checkpoint the branch starts from: the parent's, without hook states (a
        branch may run other CAGE settings; the check below made them equal before it)."""
        return {k: v for k, v in self.state.items() if k != "hooks"}


def cage_hooks(settings: TrainSettings, schedule: Schedule,
               bitconfig: BitConfig | None) -> CageHooks | None:
    """The CAGE hooks a run's settings ask for (None: plain AdamW, or a float run)."""
    if settings.optimizer == "adamw" or bitconfig is None:
        return None
    return CageHooks.from_settings(settings, schedule)


def branch_config(parent: str | Path, options: Mapping[str, Any]) -> tuple[RunConfig, BitConfig | None]:
    """The configuration of a branch of ``parent``: the parent's own, with ``options``
    (flat TrainSettings / Runtime fields, None = keep) applied, and the parent's bits.
    Whether the options are allowed is checked by ``branch_point`` (``runner.prepare``)."""
    run = RunDir.open(parent)
    doc = run.read_json(CONFIG)
    config = run_config_from_json(doc, str(run.file(CONFIG)))
    parts: dict[type, dict[str, Any]] = {TrainSettings: {}, SearchSettings: {}, Runtime: {}}
    for k, v in options.items():
        owner = next((cls for cls in parts if k in {f.name for f in dataclasses.fields(cls)}),
                     None)
        if owner is None:
            raise CoqatError(f"unknown option {k!r}; options are the fields of TrainSettings,"
                             " SearchSettings and Runtime")
        if v is not None:
            parts[owner][k] = v
    config = config.with_train(**parts[TrainSettings]).with_search(**parts[SearchSettings])
    # a warm-started parent's weights are already in its checkpoint: no init_from here
    config = config.with_runtime(**{"name": None, "stop_at": None, **parts[Runtime],
                                    "branch_from": str(run.path), "init_from": None})
    bits = None if doc.get("bits") == "fp" else BitConfig.load(run.file(BITCONFIG))
    return config, bits


def branch_point(config: RunConfig, bitconfig: BitConfig | None,
                 schedule: Schedule) -> BranchPoint:
    """Check that ``config`` may branch from ``config.runtime.branch_from`` and return the
    branch point; one-line CoqatError naming what differs otherwise."""
    run = RunDir.open(config.runtime.branch_from)
    where = f"--branch-from {run.path}"
    doc = run.read_json(CONFIG)
    parent = run_config_from_json(doc, str(run.file(CONFIG)))
    differ = [f.name for f in dataclasses.fields(TrainSettings)
              if f.name not in BRANCH_FREE_SETTINGS
              and getattr(parent.train, f.name) != getattr(config.train, f.name)]
    if parent.space.fingerprint() != config.space.fingerprint():
        differ.insert(0, "search space")
    if parent.runtime.seed != config.runtime.seed:
        differ.append("seed")
    parent_bits = None if doc.get("bits") == "fp" else BitConfig.load(run.file(BITCONFIG))
    if _layers(parent_bits) != _layers(bitconfig):
        differ.append("bits")
    if differ:
        raise CoqatError(f"{where}: {', '.join(differ)} must equal the parent run's; a branch"
                         " may change only " + ", ".join(BRANCH_FREE_SETTINGS))
    state = run.load_checkpoint() if run.finished else None
    if state is None:
        raise CoqatError(f"{where}: the parent has not finished (a running parent's"
                         " checkpoint moves); run it to its --stop-at step first")
    step = int(state["step"])
    if step >= schedule.total_steps:
        raise CoqatError(f"{where}: the parent's checkpoint is at its last step ({step}),"
                         " so nothing is left to branch; stop the parent earlier (--stop-at)")
    stop = config.runtime.stop_at
    if stop is not None and stop <= step:
        raise CoqatError(f"{where}: --stop-at {stop} is not after the branch step {step}")
    mine = _pre_branch_cage(cage_hooks(config.train, schedule, bitconfig), step)
    theirs = _pre_branch_cage(cage_hooks(parent.train, schedule, parent_bits), step)
    if mine != theirs:
        raise CoqatError(f"{where}: this CAGE term would act before the branch step {step},"
                         " where the parent trained without it (or with another); raise"
                         " --cage-silence or branch later")
    return BranchPoint(run.path, step, state)


def _layers(cfg: BitConfig | None) -> Any:
    return None if cfg is None else {n: dataclasses.astuple(b) for n, b in cfg.layers.items()}


def _pre_branch_cage(hooks: CageHooks | None, step: int) -> tuple[Any, ...]:
    """What CAGE did to the steps before ``step``: () when nothing."""
    if hooks is None:
        return ()
    lams = tuple(hooks.lambda_at(t) for t in range(step))
    if not any(lams):
        return ()
    return hooks.mode, hooks.scale, lams
