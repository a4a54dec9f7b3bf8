"""Fused low-bit kernels (Triton on CUDA) and their torch reference (identical integer semantics).

K1  ``triton_quant.quantize_rows_triton``  block-Hadamard + QuEST/RTN row quantizer, one pass
K2  ``gemm.lowbit_matmul_triton`` / ``gemm.lowbit_matmul_scaled_mm``  FP8 / INT8 GEMM
K3  ``linear.lowbit_linear``  the quantized linear as one autograd Function (v1 backward:
    BF16 GEMMs on dequantized codes, trust masks, Hadamard back-rotation)
K4  ``triton_pack``  int4 / int2 pack and unpack for export

``reference`` is the torch implementation of the same integer semantics (the CPU path and
the test oracle); ``dispatch`` decides which backend a ``QuantLinear`` uses
(``--kernels auto|triton|reference``). Importing this package does not import Triton.
"""

from coqat.kernels.dispatch import (
    KERNEL_CHOICES,
    check_kernels,
    kernel_forward,
    triton_unavailable_reason,
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
    "KERNEL_CHOICES", "check_kernels", "kernel_forward", "triton_unavailable_reason",
    "LinearSpec", "linear_spec", "lowbit_linear",
    "FP8_DTYPE", "LowbitFormat", "QuantizedRows", "RowQuantizer", "lowbit_format",
    "quantize_ref", "store_codes", "integer_codes", "lowbit_matmul_ref", "dequantize_ref",
    "masked_rotate_ref", "pack_mask_bits", "unpack_mask_bits",
]
