"""The training loop: run directories, QAT switch, resume, corrupt checkpoints, DDP, schedules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from coqat.bitconfig import BitConfig
from coqat.errors import CoqatError
from coqat.optim.schedules import Schedule
from coqat.rundir import CHECKPOINT
from coqat.training import runner
from coqat.training.loop import TrainHooks
from conftest import DIGITS, LM_MICRO, ROOT, prepare_run, train_run


def test_fp_run_writes_a_complete_run_directory(runs):
    run, result = train_run(DIGITS, runs, bits="fp")
    for name in ("config.json", "bitconfig.json", "metrics.jsonl", "final.json", "env.json",
                 "model.safetensors", CHECKPOINT):
        assert run.has(name), name
    final = run.read_json("final.json")
    assert final["metric_name"] == "val_acc" and 0 <= final["metric"] <= 1
    assert final["bops"] == final["fp32_bops"]          # an FP run is the FP32 reference
    assert final["schedule"] == "fp-only" and final["qat_steps"] == 0
    evals = list(run.metrics("eval"))
    assert [e["step"] for e in evals] == [20, 40] and evals[-1]["final"]
    assert BitConfig.load(run.file("bitconfig.json")).summary() == "fp"
    assert result.metric == final["metric"]


def test_qat_run_quantizes_every_searchable_layer_and_reports_bops(runs):
    run, result = train_run(DIGITS, runs, bits="w4a4")
    doc = run.read_json("bitconfig.json")
    assert {e["weight"]["bits"] for e in doc["layers"].values()} == {4}
    assert doc["cost"]["total_bops"] == result.bops < result.fp32_bops
    from safetensors.torch import load_file

    keys = set(load_file(str(run.file("model.safetensors"))))
    assert "conv1.weight" in keys                        # same keys as the float model
    assert result.qat_steps == 40


def test_mixed_bitconfig_file_trains_with_its_own_bits(runs, tmp_path):
    run, _ = train_run(DIGITS, runs, bits="w4a4", steps=5)
    cfg = BitConfig.load(run.file("bitconfig.json"))
    cfg.layers["conv2"] = type(cfg.layers["conv2"])(2, 8, "quest")
    path = tmp_path / "mixed.json"
    prep = prepare_run(DIGITS, runs, bits="w4a4")
    cfg.save(path, prep.cost)
    run2, res2 = train_run(DIGITS, runs, bits=str(path), steps=5)
    assert res2.bits == "mixed"
    assert BitConfig.load(run2.file("bitconfig.json")).layers["conv2"].w_bits == 2


class _InterruptAt(TrainHooks):
    name = "interrupt"

    def __init__(self, step: int):
        self.at = step

    def after_optimizer_step(self, ctx) -> None:
        if ctx.step + 1 == self.at:       # a real Ctrl-C, mid-run
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("bits", ["fp", "w4a4"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(runs, bits):
    full_run, full = train_run(LM_MICRO, runs, bits=bits, qat_fraction=0.5, name="full")
    prep = prepare_run(LM_MICRO, runs, bits=bits, qat_fraction=0.5, name="cut")
    with pytest.raises(CoqatError, match="resume with"):
        runner.execute(prep, hooks=[_InterruptAt(13)])
    cut = next(p for p in runs.iterdir() if p.name.startswith("cut"))
    assert not (cut / "final.json").exists()
    run, resumed = runner.resume(cut, progress=False)
    assert resumed.resumed is True
    a, b = full_run.load_weights(), run.load_weights()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metric == full.metric
    steps = [r["step"] for r in run.metrics("train")]
    assert steps == sorted(set(steps))                   # no duplicated log lines


def test_resume_of_a_finished_run_is_refused(runs):
    run, _ = train_run(DIGITS, runs, bits="fp", steps=5)
    with pytest.raises(CoqatError, match="already finished"):
        runner.resume(run.path)


def test_corrupt_checkpoint_is_a_one_line_error(runs):
    run, _ = train_run(DIGITS, runs, bits="fp", steps=10)
    (run.path / "final.json").unlink()
    run.file(CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CoqatError, match="corrupt"):
        runner.resume(run.path)


def test_nonfinite_loss_stops_with_advice(runs):
    with pytest.raises(CoqatError, match="learning rate"):
        train_run(DIGITS, runs, bits="fp", steps=20, lr=1e6)


# ----- schedules ---------------------------------------------------------------------------
def test_wsd_schedule_warms_up_holds_and_decays():
    s = Schedule(100, warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.1)
    assert s.lr_factor(0) == pytest.approx(0.1) and s.lr_factor(9) == 1.0
    assert s.lr_factor(50) == 1.0 and s.lr_factor(79) == 1.0
    assert s.lr_factor(99) == pytest.approx(0.1)
    assert all(s.phase(i) == "fp" for i in range(100))


def test_fused_schedule_starts_qat_where_the_decay_starts():
    s = Schedule(100, warmup_steps=10, qat_start=70, fused=True)
    assert s.phase(69) == "fp" and s.phase(70) == "qat"
    assert s.lr_factor(69) == 1.0 and s.lr_factor(70) < 1.0          # decay begins with QAT
    assert s.lr_factor(99) == pytest.approx(0.1)
    assert all(s.lr_factor(i) >= s.lr_factor(i + 1) for i in range(70, 99))  # no re-warm-up


def test_unfused_schedule_cools_down_fp_then_rewarms_for_qat():
    s = Schedule(100, warmup_steps=10, decay_frac=0.2, qat_start=60, fused=False)
    assert s.lr_factor(59) == pytest.approx(0.1)                       # FP cooled down
    assert s.lr_factor(60) < s.lr_factor(64) <= 1.0                    # QAT re-warms
    assert s.lr_factor(99) == pytest.approx(0.1)


def test_fusion_defaults_on_at_four_bits_and_off_below(runs):
    p4 = prepare_run(DIGITS, runs, bits="w4a4", qat_fraction=0.5)
    p2 = prepare_run(DIGITS, runs, bits="w2a4", qat_fraction=0.5)
    assert p4.schedule.fused and not p2.schedule.fused
    assert p4.schedule.qat_start == 20


# ----- DDP -----------------------------------------------------------------------------------
def test_two_process_ddp_ranks_end_with_identical_weights(tmp_path):
    """torchrun, 2 CPU processes (gloo): the loop checks every rank's weight digest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "coqat", "train", "--space", DIGITS, "--bits", "w4a4",
           "--steps", "12", "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["eval"]["ddp_world_size"] == 2
    # the same global batches in one process give (nearly) the same model
    single = train_run(DIGITS, tmp_path / "one", bits="w4a4", steps=12)[1]
    assert result["metric"] == pytest.approx(single.metric, abs=0.03)
    run_dirs = list((tmp_path / "ddp").iterdir())
    assert len(run_dirs) == 1                                          # rank 0 alone writes
