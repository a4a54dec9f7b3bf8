"""Export adapters from a BitConfig (+ trained weights) to deployment formats.

    export_run(run_dir, "onnx" | "compressed-tensors" | "torchao" | "json", out=None,
               approx=False, check_batches=2) -> ExportResult
    export_model(model, bitconfig, fmt, out, ...) -> ExportResult   (a model in memory,
               e.g. a Hugging Face causal LM; see coqat.exporters.source.from_model)
    explain_export(run_dir, fmt, approx=False) -> list[str]          (every problem)
    deploy(run_dir, "packed" | "onnx", ...) -> DeployReport          (coqat.exporters.deploy)
    get_target(name).violations(bitconfig, ops)                      (legal bits and ties)

Every adapter checks what its format can hold and refuses, in one short line, with the
decisive problem, a count of the rest and the fix (``ExportRefused.problems`` and
``explain_export`` list them all); none coerces silently. Where a format cannot hold
coqat's exact numerics the export is refused unless ``approx=True``, and then every
approximation is listed in the result and in the export's ``export.json``. Every written
export is evaluated in its real consumer (onnxruntime, transformers, torchao) next to
coqat's QAT model on ``check_batches`` batches: ``result.details['check']``. Adapters are
imported lazily: this package stays cheap to import for the search, which only needs
``targets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coqat.errors import CoqatError
from coqat.exporters.common import ExportRefused, ExportResult
from coqat.targets import TARGETS, Target, get_target

FORMATS = ("onnx", "compressed-tensors", "torchao", "json")

__all__ = ["TARGETS", "Target", "get_target", "FORMATS", "ExportRefused", "ExportResult",
           "export_run", "export_model", "explain_export"]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CoqatError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")


def _export(source: Any, fmt: str, out: str | Path | None, approx: bool,
            check_batches: int) -> ExportResult:
    if check_batches < 0:
        raise CoqatError(f"check_batches {check_batches} must be >= 0 (0: no check)")
    if fmt == "onnx":
        from coqat.exporters.onnx_export import export_onnx

        if approx:
            raise CoqatError("--approx does not apply to onnx: the ONNX export is always exact")
        return export_onnx(source, out, check_batches)
    if fmt == "compressed-tensors":
        from coqat.exporters.compressed import export_compressed_tensors

        return export_compressed_tensors(source, out, approx, check_batches)
    if fmt == "torchao":
        from coqat.exporters.torchao_export import export_torchao

        return export_torchao(source, out, approx, check_batches)
    from coqat.exporters.jsonfmt import export_json

    if approx:
        raise CoqatError("--approx does not apply to json: the canonical config is exact")
    return export_json(source, out)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None,
               approx: bool = False, check_batches: int = 2) -> ExportResult:
    """Export a finished run directory to ``fmt``; returns an ``ExportResult``.

    ``out`` defaults to ``<run_dir>/exports/<fmt>``. ``approx`` allows documented
    approximations (compressed-tensors, torchao) instead of refusing. ``check_batches``:
    evaluation batches for the check in the consumer (0: none).
    """
    _check_format(fmt)
    from coqat.exporters.loading import load_run
    from coqat.exporters.source import from_run

    return _export(from_run(load_run(run_dir)), fmt, out, approx, check_batches)


def export_model(model: Any, bitconfig: Any, fmt: str, out: str | Path, approx: bool = False,
                 check_batches: int = 2, **source: Any) -> ExportResult:
    """Export a QAT model in memory (``source``: keyword arguments of
    ``coqat.exporters.source.from_model``: name, example_inputs, evaluate, metric,
    higher_is_better, hf_dir). Quantized layers must be nn.Linear / nn.Conv2d named as in
    ``bitconfig``; for compressed-tensors the model must be a Hugging Face causal LM."""
    _check_format(fmt)
    from coqat.exporters.source import from_model

    return _export(from_model(model, bitconfig, **source), fmt, out, approx, check_batches)


def explain_export(run_dir: str | Path, fmt: str, approx: bool = False) -> list[str]:
    """Every reason ``export_run(run_dir, fmt, approx=approx)`` would refuse (empty: it
    would write), decisive first; nothing is written. For ``--explain`` on the CLI."""
    _check_format(fmt)
    from coqat.exporters.loading import load_run
    from coqat.exporters.source import from_run

    source = from_run(load_run(run_dir))
    if fmt == "onnx":
        from coqat.exporters.onnx_export import onnx_problems

        return onnx_problems(source)
    if fmt == "compressed-tensors":
        from coqat.exporters.compressed import compressed_problems

        return compressed_problems(source, approx)
    if fmt == "torchao":
        from coqat.exporters.torchao_export import torchao_problems

        return torchao_problems(source, approx)
    return []
