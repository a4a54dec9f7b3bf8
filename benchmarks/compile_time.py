"""Cold compile time and step time of a whole-model vs a per-block ("regional") compile.

Issue #15: of the lm-30m search job's 380 s on an H100, ~116 s were the GPU idle while
Inductor compiled (reports/search_job_lm30m_2026-12-07b.json). A transformer repeats one
block; compiling each block instead of the whole model traces and lowers one block's graph
and reuses it for the others with the same configuration. This script measures what that
buys on the space's model: for each phase (the FP step, a uniform QAT W4A4 step on the
kernels, and a mixed QAT step whose blocks carry different bit widths) and each variant, a
fresh process with empty Inductor and Triton caches times the first steps (the compile) and
the median of the steps after, as the loop runs them (bf16 autocast, fused AdamW, CUDA
graphs):

    python benchmarks/compile_time.py --space lm-30m --json reports/compile_time.json
    # CPU smoke: python benchmarks/compile_time.py --space tests/fixtures/lm-micro.toml \
    #     --device cpu --backend aot_eager --steps 2 --json /tmp/ct.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import command_line, machine_info, write_json  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

PHASES = ("fp", "qat", "qat-mixed")
VARIANTS = ("whole", "regional")


def _mixed_bits(i: int) -> tuple[int, int]:
    return ((2, 4), (3, 4), (4, 4))[i % 3]


def child(space: str, phase: str, variant: str, steps: int, device: str, backend: str) -> dict:
    import torch
    import torch.nn.functional as F

    from coqat.bitconfig import BitConfig, LayerBits
    from coqat.kernels import use_kernels
    from coqat.quant import quantize_model
    from coqat.workloads import get_workload

    path = Path(space) if space.endswith(".toml") else ROOT / "search_spaces" / f"{space}.toml"
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    batch = spec["train"]["batch_size"]
    spec = {k: v for k, v in spec["workload"].items() if k != "name"}
    spec["corpus"] = ["stdlib"]               # batches are random tokens; no corpus needed
    workload, seq = get_workload("lm", spec), spec["seq_len"]
    torch.manual_seed(0)
    model = workload.build_model().to(device)
    if phase != "fp":
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        bits = {n: LayerBits(4, 4) if phase == "qat" else
                LayerBits(*_mixed_bits(int(n.split(".")[2]))) for n in names}
        quantize_model(model, BitConfig(bits))
        use_kernels(model, "auto")
    how = dict(mode="reduce-overhead") if backend == "inductor" else dict(backend=backend)
    if variant == "whole":
        net = torch.compile(model, **how)
    else:
        for block in model.model.layers:
            block.compile(**how)
        net = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        idx = torch.randint(0, 256, (batch, seq + 1), device=device, generator=gen)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = net(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):
        loss = step()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"phase": phase, "variant": variant, "first_3_steps_s": round(first, 2),
            "step_ms": round(times[len(times) // 2] * 1e3, 2), "last_loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="lm-30m")
    p.add_argument("--steps", type=int, default=30, help="timed steps after the first three")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--json", default="compile_time.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor",
                   help="inductor (CUDA graphs, as the loop) or aot_eager (a CPU smoke test)")
    p.add_argument("--child", nargs=2, metavar=("PHASE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.space, *args.child, args.steps, args.device,
                                              args.backend)), flush=True)
        return 0
    rows = []
    for phase in args.phases.split(","):
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
                           TRITON_CACHE_DIR=f"{cache}/triton", PYTHONPATH=str(ROOT))
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, __file__, "--space", args.space,
                                      "--steps", str(args.steps), "--device", args.device,
                                      "--backend", args.backend, "--child", phase, variant],
                                     env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
            found = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(found[0][7:]) if found else {
                "phase": phase, "variant": variant, "error": out.stderr[-800:]}
            row["process_wall_s"] = round(wall, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_json(args.json, {"what": __doc__.split("\n")[0], "command": command_line(),
                           "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
