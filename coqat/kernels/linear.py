"""K3: the quantized linear layer on the low-bit kernels, differentiable.

Forward (``y = Q(x H) Q(W H)^T + b``, QuEST's half-Hadamard form)::

    K1(x) -> codes, steps, packed masks        one pass over the activations
    K1(W) -> codes, steps, packed masks        the master weight, every step (it changes)
    K2    -> y                                 FP8 / INT8 GEMM, scales in the epilogue

Backward v1 (BF16 GEMMs on the dequantized operands; ``M`` = trust masks, ``g = dL/dy``)::

    dx = (M_x * (g  @ Wq)) H       Wq = dequantized weight codes (rotated basis)
    dW = (M_w * (g^T @ Xq)) H      Xq = dequantized activation codes
    db = sum of g over the rows

This is the gradient of the fake-quant module (``coqat.quant.QuantLinear``): the
straight-through estimator masked by the trust mask, rotated back by H. For the "full"
form (quantized operands rotated back before the product) the product and both gradients
are the same mathematical expressions, since H H^T = I; only float rounding differs.

Every step is a custom op of ``coqat.kernels.ops``: Triton on CUDA tensors, the torch
reference on any other device. K1 runs as its own op on the detached input, so that under
``torch.compile`` layers that read the same tensor (q/k/v, gate/up) share one quantization.
Autograd keeps 1 byte per activation (the codes) plus 1 bit (the mask) for the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.kernels import ops
from coqat.kernels import reference as ref
from coqat.kernels.reference import LowbitFormat, RowQuantizer
from coqat.quant.modules import autocast_input

__all__ = ["LinearSpec", "linear_spec", "lowbit_linear"]


@dataclass(frozen=True)
class LinearSpec:
    """How one quantized linear layer runs on the kernels (see ``linear_spec``)."""

    weight: RowQuantizer
    act: RowQuantizer
    fmt: LowbitFormat
    fast_accum: bool = False

    @property
    def method(self) -> str:
        return self.weight.method

    @property
    def block(self) -> int:
        return self.weight.block


def linear_spec(w_bits: int, a_bits: int, block: int, method: str = "quest",
                trust: float | None = None, clip_ratio: float = 1.0,
                fast_accum: bool = False) -> LinearSpec:
    """A LinearSpec for weights and inputs quantized to ``w_bits`` / ``a_bits``.

    ``block`` is the Hadamard block applied to both operands along the reduction dim (1 = no
    rotation); ``fast_accum`` lets FP8 GEMMs accumulate inside the tensor cores (faster,
    not exact).
    """
    if FLOAT_BITS in (w_bits, a_bits):
        raise CoqatError(f"the low-bit linear needs weight and input quantized, got "
                         f"w{w_bits}a{a_bits}; run such a layer on the reference path "
                         "(--kernels auto)")
    fmt = ref.lowbit_format(w_bits, a_bits, method)
    return LinearSpec(RowQuantizer(w_bits, fmt, method, block, trust, clip_ratio),
                      RowQuantizer(a_bits, fmt, method, block, trust, clip_ratio),
                      fmt, fast_accum)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``F.linear`` would return: the autocast dtype inside autocast, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def lowbit_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  spec: LinearSpec) -> torch.Tensor:
    """``F.linear`` on quantized operands, through the kernels (differentiable).

    ``x`` (..., K) and ``weight`` (N, K) are the float input and master weight; both are
    quantized on every call. Inside autocast x is quantized in the autocast dtype (as
    ``F.linear`` casts it; ``coqat.quant.autocast_input``) and the output has that dtype,
    otherwise x's. The master weight is quantized as it is. Gradients flow to x, weight and
    bias.
    """
    x = autocast_input(x)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise CoqatError(f"lowbit_linear: input has {x.shape[-1]} features, the weight {k}")
    if k % spec.block:
        raise CoqatError(f"Hadamard block {spec.block} does not divide in_features {k}")
    x2 = x.reshape(-1, k)
    qa = ops.quantize(x2.detach(), spec.act)
    qw = ops.quantize(weight.detach(), spec.weight)
    y = ops.lowbit_linear_forward(x2, weight, bias, qa, qw, spec.fmt, spec.method, spec.block,
                                  spec.fast_accum, _output_dtype(x))
    return y.reshape(*x.shape[:-1], n)
