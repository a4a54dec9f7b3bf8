"""The compute-optimal FP -> QAT split (coqat.optim.planner, `coqat plan`) and the schedule
shapes it drives in real runs (--qat-fraction auto, fused / unfused cool-down, CAGE logs).

Expected values are the table and worked examples of reference/co_qat.md section 4, typed
in here by hand.
"""

from __future__ import annotations

import json
import math

import pytest

from coqat.bitconfig import BitConfig, LayerBits
from coqat.errors import CoqatError
from coqat.optim.planner import FITTED_S_RANGE, plan, predict_qat_fraction
from coqat.training import runner
from conftest import DIGITS, assert_one_line_error, cli_json, run_cli, prepare_run

# co_qat.md section 4: S_total -> predicted QAT fraction (3 decimals)
CO_QAT_TABLE = {10: 0.054, 20: 0.106, 50: 0.179, 100: 0.232, 200: 0.281, 500: 0.339,
                1e3: 0.377, 1e4: 0.482, 1e5: 0.557}


@pytest.mark.parametrize("s, expected", sorted(CO_QAT_TABLE.items()))
def test_prediction_reproduces_the_co_qat_table(s, expected):
    # N * B / 8 = 1 byte, so S = D
    assert round(predict_qat_fraction(tokens=s, params=1, bits=8), 3) == expected


@pytest.mark.parametrize("params, bits, tokens, s, f", [
    (1e9, 4, 20e9, 40, 0.16),          # 1B params, 4 bit, 20B tokens
    (1e9, 4, 100e9, 200, 0.28),        # same model, 100B tokens
    (1e9, 2, 100e9, 400, 0.33),        # 2 bit, 100B tokens
    (125e6, 4, 100e9, 1600, 0.40),     # 125M params, 4 bit, 100B tokens
])
def test_prediction_reproduces_the_worked_examples(params, bits, tokens, s, f):
    p = plan(tokens, params, bits)
    assert p.tokens_per_param_byte == pytest.approx(s)
    assert p.qat_fraction == pytest.approx(f, abs=0.005)
    assert p.qat_tokens + p.fp_tokens == pytest.approx(tokens)
    assert p.in_fitted_range and p.note is None


def test_prediction_rises_with_tokens_and_falls_with_bits():
    fs = [predict_qat_fraction(10 ** k, 1e6, 4) for k in range(8, 13)]
    assert all(b > a for a, b in zip(fs, fs[1:]))
    assert predict_qat_fraction(1e10, 1e6, 2) > predict_qat_fraction(1e10, 1e6, 8)


def test_at_or_below_one_token_per_byte_the_fraction_is_zero_and_flagged():
    for tokens in (0.5, 1.0):
        p = plan(tokens, 1, 8)
        assert p.qat_fraction == 0.0 and p.qat_tokens == 0.0 and not p.in_fitted_range
        assert "does not apply" in p.note
    # just above 1 the formula's limit is 0 too (continuous at S = 1)
    assert predict_qat_fraction(1.0001, 1, 8) < 1e-6


def test_outside_the_fitted_range_the_prediction_is_an_extrapolation():
    lo, hi = FITTED_S_RANGE
    below, above = plan(lo / 2, 1, 8), plan(hi * 10, 1, 8)
    assert not below.in_fitted_range and "below the fitted range" in below.note
    assert not above.in_fitted_range and "above the fitted range" in above.note
    assert above.qat_fraction == pytest.approx(math.exp(-6.7297 / math.log(hi * 10)))
    assert 0 <= predict_qat_fraction(1e300, 1, 8) <= 1


def test_bad_planner_input_is_a_coqat_error():
    with pytest.raises(CoqatError, match="positive"):
        plan(0, 1e6, 4)
    with pytest.raises(CoqatError, match="positive"):
        predict_qat_fraction(1e9, 1e6, float("nan"))


# ----- the CLI -------------------------------------------------------------------------------
def test_plan_cli_prints_s_fraction_and_token_split():
    out = cli_json("plan", "--params", "1e9", "--tokens", "100e9", "--bits", "4")
    assert out["tokens_per_param_byte"] == pytest.approx(200)
    assert round(out["qat_fraction"], 3) == CO_QAT_TABLE[200]
    assert out["qat_tokens"] == pytest.approx(100e9 * out["qat_fraction"])
    human = run_cli("plan", "--params", "1e9", "--tokens", "100e9", "--bits", "4")
    assert human.returncode == 0 and "0.281" in human.stdout and "200.0" in human.stdout
    assert "extrapolation" not in human.stdout


def test_plan_cli_flags_extrapolation_and_refuses_bad_numbers():
    out = cli_json("plan", "--params", "30e6", "--tokens", "60e6", "--bits", "4")
    assert out["in_fitted_range"] is False and out["qat_fraction"] < 0.02
    human = run_cli("plan", "--params", "30e6", "--tokens", "60e6", "--bits", "4")
    assert "extrapolation" in human.stdout
    assert_one_line_error(run_cli("plan", "--params", "0", "--tokens", "1e9", "--bits", "4"),
                          "positive")


# ----- schedules of real runs ------------------------------------------------------------------
def test_auto_fraction_sets_qat_start_from_the_prediction(runs):
    # digits: 1 token per sample; batch 1024 x 40 steps over 3,818 quantized 4-bit
    # parameters -> S = 40960 / 1909 = 21.5, f = 0.111 -> round(4.45) = 4 QAT steps
    prep = prepare_run(DIGITS, runs, bits="w4a4", qat_fraction="auto", batch_size=1024)
    f = predict_qat_fraction(40 * 1024, 3818, 4)
    assert prep.qat_plan["qat_fraction"] == pytest.approx(f)
    assert prep.qat_plan["tokens_per_param_byte"] == pytest.approx(40960 / 1909)
    assert prep.schedule.qat_start == 40 - round(f * 40) == 36


def test_mixed_bits_plan_uses_the_parameter_weighted_mean_bits(runs, tmp_path):
    prep = prepare_run(DIGITS, runs, bits="w4a4")
    params = {n: prep.cost.layers[n].params for n in prep.bitconfig.layers}
    cfg = BitConfig({n: LayerBits(2 if n == "conv2" else 8, 8, "quest") for n in params},
                    prep.bitconfig.tie_groups)
    path = tmp_path / "mixed.json"
    cfg.save(path, prep.cost)
    mixed = prepare_run(DIGITS, runs, bits=str(path), qat_fraction="auto", batch_size=1024)
    mean_bits = sum((2 if n == "conv2" else 8) * k for n, k in params.items()) / sum(
        params.values())
    assert mixed.qat_plan["bits"] == pytest.approx(mean_bits)
    assert mixed.qat_plan["qat_fraction"] == pytest.approx(
        predict_qat_fraction(40 * 1024, sum(params.values()), mean_bits))


@pytest.mark.parametrize("bits, flag, fused", [
    ("w4a4", None, True), ("w2a4", None, False),          # defaults: fuse at >= 4 bits
    ("w4a4", False, False), ("w2a4", True, True),          # explicit choice wins
])
def test_cooldown_fusion_default_and_override(runs, bits, flag, fused):
    prep = prepare_run(DIGITS, runs, bits=bits, qat_fraction=0.5, fuse_cooldown=flag)
    s = prep.schedule
    assert s.fused is fused and s.qat_start == 20
    lrs = [s.lr_factor(i) for i in range(40)]
    if fused:   # QAT starts at peak LR and decays to the end: no re-warm-up
        assert lrs[19] == 1.0 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    else:       # FP cools down first, QAT warms up again
        assert lrs[19] == pytest.approx(0.1) and max(lrs[20:]) == 1.0 > lrs[20]
    assert lrs[39] == pytest.approx(0.1)


def test_cage_training_end_to_end_logs_lambda_and_pull_and_records_the_schedule(runs):
    """`coqat train --optimizer cage-d --qat-fraction auto` on digits: 4 QAT steps (see
    above), fused at 4 bits; the log at step 40 shows lambda = 10 and the per-layer pull."""
    out = cli_json("train", "--space", DIGITS, "--bits", "w4a4", "--optimizer", "cage-d",
                   "--qat-fraction", "auto", "--batch-size", "1024", "--cage-silence", "0.5",
                   "--out", str(runs))
    assert out["qat_steps"] == 4 and out["schedule"] == "fused"
    run = out["run_dir"]
    with open(f"{run}/config.json") as fh:
        cfg = json.load(fh)
    assert cfg["schedule"]["shape"] == "fused" and cfg["schedule"]["qat_start"] == 36
    assert cfg["qat_plan"]["in_fitted_range"] and cfg["settings"]["optimizer"] == "cage-d"
    with open(f"{run}/metrics.jsonl") as fh:
        train = [r for r in map(json.loads, fh) if r["kind"] == "train"]
    assert [r["cage_lambda"] for r in train] == [0.0] * 7 + [10.0]
    last = train[-1]
    assert set(last["cage_pull"]) == {"conv1", "conv2", "fc"}
    assert 0 < last["cage_pull_mean"] <= last["cage_pull_max"] < 1
    assert "cage_pull" not in train[0]                      # FP phase: nothing to pull
    # lr decays monotonically through the QAT phase (fused)
    assert train[-1]["lr"] < train[-2]["lr"]


def test_unfused_run_records_its_shape_and_rewarms(runs):
    out = cli_json("train", "--space", DIGITS, "--bits", "w2a4", "--qat-fraction", "0.5",
                   "--optimizer", "cage-c", "--out", str(runs))
    assert out["schedule"] == "unfused" and out["qat_steps"] == 20
    with open(f"{out['run_dir']}/config.json") as fh:
        cfg = json.load(fh)
    assert cfg["schedule"]["shape"] == "unfused" and cfg["schedule"]["fused"] is False
    with open(f"{out['run_dir']}/metrics.jsonl") as fh:
        lrs = {r["step"]: r["lr"] for r in map(json.loads, fh) if r["kind"] == "train"}
    assert lrs[20] < lrs[25]                               # FP cooled down, QAT re-warmed


def test_bad_qat_fraction_is_a_one_line_error(runs):
    assert_one_line_error(run_cli("train", "--space", DIGITS, "--bits", "w4a4",
                                  "--qat-fraction", "most", "--out", str(runs)),
                          "--qat-fraction")
    assert_one_line_error(run_cli("train", "--space", DIGITS, "--bits", "w4a4",
                                  "--qat-fraction", "1.5", "--out", str(runs)),
                          "qat_fraction")
