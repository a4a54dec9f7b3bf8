"""What the benchmark scripts share: running a grid of jobs, where a benchmark ran, report
file helpers.

The runs themselves go through the library: a benchmark describes them as
``coqat.sweep.local.LocalJob``s and ``run_grid`` hands them to ``run_local`` (parallel,
resumable: a job whose ``<out>/<key>/final.json`` exists is read back, not run again).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent


def run_grid(jobs: Sequence[Any], out: str | os.PathLike, quiet: bool = False,
             **options: Any) -> list[Any]:
    """``coqat.sweep.local.run_local`` with one progress line per finished job on stderr
    (none if ``quiet``); ``options`` are run_local's (workers, threads, deadline, ...)."""
    from coqat.sweep.local import run_local

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if not quiet:
        say(f"{len(jobs)} runs under {out}")
    return run_local(jobs, out, say=None if quiet else say, **options)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (command-line lists)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def space_names(spaces: Sequence[str]) -> list[str]:
    """The names of spaces given by name or as a path to a TOML file."""
    from coqat.config import load_space

    return [load_space(sp).name for sp in spaces]


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


def read_json(path: str | os.PathLike) -> Any:
    """A committed results file (one-line error when it is missing or damaged)."""
    from coqat.util import read_json as read

    return read(path, "a benchmark's results file", "run the benchmark first")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def record_row(outcome: Any, **extra: Any) -> dict[str, Any]:
    """A finished job as a results-file row: its run record's fields, key and directory."""
    return {**outcome.record.to_dict(), "key": outcome.key, "run_dir": outcome.run_dir,
            "cached": outcome.status == "cached", **extra}

