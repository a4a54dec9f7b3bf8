"""The sensitivity diagnostic (``coqat sensitivity``) and ``--method sensitivity``.

Fast: the digits CNN's FP phase (40 steps) is trained once per module and cached; every
measurement uses 2-4 holdout batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import threading
import time
from pathlib import Path

import pytest
import torch

import coqat
from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.bitsearch import run_search
from coqat.bitsearch.pipeline import load_or_train_fp
from coqat.bitsearch.problem import Assignment
from coqat.bitsearch.baselines import fill_floor
from coqat.bitsearch.knapsack import repair
from coqat.bitsearch.sensitivity import (FILE, Sensitivity, cache_name, estimate, fp_job,
                                         measure, monotone_row, predicted_delta, values)
from coqat.errors import CoqatError
from coqat.quant import QuantConv2d, QuantLinear, quantize_model
from coqat.reporting import sensitivity as view
from coqat.rundir import RunDir
from coqat.util import exclusive_lock
from conftest import DIGITS, LM_MICRO, assert_one_line_error, cli_json, run_cli, run_config, \
    train_run


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits space's FP phase (trained once, cached where the search finds it)."""
    out = tmp_path_factory.mktemp("runs")
    job = fp_job(run_config(DIGITS, out, steps=40, fp_steps=40))
    load_or_train_fp(job, lambda _msg: None)
    return job, out


def _table(job, **kw) -> Sensitivity:
    prep = job.fp_prep
    return measure(prep.model, job.problem, prep.workload, **{"batches": 3, "batch_size": 32,
                                                               **kw})


def _mean_loss(model, workload, batches: int, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(workload.loss(model, workload.get_batch("holdout", i, batch_size)))
                   for i in range(batches)) / batches


# ----- the numbers -------------------------------------------------------------------------
def test_a_cell_is_the_loss_change_of_quantizing_that_one_tensor_by_hand(digits):
    job, _ = digits
    prep, p = job.fp_prep, job.problem
    table = _table(job)
    base = _mean_loss(copy.deepcopy(prep.model), prep.workload, 3, 32)
    assert table.baseline_loss == pytest.approx(base, rel=1e-6)
    rows = {d.name: d for d in table.decisions}
    # one layer's weight at 2 bits, its input and every other layer in float
    wd = p.w_decisions[1]
    hand = quantize_model(copy.deepcopy(prep.model),
                          BitConfig({n: LayerBits(2, FLOAT_BITS) for n in wd.layers}),
                          kernels="reference")
    want = _mean_loss(hand, prep.workload, 3, 32) - base
    assert rows[wd.name].at(2) == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert abs(want) > 1e-4                       # 2-bit weights do move the loss
    # an activation decision at 4 bits: every layer reading that input
    ad = p.a_decisions[-1]
    hand = quantize_model(copy.deepcopy(prep.model),
                          BitConfig({n: LayerBits(FLOAT_BITS, 4) for n in ad.layers}),
                          kernels="reference")
    want = _mean_loss(hand, prep.workload, 3, 32) - base
    assert rows[ad.name].at(4) == pytest.approx(want, rel=1e-4, abs=1e-7)
    # the model given is not changed by measuring it
    assert all(type(m).__name__ in ("Linear", "Conv2d")
               for n, m in prep.model.named_modules() if n in p.searchable)


def test_the_fisher_estimate_is_half_n_g2_e2_computed_by_hand(digits):
    """``estimate``: each weight cell is 1/2 * N * sum(g^2 * e^2) (N: the batch's targets),
    g the gradient of the batch loss of the float model (plain autograd here) and e = QuantLinear/QuantConv2d's own
    projection minus the weight (another code path than the search layers'); every cell is
    >= 0 and the 2-bit cell exceeds the 8-bit one; one forward/backward pass per batch."""
    job, _ = digits
    prep, p = job.fp_prep, job.problem
    table = estimate(prep.model, p, prep.workload, batches=2, batch_size=32)
    assert table.forward_passes == 2 and "Fisher" in table.notes[0]
    rows = {d.name: d for d in table.decisions}
    wd = p.w_decisions[1]
    name = wd.layers[0]
    per_batch = []
    for k in range(2):
        model = copy.deepcopy(prep.model)
        batch = prep.workload.get_batch("holdout", k, 32)
        prep.workload.loss(model, batch).backward()
        layer = model.get_submodule(name)
        q = (QuantConv2d if isinstance(layer, torch.nn.Conv2d) else QuantLinear).from_float(
            copy.deepcopy(layer), 2, FLOAT_BITS)
        e = q.project_weight() - layer.weight.detach()
        per_batch.append(0.5 * batch[0].shape[0] * float((layer.weight.grad ** 2 * e ** 2).sum()))
    assert rows[wd.name].at(2) == pytest.approx(sum(per_batch) / 2, rel=1e-4)
    for d in table.decisions:
        assert all(v >= 0 for v in d.delta)
        assert d.delta[0] > d.delta[-1]                 # lowest width vs highest
        assert all(se is not None for se in d.se)


def test_low_widths_hurt_more_than_high_ones_and_every_decision_is_measured(digits):
    job, _ = digits
    table = _table(job)
    p = job.problem
    assert [d.name for d in table.decisions] == [d.name for d in p.decisions]
    assert all(d.widths == [b for b in p.decisions[i].choices if b != FLOAT_BITS]
               for i, d in enumerate(table.decisions))
    w2 = [d.at(2) for d in table.decisions if d.kind == "w"]
    w8 = [d.at(8) for d in table.decisions if d.kind == "w"]
    a4 = [d.at(4) for d in table.decisions if d.kind == "a"]
    a8 = [d.at(8) for d in table.decisions if d.kind == "a"]
    assert sum(w2) / len(w2) > sum(w8) / len(w8) + 1e-3
    assert sum(a4) / len(a4) > sum(a8) / len(a8)
    assert table.forward_passes == 1 + sum(len(d.widths) for d in table.decisions)
    assert table.baseline_se > 0 and all(s is not None and s >= 0
                                         for d in table.decisions for s in d.se)
    assert all(s["min"] <= s["max"] for s in table.spread())


def test_spread_tells_alike_from_different_decisions():
    from coqat.bitsearch.sensitivity import DecisionSensitivity

    def table(deltas):
        rows = [DecisionSensitivity(f"w:l{i}", "w", [f"l{i}"], 10, [2], [d], [0.01])
                for i, d in enumerate(deltas)]
        return Sensitivity("s", "given", "quest", "holdout", 4, 8, 1.0, 0.1, rows, 5, 0.0)

    alike = table([0.100, 0.101, 0.099, 0.1005, 0.0995]).spread()[0]
    apart = table([0.10, 0.30, 0.10, 0.10, 0.10]).spread()[0]
    assert alike["p_alike"] > 0.5 and apart["p_alike"] < 1e-6
    assert (apart["min"], apart["max"], apart["max_decision"]) == (0.10, 0.30, "w:l1")


def test_measuring_twice_gives_the_same_table(digits):
    job, _ = digits
    one, two = _table(job, bits=[2, 4]), _table(job, bits=[2, 4])
    strip = {"wall_s": 0}
    assert dataclasses.replace(one, **strip) == dataclasses.replace(two, **strip)
    assert one.widths == [2, 4]


def test_json_round_trip_and_damaged_files(digits, tmp_path):
    job, _ = digits
    table = _table(job, bits=[2, 8])
    table.decisions[0].delta[0] = math.inf            # a loss that was not finite
    path = table.save(tmp_path / FILE)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "coqat.sensitivity/v1" and doc["decisions"][0]["delta"][0] is None
    assert Sensitivity.load(path) == table
    assert view.read(path)["baseline_loss"] == table.baseline_loss
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "schema": "other"}))
    with pytest.raises(CoqatError, match="not a coqat sensitivity table"):
        Sensitivity.load(tmp_path / "bad.json")
    with pytest.raises(CoqatError, match="not a coqat sensitivity table"):
        view.read(tmp_path / "bad.json")
    del doc["decisions"][0]["se"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CoqatError, match="damaged"):
        Sensitivity.load(tmp_path / "bad.json")


def test_widths_outside_the_space_are_refused(digits):
    job, _ = digits
    with pytest.raises(CoqatError, match=r"width\(s\) 3 are not a candidate.*\[2, 4, 8\]"):
        _table(job, bits=[2, 3])


# ----- the method ---------------------------------------------------------------------------
def test_method_meets_the_budget_in_the_fill_window_and_is_deterministic(digits):
    job, out = digits
    cfg = run_config(DIGITS, out, steps=40, fp_steps=40, proxy_batches=3)
    runs = [run_search(cfg, "w4a4", "sensitivity", final_qat=False) for _ in range(2)]
    (run, rec), (_, again) = runs
    s = rec.search
    assert s.fp_phase["reused"] is True               # the fixture's FP phase
    assert s.achieved_bops <= s.budget_bops and s.searchable_over_budget >= 0.97
    assert again.search.assignment == s.assignment
    table = Sensitivity.load(run.file(f"search/{FILE}"))
    p = job.problem
    rows = {d.name: d for d in table.decisions}

    def loss_change(asg: Assignment) -> float:     # the table's sum, computed here
        return sum(rows[d.name].at(b) for d, b in zip(p.decisions, asg.w + asg.a))

    asg = Assignment(tuple(s.assignment["w"]), tuple(s.assignment["a"]))
    summary = run.read_json("search/search.json")["sensitivity"]
    assert summary["predicted_delta_loss"] == pytest.approx(loss_change(asg))
    assert predicted_delta(table, p, asg) == pytest.approx(loss_change(asg))
    assert summary["clean"] == "monotone"
    assert summary["predicted_delta_loss_clean"] == pytest.approx(
        predicted_delta(table, p, asg, "monotone"))
    # the uniform config fills the budget exactly, so the knapsack saw it: the choice is
    # predicted (from the rows it optimised, made monotone) to lose no more than it
    assert predicted_delta(table, p, asg, "monotone") <= \
        predicted_delta(table, p, p.uniform(4, 4), "monotone") + 1e-12
    wv, av = values(table, p)
    assert wv[0] == [-rows[p.w_decisions[0].name].at(b) for b in p.w_decisions[0].choices]


def test_monotone_row_is_the_isotonic_fit_clipped_at_zero():
    from scipy.optimize import isotonic_regression   # the independent reference
    # widest first: 8 bits reads -0.002 (noise: clipped), 3 bits reads below 4 bits (pooled)
    assert monotone_row([2, 3, 4, 8], [0.5, 0.01, 0.03, -0.002]) == \
        pytest.approx([0.5, 0.02, 0.02, 0.0])
    assert monotone_row([8, 2, 4, 3], [-0.002, 0.5, 0.03, 0.01]) == \
        pytest.approx([0.0, 0.5, 0.02, 0.02])          # any order in, same order out
    assert monotone_row([2, 3, 4], [0.1, math.inf, 0.05]) == [math.inf, math.inf, 0.05]
    assert monotone_row([2, 4, 8], [0.3, 0.1, 0.0]) == [0.3, 0.1, 0.0]  # already clean
    rng = random.Random(0)
    for _ in range(300):
        bits = rng.sample([2, 3, 4, 6, 8, FLOAT_BITS], rng.randint(1, 6))
        delta = [rng.gauss(0.1, 0.3) for _ in bits]
        got = monotone_row(bits, delta)
        up = sorted(range(len(bits)), key=lambda i: bits[i])
        ref = isotonic_regression([delta[i] for i in up], increasing=False).x
        assert [got[i] for i in up] == pytest.approx([max(0.0, v) for v in ref], abs=1e-12)


def test_a_budget_that_fits_every_widest_choice_gets_it_from_cleaned_rows(digits):
    """The control of issue #16: where every decision's widest choice fits, a raw table
    with one noise cell below zero makes the knapsack drop bits for nothing; read through
    monotone_row it returns the widest config itself."""
    job, _ = digits
    p = job.problem
    table = _table(job, batches=2)
    i = min(range(len(p.w_decisions)), key=lambda k: p.macs[p.w_decisions[k].layers[0]])
    row = next(r for r in table.decisions if r.name == p.w_decisions[i].name)
    row.delta[0] = -0.01                    # the cheapest weight's narrowest width: a "gain"
    widest = p.extreme(max)
    budget = p.bops(widest)
    lo = fill_floor(p, budget, 0.9)         # room for that drop (fc is 10% of the MACs)
    raw = repair(p, *values(table, p), budget, lo=lo).assignment
    clean = repair(p, *values(table, p, "monotone"), budget, lo=lo).assignment
    assert clean == widest
    assert raw != widest and raw.w[i] == row.widths[0]
    with pytest.raises(CoqatError, match="clean must be"):
        values(table, p, "isotonic")


def test_method_with_the_fisher_estimate_meets_the_budget_and_caches_apart(digits):
    job, out = digits
    cfg = run_config(DIGITS, out, steps=40, fp_steps=40, proxy_batches=2,
                     sensitivity_estimate="fisher")
    run, rec = run_search(cfg, "w4a4", "sensitivity", final_qat=False)
    s = rec.search
    assert s.achieved_bops <= s.budget_bops and s.searchable_over_budget >= 0.97
    table = Sensitivity.load(run.file(f"search/{FILE}"))
    assert "Fisher" in table.notes[0] and table.forward_passes == 2
    fp_dir = Path(s.fp_phase["cache"])
    assert (fp_dir / cache_name(job.problem, 2, cfg.train.eval_batch_size, "cpu",
                                "fisher")).is_file()
    _, again = run_search(cfg, "w4a4", "sensitivity", final_qat=False)
    assert again.search.assignment == s.assignment
    with pytest.raises(CoqatError, match="sensitivity_estimate"):
        run_config(DIGITS, out, sensitivity_estimate="hessian")


def test_the_table_is_measured_once_per_fp_phase(digits):
    """A second sensitivity search of the same FP phase (another budget) reads the table
    the first one measured and cached beside the FP weights; other batches measure again."""
    job, out = digits
    cfg = run_config(DIGITS, out, steps=40, fp_steps=40, proxy_batches=2)
    notes: list[str] = []
    first, rec1 = run_search(cfg, "w4a4", "sensitivity", final_qat=False)
    second, rec2 = run_search(cfg, "0.8*w4a4+0.2*w2a4", "sensitivity", final_qat=False,
                              say=notes.append)
    assert any("sensitivity: reusing" in n for n in notes)
    fp_dir = Path(rec1.search.fp_phase["cache"])
    cached = fp_dir / cache_name(job.problem, 2, cfg.train.eval_batch_size, "cpu")
    t1, t2 = (Sensitivity.load(r.file(f"search/{FILE}")) for r in (first, second))
    assert t1.to_dict() == t2.to_dict() == Sensitivity.load(cached).to_dict()
    before = set(fp_dir.glob("sensitivity-*.json"))
    other = run_config(DIGITS, out, steps=40, fp_steps=40, proxy_batches=1)
    run_search(other, "w4a4", "sensitivity", final_qat=False)
    assert len(set(fp_dir.glob("sensitivity-*.json")) - before) == 1


def test_searches_of_one_fp_phase_running_at_once_measure_the_table_once(digits):
    """Two searches of one seed started together (a benchmark's workers): the second waits
    on the table's lock while the first measures, then reads the table instead of measuring
    it again. Here the test holds the lock and writes the table while the search waits."""
    job, out = digits
    cfg = run_config(DIGITS, out, steps=40, fp_steps=40, proxy_batches=2)
    _, rec = run_search(cfg, "w4a4", "sensitivity", final_qat=False)
    cached = Path(rec.search.fp_phase["cache"]) / cache_name(
        job.problem, 2, cfg.train.eval_batch_size, "cpu")
    text = cached.read_text()
    cached.unlink()
    notes: list[str] = []
    started = threading.Event()

    def say(line: str) -> None:
        notes.append(line)
        if "decisions" in line:
            started.set()           # choose() has begun; the cache file is absent now

    errors: list[BaseException] = []

    def second() -> None:
        try:
            run_search(cfg, "0.8*w4a4+0.2*w2a4", "sensitivity", final_qat=False, say=say)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    with exclusive_lock(cached.with_name(cached.name + ".lock")):
        t = threading.Thread(target=second)
        t.start()
        assert started.wait(120)
        time.sleep(0.5)             # time enough to measure the tiny table, were it not waiting
        cached.write_text(text)     # what the first search would write under the lock
    t.join(120)
    assert not errors and not t.is_alive()
    assert any("sensitivity: reusing" in n for n in notes)


def test_low_bit_candidates_meet_a_mean_wa_budget_exactly(tmp_path):
    """Weights and activations in {2,3,4,8} under ``wa6`` (between the uniform points):
    the sensitivity method and the uniform baseline both stay within the budget, the
    uniform one at an asymmetric pair, and the final QAT runs at 2- and 3-bit inputs."""
    space = tmp_path / "digits-low.toml"
    space.write_text(Path(DIGITS).read_text()
                     .replace('name = "digits-test"', 'name = "digits-low"')
                     .replace("w_bits = [2, 4, 8]", "w_bits = [2, 3, 4, 8]")
                     .replace("a_bits = [4, 8]", "a_bits = [2, 3, 4, 8]"))
    cfg = run_config(str(space), tmp_path / "runs", steps=6, fp_steps=6, proxy_batches=1,
                     eval_every=6, checkpoint_every=6)
    _, uni = run_search(cfg, "wa6", "uniform", final_qat=False)
    assert uni.search.uniform == "w2a3"                   # w3a2 costs the same; more a wins
    assert uni.search.achieved_bops == uni.search.budget_bops   # w*a = 6 fills it exactly
    assert uni.search.mean_wa == pytest.approx(6) and uni.search.budget_mean_wa == pytest.approx(6)
    run, sens = run_search(cfg, "wa6", "sensitivity")
    s = sens.search
    assert s.achieved_bops <= s.budget_bops and s.searchable_over_budget >= 0.97
    assert 0.97 * 6 <= s.mean_wa <= 6 + 1e-9
    assert set(s.assignment["a"]) <= {2, 3, 4, 8} and sens.metric is not None
    bits = BitConfig.load(run.file("bitconfig.json"))
    assert min(b.a_bits for b in bits.layers.values()) <= 3   # 6 < 4*2 forces a low input


# ----- API, CLI and report --------------------------------------------------------------------
def test_run_weights_are_measured_and_the_report_shows_the_heatmap(tmp_path):
    run, _ = train_run(DIGITS, tmp_path / "runs", steps=10)
    table = coqat.sensitivity(run=run.path, bits="2,8", batches=2, save=run.path)
    assert table.weights == f"run {run.path}" and table.widths == [2, 8]
    assert not any("trained quantized" in n for n in table.notes)    # an FP run
    job = fp_job(run_config(DIGITS, tmp_path / "x"))
    job.fp_prep.model.load_state_dict(run.load_weights())
    want = _mean_loss(job.fp_prep.model, job.fp_prep.workload, 2, table.batch_size)
    assert table.baseline_loss == pytest.approx(want, rel=1e-6)
    rep, files = coqat.report(run.path)
    assert "sensitivity" in files and files["sensitivity"].is_file()
    assert "<h2>Sensitivity</h2>" in files["html"].read_text()


def test_a_quantized_run_is_measured_with_a_note_that_says_so(tmp_path):
    run, _ = train_run(DIGITS, tmp_path / "runs", bits="w4a4", steps=4)
    table = coqat.sensitivity(run=run.path, bits="2", batches=1)
    assert any("trained quantized" in n for n in table.notes)


def test_cli_table_json_and_files(tmp_path):
    res = cli_json("sensitivity", "--space", LM_MICRO, "--fp-steps", "3", "--bits", "2,4",
                   "--batches", "2", "--out", str(tmp_path))
    assert res["source"] == "lm-micro" and {d["kind"] for d in res["decisions"]} == {"w", "a"}
    assert all(set(d["widths"]) <= {2, 4} for d in res["decisions"])
    for key in ("json", "html", "png"):
        assert (tmp_path / "sensitivity-lm-micro-s0" / {"json": FILE, "html": view.HTML,
                                                        "png": view.PNG}[key]).is_file()
    proc = run_cli("sensitivity", "--space", LM_MICRO, "--fp-steps", "3", "--bits", "8",
                   "--batches", "1", "--out", str(tmp_path), env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "8 bits" in proc.stdout and "w:0.self_attn.q_proj" in proc.stdout
    assert "FP phase: reusing" in proc.stdout           # the cached FP phase of the first call
    fisher = cli_json("sensitivity", "--space", LM_MICRO, "--fp-steps", "3", "--bits", "2,4",
                      "--batches", "2", "--estimate", "fisher", "--out", str(tmp_path),
                      "--to", str(tmp_path / "fisher"))
    assert fisher["forward_passes"] == 2 and "Fisher" in fisher["notes"][0]
    assert [d["name"] for d in fisher["decisions"]] == [d["name"] for d in res["decisions"]]
    assert all(v >= 0 for d in fisher["decisions"] for v in d["delta"])


@pytest.mark.parametrize("args,needles", [
    (["--run", "no/such/run"], ["run directory", "does not exist"]),
    (["--space", LM_MICRO, "--bits", "5"], ["width(s) 5", "not a candidate"]),
    (["--space", LM_MICRO, "--bits", "two"], ["not a list of widths"]),
    (["--space", LM_MICRO, "--weights", "random"], ["not a source of weights"]),
    (["--space", LM_MICRO, "--estimate", "hessian"], ["not a way to get the table", "fisher"]),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, args, needles):
    out = [] if "--run" in args else ["--out", str(tmp_path / "runs")]
    proc = run_cli("sensitivity", *args, *out, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "runs").exists()            # nothing trained, nothing written
