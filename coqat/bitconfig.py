"""BitConfig: the per-layer bit decision that flows from search to QAT, report and export.

A BitConfig maps fully qualified module names (FQNs, in model order) to a ``LayerBits``
(weight bits, input-activation bits, quantizer). Bits come from ``QUANT_BITS``; the value
``FLOAT_BITS`` (16) means "left in floating point" (bf16 on GPU, fp32 on CPU).

On disk a BitConfig is ``bitconfig.json`` in schema ``coqat.bitconfig/v1`` (the JSON Schema
ships as ``coqat/schema/bitconfig.v1.json`` and is checked on every load). The document
also carries the cost of every layer (MACs, BOPs), written from the one CostModel, so the
numbers a deployer reads are the numbers the budget used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from coqat.errors import CoqatError
from coqat.util import atomic_write_text, read_json

SCHEMA_ID = "coqat.bitconfig/v1"
QUANT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = 16
VALID_BITS: tuple[int, ...] = QUANT_BITS + (FLOAT_BITS,)
QUANTIZERS: tuple[str, ...] = ("quest", "rtn")

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is a width coqat supports, else raise a one-line CoqatError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        allowed = ", ".join(str(b) for b in VALID_BITS)
        raise CoqatError(
            f"{what} = {bits!r} is not supported; use one of {allowed} (16 = not quantized)"
        )
    return bits


def hadamard_block_for(dim: int, max_block: int = 128) -> int:
    """The Hadamard block used for a reduction dim of size ``dim``.

    The largest power of two that is <= ``max_block`` and divides ``dim``: 128 for
    ``dim = 384``, 32 for ``dim = 96``, 1 (no rotation) for odd ``dim``. ``max_block`` 0
    or 1 means "no rotation" and gives 1.
    """
    dim, max_block = int(dim), int(max_block)
    if dim < 1:
        raise CoqatError(f"hadamard_block_for: dim = {dim} must be >= 1")
    if max_block < 0:
        raise CoqatError(f"hadamard_block_for: max_block = {max_block} must be >= 0 (0 = no rotation)")
    block = 1
    while block * 2 <= max_block and dim % (block * 2) == 0:
        block *= 2
    return block


@dataclass(frozen=True)
class LayerCostRow:
    """What ``bitconfig.json`` records about one layer's cost (written from the CostModel)."""

    op: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    bops: int
    hadamard_block: int


@dataclass(frozen=True)
class LayerBits:
    """Bits for one layer: weights, the layer's input activation, and the quantizer."""

    w_bits: int
    a_bits: int
    quantizer: str = "quest"

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "weight bits")
        check_bits(self.a_bits, "activation bits")
        if self.quantizer not in QUANTIZERS:
            raise CoqatError(
                f"quantizer {self.quantizer!r} is unknown; use one of {', '.join(QUANTIZERS)}"
            )

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS

    @property
    def label(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


def parse_bits(text: str, quantizer: str = "quest") -> LayerBits:
    """Parse ``w4a4`` (weights 4, activations 4), ``w4a16``, ``fp``/``float`` (= w16a16)."""
    t = str(text).strip().lower()
    if t in ("fp", "float", "fp32", "bf16", "w16a16"):
        return LayerBits(FLOAT_BITS, FLOAT_BITS, quantizer)
    m = _BITS_RE.match(t)
    if not m:
        raise CoqatError(
            f"bits {text!r} is not of the form wNaM (e.g. w4a4, w8a8, w4a16) or 'fp'"
        )
    return LayerBits(int(m.group(1)), int(m.group(2)), quantizer)


@dataclass
class BitConfig:
    """Per-layer bits keyed by module FQN, plus tie groups and free-form run metadata.

    ``tie_groups`` lists layers that read the same input tensor and therefore share one
    activation quantizer (and one a_bits). ``meta`` carries things like the budget; it is
    written into the JSON document's ``model`` / ``cost`` sections by ``to_dict``.
    """

    layers: dict[str, LayerBits]
    tie_groups: list[tuple[str, ...]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: read from a document (None for a config built in memory): the per-layer cost rows,
    #: the cost summary, the model section and the qparams file it points to
    costs: dict[str, LayerCostRow] | None = None
    cost_summary: dict[str, Any] | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    qparams: str | None = None

    # ----- construction -------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        names: Iterable[str],
        bits: LayerBits,
        pinned: Mapping[str, LayerBits] | None = None,
        tie_groups: Iterable[Iterable[str]] = (),
    ) -> "BitConfig":
        """Every layer at ``bits`` except pinned ones, which keep their pinned bits (their
        names go into ``meta['pinned']``, so ``summary()`` still says e.g. 'w4a4')."""
        pinned = dict(pinned or {})
        layers = {n: pinned.get(n, bits) for n in names}
        kept = [n for n in layers if n in pinned]
        return cls(layers, [tuple(g) for g in tie_groups], {"pinned": kept} if kept else {})

    # ----- queries ------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerBits:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def quantized(self) -> dict[str, LayerBits]:
        return {n: b for n, b in self.layers.items() if not b.is_float}

    def violations_of_ties(self) -> list[str]:
        """Tie groups whose members disagree on a_bits (empty list: all ties hold)."""
        bad = []
        for group in self.tie_groups:
            present = [n for n in group if n in self.layers]
            if len({self.layers[n].a_bits for n in present}) > 1:
                desc = ", ".join(f"{n}=a{self.layers[n].a_bits}" for n in present)
                bad.append(f"tie group ({desc}) must share one a_bits")
        return bad

    def summary(self) -> str:
        """Short human label: 'w4a4' when uniform over the quantized layers (apart from the
        pinned layers that ``BitConfig.uniform`` records in ``meta``), else 'mixed'."""
        pinned = set(self.meta.get("pinned") or ())
        labels = {b.label for n, b in self.quantized().items() if n not in pinned}
        if not labels:
            return "fp" if not self.quantized() else "mixed"
        return labels.pop() if len(labels) == 1 else "mixed"

    def mean_weight_bits(self, params: Mapping[str, int]) -> float:
        """Parameter-weighted mean weight bit width over the layers in ``params``."""
        tot = sum(params[n] for n in self.layers if n in params)
        if tot == 0:
            return float(FLOAT_BITS)
        return sum(params[n] * self.layers[n].w_bits for n in self.layers if n in params) / tot

    # ----- (de)serialisation ---------------------------------------------------------
    def to_dict(self, cost: Any = None, model_info: Mapping[str, Any] | None = None) -> dict:
        """The ``coqat.bitconfig/v1`` document.

        ``cost`` is a ``coqat.cost.CostModel``; with it every layer gets op, shape, params,
        MACs, BOPs and the Hadamard block used, and the document gets totals.
        """
        default_q = _most_common([b.quantizer for b in self.layers.values()]) or "quest"
        layers: dict[str, Any] = {}
        for name, b in self.layers.items():
            entry: dict[str, Any] = {
                "weight": None if b.w_bits == FLOAT_BITS else {
                    "bits": b.w_bits, "granularity": "channel", "axis": 0, "symmetric": True},
                "input_act": None if b.a_bits == FLOAT_BITS else {
                    "bits": b.a_bits, "granularity": "token", "dynamic": True, "symmetric": True},
                "quantizer": b.quantizer,
                "status": "float" if b.is_float else "quantized",
            }
            if cost is not None and name in cost.layers:
                lc = cost.layers[name]
                block = hadamard_block_for(lc.reduction_dim) if b.quantizer == "quest" else 0
                entry.update({
                    "op": lc.op,
                    "weight_shape": list(lc.weight_shape),
                    "params": int(lc.params),
                    "macs": int(lc.macs),
                    "bops": int(cost.layer_bops(name, b)),
                    "hadamard_block": 0 if b.is_float else int(block),
                })
            layers[name] = entry
        doc: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "model": dict(model_info or self.model_info),
            "defaults": {"quantizer": default_q,
                         "weight": {"granularity": "channel", "axis": 0, "symmetric": True},
                         "input_act": {"granularity": "token", "dynamic": True}},
            "tie_groups": [list(g) for g in self.tie_groups],
            "layers": layers,
            "qparams": self.qparams,
            "meta": _jsonable(self.meta),
        }
        if cost is not None:
            doc["cost"] = cost.summary(self)
            if "budget_bops" in self.meta:
                doc["cost"]["budget_bops"] = int(self.meta["budget_bops"])
                doc["cost"]["achieved_over_budget"] = (
                    doc["cost"]["total_bops"] / max(1, int(self.meta["budget_bops"])))
        return doc

    def save(self, path: str | os.PathLike, cost: Any = None,
             model_info: Mapping[str, Any] | None = None) -> Path:
        """Write the v1 document atomically (temp file, then rename)."""
        doc = self.to_dict(cost, model_info)
        validate_document(doc, source=str(path))
        return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "<dict>") -> "BitConfig":
        validate_document(doc, source=source)
        layers = {}
        for name, e in doc["layers"].items():
            w = e.get("weight")
            a = e.get("input_act")
            layers[name] = LayerBits(
                FLOAT_BITS if w is None else int(w["bits"]),
                FLOAT_BITS if a is None else int(a["bits"]),
                e.get("quantizer") or doc.get("defaults", {}).get("quantizer", "quest"),
            )
        ties = [tuple(g) for g in doc.get("tie_groups", [])]
        costs = {name: LayerCostRow(e["op"], tuple(e.get("weight_shape") or ()),
                                    int(e.get("params", 0)), int(e["macs"]), int(e["bops"]),
                                    int(e.get("hadamard_block", 0)))
                 for name, e in doc["layers"].items() if "macs" in e and "bops" in e}
        return cls(layers, ties, dict(doc.get("meta") or {}),
                   costs=costs if len(costs) == len(layers) else None,
                   cost_summary=dict(doc["cost"]) if isinstance(doc.get("cost"), Mapping)
                   else None,
                   model_info=dict(doc.get("model") or {}), qparams=doc.get("qparams"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitConfig":
        p = Path(path)
        doc = read_json(p, "a bitconfig", "pass the bitconfig.json of a run (or regenerate it"
                        " with coqat)")
        return cls.from_dict(doc, source=str(p))


def schema() -> dict:
    """The JSON Schema of ``coqat.bitconfig/v1`` shipped with the package."""
    text = resources.files("coqat.schema").joinpath("bitconfig.v1.json").read_text()
    return json.loads(text)


def validate_document(doc: Any, source: str = "bitconfig") -> None:
    """Check a document against the shipped schema; one-line CoqatError on any problem."""
    if not isinstance(doc, Mapping):
        raise CoqatError(f"{source}: a bitconfig must be a JSON object")
    version = doc.get("schema")
    if version != SCHEMA_ID:
        raise CoqatError(
            f"{source}: schema {version!r} is not one this coqat reads (it reads {SCHEMA_ID!r});"
            " re-export the config with a matching coqat version")
    import jsonschema

    try:
        jsonschema.validate(doc, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise CoqatError(f"{source}: invalid bitconfig at {where}: {e.message}") from None


def _most_common(items: list[str]) -> str | None:
    if not items:
        return None
    return max(set(items), key=items.count)


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of metadata to JSON types (numbers, strings, lists, dicts)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
