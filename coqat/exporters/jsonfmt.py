"""``--format json``: coqat's canonical artifact, validated, plus a plain per-layer table.

Files: ``bitconfig.json`` (the run's, schema ``coqat.bitconfig/v1``, validated on load),
``qparams.safetensors`` (the run's; recomputed from the weights for runs that predate it),
``layers.tsv`` (one row per layer: FQN, op, bits, quantizer, Hadamard block, params, MACs,
BOPs; tab-separated, for spreadsheets and scripts) and ``export.json``.

HAWQ-style ``bit_config`` dicts are not written: HAWQ keys its own wrapper modules
(``quant_convbn1``, ``quant_act``), which have no mapping from plain PyTorch FQNs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from coqat.exporters.common import ExportResult, staged_dir, write_manifest
from coqat.exporters.qparams import QPARAMS, write_qparams
from coqat.exporters.source import ExportSource

__all__ = ["export_json", "layer_rows"]

COLUMNS = ("layer", "op", "w_bits", "a_bits", "quantizer", "hadamard_block", "params", "macs",
           "bops")


def layer_rows(doc: dict) -> list[dict]:
    """One row per layer of a bitconfig document, in model order."""
    rows = []
    for name, e in doc["layers"].items():
        w, a = e.get("weight"), e.get("input_act")
        rows.append({"layer": name, "op": e.get("op", ""),
                     "w_bits": 16 if w is None else w["bits"],
                     "a_bits": 16 if a is None else a["bits"],
                     "quantizer": e.get("quantizer", ""),
                     "hadamard_block": e.get("hadamard_block", ""),
                     "params": e.get("params", ""), "macs": e.get("macs", ""),
                     "bops": e.get("bops", "")})
    return rows


def export_json(source: ExportSource, out: str | Path | None = None) -> ExportResult:
    """Copy the canonical artifact (validated) and write the per-layer table."""
    doc = source.bitconfig_doc  # a run's is validated by load_run
    out = source.out_dir(out, "json")
    notes = list(source.notes) + ["bitconfig.json validated against coqat.bitconfig/v1"]
    result = ExportResult("json", str(out), source.label, exact=True, notes=notes,
                          details={"layers": len(doc["layers"]),
                                   "quantized": len(source.bitconfig.quantized())})
    with staged_dir(out) as tmp:
        (tmp / "bitconfig.json").write_text(source.bitconfig_json())
        run_qparams = source.path / QPARAMS if source.path is not None else None
        if run_qparams is not None and run_qparams.is_file():
            # the run's own (load_run checked it against the weights; it names their hash)
            shutil.copyfile(run_qparams, tmp / QPARAMS)
        else:
            write_qparams(tmp, source.model, source.bitconfig)
        lines = ["\t".join(COLUMNS)]
        lines += ["\t".join(str(r[c]) for c in COLUMNS) for r in layer_rows(doc)]
        (tmp / "layers.tsv").write_text("\n".join(lines) + "\n")
        write_manifest(tmp, result)
    return result
