"""Fused low-bit kernels (Triton on CUDA) and their torch reference (the same integer semantics).

K1  ``triton_quant.quantize_rows_triton``  block-Hadamard (tensor cores) + QuEST/RTN row
    quantizer, one pass
K2  ``gemm.lowbit_matmul_triton`` / ``gemm.lowbit_matmul_scaled_mm``  FP8 / INT8 GEMM
K3  ``linear.lowbit_linear``  the quantized linear, differentiable (v1 backward: BF16 GEMMs
    on dequantized codes, trust masks, Hadamard back-rotation on tensor cores)
K4  ``triton_pack``  int4 / int2 pack and unpack for export

``ops`` registers them as ``torch.library`` custom ops (torch reference on every device,
Triton on CUDA, fake implementations for ``torch.compile``), including the CUDA kernel of
``coqat.quant``'s rotation op. ``reference`` is the torch implementation (the CPU path and
the test oracle); ``use_kernels(model, "auto"|"triton"|"reference")`` moves a quantized
model's layers onto the kernels. Importing this package does not import Triton.
"""

from coqat.kernels.dispatch import (
    KERNEL_CHOICES,
    check_kernels,
    layer_spec,
    triton_unavailable_reason,
    unsupported_reason,
    use_kernels,
)
from coqat.kernels.linear import LinearSpec, linear_spec, lowbit_linear
from coqat.kernels.reference import (
    FP8_DTYPE,
    LowbitFormat,
    QuantizedRows,
    RowQuantizer,
    dequantize_ref,
    integer_codes,
    lowbit_format,
    lowbit_matmul_ref,
    masked_rotate_ref,
    pack_mask_bits,
    quantize_ref,
    store_codes,
    unpack_mask_bits,
)

__all__ = [
    "KERNEL_CHOICES", "check_kernels", "use_kernels", "layer_spec", "unsupported_reason",
    "triton_unavailable_reason",
    "LinearSpec", "linear_spec", "lowbit_linear",
    "FP8_DTYPE", "LowbitFormat", "QuantizedRows", "RowQuantizer", "lowbit_format",
    "quantize_ref", "store_codes", "integer_codes", "lowbit_matmul_ref", "dequantize_ref",
    "masked_rotate_ref", "pack_mask_bits", "unpack_mask_bits",
]
