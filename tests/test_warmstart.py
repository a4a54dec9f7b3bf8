"""Warm starts (--init-from): runs and searches that start from a trained float run."""

from __future__ import annotations

import shutil

import pytest
import torch

import coqat
from coqat.config import RunConfig
from coqat.errors import CoqatError
from coqat.rundir import RunDir
from coqat.training import runner
from conftest import LM_MICRO, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """A float run of lm-micro (30 steps), the trained model the tests start from."""
    runs = tmp_path_factory.mktemp("trunk")
    return coqat.train(LM_MICRO, "fp", out=str(runs), progress=False, name="trunk")


def test_run_starts_from_the_trunks_weights_and_records_them(runs, trunk):
    trained = RunDir(trunk.run_dir).load_weights()
    for init, equal in ((trunk.run_dir, True), (None, False)):
        prep = runner.prepare(RunConfig.from_options(LM_MICRO, out=str(runs),
                                                     init_from=init), "w8a8")
        got = prep.model.state_dict()
        assert all(torch.equal(got[k], trained[k]) for k in trained) == equal
    warm = coqat.train(LM_MICRO, "w8a8", out=str(runs), progress=False, steps=6,
                       init_from=trunk.run_dir)
    cold = coqat.train(LM_MICRO, "w8a8", out=str(runs), progress=False, steps=6)
    assert warm.metric < cold.metric - 0.2      # 6 QAT steps from trained vs random weights
    doc = RunDir(warm.run_dir).read_json("config.json")
    assert doc["init"]["from"] == trunk.run_dir
    assert doc["init"]["metric"] == trunk.metric
    assert len(doc["init"]["weights_sha256"]) == 64
    assert doc["runtime"]["init_from"] == trunk.run_dir
    assert "init" not in RunDir(cold.run_dir).read_json("config.json")


def test_auto_qat_fraction_is_all_steps_from_trained_weights(runs, trunk):
    warm = coqat.train(LM_MICRO, "w4a4", out=str(runs), progress=False, steps=4,
                       qat_fraction="auto", init_from=trunk.run_dir)
    assert warm.qat_steps == 4
    plan = RunDir(warm.run_dir).read_json("config.json")["qat_plan"]
    assert plan["qat_fraction"] == 1.0 and "init_from" in plan["note"]


def test_search_uses_the_trunk_as_its_fp_phase_and_qats_from_it(runs, trunk):
    recs = coqat.search(LM_MICRO, "w4a4", "sensitivity", baselines=["uniform"],
                        out=str(runs), progress=False, steps=4, init_from=trunk.run_dir)
    for rec in recs:
        assert RunDir(rec.run_dir).read_json("config.json")["init"]["from"] == trunk.run_dir
    fp = recs[0].search.fp_phase
    assert fp["cache"] == trunk.run_dir and fp["metric"] == trunk.metric and fp["init_from"]
    assert not (runs / ".fp-cache").exists()          # nothing trained, nothing cached
    assert not list(RunDir(trunk.run_dir).path.glob("sensitivity*"))   # nothing written there


def test_resume_refuses_weights_that_changed(runs, trunk, tmp_path):
    mine = tmp_path / "mytrunk"
    shutil.copytree(trunk.run_dir, mine)
    rec = coqat.train(LM_MICRO, "w8a8", out=str(runs), progress=False, steps=30,
                      init_from=str(mine), stop_at=None)
    run = RunDir(rec.run_dir)
    (run.path / "final.json").unlink()                 # as if killed before the end
    w = RunDir(mine).load_weights()
    RunDir(mine).save_weights({k: v + 1 for k, v in w.items()})
    with pytest.raises(CoqatError, match="not the one this run started from"):
        coqat.resume(run.path, progress=False)


def test_refusals_are_one_line(runs, trunk, tmp_path):
    q = coqat.train(LM_MICRO, "w8a8", out=str(runs), progress=False, steps=2)
    proc = run_cli("train", "--space", LM_MICRO, "--bits", "w4a4", "--init-from", q.run_dir,
                   "--out", str(runs))
    assert_one_line_error(proc, "quantized run", "--bits fp")
    proc = run_cli("train", "--space", LM_MICRO, "--init-from", str(tmp_path / "nope"),
                   "--out", str(runs))
    assert_one_line_error(proc, "does not exist")
    proc = run_cli("train", "--space", "fashion-resnet", "--init-from", trunk.run_dir,
                   "--steps", "2", "--out", str(runs))
    assert_one_line_error(proc, "another model")
    proc = run_cli("train", "--space", LM_MICRO, "--branch-from", trunk.run_dir,
                   "--init-from", trunk.run_dir, "--out", str(runs))
    assert_one_line_error(proc, "not both")
    assert not runs.exists() or not any(p.name.startswith("lm-micro-w4a4") for p in
                                        runs.iterdir())
    # a run directory whose final.json is missing: not finished
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trunk.run_dir, unfinished)
    (unfinished / "final.json").unlink()
    with pytest.raises(CoqatError, match="has not finished"):
        coqat.train(LM_MICRO, "w4a4", out=str(runs), progress=False, init_from=str(unfinished))
    # damaged weights
    damaged = tmp_path / "damaged"
    shutil.copytree(trunk.run_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CoqatError, match="unreadable"):
        coqat.train(LM_MICRO, "w4a4", out=str(runs), progress=False, init_from=str(damaged))


def test_a_search_whose_config_is_uniform_ends_where_train_of_those_bits_does(runs, trunk):
    """The arms of a paired grid differ in their bits and nothing else: a search that ends at
    uniform w8a8 (the only config at that budget) trains it exactly as `train --bits w8a8`
    does from the same weights and seed: same batches, same steps, same metric, same
    weights. A gap here would be a bias of the pipeline, not a gain of an allocation."""
    kw = dict(out=str(runs), progress=False, steps=5, init_from=trunk.run_dir, seed=3)
    (found,) = coqat.search(LM_MICRO, "w8a8", "sensitivity", **kw)
    assert set(found.search.assignment["w"]) == {8} and set(found.search.assignment["a"]) == {8}
    plain = coqat.train(LM_MICRO, "w8a8", **kw)
    assert found.metric == plain.metric
    a, b = RunDir(found.run_dir).load_weights(), RunDir(plain.run_dir).load_weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
