"""The command line through its real entry point: output, --json, and bad input.

Bad input must be one line on stderr naming the problem and the fix, exit code 2, no
traceback, and no half-written run directory.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import DIGITS, LM_MICRO, ROOT, assert_one_line_error, cli_json, run_cli


def test_bops_json_reports_resnet18_from_a_user_model_file():
    rep = cli_json("bops", "--model", "coqat/workloads/resnet.py:resnet18",
                   "--input-shape", "1,3,224,224", cwd=ROOT)
    assert rep["totals"]["macs"] == 1_814_073_344
    assert round(rep["totals"]["gbops_fp32"], 1) == 1857.6
    assert round(rep["totals"]["gbops_w8a8"], 1) == 116.1
    assert rep["layers"][0]["name"] == "conv1"


def test_bops_table_for_a_space_fits_100_columns_and_states_conventions():
    proc = run_cli("bops", "--space", LM_MICRO, "--bits", "w4a4")
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 100
    assert "model.layers.0.self_attn.q_proj" in proc.stdout
    assert "sdpa" in proc.stdout and "FP32 = 32x32" in proc.stdout


def test_plan_reproduces_the_worked_example():
    out = cli_json("plan", "--params", "1e9", "--tokens", "20e9", "--bits", "4")
    assert out["tokens_per_param_byte"] == pytest.approx(40.0)
    assert out["qat_fraction"] == pytest.approx(0.161, abs=0.002)


def test_train_json_prints_the_final_record(runs):
    out = cli_json("train", "--space", DIGITS, "--bits", "w8a8", "--steps", "6", "--out",
                   str(runs))
    assert out["bits"] == "w8a8" and os.path.isdir(out["run_dir"])
    assert out["metric_name"] == "val_acc"


# ----- bad input ----------------------------------------------------------------------------
def _no_runs(runs) -> None:
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was left behind"


@pytest.mark.parametrize("bits,needle", [
    ("w7a7", "not supported"), ("w1a1", "not supported"), ("w4a", "wNaM"),
    ("four", "wNaM"), ("w4a0", "not supported")])
def test_bad_bits_are_one_line_errors(runs, bits, needle):
    proc = run_cli("train", "--space", DIGITS, "--bits", bits, "--out", str(runs))
    assert_one_line_error(proc, needle)
    _no_runs(runs)


def test_malformed_toml_names_the_file(tmp_path, runs):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[workload\nname = "lm"\n')
    proc = run_cli("train", "--space", str(bad), "--out", str(runs))
    assert_one_line_error(proc, "bad.toml", "not valid TOML")
    _no_runs(runs)


def test_unknown_workload_lists_the_known_ones(tmp_path, runs):
    bad = tmp_path / "w.toml"
    bad.write_text('[workload]\nname = "cifar"\n[[search.layers]]\npattern = "*"\n'
                   'w_bits = [4]\na_bits = [4]\n')
    proc = run_cli("train", "--space", str(bad), "--out", str(runs))
    assert_one_line_error(proc, "unknown workload", "digits", "lm")
    _no_runs(runs)


def test_layer_pattern_that_matches_nothing_is_named(tmp_path, runs):
    text = open(DIGITS).read().replace('pattern = "*"', 'pattern = "encoder.*"')
    bad = tmp_path / "p.toml"
    bad.write_text(text)
    proc = run_cli("train", "--space", str(bad), "--out", str(runs))
    assert_one_line_error(proc, "encoder.*", "match no layer")
    _no_runs(runs)


def test_unknown_train_key_is_named(tmp_path, runs):
    text = open(DIGITS).read().replace("steps = 40", "stepz = 40")
    bad = tmp_path / "k.toml"
    bad.write_text(text)
    proc = run_cli("train", "--space", str(bad), "--out", str(runs))
    assert_one_line_error(proc, "stepz")


def test_missing_fashion_data_names_the_install_command(tmp_path, runs):
    proc = run_cli("train", "--space", "fashion-resnet", "--data-dir", str(tmp_path / "none"),
                   "--steps", "2", "--out", str(runs))
    assert_one_line_error(proc, "apt-get install dataset-fashion-mnist")
    _no_runs(runs)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("train", "--space", DIGITS, "--steps", "2", "--out", str(blocker / "runs"))
    assert_one_line_error(proc, "--out")


def test_corrupt_checkpoint_on_resume(tmp_path, runs):
    out = cli_json("train", "--space", DIGITS, "--steps", "10", "--out", str(runs))
    run = out["run_dir"]
    os.remove(os.path.join(run, "final.json"))
    with open(os.path.join(run, "checkpoints", "last.pt"), "wb") as f:
        f.write(b"\x00garbage")
    proc = run_cli("train", "--resume", run)
    assert_one_line_error(proc, "corrupt", "delete it")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    proc = run_cli("train", "--resume", str(tmp_path))
    assert_one_line_error(proc, "not a coqat run directory")


def test_bad_bitconfig_schema_version(tmp_path, runs):
    cfg = tmp_path / "b.json"
    cfg.write_text(json.dumps({"schema": "coqat.bitconfig/v9", "layers": {}}))
    proc = run_cli("train", "--space", DIGITS, "--bits", str(cfg), "--out", str(runs))
    assert_one_line_error(proc, "v9", "coqat.bitconfig/v1")


def test_unknown_option_is_a_usage_error_with_exit_2():
    proc = run_cli("train", "--bogus")
    assert_one_line_error(proc, "--bogus")


def test_plan_rejects_nonpositive_numbers():
    assert_one_line_error(run_cli("plan", "--params", "0", "--tokens", "1e9", "--bits", "4"),
                          "positive")


def test_bops_with_model_but_no_shape():
    proc = run_cli("bops", "--model", "coqat/workloads/resnet.py:resnet18", cwd=ROOT)
    assert_one_line_error(proc, "input shape")


def test_demo_runs_search_uniform_report_and_export_end_to_end(tmp_path):
    proc = run_cli("demo", "--steps", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = next(tmp_path.glob("demo-*"))
    assert (demo / "report.html").is_file()
    runs = [d for d in demo.iterdir() if (d / "final.json").is_file()]
    assert sorted(json.loads((d / "final.json").read_text())["method"] for d in runs) == \
        ["gumbel", "uniform"]
    for d in runs:
        final = json.loads((d / "final.json").read_text())
        assert final["achieved_bops"] <= final["budget_bops"]
    assert list(demo.glob("*-gumbel-*/exports/json/bitconfig.json"))
    assert "mixed, gumbel" in proc.stdout and "uniform w4a4" in proc.stdout
    # on the CPU the demo points to the setting where the grids show a gain
    assert "coqat demo --setting lm-2m-ft" in " ".join(proc.stdout.split())


def test_demo_names_its_settings_on_a_bad_one(tmp_path):
    proc = run_cli("demo", "--setting", "lm-9", "--out", str(tmp_path))
    assert_one_line_error(proc, "unknown demo setting 'lm-9'; choose one of lm-tiny, lm-2m-ft")
    assert not list(tmp_path.iterdir())


def test_a_torchrun_worker_ends_with_os_exit_after_the_atexit_handlers(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) main() runs the atexit handlers, then leaves with
    os._exit and the command's exit code (C++ destructors at exit aborted finished ranks)."""
    import atexit
    import sys

    from coqat import cli

    calls: list[str] = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        calls.append(f"exit {code}")
        raise Exited

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    for argv, code in ((["coqat", "bops", "--space", "no-such-space"], 2),
                       (["coqat", "--help"], 0)):
        monkeypatch.setattr(sys, "argv", argv)
        calls.clear()
        with pytest.raises(Exited):
            cli.main()
        assert calls == ["atexit", f"exit {code}"]
