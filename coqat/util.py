"""Small helpers shared across packages: atomic file writes, hashing, environment info."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from coqat.errors import CoqatError


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory, then rename.

    Readers never see a half-written file; a crash leaves the old file (or none).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise CoqatError(
            f"cannot write to {p.parent} ({e.strerror}); choose a writable directory") from None
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (or keep the
        # mode of the file it replaces), so reports stay readable by others.
        if p.exists():
            os.chmod(tmp, p.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Parse the JSON file ``path``; any way it can be unreadable (missing, a directory, not
    UTF-8, not JSON, nested absurdly deep, an OS error) is a one-line CoqatError that names
    ``what`` the file is and ``fix``."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CoqatError(f"{p} is missing ({what}); {fix}") from None
    except IsADirectoryError:
        raise CoqatError(f"{p} is a directory, not {what}; {fix}") from None
    except UnicodeDecodeError:
        raise CoqatError(f"{p} is not UTF-8 text, so not {what}; {fix}") from None
    except json.JSONDecodeError as e:
        raise CoqatError(f"{p} is not valid JSON ({e}), so not {what}; {fix}") from None
    except RecursionError:
        raise CoqatError(f"{p} is nested too deeply to be {what}; {fix}") from None
    except OSError as e:
        raise CoqatError(f"cannot read {p} ({e.strerror}); {fix}") from None


def jsonl_appender(path: str | os.PathLike) -> Callable[[dict[str, Any]], None]:
    """A function that appends one JSON object per line to ``path`` (parent created now)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def append(rec: dict[str, Any]) -> None:
        with open(p, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")

    return append


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing) while inside.

    Yields True when the lock is held. With ``blocking=False`` it yields False at once if
    another process holds it. The lock goes with the process: a killed holder frees it.
    Without ``fcntl`` (not POSIX) it yields True and locks nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    p = Path(lock_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def environment_info() -> dict[str, Any]:
    """Versions that a result depends on; written into every run directory."""
    import numpy
    import torch

    import coqat

    info: dict[str, Any] = {
        "coqat": coqat.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        pass
    return info
