"""Do shared input operands change what training gives? Paired seeds, sharing on vs off.

Layers that read one input share its quantized operand (``coqat.quant.shared``): the same
mathematics as separate operands, with the backward summing the layers' gradients before
the masked rotation back instead of after, so float rounding differs and a run's trajectory
moves. This script trains the same uniform configuration with sharing on (the default) and
off for each seed, in this process one after the other, and reports the paired difference
of the final metric with its standard error and t-test, and each run's wall time:

    python benchmarks/shared_operands.py --space lm-tiny --bits w4a4 --seeds 0,1,2,3,4 \\
        --steps 200 --json reports/shared_operands_paired_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import command_line, comma_list, machine_info, write_json  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]


def measure(space: str, bits: str, seeds: list[int], steps: int, out: Path,
            say=print) -> dict:
    from coqat import api
    from coqat.quant import sharing
    from coqat.reporting.stats import paired_difference

    runs = []
    for seed in seeds:
        for share in (True, False):
            t0 = time.perf_counter()
            with sharing(share):
                rec = api.train(space, bits, seed=seed, steps=steps,
                                out=str(out / ("shared" if share else "separate")))
            runs.append({"seed": seed, "shared": share, "metric": rec.metric,
                         "metric_name": rec.metric_name,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            say(f"seed {seed} shared={share}: {rec.metric_name} {rec.metric:.4f} "
                f"({runs[-1]['wall_s']} s)")
    on = [r for r in runs if r["shared"]]
    off = [r for r in runs if not r["shared"]]
    higher = on[0]["metric_name"] not in ("val_loss", "loss")
    diff = paired_difference([r["metric"] for r in on], [r["metric"] for r in off], higher)
    return {"runs": runs, "shared_vs_separate": diff.to_dict(),
            "verdict": diff.statement("shared", "separate"),
            "mean_wall_s": {"shared": round(sum(r["wall_s"] for r in on) / len(on), 1),
                            "separate": round(sum(r["wall_s"] for r in off) / len(off), 1)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="lm-tiny")
    ap.add_argument("--bits", default="w4a4", help="the uniform configuration trained")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--json", required=True, help="where the results go")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in comma_list(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(args.space, args.bits, seeds, args.steps, Path(args.out or tmp))
    write_json(args.json, {"command": command_line(), "machine": machine_info(), **res})
    print(res["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
