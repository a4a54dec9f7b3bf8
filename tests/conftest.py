"""Shared test helpers: fixture spaces and running the real ``coqat`` CLI in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coqat.config import RunConfig
from coqat.training import runner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DIGITS = str(FIXTURES / "digits.toml")
LM_MICRO = str(FIXTURES / "lm-micro.toml")

# Tests run in parallel processes (pytest-xdist); one intra-op thread each keeps them from
# oversubscribing the CI machine's two cores.
torch.set_num_threads(1)


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m coqat ARGS`` (the installed console script does the same)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100", **(env or {})}
    return subprocess.run([sys.executable, "-m", "coqat", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def run_config(space: str, runs: str | os.PathLike, **options) -> RunConfig:
    """A quiet RunConfig writing under ``runs`` (options: TrainSettings / SearchSettings /
    Runtime fields)."""
    return RunConfig.from_options(space, out=str(runs), progress=False, **options)


def train_run(space: str, runs: str | os.PathLike, bits="fp", **options):
    """``coqat train`` from Python: (RunDir, RunRecord)."""
    return runner.run_train(run_config(space, runs, **options), bits)


def prepare_run(space: str, runs: str | os.PathLike, bits="fp", **options):
    return runner.prepare(run_config(space, runs, **options), bits)


def cli_json(*args: str, **kw) -> dict:
    proc = run_cli(*args, "--json", **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def mvu():
    """benchmarks/mixed_vs_uniform.py as a module (its presets, plans and statistics)."""
    spec = importlib.util.spec_from_file_location(
        "mixed_vs_uniform", ROOT / "benchmarks" / "mixed_vs_uniform.py")
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod
