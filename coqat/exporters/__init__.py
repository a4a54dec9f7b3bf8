"""Export adapters from a BitConfig (+ trained weights) to deployment formats.

    export_run(run_dir, "onnx" | "compressed-tensors" | "torchao" | "json", out=None,
               approx=False) -> ExportResult
    deploy(run_dir, "packed" | "onnx", ...) -> DeployReport    (coqat.exporters.deploy)
    get_target(name).violations(bitconfig, ops)                 (legal bits and ties)

Every adapter checks the target's legal set and lists all violations; none coerces
silently. Where a format cannot hold coqat's exact numerics the export is refused unless
``approx=True``, and then every approximation is listed in the result and in the export's
``export.json``. Adapters are imported lazily: this package stays cheap to import for the
search, which only needs ``targets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coqat.errors import CoqatError
from coqat.targets import TARGETS, Target, get_target

FORMATS = ("onnx", "compressed-tensors", "torchao", "json")

__all__ = ["TARGETS", "Target", "get_target", "FORMATS", "export_run"]


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None,
               approx: bool = False) -> Any:
    """Export a finished run directory to ``fmt``; returns an ``ExportResult``.

    ``out`` defaults to ``<run_dir>/exports/<fmt>``. ``approx`` allows documented
    approximations (compressed-tensors, torchao) instead of refusing.
    """
    if fmt not in FORMATS:
        raise CoqatError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    from coqat.exporters.loading import load_run

    loaded = load_run(run_dir)
    if fmt == "onnx":
        from coqat.exporters.onnx_export import export_onnx

        if approx:
            raise CoqatError("--approx does not apply to onnx: the ONNX export is always exact")
        return export_onnx(loaded, out)
    if fmt == "compressed-tensors":
        from coqat.exporters.compressed import export_compressed_tensors

        return export_compressed_tensors(loaded, out, approx=approx)
    if fmt == "torchao":
        from coqat.exporters.torchao_export import export_torchao

        return export_torchao(loaded, out, approx=approx)
    from coqat.exporters.jsonfmt import export_json

    if approx:
        raise CoqatError("--approx does not apply to json: the canonical config is exact")
    return export_json(loaded, out)
