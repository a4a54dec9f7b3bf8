"""coqat.sweep.local: a resumable grid of runs on this machine, outcomes in job order."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from coqat.errors import CoqatError
from coqat.rundir import CHECKPOINT, RunDir
from coqat.sweep.local import (CACHED, DONE, FAILED, MISSING, SKIPPED, LocalJob, read_finished,
                               run_local)
from coqat.training import runner
from coqat.training.hooks import TrainHooks
from conftest import DIGITS

# a few steps of the digits CNN: checkpoints every 2 steps, a short final evaluation
TINY = {"steps": 6, "checkpoint_every": 2, "eval_every": 6, "log_every": 1,
        "final_eval_batches": 2, "device": "cpu"}


def job(key: str, **kw) -> LocalJob:
    options = {**TINY, **kw.pop("options", {})}
    if "budget" not in kw:
        kw.setdefault("bits", "w4a4")
    return LocalJob(key, DIGITS, options, **kw)


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()}


def test_a_grid_runs_in_job_order_and_a_second_call_reads_it_back(tmp_path):
    out = tmp_path / "grid"
    jobs = [job("w4a4-s1", options={"seed": 1}), job("fp-s0", bits="fp"),
            job("uniform-w4a4-s0", budget="w4a4", method="uniform")]
    lines: list[str] = []
    first = run_local(jobs, out, say=lines.append)
    assert [o.key for o in first] == [j.key for j in jobs]
    assert [o.status for o in first] == [DONE] * 3
    assert [(o.record.method, o.record.seed) for o in first] == \
        [("uniform", 1), ("fp", 0), ("uniform", 0)]
    assert first[2].record.search.budget_expr == "w4a4"
    assert first[2].record.search.achieved_bops <= first[2].record.search.budget_bops
    assert [Path(o.run_dir) for o in first] == [out / j.key for j in jobs]
    assert len(lines) == 3 and lines[0].startswith("[1/3] w4a4-s1: val_acc ")

    before = files(out)
    t0 = time.perf_counter()
    again = run_local(jobs, out, say=lines.append)
    assert time.perf_counter() - t0 < 5                 # nothing was trained again
    assert files(out) == before                          # ... and nothing was written
    assert [o.status for o in again] == [CACHED] * 3
    assert [o.record.to_dict() for o in again] == [o.record.to_dict() for o in first]
    assert all(o.wall_s == 0 for o in again)
    assert lines[3].endswith("(finished earlier)")


def test_parallel_workers_return_outcomes_in_job_order(tmp_path):
    # the first job is eight times longer, so the second one (nearly always) finishes first;
    # the outcomes still come back in the order of the jobs
    jobs = [job("long", options={"steps": 24}), job("short", bits="fp", options={"steps": 3})]
    lines: list[str] = []
    outcomes = run_local(jobs, tmp_path / "grid", workers=2, say=lines.append)
    assert [o.key for o in outcomes] == ["long", "short"]
    assert [o.status for o in outcomes] == [DONE, DONE]
    assert [(o.record.steps, o.record.method) for o in outcomes] == [(24, "uniform"), (3, "fp")]
    assert sorted(line.split()[1] for line in lines) == ["long:", "short:"]


class _InterruptAt(TrainHooks):
    name = "interrupt"

    def __init__(self, step: int):
        self.at = step

    def after_optimizer_step(self, ctx) -> None:
        if ctx.step + 1 == self.at:          # a real Ctrl-C mid-run: checkpoint, then stop
            os.kill(os.getpid(), signal.SIGINT)


def test_a_killed_job_resumes_and_a_partial_one_starts_over(tmp_path):
    out = tmp_path / "grid"
    full, cut, partial = job("full"), job("cut"), job("partial")
    prep = runner.prepare(cut.config(out), cut.bits)
    with pytest.raises(CoqatError, match="interrupted after step 3"):
        runner.execute(prep, run=RunDir.create_at(out / "cut"), hooks=[_InterruptAt(3)])
    assert (out / "cut" / CHECKPOINT).is_file() and not (out / "cut" / "final.json").exists()
    (out / "partial").mkdir()                # killed before its first checkpoint
    (out / "partial" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')

    assert [o.status for o in read_finished([full, cut, partial], out)] == [MISSING] * 3
    res = {o.key: o for o in run_local([full, cut, partial], out, drop_checkpoints=True)}
    assert res["cut"].record.resumed is True
    assert res["partial"].record.resumed is False
    assert res["cut"].record.metric == res["full"].record.metric
    assert res["partial"].record.metric == res["full"].record.metric
    steps = [r["step"] for r in RunDir(out / "partial").metrics("train")]
    assert steps == list(range(1, TINY["steps"] + 1))   # the stale line went with the restart
    assert not (out / "cut" / CHECKPOINT).exists()      # dropped once finished


def test_a_key_reused_for_other_settings_is_refused(tmp_path):
    out = tmp_path / "grid"
    run_local([job("a", bits="fp", options={"steps": 3})], out)
    for other in (job("a", bits="fp", options={"steps": 4}),
                  job("a", bits="fp", options={"steps": 3, "seed": 5})):
        with pytest.raises(CoqatError, match="holds a run with other") as e:
            run_local([other], out)
        assert "\n" not in str(e.value)
    with pytest.raises(CoqatError, match="training settings"):
        read_finished([job("a", bits="fp", options={"steps": 4})], out)


def test_failures_are_outcomes_with_keep_going_and_errors_without(tmp_path):
    out = tmp_path / "grid"
    jobs = [job("bad", bits=str(tmp_path / "missing.json")), job("good", bits="fp",
                                                                  options={"steps": 2})]
    outcomes = run_local(jobs, out, keep_going=True)
    assert [o.status for o in outcomes] == [FAILED, DONE]
    assert "missing.json" in outcomes[0].error and not outcomes[0].ok
    assert not (out / "bad").exists()                  # bad input leaves no directory
    with pytest.raises(CoqatError, match=r"^bad: .*missing\.json"):
        run_local(jobs, out)


def test_job_descriptions_are_checked_before_anything_runs(tmp_path):
    out = tmp_path / "grid"
    with pytest.raises(CoqatError, match="appears twice"):
        run_local([job("a"), job("a", bits="fp")], out)
    with pytest.raises(CoqatError, match="job b: unknown option"):
        run_local([job("a"), job("b", options={"stepz": 3})], out)
    with pytest.raises(CoqatError, match="exactly one"):
        LocalJob("c", DIGITS, bits="fp", budget="w4a4")
    with pytest.raises(CoqatError, match="plain directory name"):
        LocalJob("../c", DIGITS, bits="fp")
    assert not out.exists()


def test_no_job_starts_after_the_deadline(tmp_path):
    out = tmp_path / "grid"
    outcomes = run_local([job("a"), job("b")], out, deadline=time.monotonic() - 1)
    assert [o.status for o in outcomes] == [SKIPPED, SKIPPED]
    assert not any(out.glob("*"))
