"""Run directories: the one on-disk layout every command writes and every report reads.

::

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.json          resolved configuration (space as parsed, options, schedule)
      bitconfig.json       the per-layer bits (schema coqat.bitconfig/v1) with MACs/BOPs
      metrics.jsonl        one JSON object per logged train step / evaluation / search step
      final.json           final metrics; present only when the run finished
      env.json             versions of coqat, torch, python, device
      model.safetensors    final weights (state_dict of the float/quantized model: same keys)
      qparams.safetensors  derived quantizer state for deployers (weight steps, blocks)
      checkpoints/last.pt  resumable state, loadable with torch.load(weights_only=True)

Every JSON file is written atomically (temp file + rename), so a reader never sees half a
file. ``metrics.jsonl`` is append-only; a torn last line (a kill mid-write) is skipped when
read.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from coqat.errors import CoqatError
from coqat.util import atomic_write_bytes, atomic_write_json, exclusive_lock, read_json

CONFIG = "config.json"
BITCONFIG = "bitconfig.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
ENV = "env.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoints/last.pt"
#: the manifest of a frontier sweep directory (``coqat.sweep.frontier``)
FRONTIER_MANIFEST = "frontier.json"
LOCK = ".lock"


class RunDir:
    """A run directory on disk (existing or new)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ----- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, name: str) -> "RunDir":
        root = Path(root)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            root.mkdir(parents=True, exist_ok=True)
            for i in range(1000):
                path = root / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - a thousand runs in one second
                raise CoqatError(f"cannot find a free run name under {root}")
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except PermissionError:
            raise CoqatError(f"output directory {root} is not writable; pass --out DIR"
                             " pointing to a writable place") from None
        except OSError as e:
            raise CoqatError(f"cannot create a run under {root} ({e.strerror}); pass --out DIR"
                             " pointing to a writable place") from None
        return cls(path)

    @classmethod
    def create_at(cls, path: str | os.PathLike) -> "RunDir":
        """A new run directory exactly at ``path`` (which must not exist yet)."""
        p = Path(path)
        if p.exists():
            raise CoqatError(f"{p} already exists; a new run needs a new directory")
        p.parent.mkdir(parents=True, exist_ok=True)  # OS errors: the CLI's one-line message
        p.mkdir()
        return cls(p)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        p = Path(path)
        if not p.is_dir():
            raise CoqatError(f"run directory {p} does not exist")
        if not (p / CONFIG).is_file():
            raise CoqatError(f"{p} is not a coqat run directory (no {CONFIG}); pass a directory"
                             " made by coqat train / search")
        return cls(p)

    # ----- files ------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.path / name, f"the run's {name}",
                         "the run directory is incomplete or damaged: rerun it")

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    @property
    def finished(self) -> bool:
        return self.has(FINAL)

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (one JSON line)."""
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.path / METRICS, "a") as f:
            f.write(line)

    def metrics(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        p = self.path / METRICS
        if not p.is_file():
            return iter(())
        return _read_jsonl(p, kind)

    def series(self, kind: str | None, key: str,
               file: str = METRICS) -> tuple[list[int], list[float]]:
        """(steps, values) of the numeric ``key`` in the records of ``kind`` of one of the
        run's JSONL files (``metrics.jsonl``, ``search/trace.jsonl``); empty lists where the
        file is missing."""
        xs: list[int] = []
        ys: list[float] = []
        f = self.path / file
        if not f.is_file():
            return xs, ys
        for r in _read_jsonl(f, kind):
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
                xs.append(int(r.get("step", len(xs))))
                ys.append(float(r[key]))
        return xs, ys

    def truncate_metrics_after(self, step: int) -> None:
        """On resume from the checkpoint of ``step``: drop what the resumed run logs again,
        i.e. records of later steps and the end-of-run evaluation (a run killed between its
        final evaluation and final.json evaluates again)."""
        p = self.path / METRICS
        if not p.is_file():
            return
        keep = [r for r in _read_jsonl(p, None)
                if r.get("step", -1) <= step and not r.get("final")]
        atomic_write_bytes(p, "".join(json.dumps(r) + "\n" for r in keep).encode())

    # ----- hygiene ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the run directory while a process writes it; a second writer
        (two --resume of one run, say) is refused at once. The lock dies with its process."""
        with exclusive_lock(self.path / LOCK, blocking=False) as held:
            if not held:
                raise CoqatError(f"run {self.path} is being written by another coqat process;"
                                 " wait for it to finish (or stop it) before resuming")
            yield

    def remove_stale_temp_files(self) -> list[Path]:
        """Temp files of atomic writes interrupted by a kill (``.NAME.XXXX.tmp``); call it
        while holding :meth:`lock`, so no live writer owns them."""
        stale = [p for d in (self.path, self.path / "checkpoints") if d.is_dir()
                 for p in d.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # ----- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        return atomic_write_bytes(self.path / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when the run has none yet. Loads without executing
        code (``weights_only=True``); a damaged file is a one-line error."""
        p = self.path / CHECKPOINT
        if p.exists() and not p.is_file():
            raise CoqatError(f"{p} is not a file; delete it to restart the run from scratch")
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise CoqatError(
                f"checkpoint {p} is corrupt or unreadable ({type(e).__name__}); delete it to"
                " restart the run from scratch") from None

    def save_weights(self, state_dict: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        return atomic_write_bytes(self.path / WEIGHTS, save(tensors, metadata=metadata))

    def load_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path / WEIGHTS
        if not p.is_file():
            raise CoqatError(f"{p} is missing; the run has not finished (resume it with"
                             f" coqat train --resume {self.path})")
        try:
            return load_file(str(p))
        except Exception as e:
            raise CoqatError(f"weights file {p} is unreadable ({type(e).__name__});"
                             " the run directory is damaged") from None


def read_jsonl(p: Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (of one ``kind``); a line a kill tore or damaged
    bytes broke is skipped, not an error."""
    return _read_jsonl(p, kind)


def _read_jsonl(p: Path, kind: str | None) -> Iterator[dict[str, Any]]:
    with open(p, encoding="utf-8", errors="replace") as f:   # damaged bytes: skipped lines
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # torn last line after a kill
            if isinstance(rec, dict) and (kind is None or rec.get("kind") == kind):
                yield rec


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
