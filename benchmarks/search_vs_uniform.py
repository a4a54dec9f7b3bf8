"""Gumbel search vs uniform precision vs Optuna vs random, at equal BOPs, several seeds.

What it measures (issue #5):

run        for each seed and budget: the FP reference (= the search's cached FP phase, an
           ordinary ``coqat train --bits fp`` of the same steps), the uniform config at the
           largest BOPs not above the budget, a random config repaired into the budget, the
           Gumbel search, and Optuna given the Gumbel search's wall-clock. Every method ends
           in the identical final QAT (``coqat.bitsearch.run_search``: runner.prepare +
           execute, i.e. ``coqat train --bits <chosen config>``). The report gives the metric
           (mean, std over seeds), achieved/target BOPs, the share of the uniform -> FP gap
           each method closes (paired by seed), and the seed-to-seed spread of the chosen
           configs (mean pairwise number of layers whose bits differ).
overhead   wall-clock of one search step (weight step + architecture step / arch_every)
           against one QAT step of the same model and batch (target: at most 1.5x).
report     rewrite README.md / results.json / PNG from the finished jobs.

Every job is one ``coqat.bitsearch.run_search`` in ``<out>/<key>`` through the local grid
runner (``coqat.sweep.local``): a finished job is read back, so the script can be called
again after a timeout (the FP phase is cached per seed under ``<out>`` too). Optuna jobs
run after the Gumbel ones, whose search time they get. The FP reference is the cached FP
phase of each seed, as the Gumbel and Optuna records name it. With ``--deadline S`` no job
starts that the slowest job so far says would end more than S seconds after the start.

Examples::

    # CPU part (2-core dev machine)
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/search_vs_uniform.py run --preset cpu \
        --out runs/bench-search --report-dir reports/search_vs_uniform
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/search_vs_uniform.py overhead \
        --report-dir reports/search_vs_uniform

    # GPU part: one H100/H200; two 10-minute calls on one machine (the second resumes;
    # on an H200 the whole grid took 551 s + 286 s)
    python benchmarks/search_vs_uniform.py run --preset gpu --out /tmp/bench-search \
        --report-dir reports/search_vs_uniform/gpu
    # the same plan at toy size on the CPU (checks the preset end to end in ~2 minutes)
    python benchmarks/search_vs_uniform.py run --preset gpu --smoke --out /tmp/smoke \
        --report-dir /tmp/smoke/report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import command_line, machine_info, pyplot, run_grid  # noqa: E402
from coqat.bitconfig import BitConfig  # noqa: E402
from coqat.cost.budget import budget_slug  # noqa: E402
from coqat.records import RunRecord  # noqa: E402
from coqat.reporting.stats import (config_distance, gap_closed_of_means, gap_shares,  # noqa: E402
                                   pair_by_seed, paired_difference, seed_summary)
from coqat.rundir import BITCONFIG, RunDir  # noqa: E402
from coqat.sweep.local import CACHED, JobOutcome, LocalJob  # noqa: E402
from coqat.util import atomic_write_json, atomic_write_text  # noqa: E402

HALFWAY = "w4a4+0.5*(w8a8-w4a4)"
METHODS = ("uniform", "random", "gumbel", "optuna")

PRESETS: dict[str, dict[str, Any]] = {
    # the 2-core dev machine: lm-tiny at its own 400 steps, the w4a4 budget of the target
    "cpu": {"space": "lm-tiny", "budgets": ["w4a4"], "seeds": 3, "steps": 400,
            "fp_steps": 400, "search_steps": 200, "batch_size": None, "device": "cpu",
            "workers": 2, "threads": 1, "deadline": None},
    # One H100 (16 cores), one 10-minute call: lm-30m (6 x 640, seq 512) at batch 32;
    # 8 jobs share the GPU. Per seed: FP 300 steps (cached, = the FP reference), search
    # 150 steps, 4 final QATs of 300 steps. Gumbel searches start first; no job starts
    # that the slowest so far says would end after 480 s, so the call ends with a report.
    # Call again to finish the rest.
    "gpu": {"space": "lm-30m", "budgets": ["w4a4", HALFWAY], "seeds": 3, "steps": 300,
            "fp_steps": 300, "search_steps": 150, "batch_size": 32, "device": "cuda",
            "workers": 8, "threads": 2, "deadline": 480},
}
SMOKE = {"space": str(ROOT / "tests" / "fixtures" / "lm-micro.toml"), "steps": 6,
         "fp_steps": 6, "search_steps": 6, "batch_size": None, "device": "cpu",
         "workers": 2, "threads": 1, "seeds": 2}


# ------------------------------------------------------------------------------------------
# jobs
def job_key(label: str, budget: str, seed: int) -> str:
    return f"{label}-{budget_slug(budget)}-s{seed}"


def _label(cfg: dict[str, Any], method: str) -> str:
    """Result name of a searched method: ``gumbel``, or ``gumbel-<tag>`` for a variant run
    with other [search] settings (--tag/--search-set); baselines carry no tag."""
    return f"{method}-{cfg['tag']}" if cfg.get("tag") and method in ("gumbel", "optuna") \
        else method


def jobs_of(cfg: dict[str, Any], method: str, seconds: dict[str, float] | None = None
            ) -> list[LocalJob]:
    """One search per budget and seed; ``seconds``: time limits by key (Optuna)."""
    opts = {k: cfg[k] for k in ("steps", "fp_steps", "search_steps", "batch_size", "device")}
    opts.update(cfg.get("search_set", {}))
    return [LocalJob(key, cfg["space"], {**opts, "seed": seed}, budget=budget, method=method,
                     seconds=(seconds or {}).get(key))
            for budget in cfg["budgets"] for seed in range(cfg["seeds"])
            for key in [job_key(_label(cfg, method), budget, seed)]]


def run(cfg: dict[str, Any], out: Path, report_dir: Path) -> None:
    """Gumbel first (longest, and Optuna gets its search time), then the baselines, then
    Optuna with the wall-clock of the Gumbel search of its seed and budget."""
    first = [j for m in ("gumbel", "uniform", "random") if m in cfg["methods"]
             for j in jobs_of(cfg, m)]

    def ran(o: JobOutcome) -> None:        # a report after every new run, in case of a timeout
        if o.status != CACHED:
            write_report(cfg, out, report_dir)

    grid = {"workers": cfg["workers"], "threads": cfg["threads"], "on_outcome": ran,
            "deadline": time.monotonic() + cfg["deadline"] if cfg.get("deadline") else None}
    done = run_grid(first, out, **grid)
    if "optuna" in cfg["methods"]:
        seconds = {job_key(_label(cfg, "optuna"), j.budget, j.options["seed"]):
                   o.record.search.search_phase_wall_s
                   for j, o in zip(first, done) if j.method == "gumbel" and o.ok}
        if grid["deadline"] is not None:   # the same rule as within a call: the slowest job
            grid["deadline"] -= max((o.wall_s for o in done), default=0.0)
        run_grid(jobs_of(cfg, "optuna", seconds), out, **grid)
    write_report(cfg, out, report_dir)


# ------------------------------------------------------------------------------------------
# overhead
def overhead(space: str, steps: int, threads: int, report_dir: Path) -> dict[str, Any]:
    """Median wall-clock of FP, QAT (uniform w4a4), search weight and architecture steps."""
    import copy

    import torch

    from coqat.bitconfig import LayerBits
    from coqat.bitsearch import GumbelSearch, SearchProblem, SearchSettings, to_search_model
    from coqat.config import RunConfig
    from coqat.cost import Budget
    from coqat.quant import quantize_model
    from coqat.training.loop import build_optimizer
    from coqat.training.runner import prepare

    torch.set_num_threads(threads)
    prep = prepare(RunConfig.from_options(space, progress=False), "fp")
    wl, bs = prep.workload, prep.settings.batch_size
    base = prep.model
    problem = SearchProblem.build(prep.resolved, prep.cost)
    budget = Budget.parse("w4a4", prep.cost, prep.resolved.pinned).bops
    settings = SearchSettings()
    batches = [wl.get_batch("train", i, bs) for i in range(steps + 2)]
    holdout = [wl.get_batch("holdout", i, settings.resolved_arch_batch(bs))
               for i in range(steps + 2)]

    def train_step(model, opt):
        def step(i):
            wl.loss(model, batches[i]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    fp_model = copy.deepcopy(base)
    q_model = quantize_model(copy.deepcopy(base), prep.resolved.uniform(LayerBits(4, 4)))
    s_model = copy.deepcopy(base)
    mods = to_search_model(s_model, problem)
    gs = GumbelSearch(problem, prep.cost, mods, budget, settings, 0, arch_steps=steps + 2)
    inner = train_step(s_model, build_optimizer(s_model, prep.settings))

    def weight_step(i):
        gs.apply(gs.sample(i, "weights", "hard"))
        inner(i)

    kinds = {"fp": train_step(fp_model, build_optimizer(fp_model, prep.settings)),
             "qat_w4a4": train_step(q_model, build_optimizer(q_model, prep.settings)),
             "search_weight": weight_step,
             "search_arch": lambda i: gs.arch_step(s_model, holdout[i], wl.loss, i)}
    # round-robin, so that a change of machine load hits every kind alike
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(steps + 2):
        for k, fn in kinds.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= 2:                                   # two warm-up rounds
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    amortised = med["search_weight"] + med["search_arch"] / settings.arch_every
    res = {"space": space, "batch_size": bs, "steps_timed": steps, "threads": threads,
           "arch_batch_size": settings.resolved_arch_batch(bs),
           "arch_every": settings.arch_every, "median_s": med,
           "search_step_s": amortised, "search_over_qat": amortised / med["qat_w4a4"],
           "arch_step_over_qat": med["search_arch"] / med["qat_w4a4"],
           "target": "search step <= 1.5 x QAT step",
           "passed": amortised <= 1.5 * med["qat_w4a4"],
           "command": command_line(), "machine": machine_info()}
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / f"overhead_{'cuda' if torch.cuda.is_available() else 'cpu'}"
                                   f"_t{threads}.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return res


# ------------------------------------------------------------------------------------------
# report
def _finished(out: Path, budget: str) -> dict[str, dict[int, RunRecord]]:
    """Finished runs of ``budget`` by method label (METHODS first, then tagged variants
    such as gumbel-<tag> found on disk) and seed."""
    tail = f"-{budget_slug(budget)}-s"
    found: dict[str, dict[int, RunRecord]] = {}
    for final in out.glob(f"*{tail}*/final.json"):
        label, _, seed = final.parent.name.rpartition(tail)
        if seed.isdigit():
            found.setdefault(label, {})[int(seed)] = RunRecord.read(RunDir(final.parent))
    return {m: found.get(m, {}) for m in [*METHODS, *sorted(set(found) - set(METHODS))]}


def _layer_bits(rec: RunRecord) -> dict[str, str]:
    cfg = BitConfig.load(Path(rec.run_dir) / BITCONFIG)
    return {name: bits.label for name, bits in cfg.layers.items()}


def _stats(xs) -> dict[str, Any]:
    return seed_summary(xs).to_dict()


def analyse(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    seeds = range(cfg["seeds"])
    fp: dict[int, float] = {}                  # the FP phase each seed's searches started from
    rows, hib = [], []
    for budget in cfg["budgets"]:
        for m, per in _finished(out, budget).items():
            res = {s: r for s, r in sorted(per.items()) if s in seeds}
            for s, r in res.items():
                if (r.search.fp_phase or {}).get("metric") is not None:
                    fp.setdefault(s, r.search.fp_phase["metric"])
            if not res:
                continue
            hib += [r.higher_is_better for r in res.values()]
            srch = [r.search for r in res.values()]
            layer_bits = [_layer_bits(r) for r in res.values()]
            rows.append({
                "budget": budget, "method": m, "seeds": sorted(res),
                "metric": _stats([r.metric for r in res.values()]),
                "achieved_over_budget": _stats([x.achieved_over_budget for x in srch]),
                "searchable_over_budget": _stats([x.searchable_over_budget for x in srch]),
                "gbops": _stats([x.achieved_bops / 1e9 for x in srch]),
                "config_spread_layers": config_distance(layer_bits),
                "n_layers": len(layer_bits[0]),
                "bits": {s: r.search.bits_histogram for s, r in res.items()},
                "search_wall_s": _stats([x.search_phase_wall_s or x.search_wall_s
                                         for x in srch]),
                "optuna_trials": [x.optuna["trials"] for x in srch if x.optuna],
                "per_seed": {s: r.metric for s, r in res.items() if r.metric is not None},
            })
    a = {"fp": _stats([fp[s] for s in sorted(fp)]), "rows": rows,
         "fp_per_seed": {s: fp[s] for s in sorted(fp)}, "higher_is_better": bool(hib and hib[0])}
    return derive_gaps(a)


def derive_gaps(a: dict[str, Any]) -> dict[str, Any]:
    """Add each row's comparison with uniform at the same budget, from the per-seed metrics.

    ``better_than_uniform``: per seed, how much better than uniform the method ended (same
    seed = same FP run, final-QAT init and data order), in metric units (> 0: better).
    ``gap_closed_paired``: per seed, that gain as a share of uniform's gap to the FP
    reference, on the seeds where uniform is worse than FP (a share of a gap that does not
    exist means nothing; ``gap_seeds`` says how many seeds had one). ``gap_closed_of_means``:
    the same from the means, or None when uniform's mean is not worse than FP's.
    Works on a fresh analysis and on one read back from results.json (string seed keys).
    """
    hib = bool(a.get("higher_is_better"))
    fp = a.get("fp_per_seed", {})
    for row in a["rows"]:
        uni = next((x for x in a["rows"] if x["budget"] == row["budget"]
                    and x["method"] == "uniform"), None)
        if uni is None:
            continue
        _, (v, u) = pair_by_seed(row["per_seed"], uni["per_seed"])
        _, (v3, u3, f3) = pair_by_seed(row["per_seed"], uni["per_seed"], fp)
        shares = gap_shares(u3, v3, f3, hib)
        row["better_than_uniform"] = _stats(paired_difference(v, u, hib).differences)
        row["gap_closed_paired"] = _stats(shares)
        row["gap_seeds"] = len(shares)
        row["gap_closed_of_means"] = gap_closed_of_means(
            uni["metric"].get("mean") if a["fp"].get("n") else None,
            row["metric"].get("mean"), a["fp"].get("mean"), hib)
    return a


def write_report(cfg: dict[str, Any], out: Path, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    a = analyse(cfg, out)
    doc = {"config": {k: v for k, v in cfg.items()}, "analysis": a, "command": command_line(),
           "machine": machine_info()}
    atomic_write_json(report_dir / "results.json", doc)
    _plot(a, cfg, report_dir / "search_vs_uniform.png")
    atomic_write_text(report_dir / "RESULTS.md", _markdown(a, cfg))


def rerender(report_dir: Path) -> None:
    """RESULTS.md and the plot again from results.json (e.g. runs made on another machine)."""
    doc = json.loads((report_dir / "results.json").read_text())
    if any("per_seed" not in r for r in doc["analysis"]["rows"]):
        sys.exit(f"{report_dir}/results.json has no per-seed metrics (an older format):"
                 " rewrite it with `report --out <the runs>` instead")
    doc["analysis"] = derive_gaps(doc["analysis"])
    atomic_write_json(report_dir / "results.json", doc)
    _plot(doc["analysis"], doc["config"], report_dir / "search_vs_uniform.png")
    atomic_write_text(report_dir / "RESULTS.md", _markdown(doc["analysis"], doc["config"]))


def _fmt(st: dict[str, Any], digits: int = 4) -> str:
    if not st or not st.get("n"):
        return "-"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _markdown(a: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [f"Space `{cfg['space']}`, {cfg['seeds']} seeds, final QAT {cfg['steps']} steps, "
             f"FP phase {cfg['fp_steps']}, search {cfg['search_steps']} steps, device "
             f"{cfg['device']}. FP reference: {_fmt(a['fp'])} (n={a['fp'].get('n', 0)}).", "",
             "| budget | method | n | metric (mean ± std) | better than uniform (paired) |"
             " gap closed (paired) | gap closed (means) | achieved/budget | searchable/budget"
             " | config spread (layers) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        gm = r.get("gap_closed_of_means")
        spread = "-" if r["config_spread_layers"] is None else \
            f"{r['config_spread_layers']:.1f} of {r['n_layers']}"
        paired = _fmt(r.get("gap_closed_paired", {}), 2)
        if r.get("gap_seeds", 0) < r["metric"]["n"] and r["method"] != "uniform":
            paired += f" (n={r.get('gap_seeds', 0)})"
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['metric']['n']} | {_fmt(r['metric'])} | "
            f"{'-' if r['method'] == 'uniform' else _fmt(r.get('better_than_uniform', {}))} | "
            f"{'-' if r['method'] == 'uniform' else paired} | "
            f"{'-' if gm is None or r['method'] == 'uniform' else f'{gm:.2f}'} | "
            f"{r['achieved_over_budget']['min']:.4f}–{r['achieved_over_budget']['max']:.4f} | "
            f"{r['searchable_over_budget']['min']:.3f}–{r['searchable_over_budget']['max']:.3f}"
            f" | {spread} |")
    lines += ["", "Better than uniform: uniform's metric minus the method's, per seed (> 0:"
              " the method is better). Gap closed: that gain over uniform's gap to the FP"
              " reference, only where uniform is worse than FP (n = seeds with such a gap;"
              " '-' in the means column: no gap on average).", ""]
    seeds = range(cfg["seeds"])
    lines += ["Per seed (same seed = same FP run, same final-QAT init and data order):", "",
              "| budget | method | " + " | ".join(f"seed {s}" for s in seeds)
              + " | better than uniform |", "|---|---|" + "---|" * (len(seeds) + 1)]
    for r in a["rows"]:
        u = next((x for x in a["rows"] if x["budget"] == r["budget"]
                  and x["method"] == "uniform"), None)
        vals = {int(k): v for k, v in r["per_seed"].items()}
        wins = "-"
        if u is not None and r["method"] != "uniform":
            _, (v, uv) = pair_by_seed(r["per_seed"], u["per_seed"])
            pd = paired_difference(v, uv, bool(a.get("higher_is_better")))
            wins = f"{pd.wins} of {pd.n}"
        lines.append(f"| {r['budget']} | {r['method']} | "
                     + " | ".join("-" if s not in vals else f"{vals[s]:.4f}" for s in seeds)
                     + f" | {wins} |")
    fp_vals = {int(k): v for k, v in a.get("fp_per_seed", {}).items()}
    if fp_vals:
        lines.append("| | FP | " + " | ".join(
            "-" if s not in fp_vals else f"{fp_vals[s]:.4f}" for s in seeds) + " | |")
    lines += ["", "Chosen bits per seed (histogram over searchable layers):", ""]
    for r in a["rows"]:
        for s, h in r["bits"].items():
            lines.append(f"- {r['budget']} {r['method']} seed {s}: "
                         + ", ".join(f"{k}×{v}" for k, v in sorted(h.items())))
    return "\n".join(lines) + "\n"


def _plot(a: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = [r for r in a["rows"] if r["metric"]["n"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, b in enumerate(budgets):
            r = next((r for r in rows if r["budget"] == b and r["method"] == m), None)
            if r:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(r["metric"]["mean"])
                es.append(r["metric"]["std"])
        if xs:
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=m)
    if a["fp"].get("n"):
        ax.axhline(a["fp"]["mean"], color="gray", ls="--", lw=1,
                   label=f"FP ({a['fp']['n']} seeds)")
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel("BOPs budget")
    ax.set_ylabel("validation loss (nats/byte)" if "lm" in cfg["space"] else "metric")
    ax.set_title(f"{Path(cfg['space']).stem}: search vs uniform at equal BOPs "
                 f"(mean ± std, {cfg['seeds']} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
        p.add_argument("--smoke", action="store_true",
                       help="the preset's plan at toy size on the CPU (micro LM, few steps)")
        p.add_argument("--space")
        p.add_argument("--budgets", help="comma list, e.g. w4a4,w3a3")
        p.add_argument("--seeds", type=int)
        p.add_argument("--methods", default=",".join(METHODS))
        p.add_argument("--steps", type=int, help="final QAT steps")
        p.add_argument("--fp-steps", type=int)
        p.add_argument("--search-steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--device")
        p.add_argument("--workers", type=int)
        p.add_argument("--threads", type=int)
        p.add_argument("--deadline", type=float, help="start no job that would end after this many"
                       " seconds (judged by the slowest job so far)")
        p.add_argument("--tag", default="", help="name of a variant of the searched methods"
                       " (results gumbel-<tag>, optuna-<tag>); use with --search-set")
        p.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                       help="[search] setting for this run, e.g. arch_batch_size=16")
        p.add_argument("--out", default="runs/bench-search")
        p.add_argument("--report-dir", default="reports/search_vs_uniform")
    p = sub.add_parser("readme", help="rewrite RESULTS.md and the plot from the"
                       " results.json in --report-dir (no runs needed)")
    p.add_argument("--report-dir", default="reports/search_vs_uniform")
    p = sub.add_parser("overhead")
    p.add_argument("--space", default="lm-tiny")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-dir", default="reports/search_vs_uniform")
    args = ap.parse_args()
    if args.cmd == "readme":
        rerender(Path(args.report_dir))
        return
    if args.cmd == "overhead":
        overhead(args.space, args.steps, args.threads, Path(args.report_dir))
        return
    cfg = dict(PRESETS[args.preset])
    if args.smoke:
        cfg.update(SMOKE)
    for key in ("space", "seeds", "steps", "fp_steps", "search_steps", "batch_size", "device",
                "workers", "threads", "deadline"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.budgets:
        cfg["budgets"] = [b.strip() for b in args.budgets.split(",") if b.strip()]
    cfg["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; use {','.join(METHODS)}")
    cfg["tag"] = args.tag
    cfg["search_set"] = {}
    for item in args.search_set:
        key, _, value = item.partition("=")
        try:
            cfg["search_set"][key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            cfg["search_set"][key.strip()] = value
    if args.search_set and not args.tag:
        ap.error("--search-set changes the search: give the variant a --tag")
    out, report_dir = Path(args.out), Path(args.report_dir)
    if args.cmd == "run":
        run(cfg, out, report_dir)
    else:
        write_report(cfg, out, report_dir)
    print((report_dir / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
