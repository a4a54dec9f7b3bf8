"""Branching from a trunk's checkpoint, CAGE's pull integral and its per-layer scaling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import coqat
from coqat.config import TrainSettings
from coqat.errors import CoqatError
from coqat.optim.cage import grid_step_factor, lambda_for_pull
from coqat.optim.schedules import Schedule
from coqat.quant import QuantLinear
from coqat.quant.quantizers import ALPHA
from coqat.rundir import RunDir
from coqat.training.cage import CageHooks
from conftest import LM_MICRO, ROOT, assert_one_line_error, run_cli
from test_cage import ctx_for, last_step_hooks, np_quest_full

# lm-micro: 30 steps, log every 5; CAGE with silence 0.8 is silent through step 24
STOP = 20


def _train(runs, name, **options):
    return coqat.train(LM_MICRO, options.pop("bits", "w3a3"), out=str(runs), progress=False,
                       name=name, **options)


def _branch(trunk, runs, **options):
    return coqat.train(branch_from=trunk.run_dir, out=str(runs), progress=False, **options)


def _losses(rec) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(rec.run_dir).metrics("train")}


def _weights_equal(a, b) -> bool:
    wa, wb = RunDir(a.run_dir).load_weights(), RunDir(b.run_dir).load_weights()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def trunk_and_full(tmp_path_factory):
    """A trunk stopped at STOP and the same run uninterrupted (shared by this file's tests;
    branches are written elsewhere)."""
    runs = tmp_path_factory.mktemp("trunk")
    return _train(runs, "trunk", stop_at=STOP), _train(runs, "full")


def test_unchanged_branch_ends_bit_for_bit_where_the_uninterrupted_run_does(runs,
                                                                           trunk_and_full):
    trunk, full = trunk_and_full
    assert trunk.stopped_at == STOP and trunk.steps == full.steps == 30
    assert RunDir(trunk.run_dir).load_checkpoint()["step"] == STOP
    branch = _branch(trunk, runs)
    assert (branch.branch_of, branch.branch_step) == (trunk.run_dir, STOP)
    assert branch.stopped_at is None and branch.run_dir != trunk.run_dir
    assert _weights_equal(branch, full)
    assert branch.metric == full.metric and branch.eval == full.eval
    assert _losses(branch) == {s: v for s, v in _losses(full).items() if s > STOP}
    doc = RunDir(branch.run_dir).read_json("config.json")
    assert doc["branch"] == {"parent": trunk.run_dir, "step": STOP}
    assert doc["runtime"]["branch_from"] == trunk.run_dir


def test_other_optimizer_is_identical_up_to_the_branch_step_then_differs(runs,
                                                                       trunk_and_full):
    trunk, full = trunk_and_full
    assert _losses(trunk) == {s: v for s, v in _losses(full).items() if s <= STOP}
    quest = _branch(trunk, runs)
    cage = _branch(trunk, runs, optimizer="cage-d", cage_pull=1.6)
    # the pull starts after step 24 (silence 0.8): step 25's loss is computed before it
    assert _losses(cage)[25] == _losses(quest)[25]
    assert not _weights_equal(cage, quest) and cage.metric != quest.metric
    assert cage.cage.pull == 1.6 and cage.cage.mode == "decoupled"
    final = RunDir(cage.run_dir).read_json("final.json")
    assert final["cage"]["lam"] == cage.cage.lam and final["branch_step"] == STOP


@pytest.mark.parametrize("option, value, needle", [
    ("--lr", "0.01", "lr must equal"),
    ("--seed", "5", "seed must equal"),
    ("--bits", "w4a4", "bits must equal"),
    ("--cage-silence", "0.5", "before the branch step"),   # with --optimizer cage-d below
])
def test_branch_that_would_change_the_trajectory_is_refused_in_one_line(
        runs, trunk_and_full, option, value, needle):
    trunk, _ = trunk_and_full
    proc = run_cli("train", "--branch-from", trunk.run_dir, "--optimizer", "cage-d",
                   option, value, "--out", str(runs), "-q")
    assert_one_line_error(proc, needle)
    assert not runs.exists() or not any(runs.iterdir())        # nothing half-made


def test_branch_needs_a_stopped_parent_and_stop_at_below_steps(runs):
    done = _train(runs, "done", steps=8)
    with pytest.raises(CoqatError, match="nothing is left to branch"):
        _branch(done, runs)
    with pytest.raises(CoqatError, match="must be below"):
        _train(runs, "bad", steps=8, stop_at=8)
    with pytest.raises(CoqatError, match="not both"):
        _train(runs, "both", optimizer="cage-d", cage_lambda=3.0, cage_pull=1.0)


def test_pull_converts_to_lambda_over_the_runs_own_schedule_by_hand():
    # 10 QAT steps, no warm-up, LR decays over the last 2: factors 1 x 8, 0.55, 0.1.
    # Silence 0.8, linear ramp: g_8 = 0.5, g_9 = 1. So sum lr_t g_t = 0.01 * (0.275 + 0.1).
    settings = TrainSettings(steps=10, warmup_steps=0, lr=0.01, decay_frac=0.2,
                             min_lr_ratio=0.1, optimizer="cage-d", cage_pull=1.5)
    schedule = Schedule(10, 0, 0.2, 0.1, qat_start=0)
    assert [schedule.lr(t, 0.01) for t in (7, 8, 9)] == pytest.approx([0.01, 0.0055, 0.001])
    hooks = CageHooks.from_settings(settings, schedule)
    assert hooks.lam == pytest.approx(1.5 / 0.00375)
    assert sum(schedule.lr(t, 0.01) * hooks.lambda_at(t) for t in range(10)) == \
        pytest.approx(1.5, rel=1e-12)
    assert lambda_for_pull(0.0, [0.0], [0.0]) == 0.0
    with pytest.raises(CoqatError, match="silent at every step"):
        lambda_for_pull(1.0, [0.01, 0.01], [0.0, 0.0])


def test_step_scale_multiplies_each_layers_pull_by_its_rms_over_grid_step():
    assert grid_step_factor(2) == pytest.approx(3 / (2 * ALPHA[2]))
    assert grid_step_factor(4) == pytest.approx(15 / (2 * 2.513930578568423))
    with pytest.raises(CoqatError, match="QuEST"):
        grid_step_factor(4, "rtn")
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    lr, lam = 0.01, 2.0
    for bits in (2, 4):
        moved = {}
        for scale in ("none", "step"):
            layer = nn.Sequential(QuantLinear(32, 4, w_bits=bits, a_bits=8))
            with torch.no_grad():
                layer[0].weight.copy_(w)
            hooks, last = last_step_hooks("decoupled", lam=lam)
            hooks.scale = scale
            hooks.after_optimizer_step(ctx_for(layer, last, lr=lr))
            moved[scale] = (w - layer[0].weight.detach()).numpy()
        err = w.numpy() - np_quest_full(w.numpy(), bits)
        np.testing.assert_allclose(moved["none"], lr * lam * err, atol=1e-6, rtol=0)
        np.testing.assert_allclose(moved["step"], moved["none"] * grid_step_factor(bits),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_cage_branch_smoke_preset_writes_paired_results_and_resumes(tmp_path):
    out = tmp_path / "cb"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cage_branch.py"), "run", "--preset",
           "smoke", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["missing"] == [] and res["seeds"] == 2
    w3 = res["rungs"]["main"]["widths"]["w3a3"]
    assert set(w3["tests"]) == {"cage-d-0.5", "cage-d-1.6", "cage-d-5", "cage-c-1.6"}
    t = w3["tests"]["cage-d-1.6"]
    quest, cage = (w3["arms"][a]["per_seed"] for a in ("quest", "cage-d-1.6"))
    assert t["n"] == 2 and t["differences"] == pytest.approx(
        [quest[s] - cage[s] for s in ("0", "1")])
    branch = RunDir(out / "main-w3a3-cage-d-1.6-s0").read_json("final.json")
    assert branch["branch_step"] == 32 and branch["cage"]["pull"] == 1.6
    readme = (out / "report" / "README.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stderr.count("finished earlier") == 34
    (out / "report" / "README.md").unlink()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cage_branch.py"), "render",
                    "--out", str(out)], check=True, timeout=120)
    assert (out / "report" / "README.md").read_text() == readme
