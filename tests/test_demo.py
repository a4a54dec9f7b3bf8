"""coqat demo's settings: the fine-tune-from-a-trunk flow end to end at toy size, the GPU
setting pinned to the grid whose figure it quotes, and the default per machine."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import LM_MICRO
from coqat import demo
from coqat.config import load_space
from coqat.errors import CoqatError
from coqat.rundir import RunDir


def test_the_trunk_setting_fine_tunes_both_arms_from_one_float_model(tmp_path):
    """The lm-2m-ft flow on lm-micro: one float run, then the sensitivity config and the
    best uniform config each QAT-fine-tuned from its weights, at the budget, with the
    table, the report and the JSON config."""
    toy = dataclasses.replace(demo.SETTINGS["lm-2m-ft"], name="toy", space=LM_MICRO,
                              steps=2, references=(), title="lm-micro")
    out = io.StringIO()
    recs = demo.run_demo(Console(file=out, width=200), out=str(tmp_path), setting=toy,
                         options={"proxy_batches": 1, "eval_batches": 1, "device": "cpu"})
    text = out.getvalue()
    assert sorted(recs) == ["sensitivity", "uniform"]
    root = next(tmp_path.glob("demo-*"))
    trunks = [d for d in root.iterdir() if "-fp-" in d.name]
    assert len(trunks) == 1 and RunDir(trunks[0]).finished
    trunk_final = json.loads((trunks[0] / "final.json").read_text())
    assert trunk_final["steps"] == 6 and trunk_final["bits"] == "fp"   # 3x the QAT steps
    sha = set()
    for rec in recs.values():
        cfg = RunDir(rec.run_dir).read_json("config.json")
        assert cfg["init"]["from"] == str(trunks[0])
        sha.add(cfg["init"]["weights_sha256"])
        assert cfg["settings"]["steps"] == 2 and cfg["settings"]["lr"] == pytest.approx(1e-3)
        assert rec.search.achieved_bops <= rec.search.budget_bops
    assert len(sha) == 1
    assert recs["uniform"].search.uniform == "w2a4"      # the only uniform pair at wa9
    assert "FP (the trained float model)" in text and "mixed, sensitivity" in text
    assert "uniform w2a4" in text and "(2 QAT steps, 1 seed)" in text
    assert (root / "report.html").is_file()
    assert (Path(recs["sensitivity"].run_dir) / "exports/json/bitconfig.json").is_file()
    assert "--format onnx --explain" in text


def test_the_gpu_setting_is_the_grid_it_quotes(mvu):
    """lm-2m-ft runs what benchmarks/mixed_vs_uniform.py --preset gpu-lm2m-ft ran, so its
    paired figure is this demo's setting."""
    st, grid = demo.SETTINGS["lm-2m-ft"], mvu.PRESETS["gpu-lm2m-ft"]
    assert st.space == grid["space"] and st.budget in grid["budgets"]
    assert st.method in grid["mixed"] and grid["trunk"] == {} and st.trunk
    arm = {**st.options, **demo.schedule_options(st.steps)}
    assert {k: v for k, v in arm.items() if k not in ("compile", "sensitivity_clean")} \
        == grid["options"]
    own = load_space(st.space).train           # the grid's trunk: the space's own run
    assert demo.trunk_options(st.steps) == {k: getattr(own, k) for k in (
        "steps", "warmup_steps", "eval_every", "checkpoint_every")}
    assert st.options["compile"] is False and grid["compile"] == "off"
    assert st.options["sensitivity_clean"] == "none"     # the grid's arm reads the table raw
    assert st.target == grid.get("target")
    [fig] = demo.reference_figures(st.budget, st.steps, st.target, setting=st)
    assert "reports/mixed_vs_uniform/lm-2m-ft (8 seeds, 0-7; this demo's setting)" in fig
    assert "measured the sensitivity config" in fig


def test_the_default_setting_follows_the_machine(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.default_setting() == "lm-2m-ft"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.default_setting() == "lm-tiny"


def test_bad_steps_and_settings_are_refused_before_any_run(tmp_path):
    with pytest.raises(CoqatError, match="choose one of lm-tiny, lm-2m-ft"):
        demo.run_demo(Console(file=io.StringIO()), out=str(tmp_path), setting="nope")
    with pytest.raises(CoqatError, match="steps must be >= 1"):
        demo.run_demo(Console(file=io.StringIO()), out=str(tmp_path), setting="lm-tiny",
                      steps=0)
    assert not list(tmp_path.iterdir())
