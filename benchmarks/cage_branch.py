"""CAGE in its own regime: paired branches from one shared QuEST trunk per seed (issue 18).

Protocol
--------
- Model: coqat's byte-level Llama (``lm`` workload), sized to the data: the bytes a run
  trains on (steps x batch x sequence length) are >= 25 per parameter on the main model,
  and ~100 per parameter on a smaller second model (the "rung"), to see whether CAGE's
  effect grows as training gets closer to convergence. Parameters count every weight,
  embeddings and lm_head included. The corpus's SHA-256 is recorded with every run.
- Quantization: QuEST (Hadamard, RMS-scaled grid, trust mask) from the first step, on every
  transformer Linear; lm_head stays in float. W3A3 is the primary width, W4A4 secondary.
- Per seed and width, one QuEST trunk (plain AdamW) trains to 80% of the steps
  (``coqat train --stop-at``; the LR schedule and CAGE's ramp span all the steps). Every arm
  branches from that trunk's checkpoint (``--branch-from``), so all arms of a seed share the
  initialisation, the first 80% of training and every batch of the last 20%:
    quest      QuEST continued with plain AdamW (the baseline)
    cage-d-P   CAGE decoupled at pull integral P = sum_t lr_t*lambda_t in {0.5, 1.6, 5}
               (1.6 is the paper's recipe), silence 0.8, linear ramp: silent until the
               branch point, so the trunk is exactly what CAGE-D would have trained
    cage-c-1.6 CAGE coupled at the lambda of pull 1.6 (a control: its term goes through Adam)
  The rung runs quest and cage-d-1.6 at W3A3 only. One FP run per seed and model gives the
  W3A3 -> FP gap.
- Metric: validation loss (nats per byte) on the whole validation split at the end.
- Statistics (``coqat.reporting.stats``): per arm against quest, the paired per-seed
  difference (> 0 = the arm has the lower loss), its standard error, the one-sided paired
  t-test p and Wilcoxon p, wins out of seeds, and the share of the W3A3 -> FP gap it closes.

Presets: ``smoke`` (CPU, tiny, about a minute on 2 cores, run by tests/test_branch.py) and
``gpu`` (one H100, several runs at once). Runs go through ``coqat.sweep.local`` (the code
path of ``coqat train``): rerunning skips finished runs and resumes killed ones. Trunks and FP
runs go first, then the branches. ``--deadline`` starts no run that would end after it.

    python benchmarks/cage_branch.py run --preset smoke --out runs/cage-branch-smoke
    python benchmarks/cage_branch.py run --preset gpu --out /tmp/cb --deadline 450
    python benchmarks/cage_branch.py render --out /tmp/cb     # README from results.json

Results: ``<out>/report/results.json`` and ``<out>/report/README.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import command_line, machine_info, read_json, write_json
from coqat.config import COMPILE_FLAGS as COMPILE, SearchSpace, parse_space
from coqat.reporting.stats import gap_shares, pair_by_seed, paired_difference, seed_summary
from coqat.sweep.local import JobOutcome, LocalJob, read_finished, run_local

TRUNK_SHARE = 0.8
#: arm -> (optimizer, pull); quest is the baseline every other arm is paired with
ARMS: dict[str, tuple[str, float | None]] = {
    "quest": ("adamw", None), "cage-d-0.5": ("cage-d", 0.5), "cage-d-1.6": ("cage-d", 1.6),
    "cage-d-5": ("cage-d", 5.0), "cage-c-1.6": ("cage-c", 1.6)}
BASELINE = "quest"


@dataclass(frozen=True)
class Rung:
    """One model with its steps, the widths it runs and the arms of each width."""

    name: str
    model: dict[str, Any]              # lm workload keys
    steps: int
    bits: tuple[str, ...]
    arms: tuple[str, ...]


def _lm(d: int, layers: int, heads: int, ffn: int, seq: int) -> dict[str, Any]:
    return {"d_model": d, "n_layers": layers, "n_heads": heads, "ffn_hidden": ffn,
            "seq_len": seq}


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"device": "cpu", "seeds": 2, "workers": 1, "batch": 8, "lr": 3e-3,
              "corpus": "stdlib", "eval_batches": 4, "rungs": (
                  Rung("main", _lm(32, 2, 2, 64, 32), 40, ("w3a3", "w4a4"), tuple(ARMS)),
                  Rung("rung", _lm(16, 1, 2, 32, 32), 20, ("w3a3",), (BASELINE, "cage-d-1.6")))},
    # Two CPU cores (the machine this project develops on): the same protocol on models
    # small enough for 136 runs in well under an hour: 2 x 32 (43k parameters) for 560
    # steps of 16 x 128 bytes (26.6 bytes per parameter) and 1 x 16 (11k parameters) for 560
    # steps (106 bytes per parameter).
    "cpu": {"device": "cpu", "seeds": 8, "workers": 2, "batch": 16, "lr": 3e-3,
            "corpus": "wiki+stdlib", "eval_batches": 0, "rungs": (
                Rung("main", _lm(32, 2, 2, 96, 128), 560, ("w3a3", "w4a4"), tuple(ARMS)),
                Rung("rung", _lm(16, 1, 2, 32, 128), 560, ("w3a3",),
                     (BASELINE, "cage-d-1.6")))},
    # One H100: lm-tiny's shape at sequence 256 (0.92M parameters) for 1,500 steps of
    # 64 x 256 bytes (26.7 bytes per parameter, 2.2 passes over wiki+stdlib's 11.0 MB), and
    # a 0.14M model for 850 steps (100 bytes per parameter).
    "gpu": {"device": "cuda", "seeds": 8, "workers": 6, "batch": 64, "lr": 3e-3,
            "corpus": "wiki+stdlib", "eval_batches": 0, "rungs": (
                Rung("main", _lm(128, 4, 4, 384, 256), 1500, ("w3a3", "w4a4"), tuple(ARMS)),
                Rung("rung", _lm(64, 2, 2, 192, 256), 850, ("w3a3",),
                     (BASELINE, "cage-d-1.6")))},
}


def space_for(rung: Rung, preset: dict[str, Any]) -> SearchSpace:
    s = rung.steps
    return parse_space({
        "name": f"cage-branch-{rung.name}",
        "description": "benchmarks/cage_branch.py: byte Llama sized to its data",
        "workload": {"name": "lm", **rung.model, "corpus": preset["corpus"]},
        "train": {"steps": s, "batch_size": preset["batch"], "lr": preset["lr"],
                  "warmup_steps": max(1, s // 12), "decay_frac": 0.2, "eval_every": s,
                  "checkpoint_every": max(1, s // 4), "log_every": max(1, s // 20),
                  "final_eval_batches": preset["eval_batches"], "eval_batch_size": 32,
                  "quantizer": "quest", "qat_fraction": 1.0},
        "search": {"layers": [{"pattern": "model.layers.*", "w_bits": [3, 4],
                               "a_bits": [3, 4]}], "pinned": {"lm_head": "w16a16"}}})


def key(rung: Rung, bits: str, arm: str, seed: int) -> str:
    return f"{rung.name}-{bits}-{arm}-s{seed}"


def plan(preset: dict[str, Any], seeds: int, out: Path, device: str,
         extra: dict[str, Any] | None = None) -> list[list[LocalJob]]:
    """Stages in priority order, each run after the one before: per model (main, then the
    rung) and width (W3A3, then W4A4), the trunks (with the model's FP runs at its first
    width), then their branches (quest and the paper's pull first). A grid cut short by
    --deadline has the primary comparison (main W3A3) on every seed it reached."""
    stages: list[list[LocalJob]] = []
    for rung in preset["rungs"]:
        space = space_for(rung, preset)
        for i, bits in enumerate(rung.bits):
            base = {"device": device, **(extra or {})}
            trunks = [LocalJob(key(rung, "fp", "fp", seed), space, {**base, "seed": seed},
                               bits="fp") for seed in range(seeds)] if i == 0 else []
            trunks += [LocalJob(key(rung, bits, "trunk", seed), space, {
                **base, "seed": seed, "stop_at": int(round(TRUNK_SHARE * rung.steps))},
                bits=bits) for seed in range(seeds)]
            branches = []
            for arm in sorted(rung.arms, key=lambda a: a not in (BASELINE, "cage-d-1.6")):
                optimizer, pull = ARMS[arm]
                for seed in range(seeds):
                    trunk = out / key(rung, bits, "trunk", seed)
                    opts = {**base, "seed": seed, "branch_from": str(trunk.resolve()),
                            "optimizer": optimizer, "cage_pull": pull}
                    branches.append(LocalJob(key(rung, bits, arm, seed), space, opts,
                                             bits=bits))
            stages += [trunks, branches]
    return stages


# ----- running --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset["seeds"]
    workers = args.workers or preset["workers"]
    device = args.device or preset["device"]
    out = Path(args.out)
    extra = {} if args.compile is None else {"compile": COMPILE[args.compile]}
    stages = plan(preset, seeds, out, device, extra)
    total, t0 = sum(len(s) for s in stages), time.monotonic()
    deadline = None if args.deadline is None else t0 + args.deadline
    done: list[JobOutcome] = []

    def progress(o: JobOutcome) -> None:
        done.append(o)
        ran = [x.wall_s for x in done if x.status == "done"]
        left = total - len(done)
        eta = (sum(ran) / len(ran)) * left / workers if ran else float("nan")
        print(f"[{len(done)}/{total}] {o.describe()}; {time.monotonic() - t0:.0f} s elapsed,"
              f" ~{eta:.0f} s left", file=sys.stderr, flush=True)

    print(f"{total} runs under {out} ({workers} at once on {device})", file=sys.stderr)
    for batch in stages:
        run_local(batch, out, workers=workers, threads=args.threads, deadline=deadline,
                  keep_going=True, on_outcome=progress)
    results = collect(args.preset, preset, seeds, out, device, extra)
    write_report(out / "report", results)
    return results


def collect(name: str, preset: dict[str, Any], seeds: int, out: Path, device: str,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json: per rung and width, each arm's per-seed loss and its paired test."""
    rows = {o.key: o for o in read_finished(
        [job for stage in plan(preset, seeds, out, device, extra) for job in stage], out)}
    rungs = {}
    for rung in preset["rungs"]:
        metric = lambda b, a: {s: _metric(rows[key(rung, b, a, s)]) for s in range(seeds)}
        fp = metric("fp", "fp")
        params, data = _model_facts(rung, preset, rows, seeds)
        widths = {}
        for bits in rung.bits:
            arms = {a: metric(bits, a) for a in rung.arms}
            tests = {}
            for arm in rung.arms:
                if arm == BASELINE:
                    continue
                _, (mine, base, ref) = pair_by_seed(arms[arm], arms[BASELINE], fp)
                test = paired_difference(mine, base, higher_is_better=False).to_dict()
                shares = gap_shares(base, mine, ref, higher_is_better=False)
                test["gap_share"] = seed_summary(shares).to_dict()
                test["statement"] = paired_difference(mine, base, False).statement(arm, BASELINE)
                tests[arm] = test
            _, (base, ref) = pair_by_seed(arms[BASELINE], fp)
            widths[bits] = {"arms": {a: {"per_seed": v, "summary": seed_summary(
                v.values()).to_dict()} for a, v in arms.items()},
                "gap_to_fp": seed_summary(b - f for b, f in zip(base, ref)).to_dict(),
                "tests": tests}
        rungs[rung.name] = {"model": rung.model, "steps": rung.steps,
                            "trunk_steps": int(round(TRUNK_SHARE * rung.steps)),
                            "params": params, "train_bytes_per_run": data["bytes_seen"],
                            "bytes_per_param": data["bytes_seen"] / params if params else None,
                            "corpus": data["corpus"], "fp": {"per_seed": fp,
                                                            "summary": seed_summary(
                                                                fp.values()).to_dict()},
                            "widths": widths}
    return {"preset": name, "seeds": seeds, "device": device, "arms": ARMS,
            "trunk_share": TRUNK_SHARE, "batch": preset["batch"], "rungs": rungs,
            "missing": sorted(k for k, o in rows.items() if o.record is None),
            "command": command_line(), "machine": machine_info(device)}


def _metric(o: JobOutcome) -> float | None:
    return o.record.metric if o.record is not None else None


def _model_facts(rung: Rung, preset: dict[str, Any], rows: dict[str, JobOutcome],
                 seeds: int) -> tuple[int, dict[str, Any]]:
    """Parameter count (every weight) and data facts of a rung, from its FP runs' configs."""
    from coqat.rundir import RunDir
    from coqat.training.runner import build_model
    from coqat.workloads import get_workload

    spec = {**rung.model, "corpus": preset["corpus"]}
    params = sum(p.numel() for p in build_model(get_workload("lm", spec), 0).parameters())
    seen = rung.steps * preset["batch"] * rung.model["seq_len"]
    corpus: dict[str, Any] = {}
    for s in range(seeds):
        o = rows[key(rung, "fp", "fp", s)]
        if o.record is not None:
            corpus = RunDir(o.run_dir).read_json("config.json").get("data", {})
            break
    return params, {"bytes_seen": seen, "corpus": corpus}


# ----- the report --------------------------------------------------------------------------------
def write_report(report: Path, results: dict[str, Any]) -> None:
    report.mkdir(parents=True, exist_ok=True)
    write_json(report / "results.json", results)
    (report / "README.md").write_text(render(results))


def render(results: dict[str, Any]) -> str:
    """The README, from results.json alone."""
    lines = ["# CAGE from a shared QuEST trunk: paired branches", "",
             f"Preset `{results['preset']}`, {results['seeds']} seeds, device"
             f" {results['device']}; every arm branches at {results['trunk_share']:.0%} of the"
             " steps from its seed's QuEST trunk (protocol: `benchmarks/cage_branch.py`).", "",
             f"Command: `{results['command']}`", ""]
    m = results.get("machine") or {}
    if m:
        where = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_count')} cores)"
        lines += [f"Machine: {where}; torch {m.get('torch')}; commit"
                  f" {str(m.get('git_commit'))[:10]}.", ""]
    for name, r in results["rungs"].items():
        bpp = r["bytes_per_param"]
        lines += [f"## {name}: {r['params']:,} parameters, {r['steps']} steps"
                  f" ({r['trunk_steps']} in the trunk), {bpp:.1f} bytes per parameter", "",
                  f"Corpus: {', '.join(r['corpus'].get('sources') or ['?'])}, SHA-256"
                  f" {str(r['corpus'].get('sha256', '?'))[:16]}. FP loss"
                  f" {_mean(r['fp']['summary'])}.", ""]
        for bits, w in r["widths"].items():
            lines += [f"### {bits.upper()} (QuEST -> FP gap {_mean(w['gap_to_fp'])})", "",
                      "| arm | val loss | vs quest (> 0 = lower loss) | s.e. | p (t) |"
                      " p (Wilcoxon) | wins | share of gap |", "|---|---|---|---|---|---|---|---|"]
            for arm, a in w["arms"].items():
                t = w["tests"].get(arm)
                if t is None:
                    lines.append(f"| {arm} | {_mean(a['summary'])} | | | | | | |")
                    continue
                lines.append(f"| {arm} | {_mean(a['summary'])} | {_num(t['mean'], '+.4f')} |"
                             f" {_num(t['se'], '.4f')} | {_num(t['p_t'], '.3g')} |"
                             f" {_num(t['p_wilcoxon'], '.3g')} | {t['wins']}/{t['n']} |"
                             f" {_num(t['gap_share'].get('mean'), '.1%')} |")
            lines += [""] + [f"- {t['statement']}" for t in w["tests"].values()] + [""]
    if results["missing"]:
        lines += [f"Not run yet: {len(results['missing'])} runs (rerun the command to add"
                  " them).", ""]
    return "\n".join(lines)


def _mean(summary: dict[str, Any]) -> str:
    if not summary.get("n"):
        return "-"
    return f"{summary['mean']:.4f} (n={summary['n']})"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the grid, then write the report")
    r.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=int)
    r.add_argument("--workers", type=int, help="runs at once (default: the preset's)")
    r.add_argument("--threads", type=int, help="torch threads per run")
    r.add_argument("--device")
    r.add_argument("--compile", choices=sorted(COMPILE), help="torch.compile each run's step"
                   " (default: the library's, on for CUDA); off saves the per-process compile"
                   " of many short runs")
    r.add_argument("--deadline", type=float, help="seconds from now: start no run that"
                   " would end later (rerun to continue)")
    g = sub.add_parser("render", help="rewrite README.md from <out>/report/results.json")
    g.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "render":
        report = Path(args.out) / "report"
        (report / "README.md").write_text(render(read_json(report / "results.json")))
        return 0
    results = run(args)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
