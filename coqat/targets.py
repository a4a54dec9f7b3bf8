"""Deployment targets: which bit widths each can run and which layers it forces to agree.

The search uses these to restrict its candidates (``coqat search --target vllm``), so that
every point on a frontier is deployable; export adapters check a BitConfig against them and
report every violation (the refusal names the first and counts the rest) rather than
coercing anything. ``Target.quantizers`` names the quantizers whose numerics the target's
runtimes reproduce (vllm, torchao: RTN; their loaders apply no Hadamard rotation), so a
search for a target should train with one of them. Facts from reference/export_formats.md:

- ``onnx``: standard QuantizeLinear/DequantizeLinear types are int8/uint8 and int4/uint4
  (opset 21) and int2/uint2 (opset 25); 3-, 5- and 6-bit have no standard ONNX type.
- ``vllm`` (compressed-tensors): weight kernels exist for 4 and 8 bits only (2-bit layers
  cannot be served); activations are either left in 16 bit (weight-only) or int8; the fused
  shards q/k/v and gate/up must share one scheme (weights and activations).
- ``torchao``: Int8DynamicActivationIntxWeightConfig / IntxWeightOnlyConfig take int1..int8
  weights with int8 dynamic or floating-point activations, on Linear layers.
- ``json``: coqat's own schema; anything coqat can train.
"""

from __future__ import annotations

from dataclasses import dataclass

from coqat.bitconfig import FLOAT_BITS, QUANT_BITS, BitConfig
from coqat.errors import CoqatError


@dataclass(frozen=True)
class Target:
    name: str
    weight_bits: frozenset[int]           # legal weight bits (FLOAT_BITS = left in float)
    act_bits: frozenset[int]              # legal input-activation bits
    tie_weights: bool                     # tie groups must also share w_bits (fused shards)
    ops: frozenset[str]                   # layer types it can quantize ("Linear", "Conv2d")
    description: str
    # quantizers whose numerics the format's runtimes reproduce exactly; a search for this
    # target should train with one of them (others export only with --approx)
    quantizers: frozenset[str] = frozenset({"quest", "rtn"})

    def allows(self, w_bits: int, a_bits: int) -> bool:
        return w_bits in self.weight_bits and a_bits in self.act_bits

    def violations(self, cfg: BitConfig, ops: dict[str, str] | None = None) -> list[str]:
        """Every reason ``cfg`` cannot be served by this target (empty: deployable), one
        short line each, in model order."""
        bad: list[str] = []
        for name, b in cfg.layers.items():
            if b.is_float:
                continue
            if ops and ops.get(name) and ops[name] not in self.ops:
                bad.append(f"layer {name} is a {ops[name]} ({self.name} quantizes "
                           f"{', '.join(sorted(self.ops))} layers)")
            if b.w_bits not in self.weight_bits:
                bad.append(f"layer {name} has {b.w_bits}-bit weights ({self.name} serves "
                           f"{_fmt(self.weight_bits)})")
            if b.a_bits not in self.act_bits:
                bad.append(f"layer {name} has {b.a_bits}-bit activations ({self.name} serves "
                           f"{_fmt(self.act_bits)})")
        for group in cfg.tie_groups:
            present = [n for n in group if n in cfg.layers]
            schemes = {(cfg.layers[n].w_bits if self.tie_weights else None,
                        cfg.layers[n].a_bits) for n in present}
            if len(schemes) > 1:
                what = "one scheme (weights and activations)" if self.tie_weights \
                    else "one activation width"
                bad.append(f"tie group ({', '.join(present)}) must share {what}")
        return bad

    def check(self, cfg: BitConfig, ops: dict[str, str] | None = None) -> None:
        bad = self.violations(cfg, ops)
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise CoqatError(f"{self.name} cannot serve this configuration: {bad[0]}{more}; "
                             f"search with --target {self.name} or pick a config within its "
                             "legal set")


def _fmt(bits: frozenset[int]) -> str:
    """'2, 4, 8, 16 = float'"""
    text = ", ".join(str(b) for b in sorted(bits))
    return text + " = float" if FLOAT_BITS in bits else text


TARGETS: dict[str, Target] = {
    "json": Target("json", frozenset(QUANT_BITS + (FLOAT_BITS,)),
                   frozenset(QUANT_BITS + (FLOAT_BITS,)), False,
                   frozenset({"Linear", "Conv2d"}), "coqat's own schema, any bits"),
    "onnx": Target("onnx", frozenset({2, 4, 8, FLOAT_BITS}), frozenset({2, 4, 8, FLOAT_BITS}),
                   False, frozenset({"Linear", "Conv2d"}),
                   "ONNX QDQ: int8/int4 (opset 21), int2 (opset 25)"),
    "vllm": Target("vllm", frozenset({4, 8, FLOAT_BITS}), frozenset({8, FLOAT_BITS}), True,
                   frozenset({"Linear"}),
                   "compressed-tensors for vLLM: W4A16, W8A16, W4A8, W8A8; fused shards tied",
                   frozenset({"rtn"})),
    "torchao": Target("torchao", frozenset(QUANT_BITS + (FLOAT_BITS,)), frozenset({8, FLOAT_BITS}),
                      False, frozenset({"Linear"}),
                      "torchao FqnToConfig: intx weights, int8 dynamic or float activations",
                      frozenset({"rtn"})),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise CoqatError(f"unknown target {name!r}; use one of {', '.join(TARGETS)}")
    return TARGETS[name]
