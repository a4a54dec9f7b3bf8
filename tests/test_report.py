"""``coqat report``: Pareto fronts, terminal tables, JSON, and the offline HTML page."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from coqat.reporting.build import build_report, to_json, write_html
from coqat.reporting.runs import Point, dominates, pareto_front
from coqat.training import runner
from conftest import DIGITS, run_cli, train_run


def P(bops, metric, hib=False, method="x"):
    return Point("", "s", method, "b", 0, bops, 100, "m", metric, hib)


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [P(10, 1.0), P(20, 0.9), P(30, 0.95), P(40, 0.8), P(20, 1.1)]
    front = pareto_front(pts)
    assert [(p.bops, p.metric) for p in front] == [(10, 1.0), (20, 0.9), (40, 0.8)]
    assert dominates(P(20, 0.9), P(30, 0.95)) and not dominates(P(10, 1.0), P(20, 0.9))
    hib = [P(10, 0.5, True), P(20, 0.4, True)]
    assert pareto_front(hib) == [hib[0]]


def test_vs_uniform_compares_with_the_uniform_run_of_the_same_budget():
    from coqat.reporting.build import Report, uniform_delta
    from coqat.reporting.runs import group_points

    def pt(method, bops, metric, budget):
        return Point("", "s", method, "mixed", 0, bops, 1000, "loss", metric, False,
                     budget_expr=budget)

    # the search lands just under its budget, below the uniform config of that budget
    pts = [pt("uniform", 100, 2.00, "w4a4"), pt("gumbel", 99, 1.90, "w4a4"),
           pt("uniform", 50, 2.50, "w3a3"), pt("gumbel", 200, 1.80, "w6a6")]
    groups = group_points(pts)
    rep = Report(None, pts, [], groups, [])
    by = {(g.method, g.budget): g for g in groups}
    assert uniform_delta(rep, by["gumbel", "w4a4"]) == pytest.approx(0.10)
    # no uniform run at that budget: the best uniform at no more BOPs
    assert uniform_delta(rep, by["gumbel", "w6a6"]) == pytest.approx(0.20)
    assert uniform_delta(rep, by["uniform", "w4a4"]) is None
    # the same config trained twice (w8a8 search = uniform w8a8) prints +0.0000, not -0.0000
    same = group_points([pt("uniform", 300, 1.70, "w8a8"), pt("gumbel", 300, 1.70, "w8a8")])
    d = uniform_delta(Report(None, [], [], same, []), [g for g in same if g.method == "gumbel"][0])
    assert f"{d:+.4f}" == "+0.0000"


def _cell(method, budget, metrics, bops, budget_bops=None, bits="mixed"):
    return [Point(f"{method}-{budget}-s{s}", "s", method, bits, s, bops, 10_000, "loss", m,
                  False, budget_expr=budget, budget_bops=budget_bops)
            for s, m in enumerate(metrics)]


def _report(points):
    from coqat.reporting.build import Report
    from coqat.reporting.runs import group_points

    return Report(Path("."), points, [], group_points(points), pareto_front(points))


def test_paired_difference_to_the_best_uniform_config_under_the_budget():
    from coqat.reporting.build import compare_with_uniform, noise_statement

    # the asymmetric w2a4 (better than w3a3 here) is the best uniform under the w3a3 budget;
    # w4a4 does not fit it
    pts = (_cell("uniform", "w3a3", [2.00, 2.10, 2.05, 2.02], 90, 100, "w3a3")
           + _cell("uniform", "w2a4", [1.95, 2.05, 2.00, 1.98], 80, 80, "w2a4")
           + _cell("uniform", "w4a4", [1.50, 1.60, 1.55, 1.52], 160, 160, "w4a4")
           + _cell("gumbel", "w3a3", [1.90, 1.96, 1.93, 1.90], 99, 100)
           + _cell("gumbel", "w4a4", [1.52, 1.58, 1.56, 1.55], 159, 160))
    rep = _report(pts)
    by = {(g.method, g.budget): g for g in rep.groups}
    c = compare_with_uniform(rep, by["gumbel", "w3a3"])
    assert c.baseline is by["uniform", "w2a4"]
    assert c.paired.differences == pytest.approx((0.05, 0.09, 0.07, 0.08))
    d = np.array([0.05, 0.09, 0.07, 0.08])
    assert c.paired.se == pytest.approx(d.std(ddof=1) / 2)
    assert c.paired.verdict() == "better" and c.paired.wins == 4
    # hull of the uniform means at 99 BOPs: between w2a4 (80, 1.995) and w4a4 (160, 1.5425)
    assert c.hull_metric == pytest.approx(1.995 + (1.5425 - 1.995) * 19 / 80)
    w4 = compare_with_uniform(rep, by["gumbel", "w4a4"])
    assert w4.baseline is by["uniform", "w4a4"] and w4.paired.verdict() == "noise"
    assert compare_with_uniform(rep, by["uniform", "w4a4"]) is None
    text = noise_statement(rep)
    assert "beyond seed noise" in text and "gumbel w3a3" in text
    assert "Not distinguishable from seed noise" in text and "gumbel w4a4" in text


def test_one_seed_says_it_has_no_uncertainty_estimate():
    from coqat.reporting.build import comparisons, noise_statement

    rep = _report(_cell("uniform", "w4a4", [2.0], 100, 100, "w4a4")
                  + _cell("gumbel", "w4a4", [1.9], 99, 100))
    (c,) = comparisons(rep)
    assert c.paired.verdict() == "1 seed" and c.paired.p_t is None
    assert noise_statement(rep).startswith("1 seed: no uncertainty estimate")
    alone = _report(_cell("gumbel", "w4a4", [1.9], 99, 100))      # no uniform run to pair with
    assert comparisons(alone) == []
    assert noise_statement(alone).startswith("1 seed: no uncertainty estimate")


def test_noise_statement_names_worse_cells_with_their_p_and_cells_without_common_seeds():
    from dataclasses import replace

    from coqat.reporting.build import comparisons, noise_statement

    unpaired = [replace(p, seed=p.seed + 10) for p in _cell("random", "w4a4", [1.0, 1.1], 98, 100)]
    rep = _report(_cell("uniform", "w4a4", [1.0, 1.1, 0.9, 1.05], 100, 100, "w4a4")
                  + _cell("gumbel", "w4a4", [1.3, 1.4, 1.2, 1.33], 99, 100) + unpaired)
    by = {c.group.method: c.paired for c in comparisons(rep)}
    assert by["gumbel"].verdict() == "worse" and by["random"].verdict() == "no seeds"
    text = noise_statement(rep)
    assert f"Worse than uniform beyond seed noise: gumbel w4a4 (p = {by['gumbel'].p_t_worse:.2g})" \
        in text and by["gumbel"].p_t_worse < 0.05
    assert "No seed in common with the uniform baseline" in text and "random w4a4" in text


def _fake_run(path, final, config=None):
    """A finished run directory as the report reads it (config.json + final.json)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {}))
    (path / "final.json").write_text(json.dumps(final))
    return path


def _final(seed, metric, **kw):
    return {"metric_name": "val_loss", "metric": metric, "higher_is_better": False,
            "bits": "mixed", "bops": 100, "fp32_bops": 1000, "steps": 8, "seed": seed,
            "space": "s", **kw}


def test_fp_reference_comes_from_the_searches_cached_fp_phase_even_after_a_move(tmp_path):
    from coqat.reporting.build import build_report, to_json

    sweep = tmp_path / "sweep"
    for seed, fp in ((0, 2.5), (1, 2.7)):
        cache = f"/elsewhere/sweep/.fp-cache/s-s{seed}-abc"        # where it was trained
        _fake_run(sweep / ".fp-cache" / f"s-s{seed}-abc",
                  _final(seed, fp, bits="fp", bops=1000, steps=6))
        _fake_run(sweep / "trials" / f"g-s{seed}",
                  _final(seed, 2.9, method="gumbel", budget_expr="w4a4", budget_bops=100,
                         achieved_bops=100,
                         fp_phase={"cache": cache, "metric": fp, "reused": False}))
    data = to_json(build_report(sweep))
    fp = data["fp_reference"]
    assert fp["per_seed"] == {"0": 2.5, "1": 2.7} and fp["steps"] == 6 and fp["bops"] == 1000
    assert fp["n"] == 2 and fp["mean"] == pytest.approx(2.6)
    assert {g["method"] for g in data["groups"]} == {"gumbel"}    # a reference, not a cell


def test_report_rebuilt_from_its_json_keeps_the_numbers_and_the_plots_it_cannot_redraw(
        runs_dir, tmp_path):
    from coqat.reporting.build import build_report, to_json, write_html, write_json

    first = build_report(runs_dir)
    out = tmp_path / "committed"
    write_html(first, out)
    saved = write_json(first, out / "report.json")
    expected = to_json(first)
    shutil.move(str(runs_dir), str(tmp_path / "gone"))           # the run directories are gone
    try:
        again = build_report(saved)
        assert to_json(again) == expected
        files = write_html(again)                                 # next to report.json
        page = files["html"].read_text()
    finally:
        shutil.move(str(tmp_path / "gone"), str(runs_dir))
    assert files["html"] == out / "report.html" and files["training"].is_file()
    assert "not redrawn from report.json" in page and "rebuilt from report.json" in page
    assert "FP runs" in page                                      # the reference row


def test_bits_heatmap_greys_out_float_layers_and_keeps_its_title_inside():
    from matplotlib import pyplot as plt

    from coqat.bitconfig import LayerBits
    from coqat.reporting.plots import heatmap_figure

    def layer(w, a):
        return LayerBits(w or 16, a or 16)

    runs = [(f"gumbel w4a4+0.5*(w8a8-w4a4) s{s}",
             {"l0": layer(2, 4), "l1": layer(3, 8), "l2": layer(8, 6), "lm_head": layer(None, None)})
            for s in range(2)]
    fig = heatmap_figure(runs)
    try:
        im = fig.axes[0].images[0]
        data = im.get_array()
        assert data.mask[3].all() and not data.mask[:3].any()   # lm_head: outside the scale
        ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
        assert ticks == ["2", "3", "8"]                        # 16 is not on the scale
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    finally:
        plt.close(fig)


def test_reports_are_written_with_the_umask_mode_not_0600(tmp_path):
    import os
    from coqat.util import atomic_write_text

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    f.chmod(0o600)  # replacing a file keeps its mode
    assert atomic_write_text(f, "x").stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for bits in ("fp", "w8a8", "w4a4", "w2a4"):
        for seed in (0, 1):
            train_run(DIGITS, out, bits=bits, seed=seed, steps=8)
    return out


def test_report_groups_seeds_and_marks_dominated_cells(runs_dir):
    rep = build_report(runs_dir)
    data = to_json(rep)
    assert len(data["points"]) == 8
    cells = {(g["method"], g["budget"]): g for g in data["groups"]}
    assert set(cells) == {("fp", "fp"), ("uniform", "w8a8"), ("uniform", "w4a4"),
                          ("uniform", "w2a4")}
    assert all(g["n"] == 2 and g["seeds"] == [0, 1] for g in cells.values())
    assert data["conventions"]["metric"] == "BOPs"
    gbops = [g["gbops_mean"] for g in data["groups"]]
    assert gbops == sorted(gbops)


def test_terminal_report_fits_100_columns(runs_dir, tmp_path):
    proc = run_cli("report", str(runs_dir), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 100
    assert "frontier" in proc.stdout and "uniform" in proc.stdout


def test_terminal_paired_table_of_a_committed_frontier_fits_100_columns():
    # rebuilt from the committed report.json: long budget expressions, four methods, 3 seeds
    from conftest import ROOT

    proc = run_cli("report", str(ROOT / "reports" / "frontier-lm-30m" / "report.json"),
                   "--no-html")
    assert proc.returncode == 0, proc.stderr
    assert max(len(ln) for ln in proc.stdout.splitlines()) <= 100
    assert "paired by seed with the best uniform config" in proc.stdout
    assert "distinguishable from seed noise" in proc.stdout
    assert "w4a4+0.5*(w8a8-w4a4)" in proc.stdout        # in full: the paired table never cuts


def test_single_run_report_has_the_per_layer_table(runs_dir, tmp_path):
    one = next(p for p in sorted(runs_dir.iterdir()) if "w4a4" in p.name)
    out = json.loads(run_cli("report", str(one), "--no-html", "--json").stdout)
    assert [r["name"] for r in out["layers"]] == ["conv1", "conv2", "fc"]
    assert abs(sum(r["macs_share"] for r in out["layers"]) - 1) < 1e-9
    assert out["noise_statement"].startswith("1 seed: no uncertainty estimate")


def test_html_report_is_self_contained_with_png_copies(runs_dir, tmp_path):
    files = write_html(build_report(runs_dir), tmp_path / "html")
    page = files["html"].read_text()
    for name in ("frontier", "bits", "training"):
        assert files[name].is_file() and files[name].stat().st_size > 1000
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page        # nothing fetched
    assert "class='noise'" in page and "FP runs" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_html_report_renders_in_headless_chromium_with_the_frontier_visible(runs_dir, tmp_path):
    files = write_html(build_report(runs_dir), tmp_path / "html")
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
           "--window-size=1200,1000", f"--screenshot={shot}", files["html"].as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert (img.std(axis=(0, 1)) > 0.05).all(), "the screenshot is blank"
    # the frontier plot sits in the top part of the page: its uniform series is blue
    top = img[: img.shape[0] * 2 // 3]
    blue = (np.abs(top - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.15).sum()
    assert blue > 20, "no frontier markers visible in the screenshot"


def test_report_of_a_missing_or_empty_directory_is_a_one_line_error(tmp_path):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("report", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("report", str(tmp_path / "empty")), "no coqat runs")
