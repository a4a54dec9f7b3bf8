"""QuEST and RTN fake quantization: functions, quantized modules, and ``quantize_model``.

The numerics definition lives in ``coqat.quant.quantizers`` (quantizers) and
``coqat.quant.hadamard`` (rotation); kernels are tested against them (bit for bit after
the rotation; the float32 rotation may move a code by one step at a tie).

Functional API
    fake_quant(x, bits, method, hadamard_block, form, trust, clip_ratio)  Q over the last dim
    project(w, spec)                       Q(w) in the original basis, no grad (for CAGE)
    quantize_rows(x, bits, method, ...)    values, int8 codes, per-row step, gradient mask
    quantize_rows_with(x, row_params(...)) the same with a width's constants as tensors
    ste_quantize(x_rot, bits, method, ...) Q of an already-rotated tensor, masked STE backward
    dequantize(codes, scale, method)       values from integer codes
    hadamard_transform(x, block), hadamard_block_for(dim, max_block)
    ALPHA, default_trust(bits), QuantSpec, QuantResult

Modules
    QuantLinear, QuantConv2d (``from_float``, ``project_weight``, ``weight_error``)
    quantize_model(model, bitconfig), dequantize_model(model), quantized_modules(model)
    autocast_input(x)   the input as a float layer takes it under autocast (what is quantized)
    sharing(enabled)    layers reading one input share its quantized operand (on by default;
                        ``coqat.quant.shared``); shared_operand(x, key, compute) for new layers

Bits: 2, 3, 4, 5, 6, 8 quantize; 16 passes through; anything else is a CoqatError.
"""

from coqat.quant.hadamard import hadamard_block_for, hadamard_transform
from coqat.quant.modules import (
    QuantConv2d,
    QuantLinear,
    autocast_input,
    dequantize_model,
    quantize_model,
    quantized_modules,
)
from coqat.quant.shared import shared_operand, sharing
from coqat.quant.quantizers import (
    ALPHA,
    QuantResult,
    QuantSpec,
    RowParams,
    default_trust,
    dequantize,
    fake_quant,
    project,
    quantize_rows,
    quantize_rows_with,
    row_params,
    ste_quantize,
)

__all__ = [
    "ALPHA", "QuantResult", "QuantSpec", "default_trust",
    "hadamard_transform", "hadamard_block_for",
    "quantize_rows", "quantize_rows_with", "row_params", "RowParams", "dequantize",
    "ste_quantize", "fake_quant", "project",
    "QuantLinear", "QuantConv2d", "quantize_model", "dequantize_model", "quantized_modules",
    "autocast_input", "shared_operand", "sharing",
]
