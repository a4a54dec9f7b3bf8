"""Frontier sweeps as a shared Optuna study: queue, resume, fault tolerance, bad input.

The fault test runs two real worker processes on one study, SIGKILLs one while it holds a
point, and checks that the survivor retries that point and the sweep ends with every grid
point COMPLETE exactly once. It runs against the journal file (always) and against a real
PostgreSQL server when COQAT_TEST_POSTGRES_URL is set (CI starts one in .ci/run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.sweep import frontier as fr
from coqat.sweep import queue
from conftest import DIGITS, FIXTURES, assert_one_line_error, cli_json, run_cli

BUDGETS = ["w2a4", "w4a4", "w8a8"]


def _storages(tmp_path: Path) -> list[str]:
    urls = [str(tmp_path / "study.journal")]
    if os.environ.get("COQAT_TEST_POSTGRES_URL"):
        urls.append(os.environ["COQAT_TEST_POSTGRES_URL"])
    return urls


def _complete_counts(study) -> Counter:
    from optuna.trial import TrialState

    return Counter(fr.point_key(t.user_attrs) for t in study.get_trials(
        states=(TrialState.COMPLETE,)))


def test_points_are_enqueued_once_and_rerunning_the_command_adds_nothing(tmp_path):
    kw = dict(storage_url=str(tmp_path / "s.journal"), out=tmp_path, name=f"q{uuid.uuid4().hex[:6]}",
)
    study, manifest, _ = fr.create_or_resume(DIGITS, BUDGETS, [0, 1], ["uniform"], **kw)
    assert len(study.get_trials()) == 6
    study, manifest, sweep = fr.create_or_resume(DIGITS, BUDGETS, [0, 1], ["uniform"], **kw)
    assert len(study.get_trials()) == 6                   # resume: nothing enqueued twice
    study, manifest, _ = fr.create_or_resume(DIGITS, BUDGETS, [0, 1, 2], ["uniform"], **kw)
    assert len(study.get_trials()) == 9                   # a new seed extends the grid
    assert (sweep / "frontier.json").is_file()


def fake_record(point) -> RunRecord:
    """What a point reports, without training: BOPs by budget, metric by budget and seed."""
    rank = BUDGETS.index(point["budget"]) + 1
    return RunRecord(metric_name="val_acc", metric=1.0 / rank + point["seed"] * 1e-3,
                     higher_is_better=True, bits="w4a4", bops=rank * 1000, space="digits",
                     seed=point["seed"], method=point["method"])


def _fake_point(manifest, space, point, run_dir):
    return fake_record(point)


def test_a_grid_extended_after_points_ran_runs_only_the_new_points(tmp_path):
    """Regression: the point used to be suggest_categorical()'d over the grid, and Optuna
    refuses a categorical whose choices change, so every point after an extension failed."""
    kw = dict(storage_url=str(tmp_path / "s.journal"), out=tmp_path, name="grow")
    study, manifest, sweep = fr.create_or_resume(DIGITS, ["w4a4"], [0], ["uniform"], **kw)
    assert fr.work(study, manifest, sweep, run_point=_fake_point) == 1
    study, manifest, sweep = fr.create_or_resume(DIGITS, ["w4a4", "w8a8"], [0, 1],
                                                 ["uniform", "gumbel"], **kw)
    assert fr.work(study, manifest, sweep, run_point=_fake_point) == 7
    counts = _complete_counts(study)
    assert set(counts) == {fr.point_key(p) for p in manifest.points()}
    assert set(counts.values()) == {1}
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert {(t.user_attrs["budget"], t.user_attrs["seed"], t.user_attrs["method"])
            for t in done} == {(p["budget"], p["seed"], p["method"]) for p in manifest.points()}


def test_a_worker_that_died_before_its_first_heartbeat_has_its_point_retried(tmp_path):
    study, manifest, sweep = fr.create_or_resume(
        DIGITS, ["w4a4"], [0], ["uniform"], str(tmp_path / "s.journal"), tmp_path, "early",
        grace=0.5)
    study.ask()                            # a worker took the point and died right away
    assert fr.progress(study, manifest)["running"] == 1
    time.sleep(0.6)
    assert queue.fail_stale(study, manifest.grace, fr.POINT_KEYS) == [0]   # re-enqueued
    assert fr.work(study, manifest, sweep, run_point=_fake_point) == 1
    assert set(_complete_counts(study).values()) == {1}


def test_a_study_made_with_another_space_is_refused(tmp_path):
    kw = dict(storage_url=str(tmp_path / "s.journal"), out=tmp_path, name="same")
    fr.create_or_resume(DIGITS, ["w4a4"], [0], ["uniform"], **kw)
    other = tmp_path / "other.toml"
    other.write_text(Path(DIGITS).read_text().replace("lr = 1e-2", "lr = 2e-2"))
    with pytest.raises(CoqatError, match="different search space"):
        fr.create_or_resume(str(other), ["w4a4"], [0], ["uniform"], **kw)


@pytest.mark.parametrize("storage_kind", ["journal", "postgres"])
def test_killed_worker_point_is_retried_and_every_point_completes_exactly_once(
        tmp_path, storage_kind):
    urls = _storages(tmp_path)
    if storage_kind == "postgres":
        if len(urls) < 2:
            pytest.skip("set COQAT_TEST_POSTGRES_URL to run against PostgreSQL (CI does)")
        url = urls[1]
    else:
        url = urls[0]
    name = f"fault-{uuid.uuid4().hex[:8]}"
    study, manifest, sweep = fr.create_or_resume(DIGITS, BUDGETS, [0, 1], ["uniform"], url,
                                                 tmp_path, name, heartbeat=0.3, grace=2.0)
    env = {**os.environ, "PYTHONPATH": str(FIXTURES.parent.parent)}
    cmd = [sys.executable, str(FIXTURES / "queue_worker.py"), url, name, str(sweep)]
    victim = subprocess.Popen(cmd + ["3.0"], env=env)      # slow points: killed mid-point
    # wait until the victim holds a point, then kill it without warning
    deadline = time.time() + 60
    held = None
    while time.time() < deadline and held is None:
        for t in study.get_trials():
            if t.state.name == "RUNNING" and t.user_attrs.get(queue.OWNER_ATTR, "").endswith(
                    f":{victim.pid}"):
                held = fr.point_key(t.user_attrs)
        time.sleep(0.1)
    assert held is not None, "the victim never started a point"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    survivor = subprocess.run(cmd + ["0.2"], env=env, timeout=180, capture_output=True, text=True)
    assert survivor.returncode == 0, survivor.stderr[-2000:]

    counts = _complete_counts(study)
    keys = {fr.point_key(p) for p in manifest.points()}
    assert set(counts) == keys and set(counts.values()) == {1}    # every point exactly once
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert [fr.point_key(t.user_attrs) for t in failed] == [held]
    starts = (sweep / "trials" / held / "starts.txt").read_text().split()
    assert len(starts) == 2                       # the killed start and the retry
    for k in keys:
        assert (sweep / "trials" / k / "done.json").is_file()


def test_workers_print_a_line_per_finished_point_when_not_on_a_terminal(tmp_path):
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4,w8a8", "--seeds", "1",
                   "--methods", "uniform", "--workers", "2", "--steps-scale", "0.1",
                   "--out", str(tmp_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("frontier: ")]
    assert lines and lines[-1].startswith("frontier: 2/2 points done, 0 running")


def test_unreachable_storage_is_a_one_line_error():
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4", "--storage",
                   "postgresql://nobody:pw@127.0.0.1:1/none", "--no-run")
    assert_one_line_error(proc, "cannot reach storage", "***@127.0.0.1")


def test_empty_budget_list_is_a_one_line_error(tmp_path):
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", " , ", "--out", str(tmp_path))
    assert_one_line_error(proc, "budget list is empty")


def test_bad_budget_in_the_list_is_named(tmp_path):
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4,w4a", "--out", str(tmp_path))
    assert_one_line_error(proc, "w4a")


def test_an_infeasible_budget_is_refused_before_any_point_runs(tmp_path):
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4,0.0001", "--out",
                   str(tmp_path))
    assert_one_line_error(proc, "'0.0001'", "below the cheapest configuration")
    assert not list(tmp_path.iterdir())                  # no study, no sweep directory


def test_worker_for_an_unknown_study_lists_what_exists(tmp_path):
    fr.create_or_resume(DIGITS, ["w4a4"], [0], ["uniform"], str(tmp_path / "s.journal"),
                        tmp_path, "exists")
    proc = run_cli("worker", "--storage", str(tmp_path / "s.journal"), "--study", "nope")
    assert_one_line_error(proc, "no study 'nope'", "exists")


def test_the_journal_opens_in_optuna_dashboard(tmp_path):
    """optuna-dashboard reads the sweep's journal as it is (its WSGI app lists the study)."""
    import io
    import json

    import optuna_dashboard

    fr.create_or_resume(DIGITS, ["w4a4"], [0], ["uniform"], str(tmp_path / "s.journal"),
                        tmp_path, "dash")
    app = optuna_dashboard.wsgi(queue.open_storage(str(tmp_path / "s.journal")))
    status = {}
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies",
                         "QUERY_STRING": "", "SERVER_NAME": "x", "SERVER_PORT": "80",
                         "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO(),
                         "wsgi.url_scheme": "http"},
                        lambda s, h, exc_info=None: status.setdefault("s", s)))
    assert status["s"].startswith("200")
    assert "dash" in [s["study_name"] for s in json.loads(body)["study_summaries"]]


# ----- end to end: the reduced lm-tiny frontier with the real search ------------------------
def _reduced_lm_tiny(tmp_path: Path) -> Path:
    """lm-tiny (same model, data and search space) at few steps and a short final eval."""
    from conftest import ROOT

    text = (ROOT / "search_spaces" / "lm-tiny.toml").read_text()
    for old, new in (("steps = 400", "steps = 16\nfinal_eval_batches = 2"),
                     ("warmup_steps = 40", "warmup_steps = 2"),
                     ("eval_every = 100", "eval_every = 16"),
                     ("eval_batches = 8", "eval_batches = 1"),
                     ("checkpoint_every = 100", "checkpoint_every = 16")):
        assert old in text, old
        text = text.replace(old, new)
    text += "\n[search]\nfp_steps = 16\nsearch_steps = 8\n"
    path = tmp_path / "lm-tiny-reduced.toml"
    path.write_text(text.replace('name = "lm-tiny"', 'name = "lm-tiny-reduced"'))
    return path


def test_reduced_lm_tiny_frontier_runs_search_and_uniform_end_to_end(tmp_path):
    import json

    space = _reduced_lm_tiny(tmp_path)
    budgets = ["w3a3", "w4a4", "w4a4+0.5*(w8a8-w4a4)", "w6a6"]
    rep = cli_json("frontier", "--space", str(space), "--budgets", ",".join(budgets),
                      "--seeds", "2", "--methods", "gumbel,uniform", "--out", str(tmp_path),
                      "--workers", "2")
    sweep = tmp_path / "frontier-lm-tiny-reduced"
    trials = sorted((sweep / "trials").iterdir())
    assert len(trials) == 16 and len(rep["points"]) == 16     # 4 budgets x 2 seeds x 2 methods
    caches = [d for d in (sweep / ".fp-cache").iterdir() if d.is_dir()]
    assert len(caches) == 2                                   # one FP phase per seed, shared
    for d in trials:
        final = json.loads((d / "final.json").read_text())
        assert final["achieved_bops"] <= final["budget_bops"]
        if final["method"] == "gumbel":
            assert 0.97 <= final["achieved_over_budget"] <= 1.0, (d.name, final)
            assert (d / "search" / "trace.jsonl").is_file()
        cfg = json.loads((d / "bitconfig.json").read_text())
        for group in cfg["tie_groups"]:                       # q/k/v, gate/up share a_bits
            assert len({cfg["layers"][n]["input_act"]["bits"] for n in group}) == 1, group
    # the report: a Pareto front, uniform as its own group, the search trace, the plots
    methods = {g["method"] for g in rep["groups"]}
    assert methods == {"gumbel", "uniform"}
    assert rep["pareto_front"] and rep["search"]
    assert (sweep / "report.html").is_file()
    assert any(sweep.glob("*.png"))


def test_time_estimate_comes_from_earlier_runs_of_the_same_space(tmp_path):
    from coqat.config import load_space
    from conftest import train_run

    space = load_space(DIGITS)
    assert fr.estimate(tmp_path, space, points=6) is None          # nothing to go by yet
    _, rec = train_run(DIGITS, tmp_path, bits="w4a4", steps=4)
    est = fr.estimate(tmp_path, space, points=6, steps_scale=0.5)
    assert est is not None and est.runs_seen == 1 and est.points == 6
    expect = rec.wall_s / rec.steps * round(space.train.steps * 0.5)
    assert est.point_s == pytest.approx(expect)
    assert est.total_s(2) == pytest.approx(est.total_s(1) / 2)
    other = load_space(FIXTURES / "lm-micro.toml")
    assert fr.estimate(tmp_path, other, points=6) is None           # another space's runs


def test_sweep_progress_lines_estimate_the_time_left_from_points_finished_here(capsys):
    from coqat.cli import _progress_printer

    show = _progress_printer()
    show({"complete": 2, "total": 10, "running": 1}, 5.0)     # 2 finished before: not timed
    show({"complete": 4, "total": 10, "running": 1}, 120.0)   # 2 points in 2 min -> 6 left
    lines = capsys.readouterr().out.splitlines()
    assert "left" not in lines[0]
    assert lines[1].startswith("frontier: 4/10 points done") and "about 6 min left" in lines[1]


def test_frontier_steps_means_final_steps_as_on_train_and_search(tmp_path):
    import json

    from coqat.config import load_space

    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4", "--steps", "3",
                   "--steps-scale", "0.5", "--out", str(tmp_path), "--no-run")
    assert_one_line_error(proc, "--steps or --steps-scale")
    proc = run_cli("frontier", "--space", DIGITS, "--budgets", "w4a4", "--seeds", "1",
                   "--methods", "uniform", "--steps", "3", "--name", "st",
                   "--out", str(tmp_path), "--no-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(next(tmp_path.rglob("frontier.json")).read_text())
    scale = manifest.get("steps_scale", manifest.get("manifest", {}).get("steps_scale"))
    assert round(load_space(DIGITS).train.steps * scale) == 3
