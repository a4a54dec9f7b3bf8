"""``coqat report``: Pareto fronts, terminal tables, JSON, and the offline HTML page."""

from __future__ import annotations

import json
import shutil
import subprocess

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


def test_single_run_report_has_the_per_layer_table(runs_dir, tmp_path):
    one = next(p for p in sorted(runs_dir.iterdir()) if "w4a4" in p.name)
    out = json.loads(run_cli("report", str(one), "--no-html", "--json").stdout)
    assert [r["name"] for r in out["layers"]] == ["conv1", "conv2", "fc"]
    assert abs(sum(r["macs_share"] for r in out["layers"]) - 1) < 1e-9


def test_html_report_is_self_contained_with_png_copies(runs_dir, tmp_path):
    files = write_html(build_report(runs_dir), tmp_path / "html")
    page = files["html"].read_text()
    for name in ("frontier", "bits", "training"):
        assert files[name].is_file() and files[name].stat().st_size > 1000
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page        # nothing fetched


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
