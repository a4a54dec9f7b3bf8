"""Uniform-precision QAT at equal steps: FP, W8A8, W6A6, W4A4, W3A3, W2A2 (QuEST).

For each space, trains every bit width with the same steps, schedule and seed(s) (QAT
from scratch, as QuEST trains) and writes ``reports/uniform_precision/``: a README with the
table, the checks below, the command and the machine, a PNG of metric vs GBOPs and the raw
results JSON.

Checks (the foundation issue's acceptance): the metric is ordered by bit width (a lower
width never beats a higher one), and W8A8 is within 1% of FP.

    python benchmarks/uniform_precision.py                       # lm-tiny + fashion-resnet
    python benchmarks/uniform_precision.py --spaces lm-tiny --seeds 0,1,2 --workers 2
    python benchmarks/uniform_precision.py --seeds 0,1,2 --space-seeds lm-tiny=0,1,2,3,4
    python benchmarks/uniform_precision.py --readme     # README + plot from results.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, comma_list, command_line, machine_info, pyplot, read_json,  # noqa: E402
                    record_row, run_grid, space_names, write_json)
from coqat.sweep.local import LocalJob  # noqa: E402
from coqat.reporting.stats import SeedSummary, ordering_inversions, seed_summary  # noqa: E402

BITS = ["fp", "w8a8", "w6a6", "w4a4", "w3a3", "w2a2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default="lm-tiny,fashion-resnet")
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--seeds", default="0", help="comma list, for every space")
    ap.add_argument("--space-seeds", action="append", default=[], metavar="SPACE=LIST",
                    help="seeds for one space instead of --seeds, e.g. lm-tiny=0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=None, help="override each space's steps")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-uniform"))
    ap.add_argument("--report-dir", default=str(ROOT / "reports" / "uniform_precision"))
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md and the"
                    " plot from results.json in --report-dir (no runs)")
    args = ap.parse_args()
    out = Path(args.report_dir)
    if args.readme:
        render(read_json(out / "results.json"), out)
        return

    spaces = comma_list(args.spaces)
    names = space_names(spaces)
    bits = comma_list(args.bits)
    seeds = {name: [int(s) for s in comma_list(args.seeds)] for name in names}
    for item in args.space_seeds:
        name, _, values = item.partition("=")
        if name not in seeds:
            ap.error(f"--space-seeds {item!r}: {name!r} is not one of {', '.join(names)}")
        seeds[name] = [int(s) for s in comma_list(values)]
    jobs = [LocalJob(f"{name}-{b}-s{seed}" + (f"-t{args.steps}" if args.steps else ""), sp,
                     {"seed": seed, "steps": args.steps, "device": args.device}, bits=b)
            for sp, name in zip(spaces, names) for b in bits for seed in seeds[name]]
    outcomes = run_grid(jobs, args.out, workers=args.workers)
    # the bits asked for (a run's own label says 'mixed' when the space pins layers)
    results = [record_row(o, job_options={"bits": j.bits, **j.options})
               for j, o in zip(jobs, outcomes)]
    summary = {}
    for space in names:
        rows = summarize(results, space, bits)
        ordered, inversions, within = checks(rows)
        summary[space] = {"rows": rows, "ordered_by_width": ordered, "inversions": inversions,
                          "w8a8_within_1pct": within}
    doc = {"machine": machine_info(), "command": command_line(), "summary": summary,
           "runs": results}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", doc)
    render(doc, out)


def summarize(results, space, bits):
    rows = []
    for b in bits:
        # the bits asked for (a run's own label says 'mixed' when the space pins layers)
        rs = [r for r in results if r["space"] == space and r["job_options"]["bits"] == b]
        st = seed_summary(r["metric"] for r in rs)
        rows.append({
            "bits": b, "gbops": rs[0]["bops"] / 1e9, "frac_fp32": rs[0]["bops_fraction_of_fp32"],
            "mean": st.mean, "std": st.sd, "n": st.n, "metric_name": rs[0]["metric_name"],
            "higher_is_better": rs[0]["higher_is_better"], "steps": rs[0]["steps"],
            "wall_s": statistics.fmean(r["wall_s"] for r in rs)})
    return rows


def checks(rows):
    """Ordered by width (best first from FP down) and W8A8 within 1% of FP.

    Returns (ordered, inversions, within): ``ordered`` is the strict check on the means;
    ``inversions`` lists each adjacent pair where the lower width has the better mean, with
    the difference and its standard error (Welch, over seeds), so a reader can tell an
    inversion from seed noise.
    """
    cells = [(r["bits"], SeedSummary(r["n"], r["mean"], r["std"])) for r in rows]
    inversions = [{"higher": v.expected_better, "lower": v.expected_worse, "by": v.by,
                   "se": v.se, "within_2se": v.within_2se}
                  for v in ordering_inversions(cells, rows[0]["higher_is_better"])]
    fp = next((r for r in rows if r["bits"] == "fp"), None)
    w8 = next((r for r in rows if r["bits"] == "w8a8"), None)
    within = None
    if fp and w8:
        within = abs(w8["mean"] - fp["mean"]) / abs(fp["mean"]) <= 0.01
    return not inversions, inversions, within


def _ordering_line(ordered: bool, inversions: list[dict]) -> str:
    if ordered:
        return "- ordered by bit width: **yes**"
    parts = [f"{v['lower']} beats {v['higher']} by {v['by']:.4f} (s.e. {v['se']:.4f}, "
             f"{'within' if v['within_2se'] else 'OUTSIDE'} 2 s.e.)" for v in inversions]
    return (f"- ordered by bit width: **NO** on the means: {'; '.join(parts)}."
            + (" Every inversion is within seed noise." if all(v["within_2se"]
                                                              for v in inversions) else ""))


def render(doc: dict, out: Path) -> None:
    """README.md and the plot from a results document (a fresh one or results.json)."""
    plt = pyplot()
    machine, summary = doc["machine"], doc["summary"]
    lines = ["# Uniform-precision QAT at equal steps", "",
             "QuEST (Hadamard + RMS-optimal clip + trust mask), QAT from scratch, every bit",
             "width with the same steps, schedule and seeds. BOPs per coqat's conventions",
             "(`coqat bops`): FP32 reference = 32x32; pinned float layers and attention",
             "matmuls count 16x16.", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), device"
             f" {machine['device']}, torch {machine['torch']}, python {machine['python']},"
             f" coqat {machine['coqat']}.", ""]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
    for ax, (space, s) in zip(axes[0], summary.items()):
        rows = s["rows"]
        seeds = list(dict.fromkeys(r["seed"] for r in doc["runs"] if r["space"] == space))
        name = rows[0]["metric_name"]
        lines += [f"## {space}", "",
                  f"{rows[0]['steps']} steps, seeds {','.join(map(str, seeds))};"
                  f" metric `{name}` ({'higher' if rows[0]['higher_is_better'] else 'lower'}"
                  " is better).", "",
                  f"| bits | GBOPs | % of FP32 | {name} | vs FP | wall (s) |",
                  "|---|---|---|---|---|---|"]
        fp = rows[0]["mean"]
        for r in rows:
            spread = f" ± {r['std']:.4f}" if r["n"] > 1 else ""
            rel = (r["mean"] - fp) / abs(fp) * 100
            lines.append(f"| {r['bits']} | {r['gbops']:.3f} | {100 * r['frac_fp32']:.2f} |"
                         f" {r['mean']:.4f}{spread} | {rel:+.2f}% | {r['wall_s']:.0f} |")
        lines += ["", _ordering_line(s["ordered_by_width"], s["inversions"]),
                  f"- W8A8 within 1% of FP: **{'yes' if s['w8a8_within_1pct'] else 'NO'}**",
                  ""]
        ax.errorbar([r["gbops"] for r in rows], [r["mean"] for r in rows],
                    yerr=[r["std"] for r in rows], marker="o")
        for r in rows:
            ax.annotate(r["bits"], (r["gbops"], r["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("GBOPs (log)")
        ax.set_ylabel(name)
        ax.set_title(space)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "uniform_precision.png", dpi=120)
    lines += ["![metric vs GBOPs](uniform_precision.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
