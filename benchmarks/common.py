"""Shared plumbing for benchmark scripts: resumable grids of training runs, machine info.

Each benchmark describes its runs as ``Job``s (a space, ``TrainOptions`` and a stable key);
``run_grid`` trains the missing ones through the library (the code path ``coqat train``
uses), in parallel worker processes if asked, and returns every job's final record. A job
whose ``<out>/<key>/final.json`` exists is not run again, so an interrupted benchmark
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    key: str                      # stable, filesystem-safe id: the run directory's name
    space: str
    options: dict[str, Any] = field(default_factory=dict)   # TrainOptions fields


def _run_one(job: Job, out: str, threads: int) -> dict[str, Any]:
    import torch

    from coqat.rundir import RunDir
    from coqat.training import runner

    torch.set_num_threads(threads)
    run_path = Path(out) / job.key
    if (run_path / "final.json").is_file():
        return {**json.loads((run_path / "final.json").read_text()), "key": job.key,
                "run_dir": str(run_path), "cached": True, "job_options": job.options}
    opts = runner.TrainOptions(**{**job.options, "out": out, "progress": False})
    prep = runner.prepare(job.space, opts)
    resume = (run_path / "checkpoints" / "last.pt").is_file()
    if not resume and run_path.exists():
        import shutil

        shutil.rmtree(run_path)      # killed before its first checkpoint: start over
    run_path.mkdir(parents=True, exist_ok=True)
    _, result = runner.execute(prep, run=RunDir(run_path), resume=resume)
    return {**result, "key": job.key, "run_dir": str(run_path), "cached": False,
            "job_options": job.options}


def run_grid(jobs: Sequence[Job], out: str | os.PathLike, workers: int = 1,
             threads: int | None = None) -> list[dict[str, Any]]:
    """Train every job (skipping finished ones); results in the order of ``jobs``."""
    out = str(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    results: dict[str, dict[str, Any]] = {}
    if workers <= 1:
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job.key}", file=sys.stderr, flush=True)
            results[job.key] = _run_one(job, out, threads)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_run_one, job, out, threads): job for job in jobs}
            for i, fut in enumerate(as_completed(futures), 1):
                job = futures[fut]
                results[job.key] = fut.result()
                print(f"[{i}/{len(jobs)}] {job.key} done", file=sys.stderr, flush=True)
    return [results[j.key] for j in jobs]


def machine_info(device: str | None = None) -> dict[str, Any]:
    """Where a benchmark ran: written next to every committed result (with the GPU when
    ``device`` is cuda, and the git commit so a number can be traced to its code)."""
    import subprocess

    from coqat.util import environment_info

    info = environment_info()
    info["cpu"] = _cpu_name()
    info["cpu_count"] = os.cpu_count()
    info["python_impl"] = platform.python_implementation()
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    try:
        git = ["git", "-C", str(ROOT)]
        info["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        info["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain"],
                                                capture_output=True, text=True,
                                                timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    """The command that produced a report, as the user would type it."""
    args = " ".join(sys.argv[1:])
    return f"python benchmarks/{Path(sys.argv[0]).name} {args}".strip()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    from coqat.util import atomic_write_json

    atomic_write_json(path, obj)


def asdict_safe(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
