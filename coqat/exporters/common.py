"""What every export adapter shares: the result record, the refusal message and the
all-or-nothing output directory.

An adapter never coerces: it collects *every* reason a configuration cannot be written
exactly in its format and raises one CoqatError listing them all. When the caller allows
approximations (``approx=True``), the same reasons become ``approximations`` in the
result and in the export's ``export.json`` manifest, so the tool always says what it did.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from coqat.errors import CoqatError
from coqat.util import sha256_file

MANIFEST = "export.json"

__all__ = ["ExportResult", "MANIFEST", "refuse", "staged_dir", "quiet_stderr",
           "default_out_dir"]


@dataclass
class ExportResult:
    """What an export wrote and how faithful it is.

    ``exact``: the files reproduce coqat's numerics (up to float summation order);
    ``approximations``: each place where they do not (empty when exact);
    ``notes``: how coqat's quantizers were represented in the format.
    """

    format: str
    out_dir: str
    run_dir: str
    files: dict[str, int] = field(default_factory=dict)
    exact: bool = True
    approximations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refuse(fmt: str, problems: list[str], fix: str) -> None:
    """Raise one CoqatError listing every problem (no truncation), or return if none."""
    if problems:
        raise CoqatError(f"cannot export to {fmt}: {len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}; {fix}")


def default_out_dir(run_dir: str | Path, fmt: str) -> Path:
    return Path(run_dir) / "exports" / fmt


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Write an export into a temporary sibling directory, then move it into place.

    A failure leaves no half-written export. An existing ``out`` is replaced only if it is
    an earlier coqat export (it has ``export.json``) or empty; anything else is refused.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise CoqatError(f"--out {out} is a file; pass a directory")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise CoqatError(f"--out {out} is a non-empty directory that is not a coqat "
                             "export; pass a new or empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise CoqatError(f"cannot write to {out.parent} ({e.strerror}); pass --out DIR "
                         "pointing to a writable place") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(tmp: Path, result: ExportResult) -> None:
    """Record every file's size and SHA-256, plus the result, as ``export.json``."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(tmp))
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    result.files = {k: v["bytes"] for k, v in files.items()}
    doc = {**result.to_dict(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=str) + "\n")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence third-party chatter while it runs: progress bars (tqdm), import-time log
    warnings (torchao's optional CUDA extensions, torch's pytree deprecations) and Python
    warnings. They would break the CLI's contract of one line per error; the state is
    restored on exit."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
