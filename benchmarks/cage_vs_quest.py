"""CAGE vs QuEST, cool-down fusion and the FP -> QAT split, measured on coqat's own runs.

What it measures (issue #4; facts in reference/cage.md and co_qat.md):

compare   FP (fp32 on CPU, bf16 autocast on GPU), QuEST (trust mask, plain AdamW), CAGE-D and
          CAGE-C at W4A4 and W3A3, several seeds, one token budget; QAT from the first step
          (as in the CAGE paper). Reports the share of the QuEST -> FP loss gap that CAGE
          closes (paired by seed) and whether CAGE at W3A3 reaches QuEST at W4A4.
fusion    fused vs unfused LR cool-down at W4A4 and W2A4 (QAT fraction 0.5, QuEST).
sweep     QAT fraction 0.1 / 0.25 / 0.5 / 0.75 / 1.0 at W4A4 (QuEST, fused) next to the
          compute-optimal ``auto`` prediction f = exp(-6.7297 / ln S).
lambda    CAGE-D / CAGE-C lambda and silence sweep at W4A4, to show what was tried.

Every run is a ``coqat.sweep.local`` job, i.e. ``coqat.training.runner.prepare`` /
``execute``: the code path of ``coqat train``. Run directories live under
``--out/<space>/<run key>/``; a finished run (final.json present) is read back and an
interrupted one is resumed, so the script can be called again after a timeout. Runs start
in priority order (compare first); with ``--deadline`` no run is started that would not
finish in time, and the report (results JSON + README.md, then PNGs) is rewritten after
every newly finished run.

Examples::

    # CPU part (the 2-core dev machine)
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/cage_vs_quest.py run --space lm-tiny \
        --steps 100 --seeds 3 --workers 2 --out runs/bench-cage \
        --report-dir reports/cage_vs_quest

    # GPU part: one H100/H200, one 10-minute call (the plan's defaults: lm-30m, 200 steps
    # of 32 x 512 tokens, 8 runs at once; 35 runs took 282 s on an H200). The report dir
    # there is empty, so only lm-30m's files come back (5 files) ...
    python benchmarks/cage_vs_quest.py run --plan gpu --deadline 480 \
        --out /tmp/bench-cage --report-dir "$OUT/cage" --quiet
    # ... then, here: copy results-lm-30m.json and *-lm-30m.png into the committed report
    # and rewrite its README from every results-<space>.json (+ notes-<space>.md) in it
    python benchmarks/cage_vs_quest.py readme --report-dir reports/cage_vs_quest

    python benchmarks/cage_vs_quest.py report --space lm-tiny --out runs/bench-cage \
        --report-dir reports/cage_vs_quest
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from common import machine_info, pyplot, run_grid
from coqat.reporting.stats import (gap_closed_of_means, gap_shares, pair_by_seed,
                                   paired_difference, seed_summary, standard_error)
from coqat.sweep.local import CACHED, FAILED, SKIPPED, JobOutcome, LocalJob, read_finished

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("compare", "fusion", "sweep", "lambda")
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
# (method, lambda, silence) tried besides the default cage-d / cage-c (10, 0.8). The coupled
# term goes through Adam's normalisation, so its useful lambda is on the gradient's scale.
LAMBDA_SWEEP = (("cage-d", 1.0, 0.8), ("cage-d", 30.0, 0.8), ("cage-d", 100.0, 0.8),
                ("cage-d", 10.0, 0.5), ("cage-d", 10.0, 0.95),
                ("cage-c", 0.1, 0.8), ("cage-c", 1.0, 0.8))
COMPARE_BITS = ("w4a4", "w3a3")
METHODS = ("quest", "cage-d", "cage-c")       # quest = plain AdamW on the QuEST quantizer
FUSION_BITS = ("w4a4", "w2a4")

# Presets. Explicit command-line flags override them.
PLANS: dict[str, dict[str, Any]] = {
    "cpu": {"space": "lm-tiny", "steps": 100, "seeds": 3, "device": "cpu", "workers": 2,
            "threads": 1, "parts": PARTS, "deadline": None},
    # One H100/H200 (16 CPU cores, 80+ GB), one 10-minute call: 8 runs share the GPU, each with
    # batch 32 x 512 (about 7 GB of activations and state per run; 64 would not fit 8 at
    # once). The deadline (counted from the script's start) leaves 90 s for the last runs'
    # evaluation and the report. Compare runs start first, then fusion / sweep, then the
    # lambda sweep; what does not fit is listed as not run.
    "gpu": {"space": "lm-30m", "steps": 200, "batch_size": 32, "seeds": 3, "device": "cuda",
            "workers": 8, "threads": 2, "parts": PARTS, "deadline": 510},
}


# ------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run. ``key`` names its directory; equal configs share one run."""

    bits: str                       # fp | wNaM
    method: str = "quest"           # quest | cage-d | cage-c (fp runs: "fp")
    seed: int = 0
    qat_fraction: float = 1.0
    fused: bool | None = None       # None: coqat's default (fused at >= 4 weight bits)
    lam: float = 10.0
    silence: float = 0.8
    priority: int = 0
    parts: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        if self.bits == "fp":
            return f"fp-seed{self.seed}"
        k = f"{self.bits}-{self.method}-q{self.qat_fraction:g}"
        if self.fused is not None and self.qat_fraction < 1:
            k += "-fused" if self.fused else "-unfused"
        if self.method != "quest":
            k += f"-lam{self.lam:g}-sil{self.silence:g}"
        return f"{k}-seed{self.seed}"

    def label(self) -> str:
        return "FP" if self.bits == "fp" else f"{self.method} {self.bits}"


def plan_runs(parts: Iterable[str], seeds: int) -> list[RunSpec]:
    """The runs of the chosen parts, deduplicated by key, sorted by priority."""
    specs: list[RunSpec] = []
    if "compare" in parts:
        for seed in range(seeds):
            specs.append(RunSpec("fp", "fp", seed, priority=0, parts={"compare"}))
            for bits in COMPARE_BITS:
                for m in METHODS:
                    specs.append(RunSpec(bits, m, seed, priority=0, parts={"compare"}))
    if "fusion" in parts:
        for bits in FUSION_BITS:
            for fused in (True, False):
                specs.append(RunSpec(bits, "quest", 0, 0.5, fused, priority=1,
                                     parts={"fusion"}))
    if "sweep" in parts:
        for f in SWEEP_FRACTIONS:
            specs.append(RunSpec("w4a4", "quest", 0, f, True if f < 1 else None, priority=1,
                                 parts={"sweep"}))
    if "lambda" in parts:
        for meth, lam, sil in (("cage-d", 10.0, 0.8), ("cage-c", 10.0, 0.8), *LAMBDA_SWEEP):
            specs.append(RunSpec("w4a4", meth, 0, lam=lam, silence=sil, priority=2,
                                 parts={"lambda"}))
    merged: dict[str, RunSpec] = {}
    for s in specs:
        if s.key in merged:
            m = merged[s.key]
            m.parts |= s.parts
            m.priority = min(m.priority, s.priority)
        else:
            merged[s.key] = s
    return sorted(merged.values(), key=lambda s: (s.priority, s.seed))


def bench_options(space: str, steps: int | None, batch_size: int | None) -> dict[str, Any]:
    """The options every run shares: the benchmark's step count with a proportional warm-up,
    evaluation only at the end (the loop's final evaluation covers the whole validation
    split), a checkpoint halfway (to resume after a timeout)."""
    from coqat.config import load_space

    t = load_space(space).train
    steps = steps or t.steps
    warmup = max(1, round(t.warmup_steps * steps / t.steps))
    return {"steps": steps, "warmup_steps": min(warmup, steps - 1), "batch_size": batch_size,
            "eval_every": steps, "checkpoint_every": max(1, steps // 2),
            "log_every": max(1, min(t.log_every, steps // 20))}


def job_of(spec: RunSpec, space: str, options: dict[str, Any], device: str) -> LocalJob:
    return LocalJob(spec.key, space, {
        **options, "seed": spec.seed, "device": device,
        "optimizer": "adamw" if spec.method in ("quest", "fp") else spec.method,
        "cage_lambda": spec.lam, "cage_silence": spec.silence,
        "qat_fraction": spec.qat_fraction, "fuse_cooldown": spec.fused}, bits=spec.bits)


# ------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------
def _metric(results: dict[str, JobOutcome], spec: RunSpec) -> float | None:
    o = results.get(spec.key)
    m = o.record.metric if o is not None and o.ok else None
    return float(m) if m is not None and math.isfinite(m) else None


def _stats(values: list[float]) -> dict[str, Any]:
    return seed_summary(values).to_dict(with_values=True)


def analyse(specs: list[RunSpec], results: dict[str, JobOutcome], seeds: int,
            steps: int, tokens_per_step: int, quant_params: int) -> dict[str, Any]:
    """Tables and verdicts from the finished runs (lower metric = better is assumed for
    the gap arithmetic; the LM workloads report validation loss)."""
    by_key = {s.key: s for s in specs}
    out: dict[str, Any] = {}

    def find(**kw) -> list[RunSpec]:
        return [s for s in specs if all(getattr(s, k) == v for k, v in kw.items())]

    # ----- compare
    cmp: dict[str, Any] = {}
    fp = {s.seed: _metric(results, s) for s in find(bits="fp")}
    cmp["fp"] = _stats([v for v in fp.values() if v is not None])
    for bits in COMPARE_BITS:
        for m in METHODS:
            runs = [s for s in find(bits=bits, method=m, qat_fraction=1.0, lam=10.0,
                                    silence=0.8) if "compare" in s.parts]
            per_seed = {s.seed: _metric(results, s) for s in runs}
            cmp[f"{m} {bits}"] = {**_stats([v for v in per_seed.values() if v is not None]),
                                  "per_seed": per_seed}
    gaps: dict[str, Any] = {}
    for bits in COMPARE_BITS:
        q = cmp[f"quest {bits}"]
        for m in ("cage-d", "cage-c"):
            c = cmp[f"{m} {bits}"]
            # seeds with all three runs; the LM losses are lower-is-better
            _, (cv, qv, fv) = pair_by_seed(c["per_seed"], q["per_seed"], fp)
            pd = paired_difference(cv, qv, higher_is_better=False)   # > 0: CAGE better
            entry = {"improvement": _stats(list(pd.differences)),
                     "gap_closed": _stats(gap_shares(qv, cv, fv, higher_is_better=False)),
                     "wins": pd.wins, "seeds": pd.n}
            of_means = gap_closed_of_means(q.get("mean"), c.get("mean"), cmp["fp"].get("mean"),
                                           higher_is_better=False)
            if of_means is not None:
                entry["gap_closed_of_means"] = of_means
            gaps[f"{m} {bits}"] = entry
    cmp["gap"] = gaps
    w3_vs_w4 = {}
    qw4 = cmp["quest w4a4"]
    for m in ("cage-d", "cage-c"):
        c3 = cmp[f"{m} w3a3"]
        if c3.get("n") and qw4.get("n"):
            pd = paired_difference(*pair_by_seed(c3["per_seed"], qw4["per_seed"])[1],
                                   higher_is_better=False)
            w3_vs_w4[m] = {"cage_w3a3": c3["mean"], "quest_w4a4": qw4["mean"],
                           "holds": c3["mean"] <= qw4["mean"],
                           "seeds_holding": pd.wins + pd.ties}
    cmp["cage_w3a3_vs_quest_w4a4"] = w3_vs_w4
    out["compare"] = cmp

    # ----- fusion
    fusion = []
    for bits in FUSION_BITS:
        row = {"bits": bits}
        for fused in (True, False):
            s = RunSpec(bits, "quest", 0, 0.5, fused)
            row["fused" if fused else "unfused"] = _metric(results, s) if s.key in by_key \
                else None
        row["default"] = "fused" if int(bits[1]) >= 4 else "unfused"
        fusion.append(row)
    out["fusion"] = fusion

    # ----- QAT-fraction sweep and the auto prediction
    from coqat.optim.planner import plan as qat_plan

    sweep = []
    for f in SWEEP_FRACTIONS:
        s = RunSpec("w4a4", "quest", 0, f, True if f < 1 else None)
        sweep.append({"qat_fraction": f, "qat_steps": int(round(f * steps)),
                      "metric": _metric(results, s) if s.key in by_key else None})
    tokens = steps * tokens_per_step
    p = qat_plan(tokens, quant_params, 4.0)
    out["sweep"] = {"points": sweep, "auto": {**p.to_dict(),
                                              "qat_steps": int(round(p.qat_fraction * steps))}}

    # ----- lambda / silence sweep
    lam_rows = []
    quest0 = _metric(results, RunSpec("w4a4", "quest", 0))
    for meth, lam, sil in (("cage-d", 10.0, 0.8), ("cage-c", 10.0, 0.8), *LAMBDA_SWEEP):
        s = RunSpec("w4a4", meth, 0, lam=lam, silence=sil)
        if s.key in by_key:
            v = _metric(results, s)
            lam_rows.append({"method": meth, "lambda": lam, "silence": sil, "metric": v,
                             "vs_quest": None if None in (v, quest0) else quest0 - v})
    out["lambda"] = {"quest_seed0": quest0, "rows": lam_rows}
    return out


def pull_curves(space_dir: Path, keys: Iterable[str]) -> dict[str, list[tuple[int, float, float]]]:
    """(step, lambda_t, mean ||w - Q(w)|| / ||w||) per run, from metrics.jsonl."""
    from coqat.rundir import RunDir

    curves = {}
    for key in keys:
        pts = [(r["step"], r.get("cage_lambda", 0.0), r["cage_pull_mean"])
               for r in RunDir(space_dir / key).metrics("train") if "cage_pull_mean" in r]
        if pts:
            curves[key] = pts
    return curves


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def describe_setup(space: str, options: dict[str, Any], device: str, threads: int,
                   workers: int) -> dict[str, Any]:
    """Budget, model size, optimizer settings and corpus of the benchmark's runs (built once:
    it constructs the model on the CPU)."""
    from coqat.config import RunConfig
    from coqat.training import runner

    prep = runner.prepare(RunConfig.from_options(space, **options, device="cpu",
                                                 progress=False), "w4a4")
    st = prep.settings
    # LM workloads: one sample = seq_len tokens (the workload's tokens_per_sample() is used
    # by --qat-fraction auto; the sequence length is the token count the study means).
    tokens_per_sample = getattr(prep.workload, "seq_len", None) or \
        prep.workload.tokens_per_sample()
    quant_params = sum(prep.cost.layers[n].params for n in prep.bitconfig.quantized())
    data = dict(prep.data_info)
    return {
        "space": prep.space.name, "space_sha256": prep.space.fingerprint(),
        "steps": st.steps, "batch_size": st.batch_size,
        "tokens_per_step": st.batch_size * tokens_per_sample,
        "tokens_total": st.steps * st.batch_size * tokens_per_sample,
        "workload_tokens_per_sample": prep.workload.tokens_per_sample(),
        "quantized_params": quant_params,
        "model_params": sum(p.numel() for p in prep.model.parameters()),
        "lr": st.lr, "warmup_steps": st.warmup_steps, "decay_frac": st.decay_frac,
        "min_lr_ratio": st.min_lr_ratio, "betas": [st.beta1, st.beta2],
        "weight_decay": st.weight_decay, "grad_clip": st.grad_clip,
        "quantizer": st.quantizer, "device": device, "threads": threads, "workers": workers,
        "pinned": {k: f"w{v.w_bits}a{v.a_bits}" for k, v in prep.resolved.pinned.items()},
        "corpus": {k: data.get(k) for k in ("corpus", "sha256", "split_bytes", "seq_len",
                                            "split_rule")},
        "corpus_sources": {k: {kk: vv for kk, vv in v.items() if kk in (
            "bytes", "docs", "files", "package_version", "file_sha256")}
            for k, v in data.get("sources", {}).items()},
    }


#: a results file's run status for each outcome status (the committed files use these words)
STATUS = {FAILED: "failed", SKIPPED: "not run (deadline)"}


def collect(specs: list[RunSpec], results: dict[str, JobOutcome], space_dir: Path,
            args_info: dict, seeds: int, setup: dict[str, Any]) -> dict[str, Any]:
    """The results document of one space: setup, every run, the analysis."""
    runs = []
    for s in specs:
        o = results.get(s.key)
        status = "not run" if o is None else "ok" if o.ok else STATUS.get(o.status, "not run")
        row = {**dataclasses.asdict(s), "parts": sorted(s.parts), "key": s.key,
               "status": status}
        if o is not None and o.ok:
            f = o.record
            row.update(metric=f.metric, metric_name=f.metric_name, bops=f.bops,
                       qat_steps=f.qat_steps, schedule=f.schedule, wall_s=f.wall_s,
                       val_bpb=f.eval.get("val_bpb"))
        elif o is not None and o.error:
            row["error"] = o.error
        runs.append(row)
    analysis = analyse(specs, results, seeds, setup["steps"], setup["tokens_per_step"],
                       setup["quantized_params"])
    return {
        "benchmark": "cage_vs_quest",
        "space": setup["space"],
        "space_sha256": setup["space_sha256"],
        "command": args_info["command"],
        "plan": args_info["plan"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": args_info["machine"],
        "setup": setup,
        "runs": runs,
        "analysis": analysis,
        "pull_curves": pull_curves(space_dir, [s.key for s in specs if s.method != "quest"
                                               and "compare" in s.parts and s.seed == 0]),
    }


def _fmt(st: dict[str, Any], digits: int = 4) -> str:
    if not st or not st.get("n"):
        return "–"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f} (1 seed)"
    return (f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} "
            f"[{st['min']:.{digits}f}, {st['max']:.{digits}f}]")


def _v(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def render_space(doc: dict[str, Any], plots: dict[str, str], notes: str | None = None) -> str:
    """Markdown for one space's results; ``notes`` (hand-written reading of the numbers,
    from ``notes-<space>.md`` in the report directory) goes after the setup."""
    a, su, m = doc["analysis"], doc["setup"], doc["machine"]
    cmp = a["compare"]
    metric = next((r["metric_name"] for r in doc["runs"] if r.get("metric_name")), "metric")
    n_ok = sum(r["status"] == "ok" for r in doc["runs"])
    val_bytes = (su["corpus"].get("split_bytes") or {}).get("val", 0)
    lines = [f"## {doc['space']}", ""]
    # results written before the benchmarks shared common.machine_info name the CPU cpu_model
    cpu = m.get("cpu_model") or m.get("cpu")
    dev = m.get("gpu") or f"{cpu} ({m.get('cpu_count')} CPU threads)"
    lines += [
        f"- **Command:** `{doc['command']}`",
        f"- **Machine:** {dev}; device `{su['device']}`, {su['workers']} runs in parallel,"
        f" {su['threads']} thread(s) each; {m.get('platform')}",
        f"- **Versions:** coqat {m.get('coqat')}, torch {m.get('torch')}, python"
        f" {m.get('python')}, triton {m.get('triton')}; git {str(m.get('git_commit'))[:12]}"
        + (" (with uncommitted changes)" if m.get("git_dirty") else ""),
        f"- **Date:** {doc['created']}. Runs finished: {n_ok} of {len(doc['runs'])}.",
        f"- **Budget per run:** {su['steps']} steps x {su['batch_size']} sequences ="
        f" {su['tokens_total']:,} tokens ({su['tokens_total'] / su['quantized_params']:.2f}"
        f" tokens per quantized parameter); model {su['model_params']:,} parameters, of which"
        f" {su['quantized_params']:,} quantized (pinned: "
        + (", ".join(f"{k} {v}" for k, v in su["pinned"].items()) or "none") + ").",
        f"- **Training:** AdamW lr {su['lr']:g}, betas {tuple(su['betas'])}, weight decay"
        f" {su['weight_decay']:g}, clip {su['grad_clip']:g}, warm-up {su['warmup_steps']}"
        f" steps, WSD decay over the last {su['decay_frac']:.0%} to {su['min_lr_ratio']:g} x"
        f" lr; quantizer `{su['quantizer']}` (Hadamard + RMS clip + trust mask) on weights and"
        f" activations; QAT from the first step unless stated. CAGE: lambda 10, silence 0.8,"
        f" linear ramp (the authors' defaults).",
        f"- **Data:** corpus `{su['corpus'].get('corpus')}`, sha256"
        f" `{str(su['corpus'].get('sha256'))[:16]}…`; sources "
        + ", ".join(f"{k} ({v.get('bytes', 0):,} bytes)"
                    for k, v in su["corpus_sources"].items())
        + f"; split {su['corpus'].get('split_rule')}; val {val_bytes:,} bytes. Metric:"
        f" `{metric}` on the whole validation split (nats per byte, lower is better).",
        "",
        *([notes.strip(), ""] if notes else []),
        f"### CAGE vs QuEST ({cmp['fp'].get('n', 0)} seeds; mean ± std [min, max])",
        "",
        f"| method | W4A4 {metric} | W3A3 {metric} |",
        "|---|---|---|",
        f"| FP ({'bf16 autocast' if su['device'] == 'cuda' else 'fp32'}) | {_fmt(cmp['fp'])} |"
        f" {_fmt(cmp['fp'])} |",
    ]
    names = {"quest": "QuEST (trust, AdamW)", "cage-d": "CAGE-D (decoupled)",
             "cage-c": "CAGE-C (coupled)"}
    for meth in METHODS:
        lines.append(f"| {names[meth]} | {_fmt(cmp[f'{meth} w4a4'])} |"
                     f" {_fmt(cmp[f'{meth} w3a3'])} |")
    lines += ["", "Share of the QuEST -> FP gap that CAGE closes (per seed: (QuEST - CAGE) /"
              " (QuEST - FP), same seed = same init and data order):", "",
              "| variant | bits | gap closed, mean ± std over seeds | of the means |"
              " CAGE better on | mean improvement |", "|---|---|---|---|---|---|"]
    for key, g in cmp["gap"].items():
        meth, bits = key.split()
        gc = g["gap_closed"]
        gc_txt = "–" if not gc.get("n") else (
            f"{100 * gc['mean']:.1f}% ± {100 * gc['std']:.1f}%")
        if gc.get("n", 0) < g["seeds"]:      # seeds where QuEST <= FP have no gap to close
            gc_txt += f" (n={gc.get('n', 0)}: QuEST <= FP on the other seeds)"
        of_means = g.get("gap_closed_of_means")
        imp = g["improvement"]
        lines.append(f"| {meth} | {bits.upper()} | {gc_txt} |"
                     f" {'–' if of_means is None else f'{100 * of_means:.1f}%'} |"
                     f" {g['wins']} of {g['seeds']} seeds |"
                     f" {_v(imp.get('mean'))} ± {_v(imp.get('std'))} |")
    lines.append("")
    for meth, w in cmp["cage_w3a3_vs_quest_w4a4"].items():
        lines.append(f"- **{meth.upper()} at W3A3 <= QuEST at W4A4?** "
                     f"{'yes' if w['holds'] else 'no'}: {w['cage_w3a3']:.4f} vs"
                     f" {w['quest_w4a4']:.4f} (holds on {w['seeds_holding']} of the seeds).")
    lines.append("")
    lines += verdict_lines(cmp, a["lambda"])
    if "compare" in plots:
        lines += ["", f"![CAGE vs QuEST]({plots['compare']})"]
    if "pull" in plots:
        lines += ["", f"![CAGE pull]({plots['pull']})"]

    lines += ["", "### Cool-down fusion (QuEST, QAT fraction 0.5, seed 0)", "",
              f"| bits | fused {metric} | unfused {metric} | fused - unfused |"
              " coqat's default |", "|---|---|---|---|---|"]
    for row in a["fusion"]:
        d = None if None in (row["fused"], row["unfused"]) else row["fused"] - row["unfused"]
        lines.append(f"| {row['bits'].upper()} | {_v(row['fused'])} | {_v(row['unfused'])} |"
                     f" {'–' if d is None else f'{d:+.4f}'} | {row['default']} |")
    lines += ["", "Fused: QAT switches on where the LR decay starts, the whole decay runs under"
              " QAT. Unfused: FP warm-up/stable/decay, then QAT with its own warm-up and decay."]

    auto = a["sweep"]["auto"]
    lines += ["", "### QAT fraction (QuEST W4A4, fused, seed 0) vs the compute-optimal"
              " prediction", "",
              f"| QAT fraction | QAT steps | {metric} |", "|---|---|---|"]
    for pt in a["sweep"]["points"]:
        lines.append(f"| {pt['qat_fraction']:g} | {pt['qat_steps']} | {_v(pt['metric'])} |")
    best = [p for p in a["sweep"]["points"] if p["metric"] is not None]
    lines += ["", f"`auto` (f = exp(-6.7297 / ln S), S = D / (N * B / 8) with D ="
              f" {auto['tokens']:,.0f} tokens, N = {auto['params']:,.0f}, B = 4):"
              f" S = {auto['tokens_per_param_byte']:.3g}, predicted fraction"
              f" {auto['qat_fraction']:.3g} ({auto['qat_steps']} QAT steps)."
              + (f" **{auto['note']}** — the study fitted S in 10..1e5, so this budget is far"
                 " from where the predictor was validated." if auto.get("note") else "")]
    if best:
        b = min(best, key=lambda p: p["metric"])
        lines.append(f"Best measured fraction here: {b['qat_fraction']:g}"
                     f" ({metric} {b['metric']:.4f}).")
    if "sweep" in plots:
        lines += ["", f"![QAT fraction sweep]({plots['sweep']})"]

    lam = a["lambda"]
    if lam["rows"]:
        lines += ["", "### CAGE lambda / silence sweep (W4A4, seed 0)", "",
                  f"QuEST W4A4 seed 0: {_v(lam['quest_seed0'])}.", "",
                  f"| variant | lambda | silence | {metric} | QuEST - CAGE (> 0: CAGE better) |",
                  "|---|---|---|---|---|"]
        for r in lam["rows"]:
            diff = "–" if r["vs_quest"] is None else f"{r['vs_quest']:+.4f}"
            lines.append(f"| {r['method']} | {r['lambda']:g} | {r['silence']:g} |"
                         f" {_v(r['metric'])} | {diff} |")
    failed = [r for r in doc["runs"] if r["status"] not in ("ok",)]
    if failed:
        lines += ["", "Runs without a result: " + "; ".join(
            f"`{r['key']}` ({r['status']}{': ' + r['error'] if r.get('error') else ''})"
            for r in failed) + "."]
    return "\n".join(lines) + "\n"


def verdict_lines(cmp: dict[str, Any], lam: dict[str, Any]) -> list[str]:
    """Plain sentences: does CAGE beat QuEST here? Says so when it does not."""
    out = []
    for key, g in cmp["gap"].items():
        imp = g["improvement"]
        if not imp.get("n"):
            continue
        se = standard_error(imp["std"], imp["n"])
        clear = imp["mean"] > 0 and g["wins"] == g["seeds"] and imp["mean"] > 2 * se
        if clear:
            word = "beats QuEST on every seed"
        elif imp["mean"] > 0:
            word = "is ahead of QuEST on average, but not on every seed / not beyond 2 s.e."
        else:
            word = "does NOT beat QuEST"
        out.append(f"- **{key.upper()}** {word}: mean improvement {imp['mean']:+.4f}"
                   f" (s.e. {se:.4f}, {g['wins']} of {g['seeds']} seeds).")
    if any(not (g["improvement"].get("n") and g["improvement"]["mean"] > 0)
           for g in cmp["gap"].values()) and lam["rows"]:
        out.append("- Where CAGE does not beat QuEST, the lambda / silence sweep below shows"
                   " what else was tried.")
    return out


def make_plots(doc: dict[str, Any], report_dir: Path) -> dict[str, str]:
    """PNG plots next to the README; returns name -> file name."""
    plt = pyplot()

    space = doc["space"]
    a = doc["analysis"]
    cmp = a["compare"]
    plots: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fname = f"{name}-{space}.png"
        tmp = report_dir / f".{fname}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, report_dir / fname)
        plots[name] = fname

    if cmp["fp"].get("n"):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        colors = {"quest": "#777777", "cage-d": "#1f77b4", "cage-c": "#ff7f0e"}
        for i, bits in enumerate(COMPARE_BITS):
            for j, meth in enumerate(METHODS):
                st = cmp[f"{meth} {bits}"]
                if not st.get("n"):
                    continue
                x = i + (j - 1) * 0.25
                ax.bar(x, st["mean"], 0.23, color=colors[meth],
                       label=meth if i == 0 else None)
                ax.scatter([x] * len(st["values"]), st["values"], s=9, color="black", zorder=3)
        ax.axhline(cmp["fp"]["mean"], color="green", ls="--", label="FP")
        vals = [v for k, st in cmp.items() if isinstance(st, dict) and st.get("values")
                for v in st["values"]]
        lo, hi = min(vals), max(vals)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
        ax.set_xticks(range(len(COMPARE_BITS)), [b.upper() for b in COMPARE_BITS])
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{space}: CAGE vs QuEST (dots: seeds)")
        ax.legend(fontsize=8)
        save(fig, "compare")
    curves = doc.get("pull_curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        ax2 = ax.twinx()
        for key, pts in sorted(curves.items()):
            steps = [p[0] for p in pts]
            ax.plot(steps, [p[2] for p in pts], label=key.split("-lam")[0])
        key0 = sorted(curves)[0]
        ax2.plot([p[0] for p in curves[key0]], [p[1] for p in curves[key0]], color="gray",
                 ls=":", label="lambda_t")
        ax.set_xlabel("step")
        ax.set_ylabel("mean ||w - Q(w)|| / ||w||")
        ax2.set_ylabel("lambda_t")
        ax.set_title(f"{space}: quantization error of the latent weights (seed 0)")
        ax.legend(fontsize=7, loc="center left")
        save(fig, "pull")
    pts = [p for p in a["sweep"]["points"] if p["metric"] is not None]
    if len(pts) >= 2:
        fig, ax = plt.subplots(figsize=(6.0, 3.4))
        ax.plot([p["qat_fraction"] for p in pts], [p["metric"] for p in pts], "o-",
                label="QuEST W4A4 (measured)")
        f = a["sweep"]["auto"]["qat_fraction"]
        ax.axvline(f, color="red", ls="--", label=f"auto prediction f = {f:.3g}")
        ax.set_xlabel("QAT fraction of the token budget")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{space}: FP -> QAT split")
        ax.legend(fontsize=8)
        save(fig, "sweep")
    return plots


HEADER = """# CAGE vs QuEST, cool-down fusion and the QAT fraction

Made by `benchmarks/cage_vs_quest.py` (issue #4). Every run is an ordinary coqat training
run (`coqat.training.runner.prepare` / `execute`, the code path of `coqat train`), one token
budget for all methods of a table. CAGE (Tabesh et al., arXiv 2510.18784) adds the error
feedback `lambda_t (w - Q(w))` to QuEST's straight-through training; the QAT-fraction
predictor and the cool-down fusion are from Dremov et al. (arXiv 2509.22935). Facts and the
paper's numbers: `reference/cage.md`, `reference/co_qat.md`. Each section below is one
search space; its results JSON (`results-<space>.json`) holds every run and the exact
command. Paper context: CAGE reports closing 11-20% of the QuEST -> BF16 gap at W4A4 at
30M-100M parameters and 100 tokens per parameter, far more training than the budgets here.
"""


def write_report(report_dir: Path, doc: dict[str, Any] | None, with_plots: bool) -> Path:
    """Write results-<space>.json (if ``doc``) and README.md from every results file."""
    from coqat.util import atomic_write_json, atomic_write_text

    report_dir.mkdir(parents=True, exist_ok=True)
    if doc is not None:
        atomic_write_json(report_dir / f"results-{doc['space']}.json", doc)
    sections = []
    for path in sorted(report_dir.glob("results-*.json")):
        d = json.loads(path.read_text())
        plots = make_plots(d, report_dir) if (with_plots and doc is not None
                                             and d["space"] == doc["space"]) else {
            name: f"{name}-{d['space']}.png" for name in ("compare", "pull", "sweep")
            if (report_dir / f"{name}-{d['space']}.png").exists()}
        notes_path = report_dir / f"notes-{d['space']}.md"
        notes = notes_path.read_text() if notes_path.exists() else None
        sections.append(render_space(d, plots, notes))
    # the paired-branch experiment (benchmarks/cage_branch.py, issue 18) leads: a hand-written
    # summary in branch.md, its generated tables under branch/
    lead = report_dir / "branch.md"
    if lead.exists():
        sections.insert(0, lead.read_text())
    readme = report_dir / "README.md"
    atomic_write_text(readme, HEADER + "\n" + "\n".join(sections))
    return readme


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report", "readme", "list"),
                   help="run: train what is missing, then report; report: only the report;"
                        " readme: rewrite README.md from the results files in --report-dir"
                        " (no runs needed); list: the planned runs and their state")
    p.add_argument("--plan", choices=tuple(PLANS), default="cpu",
                   help="preset (cpu: lm-tiny on the dev machine; gpu: lm-30m, one H100/H200, one"
                        " 10-minute call); flags below override it")
    p.add_argument("--space", help="search space (default: the plan's)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the plan's)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the space's"
                                                  " or the plan's)")
    p.add_argument("--seeds", type=int, help="seeds of the compare part")
    p.add_argument("--parts", help=f"comma list of {','.join(PARTS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="training device")
    p.add_argument("--workers", type=int, help="runs in parallel (separate processes)")
    p.add_argument("--threads", type=int, help="torch threads per run")
    p.add_argument("--deadline", type=float,
                   help="seconds after the script started: start no run that would end"
                        " later (0: no deadline)")
    p.add_argument("--out", default="runs/bench-cage", help="scratch root of run directories")
    p.add_argument("--report-dir", default="reports/cage_vs_quest",
                   help="where results-<space>.json, README.md and PNGs go")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress line per run")
    args = p.parse_args(argv)
    preset = PLANS[args.plan]
    for name in ("space", "steps", "seeds", "device", "workers", "threads", "deadline",
                 "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name))
    args.parts = tuple(preset["parts"]) if not args.parts else tuple(
        x.strip() for x in args.parts.split(",") if x.strip())
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    if args.deadline == 0:
        args.deadline = None
    if args.seeds < 1 or args.workers < 1 or args.threads < 1:
        p.error("--seeds, --workers and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()       # the deadline counts from here (start-up included)
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.command == "readme":
        path = write_report(Path(args.report_dir), None, with_plots=False)
        print(f"README written to {path}")
        return 0
    from coqat.config import load_space
    from coqat.errors import CoqatError

    try:
        space_name = load_space(args.space).name
        options = bench_options(args.space, args.steps, args.batch_size)
    except CoqatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    space_dir = Path(args.out).resolve() / space_name
    specs = plan_runs(args.parts, args.seeds)
    jobs = [job_of(s, args.space, options, args.device) for s in specs]
    report_dir = Path(args.report_dir)
    command = "python benchmarks/cage_vs_quest.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    args_info = {"command": command, "plan": args.plan, "workers": args.workers,
                 "machine": machine_info(args.device)}

    if args.command == "list":
        for s in specs:
            done = (space_dir / s.key / "final.json").exists()
            print(f"{'done ' if done else 'to do'}  p{s.priority}  {s.key}"
                  f"  [{','.join(sorted(s.parts))}]")
        return 0

    setup = describe_setup(args.space, options, args.device, args.threads, args.workers)

    def report(results: dict[str, JobOutcome], plots: bool) -> Path:
        doc = collect(specs, results, space_dir, args_info, args.seeds, setup)
        return write_report(report_dir, doc, with_plots=plots and not args.no_plots)

    if args.command == "report":
        # Keep the provenance of the runs (the command and machine that trained them).
        previous = report_dir / f"results-{space_name}.json"
        if previous.exists():
            old = json.loads(previous.read_text())
            args_info.update(command=old["command"], machine=old["machine"],
                             workers=old["setup"]["workers"])
        results = {o.key: o for o in read_finished(jobs, space_dir) if o.ok}
        print(f"report written to {report(results, True)}")
        return 0

    print(f"{len(specs)} runs of {space_name}, {options['steps']} steps each,"
          f" {args.workers} at a time on {args.device}; run dirs under {space_dir}")
    t0 = time.monotonic()
    results: dict[str, JobOutcome] = {}

    def finished(o: JobOutcome) -> None:  # tables after each new run (cheap), plots at the end
        results[o.key] = o
        if o.status != CACHED:
            report(results, False)

    outcomes = run_grid(jobs, space_dir, quiet=args.quiet, workers=args.workers,
                        threads=args.threads, keep_going=True, drop_checkpoints=True,
                        deadline=None if args.deadline is None else started + args.deadline,
                        on_outcome=finished)
    results = {o.key: o for o in outcomes}
    path = report(results, True)
    n_ok = sum(o.ok for o in outcomes)
    print(f"{n_ok} of {len(specs)} runs finished in {time.monotonic() - t0:.0f} s;"
          f" report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
