"""What every export adapter shares: the result record, the refusal, the optional-dependency
check, the all-or-nothing output directory and the check against the real consumer.

An adapter never coerces: it collects *every* reason a configuration cannot be written
exactly in its format, decisive one first. The refusal (``ExportRefused``, a CoqatError)
names that one, counts the rest and gives the fix, in one short line; the full list is on
the exception (``.problems``) and from ``coqat.exporters.explain_export``. When the caller
allows approximations (``approx=True``), the same reasons become ``approximations`` in the
result and in the export's ``export.json`` manifest, so the tool always says what it did.
"""

from __future__ import annotations

import contextlib
import importlib
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
from coqat.util import _umask, sha256_file

MANIFEST = "export.json"

__all__ = ["ExportResult", "ExportRefused", "MANIFEST", "refuse", "staged_dir", "quiet_stderr",
           "default_out_dir", "require", "write_manifest"]

# The longest first problem quoted in a refusal; the whole line stays under ~300 characters.
_FIRST_PROBLEM_CHARS = 120


@dataclass
class ExportResult:
    """What an export wrote and how faithful it is.

    ``exact``: the files, run by the consumer the export was checked with, reproduce coqat's
    numerics (up to float summation order); ``approximations``: each place where coqat
    changed the model to fit the format (empty unless ``approx=True``); ``notes``: how
    coqat's quantizers were represented, and where a runtime's own rules differ;
    ``details['check']``: the metric of the written files in the consumer next to coqat's.
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


class ExportRefused(CoqatError):
    """A configuration the format cannot hold; ``problems`` lists every reason."""

    def __init__(self, message: str, fmt: str, problems: list[str]):
        super().__init__(message)
        self.format = fmt
        self.problems = list(problems)


def refuse(fmt: str, problems: list[str], fix: str, explain: str | None = None) -> None:
    """Raise ``ExportRefused`` unless ``problems`` is empty.

    The message: the first (decisive) problem, how many more, the fix and, when there are
    more, what lists them all (``explain``: the CLI's ``--explain`` flag, or for the Python
    API ``ExportRefused.problems``).
    """
    if not problems:
        return
    first = problems[0]
    if len(first) > _FIRST_PROBLEM_CHARS:
        first = first[:_FIRST_PROBLEM_CHARS - 3] + "..."
    rest = len(problems) - 1
    more = f" and {rest} more problem{'s' if rest > 1 else ''}" if rest else ""
    tail = f"; {explain} lists them all" if rest and explain else ""
    raise ExportRefused(f"cannot export to {fmt}: {first}{more}; fix: {fix}{tail}", fmt,
                        problems)


def require(fmt: str, *modules: str) -> None:
    """Import ``modules`` or raise a one-line CoqatError naming the extra to install.

    Every export format's third-party packages come with the ``export`` extra; without this
    a missing one surfaced as a ModuleNotFoundError traceback deep inside an adapter.
    """
    for name in modules:
        package = name.split(".")[0].replace("_", "-")
        try:
            with quiet_stderr():  # torchao / transformers log on import
                importlib.import_module(name)
        except ImportError as e:
            if e.name != name:
                # installed, but something it imports is broken or shadowed: say which
                raise CoqatError(f"{fmt} needs {package}, which is installed but fails to "
                                 f"import ({type(e).__name__}: {e}); reinstall coqat[export] "
                                 "or remove what shadows it") from None
            raise CoqatError(f"{fmt} needs the Python package {package}, which is not "
                             "installed; install coqat[export] (pip install 'coqat[export]')") \
                from None


def default_out_dir(run_dir: str | Path, fmt: str) -> Path:
    return Path(run_dir) / "exports" / fmt


def _give_umask_modes(root: Path) -> None:
    """mkdtemp makes the directory 0700 and some writers (safetensors) make files 0600;
    an export is meant to be shared, so give it the modes a plain mkdir / open would."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Write an export into a temporary sibling directory, then move it into place.

    A failure leaves no half-written export. An existing ``out`` is replaced only if it is
    an earlier coqat export (it has ``export.json``) or empty; anything else is refused.
    Files and directories get the umask's modes.
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
        _give_umask_modes(tmp)
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


def layer_problems(hard: list[str], reasons: dict[str, list[str]], approx: bool) -> list[str]:
    """What refuses an export, decisive first: ``hard`` problems (no approximation fixes
    them), then, unless ``approx``, one line per layer and reason."""
    if hard or approx:
        return list(hard)
    return [f"layer {fqn}: {reason}" for fqn, why in reasons.items() for reason in why]


def layer_approximations(reasons: dict[str, list[str]], errors: dict[str, float]
                         ) -> list[str]:
    """One line per approximated layer; ``errors`` adds the relative weight error of the
    layers whose weights were re-rounded."""
    out = []
    for fqn, why in reasons.items():
        if why:
            err = f" (weight error {errors[fqn]:.3f})" if fqn in errors else ""
            out.append(f"{fqn}: {'; '.join(why)}{err}")
    return out
