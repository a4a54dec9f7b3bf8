"""What one Gumbel search step costs, eager and compiled (issue #15).

A search phase is ``search_steps`` weight steps (a hard sample, the loop's training step) and
one architecture step every ``arch_every`` of them (soft mixes of every candidate, on a
holdout batch). Compiled, each kind is one graph, but its cold compile is paid once per
process: on lm-30m (one H100) the two graphs cost ~217 s of the 316 s search phase
(reports/search_job_lm30m.json). This script times, on the space's model and batch sizes
(random FP weights, same shapes), the steady-state step of each kind eagerly and compiled,
and the first compiled call (the compile), so the break-even number of steps can be read off;
then the architecture step as the search runs it by default (eager, its soft mixes compiled):

    python benchmarks/search_steps.py --space lm-30m --budget w3a3 --json reports/search_steps.json
    # CPU smoke (aot_eager: traces like Inductor, compiles nothing)
    python benchmarks/search_steps.py --space tests/fixtures/lm-micro.toml --budget w4a4 \\
        --backend aot_eager --steps 2 --json /tmp/steps.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import command_line, machine_info, write_json  # noqa: E402
# transformers imports a package named `kernels` when it finds one (benchmarks/kernels.py
# must not be it): the same as benchmarks/mixed_vs_uniform.py
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]


def measure(space: str, budget: str, steps: int, backend: str, compiled_arch: bool = True,
            arch_only: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from coqat.bitsearch import GumbelSearch, to_search_model
    from coqat.bitsearch.methods import arch_step_count
    from coqat.bitsearch.pipeline import plan_search
    from coqat.bitsearch.relax import fuse_soft_mixes
    from coqat.config import RunConfig
    from coqat.training.loop import autocast, build_optimizer
    from coqat.workloads.base import to_device

    job = plan_search(RunConfig.from_options(space, progress=False), budget, "gumbel")
    prep, s, problem = job.fp_prep, job.settings, job.problem
    dev = prep.device
    model = prep.model.to(dev)
    search = GumbelSearch(problem, prep.cost, to_search_model(model, problem), job.budget.bops,
                          s, 0, dev, arch_steps=max(2, 4 * steps))
    opt = build_optimizer(model, prep.settings)
    bs, arch_bs = prep.settings.batch_size, s.resolved_arch_batch(prep.settings.batch_size)
    train = [to_device(prep.workload.get_batch("train", i, bs), dev) for i in range(4)]
    holdout = [to_device(prep.workload.get_batch("holdout", i, arch_bs), dev) for i in range(4)]

    def weight_step(net, i: int) -> None:
        search.apply(search.sample(i, "weights", "hard"))
        with autocast(dev):
            loss = prep.workload.loss(net, train[i % 4])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def arch_step(net, i: int) -> None:
        search.arch_step(net, holdout[i % 4], prep.workload.loss, i)

    def timed(step, net, n: int, start: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(start, start + n):
            step(net, i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    out: dict[str, Any] = {"space": space, "budget": budget, "device": str(dev),
                           "batch": bs, "arch_batch": arch_bs, "arch_every": s.arch_every,
                           "search_steps": job.search_steps, "backend": backend,
                           "decisions": len(problem.w_decisions) + len(problem.a_decisions)}
    kinds = (("weight", weight_step), ("arch", arch_step))
    for kind, step in kinds[1:] if arch_only else kinds:
        timed(step, model, 2, 0)                                  # warm-up
        out[f"eager_{kind}_ms"] = 1e3 * timed(step, model, steps, 2)
        if kind == "arch" and not compiled_arch:
            say(f"arch: eager {out['eager_arch_ms']:.1f} ms (the compiled step not timed)")
            continue
        net = torch.compile(model, backend=backend)
        out[f"compiled_{kind}_first_s"] = timed(step, net, 1, 0)
        timed(step, net, 2, 1)
        out[f"compiled_{kind}_ms"] = 1e3 * timed(step, net, steps, 3)
        say(f"{kind}: eager {out[f'eager_{kind}_ms']:.1f} ms, compiled"
            f" {out[f'compiled_{kind}_ms']:.1f} ms after a first call of"
            f" {out[f'compiled_{kind}_first_s']:.1f} s")
        saved = out[f"eager_{kind}_ms"] - out[f"compiled_{kind}_ms"]
        # steps after which the compile has paid for itself (None: it never does)
        out[f"{kind}_break_even_steps"] = (round(1e3 * out[f"compiled_{kind}_first_s"] / saved)
                                          if saved > 0 else None)
    # the default on CUDA with compile on: the eager architecture step, its soft mixes
    # compiled (two small graphs; the first call pays their compile)
    fuse_soft_mixes(search.modules, backend)
    out["fused_arch_first_s"] = timed(arch_step, model, 1, 0)
    timed(arch_step, model, 2, 1)
    out["fused_arch_ms"] = 1e3 * timed(arch_step, model, steps, 3)
    fuse_soft_mixes(search.modules, None)
    say(f"arch, soft mixes compiled: {out['fused_arch_ms']:.1f} ms after a first call of"
        f" {out['fused_arch_first_s']:.1f} s")
    out["arch_steps_in_search"] = arch_step_count(job.search_steps, s.arch_every)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="lm-30m")
    ap.add_argument("--budget", default="w3a3")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--no-compiled-arch", action="store_true",
                    help="skip the whole compiled architecture step (its compile: ~150 s on"
                    " lm-30m)")
    ap.add_argument("--arch-only", action="store_true", help="time the architecture step only")
    ap.add_argument("--json", required=True, help="where the results go")
    args = ap.parse_args(argv)
    res = measure(args.space, args.budget, args.steps, args.backend,
                  compiled_arch=not args.no_compiled_arch, arch_only=args.arch_only)
    res["command"], res["machine"] = command_line(), machine_info(res["device"].split(":")[0])
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
