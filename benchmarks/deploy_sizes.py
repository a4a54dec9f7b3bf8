"""Deployed size and metric of QAT runs: ``coqat deploy`` (packed, and ONNX through
onnxruntime) on lm-tiny and fashion-resnet.

Trains (or reuses) one run per space and bit width, then for each: the packed model's
file size against the FP32 state dict, its metric against the QAT model's (they must be
equal: the packed model is bit-identical), and the same for the ONNX export evaluated with
onnxruntime. Writes ``reports/deploy/README.md`` and ``results.json``.

Check (issue #7): the W4A4 packed file is at most 0.3x the FP32 one.

    python benchmarks/deploy_sizes.py                          # lm-tiny + fashion-resnet, w4a4
    python benchmarks/deploy_sizes.py --bits w4a4,w8a8,w2a2 --steps 200
    python benchmarks/deploy_sizes.py --readme      # README from results.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, comma_list, command_line, machine_info, read_json,  # noqa: E402
                    run_grid, space_names, write_json)
from coqat.sweep.local import LocalJob  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default="lm-tiny,fashion-resnet")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--steps", type=int, default=None, help="override each space's steps")
    ap.add_argument("--formats", default="packed,onnx")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--device", default=None, help="training device (default: the space's)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-deploy"))
    ap.add_argument("--report-dir", default=str(ROOT / "reports" / "deploy"))
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md from"
                    " results.json in --report-dir (no runs)")
    args = ap.parse_args()
    out = Path(args.report_dir)
    if args.readme:
        render(read_json(out / "results.json"), out)
        return

    from coqat.exporters.deploy import deploy

    spaces = comma_list(args.spaces)
    jobs = [LocalJob(f"{name}-{b}" + (f"-t{args.steps}" if args.steps else ""), sp,
                     {"steps": args.steps, "device": args.device}, bits=b)
            for sp, name in zip(spaces, space_names(spaces)) for b in comma_list(args.bits)]
    trained = run_grid(jobs, args.out, threads=args.threads)
    rows = []
    for job, res in zip(jobs, trained):
        for fmt in comma_list(args.formats):
            t0 = time.perf_counter()
            rep = deploy(res.run_dir, fmt)
            rows.append({"run": job.key, "space": job.space, "bits": job.bits,
                         "config": res.record.bits, "format": fmt,
                         "metric_name": rep.metric_name, "metric": rep.metric,
                         "qat_metric": rep.reference_metric, "train_metric": res.record.metric,
                         "bytes": rep.bytes, "fp32_bytes": rep.fp32_bytes,
                         "ratio": rep.size_ratio, "deploy_s": round(time.perf_counter() - t0, 1)})
            print(f"{job.key} {fmt}: {rep.metric_name} {rep.metric:.4f} (QAT "
                  f"{rep.reference_metric:.4f}), {rep.bytes:,} B = {rep.size_ratio:.3f} x FP32",
                  file=sys.stderr, flush=True)
    doc = {"command": command_line(), "machine": machine_info(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", doc)
    render(doc, out)


def render(doc: dict, out: Path) -> None:
    """README.md from a results document (a fresh one or results.json)."""
    rows, info = doc["rows"], doc["machine"]
    lines = ["# Deployed size and metric (`coqat deploy`)", "",
             "Packed: integer codes in safetensors (int2 four per byte, 4-bit two per byte, "
             "8-bit as int8) + one FP32 step per output channel; embeddings, norms and float "
             "layers stay FP32. ONNX: the QDQ export evaluated by onnxruntime "
             "(ORT_ENABLE_ALL, MatMulNBits accuracy level 1). `--bits w4a4` applies to the "
             "searchable layers; pinned layers keep their bits (fashion-resnet: conv1 and fc "
             "at w8a8; lm-tiny: lm_head in float).", "",
             "| run | format | metric | deployed | QAT model | train (final.json) | bytes | "
             "FP32 bytes | x FP32 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['format']} | {r['metric_name']} | {r['metric']:.4f} | "
                     f"{r['qat_metric']:.4f} | {r['train_metric']:.4f} | {r['bytes']:,} | "
                     f"{r['fp32_bytes']:,} | {r['ratio']:.3f} |")
    checks = []
    for r in rows:
        if r["bits"] == "w4a4" and r["format"] == "packed":  # pinned layers may differ
            ok = r["ratio"] <= 0.3
            checks.append(f"- {r['run']}: W4A4 packed file is {r['ratio']:.3f} x FP32 "
                          f"({'PASS' if ok else 'FAIL'}: <= 0.3)")
        if r["format"] == "packed":
            same = r["metric"] == r["qat_metric"]
            checks.append(f"- {r['run']}: packed metric equals the QAT model's: "
                          f"{'PASS' if same else 'FAIL'}")
    lines += ["", "## Checks", "", *checks, "", "## Reproduce", "", "```",
              doc["command"], "```", "",
              "Training runs with `--threads` torch threads (default 1); the published "
              "numbers were made with `OMP_NUM_THREADS=1 nice -n 10` on a shared machine. "
              "Sizes and metrics do not depend on the machine; times do.", "",
              f"Machine: {info.get('cpu')} ({info.get('cpu_count')} cores), torch "
              f"{info.get('torch')}, {info.get('platform')}."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
