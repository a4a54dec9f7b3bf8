"""coqat: mixed-precision quantization-aware training under a BOPs budget.

The public API (``coqat.api``, re-exported here) does everything the ``coqat`` command
line does::

    import coqat
    rec = coqat.train("lm-tiny", bits="w4a4", steps=100)
    [searched, uniform] = coqat.search("lm-tiny", "w4a4", baselines=["uniform"])
    coqat.export(searched.run_dir, "onnx")

The rooms, bottom to top (docs/DESIGN.md draws them): ``errors``/``util``/``rundir``/
``records`` (files), ``bitconfig``/``targets`` (the per-layer decision), ``config``
(spaces, settings, RunConfig), ``cost`` (MACs, BOPs, budgets), ``quant`` and ``kernels``
(numerics), ``optim`` (CAGE rules, schedules), ``workloads``, ``exporters``, ``training``,
``bitsearch``, ``sweep``, ``reporting``, then ``api`` and ``cli``.

Names are loaded on first use, so ``import coqat.bitconfig`` (or the CLI's ``--help``)
does not import torch models, Optuna and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

from coqat.errors import CoqatError  # noqa: E402  (light: no dependencies)

#: public name -> the module that defines it
_PUBLIC = {
    "BitConfig": "coqat.bitconfig", "LayerBits": "coqat.bitconfig",
    "RunConfig": "coqat.config", "Runtime": "coqat.config", "SearchSettings": "coqat.config",
    "TrainSettings": "coqat.config", "load_space": "coqat.config",
    "RunRecord": "coqat.records", "SearchRecord": "coqat.records",
    "UserModel": "coqat.workloads.user",
    "Sensitivity": "coqat.bitsearch.sensitivity", "sensitivity": "coqat.api",
    **{name: "coqat.api" for name in ("BopsReport", "bops", "quantize_", "train", "resume",
                                       "search", "frontier", "work_on", "export", "deploy",
                                       "report", "plan")},
}

__all__ = ["__version__", "CoqatError", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coqat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
