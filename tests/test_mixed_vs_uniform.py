"""benchmarks/mixed_vs_uniform.py: the uniform arms it plans and the statistics it reports,
on known inputs (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LM_MICRO

ROOT = Path(__file__).resolve().parent.parent


def test_uniform_arms_are_the_maximal_pairs_under_the_budget(mvu):
    # lm-micro: weights {2,3,4,6,8} x activations {4,6,8}
    assert mvu.uniform_pairs(LM_MICRO, "wa9") == [(2, 4)]
    assert mvu.uniform_pairs(LM_MICRO, "w4a4") == [(2, 8), (4, 4)]
    assert mvu.uniform_pairs(LM_MICRO, "wa24") == [(3, 8), (4, 6), (6, 4)]
    assert mvu.budget_mean("wa7.5") == 7.5 and mvu.budget_mean("w3a4") == 12
    # a preset's target takes what it cannot serve out of the uniform arms (ONNX: no 3-
    # or 6-bit types), and its search jobs carry the target
    assert mvu.uniform_pairs(LM_MICRO, "wa24") != mvu.uniform_pairs(LM_MICRO, "wa24", "onnx")
    assert mvu.uniform_pairs(LM_MICRO, "wa24", "onnx") == [(2, 8), (4, 4)]
    cfg = mvu.subset(dict(mvu.PRESETS["cpu-lm-tiny"]), None, None)
    jobs = [p[3] for p in mvu.plan(cfg)]
    assert {j.target for j in jobs if j.is_search} == {"onnx"}
    assert sorted({j.bits for j in jobs if not j.is_search}) == ["w2a4", "w2a8", "w4a4"]


def test_the_demo_quotes_the_grids_at_its_own_setting(tmp_path):
    """The demo's paired figures are read from the committed lm-tiny grids: the gumbel arm
    vs the best uniform at the demo's budget; another setting is said to be another; Holm
    is quoted only where the grid tested several mixed arms."""
    from coqat.demo import DEMO_STEPS, reference_figure, reference_figures

    rows = [{"metric_name": "val_loss"}]
    cmp = {"n": 8, "mean": 0.0123, "se": 0.0045, "p_t": 0.013, "wins": 7}
    res = {"preset": {"options": {"steps": DEMO_STEPS}, "target": "onnx",
                      "mixed": ["sensitivity", "gumbel"]}, "rows": rows,
           "analysis": {"w4a4": {"best_uniform": "w4a4", "holm": {"gumbel": 0.026},
                                 "comparisons": {"gumbel": {"vs_best_uniform": cmp,
                                                            "seeds": list(range(8))}}}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    text = reference_figure("w4a4", path)
    assert "val_loss better by +0.0123 ± 0.0045" in text and "p = 0.013" in text
    assert "(Holm over its 2 mixed arms 0.026)" in text and "(8 seeds, 0-7;" in text
    assert "7 of 8 seeds" in text and "this demo's setting" in text
    assert "not this run's setting" in reference_figure("w4a4", path, steps=DEMO_STEPS + 1)
    assert "not this run's setting" in reference_figure("w4a4", path, target=None)
    assert reference_figure("wa9", path) is None                  # a budget it did not run
    res["preset"]["mixed"] = ["gumbel"]
    path.write_text(json.dumps(res))
    assert "Holm" not in reference_figure("w4a4", path)           # one arm: p is the test
    path.write_text("{not json")
    assert reference_figure("w4a4", path) is None                 # damaged: no figure
    # the committed grids: the first (seeds 0-7) and its replication (seeds 8-23)
    first, rep = reference_figures("w4a4")
    assert "reports/mixed_vs_uniform/lm-tiny (8 seeds, 0-7;" in first
    assert "reports/mixed_vs_uniform/lm-tiny-rep (16 seeds, 8-23;" in rep


def test_holm_adjusts_in_rank_order_and_keeps_missing_values(mvu):
    adj = mvu.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj == {"a": pytest.approx(0.03), "c": pytest.approx(0.06),
                   "b": pytest.approx(0.06), "d": None}


def test_analysis_pairs_each_mixed_arm_with_the_best_uniform_by_seed(mvu):
    acc = {"w2a8": [0.90, 0.91, 0.92], "w4a4": [0.93, 0.92, 0.94],
           "sensitivity": [0.94, 0.93, 0.96], "random": [0.90, 0.90]}   # random: 2 seeds
    rows = [{"arm": arm, "budget": "w4a4", "seed": s, "metric": v, "metric_name": "val_acc",
             "higher_is_better": True, "bops": 100 + 16 * 10, "budget_bops": 260,
             "fixed_bops": 100, "assignment": {"w": [4], "a": [4]}, "fp_metric": 0.95}
            for arm, vals in acc.items() for s, v in enumerate(vals)]
    res = {"preset": {"space": LM_MICRO, "budgets": ["w4a4"], "seeds": 3, "device": "cpu"},
           "rows": rows}
    e = mvu.analyse(res)["w4a4"]
    assert e["best_uniform"] == "w4a4" and e["seeds_complete"] == [0, 1, 2]
    assert e["not_finished"] == {"gumbel": 3, "random": 1}
    s = e["comparisons"]["sensitivity"]["vs_best_uniform"]
    assert s["differences"] == pytest.approx([0.01, 0.01, 0.02]) and s["wins"] == 3
    assert e["comparisons"]["random"]["seeds"] == [0, 1]
    assert "gumbel" not in e["comparisons"]
    assert e["arms"]["w4a4"]["mean_wa"] == pytest.approx(16)
    assert "Primary hypothesis" not in mvu.readme(res, ROOT / "reports")   # no budget <= 9


def test_an_earlier_results_file_is_kept_only_for_its_own_space(mvu, tmp_path):
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"preset": {"space": "lm-micro"}, "wall_s": 5.0, "rows": [
        {"arm": "w4a4", "budget": "w4a4", "seed": 0, "metric": 1.0}]}))
    rows = mvu.kept_rows({"space": "lm-micro"}, earlier)
    assert rows == [{"arm": "w4a4", "budget": "w4a4", "seed": 0, "metric": 1.0,
                     "kept_from": str(earlier)}]
    assert mvu.kept_rows({"space": "lm-micro"}, None) == []
    with pytest.raises(SystemExit, match="not 'fashion-resnet'"):
        mvu.kept_rows({"space": "fashion-resnet"}, earlier)


def test_a_preset_picks_its_mixed_arms_and_their_search_options(mvu):
    cfg = {"space": LM_MICRO, "budgets": ["w4a4"], "seeds": 1, "device": "cpu",
           "compile": "off", "mixed": ["sensitivity-fisher", "random"]}
    plan = {arm: job for arm, _, _, job in mvu.plan(cfg)}
    assert set(plan) == {"sensitivity-fisher", "random", "w2a8", "w4a4"}
    fisher = plan["sensitivity-fisher"]
    assert fisher.method == "sensitivity" and fisher.options["sensitivity_estimate"] == "fisher"
    assert plan["w4a4"].bits == "w4a4" and plan["random"].method == "random"


def test_a_call_can_run_a_subset_and_the_report_names_what_is_owed(mvu):
    cfg = {"space": LM_MICRO, "budgets": ["w4a4", "w8a8"], "seeds": 1, "device": "cpu",
           "compile": "off", "mixed": ["sensitivity", "gumbel", "random"]}
    cut = mvu.subset(cfg, "w8a8", "random,sensitivity")
    assert cut["budgets"] == ["w8a8"] and cut["mixed"] == ["sensitivity", "random"]
    assert cut["planned"] == {"budgets": ["w4a4", "w8a8"],
                              "mixed": ["sensitivity", "gumbel", "random"]}
    assert {(arm, b) for arm, b, _, _ in mvu.plan(cut)} == {
        ("sensitivity", "w8a8"), ("random", "w8a8"), ("w8a8", "w8a8")}
    assert mvu.subset(cfg, None, None)["budgets"] == cfg["budgets"]
    with pytest.raises(SystemExit, match="pick from sensitivity, gumbel, random"):
        mvu.subset(cfg, None, "fisher")
    with pytest.raises(SystemExit, match="--budgets"):
        mvu.subset(cfg, "wa9", None)
    res = {"preset": cut, "rows": [
        {"arm": a, "budget": "w8a8", "seed": 0, "metric": 1.0, "metric_name": "val_loss",
         "higher_is_better": False, "bops": 1, "budget_bops": None, "fixed_bops": None,
         "assignment": None, "fp_metric": None} for a in ("sensitivity", "random", "w8a8")]}
    page = mvu.readme(res, ROOT / "reports")
    assert "not yet run budgets w4a4; mixed arms gumbel" in page
    assert "not yet run" not in mvu.readme({**res, "preset": mvu.subset(cfg, None, None)},
                                           ROOT / "reports")
    # a later call of the Gumbel arms alone, on top of a kept file: the file names both
    later = mvu.subset(cfg, None, "gumbel")
    kept = [{"arm": "sensitivity", "budget": "w4a4"}, {"arm": "w4a4", "budget": "w4a4"}]
    both = mvu.covered(later, kept)
    assert both["mixed"] == ["sensitivity", "gumbel"] and both["budgets"] == ["w4a4", "w8a8"]
    assert mvu.covered(later, [])["mixed"] == ["gumbel"]


def test_the_primary_verdict_waits_for_every_planned_seed(mvu):
    """A preset's primary arm and seed range (here the replication's: gumbel, seeds from 8):
    p < 0.05 on fewer seeds than planned is reported as such, not as the protocol's verdict;
    with all planned seeds in, it is 'shown'. Lower is better (a loss)."""
    cfg = {"space": LM_MICRO, "budgets": ["wa9"], "seeds": 6, "first_seed": 8,
           "device": "cpu", "compile": "off", "mixed": ["gumbel"], "primary": "gumbel"}
    assert [seed for *_, seed, _ in mvu.plan(cfg)][::2] == list(range(8, 14))
    loss = {"w2a4": [2.10, 2.12, 2.11, 2.13], "gumbel": [2.09, 2.10, 2.10, 2.11]}
    rows = [{"arm": arm, "budget": "wa9", "seed": 8 + i, "metric": v,
             "metric_name": "val_loss", "higher_is_better": False, "bops": 100 + 9 * 10,
             "budget_bops": 190, "fixed_bops": 100, "assignment": None, "fp_metric": 2.0}
            for arm, vals in loss.items() for i, v in enumerate(vals)]
    res = {"preset": cfg, "rows": rows}
    page = mvu.readme(res, ROOT / "reports")
    assert "6 seeds planned (8-13)" in page
    assert "**Primary hypothesis** (gumbel beats" in page and "| gumbel (primary) |" in page
    assert "on 4 of the 6 planned seeds; not yet the protocol's test" in page
    assert "**shown**" not in page
    assert "**shown**" in mvu.readme({**res, "preset": {**cfg, "seeds": 4}}, ROOT / "reports")
    worse = [{**r, "metric": r["metric"] + 0.05} if r["arm"] == "gumbel" else r for r in rows]
    assert "**not shown**" in mvu.readme({"preset": {**cfg, "seeds": 4}, "rows": worse},
                                         ROOT / "reports")


def test_predicted_sums_the_table_over_each_config_and_ranks_them(mvu):
    """The additive prediction of a config is the sum of its cells (weights, then inputs, in
    decision order); uniform arms take their pair everywhere; a table of another space is
    refused."""
    from coqat.bitsearch.sensitivity import DecisionSensitivity, Sensitivity

    def row(name, kind, deltas):
        return DecisionSensitivity(name, kind, [name[2:]], 100, [2, 4], deltas, [0.01, 0.01])

    table = Sensitivity("x", "given", "quest", "holdout", 1, 8, 1.0, 0.0,
                        [row("w:a", "w", [0.5, 0.1]), row("w:b", "w", [0.2, 0.0]),
                         row("a:a", "a", [0.9, 0.3])], 3, 0.1)
    rows = [{"arm": "w2a4", "budget": "wa9", "seed": 0, "metric": 0.80, "assignment": None},
            {"arm": "sensitivity", "budget": "wa9", "seed": 0, "metric": 0.90,
             "assignment": {"w": [4, 2], "a": [4]}},
            {"arm": "random", "budget": "wa9", "seed": 0, "metric": 0.70,
             "assignment": {"w": [2, 2], "a": [2]}},
            {"arm": "random", "budget": "wa9", "seed": 1, "metric": 0.10,
             "assignment": {"w": [2, 2], "a": [2]}}]
    pr = mvu.predicted({"rows": rows}, table, seed=0)
    got = {o["arm"]: o["predicted"] for o in pr["configs"]}
    assert got == pytest.approx({"w2a4": 0.5 + 0.2 + 0.3, "sensitivity": 0.1 + 0.2 + 0.3,
                                 "random": 0.5 + 0.2 + 0.9})
    assert pr["spearman"] == pytest.approx(-1.0)     # seed 1 left out
    rows[1]["assignment"] = {"w": [4, 2, 2], "a": [4]}
    with pytest.raises(SystemExit, match="other decisions"):
        mvu.predicted({"rows": rows}, table, seed=0)


def test_cleaned_reads_a_table_raw_and_monotone_on_the_space_widths_it_measured(mvu):
    """`cleaned` on lm-micro with a hand table that lacks the 3- and 6-bit weights: those
    are left out of the problem and listed; every 8-bit and 4-bit weight cell reads a
    little below zero (noise), so at the widest budget the raw rows drop bits for nothing
    while the monotone rows give the widest config, predicted 0."""
    from coqat.bitsearch.pipeline import plan_search
    from coqat.bitsearch.sensitivity import DecisionSensitivity, Sensitivity
    from coqat.config import RunConfig

    p = plan_search(RunConfig.from_options(LM_MICRO, device="cpu", progress=False), "w8a8",
                    "sensitivity").problem
    rows = []
    for d in p.w_decisions:
        rows.append(DecisionSensitivity(d.name, "w", list(d.layers), 1, [2, 4, 8],
                                        [0.5, -0.002, -0.001], [0.001] * 3))
    for d in p.a_decisions:
        rows.append(DecisionSensitivity(d.name, "a", list(d.layers), 1, [4, 6, 8],
                                        [0.05, 0.01, 0.0], [0.001] * 3))
    table = Sensitivity("lm-micro", "given", "quest", "holdout", 1, 8, 3.0, 0.0, rows, 1, 0.1)
    (top,) = mvu.cleaned(LM_MICRO, table, ["w8a8"])
    assert top["widths_not_in_table"] == [3]
    assert top["monotone"]["mean_wa"] == pytest.approx(64.0)
    assert top["monotone"]["predicted_monotone"] == 0.0
    assert top["none"]["mean_wa"] < 64.0 and top["differ"] > 0
    assert top["none"]["predicted_raw"] < top["monotone"]["predicted_raw"]  # it bought noise
    (low,) = mvu.cleaned(LM_MICRO, table, ["wa9"])
    assert low["none"]["mean_wa"] <= 9.0 + 1e-9 and low["monotone"]["mean_wa"] <= 9.0 + 1e-9
    with pytest.raises(SystemExit, match="lacks"):
        mvu.cleaned(LM_MICRO, Sensitivity("x", "given", "quest", "holdout", 1, 8, 3.0, 0.0,
                                          rows[1:], 1, 0.1), ["wa9"])


def test_a_runs_curve_keeps_every_nth_train_step_the_last_and_each_evaluation(mvu, tmp_path):
    from coqat.rundir import RunDir

    run = RunDir(tmp_path)
    for step in range(10, 130, 10):
        run.log({"kind": "train", "step": step, "phase": "qat", "loss": 4.0 - step / 100})
        if step in (60, 120):
            run.log({"kind": "eval", "step": step, "phase": "qat", "final": step == 120,
                     "val_loss": 3.0 - step / 1000})
    curve = mvu.loss_curve(tmp_path, "val_loss", every=50)
    assert [s for s, _ in curve["train"]] == [50, 100, 120]
    assert curve["train"][0] == [50, 3.5]
    assert curve["val"] == [[60, 2.94], [120, 2.88]]
    assert mvu.loss_curve(tmp_path, "val_acc")["val"] == []
    assert mvu.loss_curve(tmp_path / "absent", "val_loss") == {"train": [], "val": []}


def test_a_trunk_preset_starts_every_arm_of_a_seed_from_its_trunk(mvu, tmp_path):
    """One float trunk per seed, then every arm QAT-trained from its weights: the rows say
    which weights they started from, and a seed whose trunk is on another machine gets no
    new runs (they would not be paired)."""
    cfg = {"space": LM_MICRO, "budgets": ["wa9"], "seeds": 1, "device": "cpu",
           "compile": "off", "workers": 1, "threads": 1, "deadline": None,
           "trunk": {"steps": 6}, "mixed": ["sensitivity"],
           "options": {"steps": 3, "eval_every": 3, "checkpoint_every": 3,
                       "proxy_batches": 1}}
    out, report = tmp_path / "runs", tmp_path / "report"
    mvu.run(mvu.subset(cfg, None, None), out, report)
    res = json.loads((report / "results.json").read_text())
    trunk = out / mvu.trunk_key(0)
    from coqat.records import RunRecord
    from coqat.rundir import RunDir
    from coqat.util import sha256_file
    sha = sha256_file(trunk / "model.safetensors")
    assert {r["arm"] for r in res["rows"]} == {"sensitivity", "w2a4"}
    assert all(r["init_sha256"] == sha for r in res["rows"])
    search = next(r for r in res["rows"] if r["arm"] == "sensitivity")
    assert search["fp_metric"] == RunRecord.read(RunDir(trunk)).metric
    assert search["fp_curve"]["val"]                  # the trunk's own curve
    assert res["analysis"]["wa9"]["trunk_mismatch"] == []
    # another machine: the kept rows stay, nothing of seed 0 is planned again
    kept = mvu.kept_rows(cfg, report / "results.json")
    assert mvu.orphaned(cfg, kept, tmp_path / "elsewhere") == {0}
    assert mvu.orphaned(cfg, kept, out) == set()
