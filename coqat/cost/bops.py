"""BOPs (bit operations) of a BitConfig: the one cost every part of coqat reads.

BOPs = MACs x w_bits x a_bits per layer (DESIGN.md §4). A layer left at FLOAT_BITS (16)
costs 16 per operand (bf16). The full-precision reference counts every MAC, attention
included, at 32 x 32. Attention matmuls (QK^T, PV) are not quantized by coqat and count
16 x 16 in every config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.cost.macs import (count_macs, find_tie_groups, fvcore_version, tensor_shapes)
from coqat.errors import CoqatError

FP32_BITS = 32
ATTENTION_BITS = FLOAT_BITS


@dataclass(frozen=True)
class LayerCost:
    """Static cost facts of one Linear/Conv2d layer."""

    name: str
    op: str                      # "Linear" | "Conv2d"
    macs: int
    params: int                  # weight + bias numel
    weight_shape: tuple[int, ...]
    reduction_dim: int           # in_features (Linear) / in_channels // groups (Conv2d)


def _name_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class CostModel:
    """MACs per layer counted once on the float model; BOPs of any BitConfig from them."""

    layers: dict[str, LayerCost]
    attention: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    tie_groups: list[tuple[str, ...]] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)
    # ops fvcore has no MAC formula for (add, max_pool2d, softmax...): name -> occurrences
    uncounted: dict[str, int] = field(default_factory=dict)

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: tuple) -> "CostModel":
        """Count MACs with fvcore and detect tie groups, in eval mode without grad.

        Every module's training flag is restored afterwards.
        """
        counted = count_macs(model, example_inputs)
        if not counted.layers:
            raise CoqatError(
                "the model has no nn.Linear or nn.Conv2d layer that ran on the example inputs; "
                "coqat quantizes only those, so build the model from them")
        modules = dict(model.named_modules())
        layers = {}
        for name, macs in counted.layers.items():
            m = modules[name]
            params = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
            if isinstance(m, nn.Linear):
                op, red = "Linear", m.in_features
            else:
                op, red = "Conv2d", m.in_channels // m.groups
            layers[name] = LayerCost(name, op, int(macs), int(params), tuple(m.weight.shape),
                                     int(red))
        ties = [kept for g in find_tie_groups(model, example_inputs)
                if len(kept := tuple(n for n in g if n in layers)) >= 2]
        return cls(layers=layers, attention=dict(counted.attention),
                   excluded=dict(counted.excluded), tie_groups=ties,
                   input_shapes=tensor_shapes(example_inputs),
                   uncounted=dict(counted.uncounted))

    # ----- totals -------------------------------------------------------------------
    @property
    def layer_macs(self) -> int:
        return sum(lc.macs for lc in self.layers.values())

    @property
    def attention_macs(self) -> int:
        return sum(self.attention.values())

    @property
    def total_macs(self) -> int:
        return self.layer_macs + self.attention_macs

    def fp32_bops(self) -> int:
        return self.total_macs * FP32_BITS * FP32_BITS

    def attention_bops(self) -> int:
        return self.attention_macs * ATTENTION_BITS * ATTENTION_BITS

    # ----- BOPs of a configuration ----------------------------------------------------
    def layer_bops(self, name: str, bits: LayerBits) -> int:
        if name not in self.layers:
            raise CoqatError(
                f"layer {name!r} is not a Linear/Conv2d layer of this model; "
                "list the layers with `coqat bops`")
        return self.layers[name].macs * bits.w_bits * bits.a_bits

    def check_names(self, names: Iterable[str], what: str = "bit config") -> None:
        """CoqatError unless ``names`` are exactly this model's layers."""
        given = list(names)
        given_set = set(given)
        missing = [n for n in self.layers if n not in given_set]
        if missing:
            raise CoqatError(
                f"{what} lacks {len(missing)} of the model's {len(self.layers)} layers: "
                f"{_name_list(missing)}; give every Linear/Conv2d layer bits "
                "(w16a16 keeps one in float)")
        extra = [n for n in given if n not in self.layers]
        if extra:
            raise CoqatError(
                f"{what} names {len(extra)} layer(s) the model does not have: "
                f"{_name_list(extra)}; remove them or check the names with `coqat bops`")

    def bops(self, cfg: BitConfig) -> int:
        """Total BOPs of ``cfg``: its layers at their bits plus attention at 16 x 16."""
        self.check_names(cfg.layers)
        total = sum(self.layer_bops(n, cfg.layers[n]) for n in self.layers)
        return total + self.attention_bops()

    def uniform_config(self, bits: LayerBits,
                       pinned: Mapping[str, LayerBits] | None = None) -> BitConfig:
        """Every layer at ``bits`` except the pinned ones; carries this model's tie groups.

        A pin that would give one member of a tie group a different a_bits than the rest is
        refused: the group shares one activation quantizer, so pin all of it or none.
        """
        pinned = dict(pinned or {})
        unknown = [n for n in pinned if n not in self.layers]
        if unknown:
            raise CoqatError(
                f"pinned layer(s) {_name_list(unknown)} are not Linear/Conv2d layers of this "
                "model; check the names with `coqat bops`")
        cfg = BitConfig.uniform(self.layers, bits, pinned, self.tie_groups)
        broken = cfg.violations_of_ties()
        if broken:
            raise CoqatError(
                f"pinned bits break a tie group: {broken[0]}; pin every member of the group "
                "with the same a_bits, or none of them")
        return cfg

    def uniform_bops(self, bits: LayerBits,
                     pinned: Mapping[str, LayerBits] | None = None) -> int:
        return self.bops(self.uniform_config(bits, pinned))

    def expected_bops(self, expected_wa: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Differentiable E[BOPs] = sum_l MACs_l * E[w_bits*a_bits]_l + attention BOPs.

        ``expected_wa[l]`` is the expectation of w_bits*a_bits under the search's
        distribution for layer l (a scalar tensor, or a float for a fixed layer); every layer
        is required. Summed in float64 (totals reach 1e12, beyond float32's exact range) on
        the device of the tensors given.
        """
        self.check_names(expected_wa, what="expected_wa")
        fixed = float(self.attention_bops())
        tensor_total: torch.Tensor | None = None
        for name, lc in self.layers.items():
            v = expected_wa[name]
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(
                        f"expected_wa[{name!r}] must be a scalar, got shape {tuple(v.shape)}")
                term = v.reshape(()).to(torch.float64) * lc.macs
                tensor_total = term if tensor_total is None else tensor_total + term
            else:
                fixed += float(v) * lc.macs
        if tensor_total is None:
            return torch.tensor(fixed, dtype=torch.float64)
        return tensor_total + fixed

    # ----- reporting ----------------------------------------------------------------
    def summary(self, cfg: BitConfig | None = None) -> dict[str, Any]:
        """JSON-able account of how the numbers were made (and the total for ``cfg``)."""
        out: dict[str, Any] = {
            "metric": "BOPs",
            "formula": "MACs*w_bits*a_bits",
            "mac_counter": f"fvcore {fvcore_version()}",
            "float_bits": FLOAT_BITS,
            "fp32_reference_bits": FP32_BITS,
            "attention_bits": ATTENTION_BITS,
            "attention_macs": "full LxS, causal masks not discounted",
            "excluded_ops": dict(self.excluded),
            "uncounted_ops": dict(self.uncounted),
            "input_shapes": [list(s) for s in self.input_shapes],
            "total_macs": self.total_macs,
            "layer_macs": self.layer_macs,
            "attention_macs_total": self.attention_macs,
            "fp32_bops": self.fp32_bops(),
        }
        if cfg is not None:
            out["total_bops"] = self.bops(cfg)
        return out

    def rows(self, cfg: BitConfig | None = None) -> list[dict[str, Any]]:
        """Per-layer table rows in model order; attention pseudo-layers follow their owner's
        layers with op "attention", no params and 16/16 bits."""
        total_macs = self.total_macs
        total_bops = self.bops(cfg) if cfg is not None else 0
        names = list(self.layers)
        # insert each pseudo-layer after the last layer inside its owner module
        placed: dict[int, list[str]] = {}
        for pseudo in self.attention:
            owner = pseudo.rpartition(".")[0]
            prefix = owner + "." if owner else ""
            inside = [i for i, n in enumerate(names) if n.startswith(prefix)]
            placed.setdefault(inside[-1] if inside else len(names) - 1, []).append(pseudo)
        ordered: list[str] = []
        for i, n in enumerate(names):
            ordered.append(n)
            ordered.extend(placed.get(i, []))

        rows = []
        for name in ordered:
            if name in self.layers:
                lc = self.layers[name]
                row: dict[str, Any] = {"name": name, "op": lc.op, "params": lc.params,
                                       "macs": lc.macs}
                bits = cfg.layers[name] if cfg is not None else None
            else:
                row = {"name": name, "op": "attention", "params": 0,
                       "macs": self.attention[name]}
                bits = LayerBits(ATTENTION_BITS, ATTENTION_BITS)
            row["macs_share"] = row["macs"] / total_macs if total_macs else 0.0
            if cfg is not None:
                bops = row["macs"] * bits.w_bits * bits.a_bits
                row.update({"w_bits": bits.w_bits, "a_bits": bits.a_bits, "bops": bops,
                            "bops_share": bops / total_bops if total_bops else 0.0})
            rows.append(row)
        return rows
