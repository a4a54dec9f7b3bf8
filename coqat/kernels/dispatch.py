"""Which backend a quantized layer runs on: the Triton kernels or the torch reference.

``--kernels`` (``TrainSettings.kernels``, ``quantize_model(..., kernels=)``) takes:

- ``auto`` (default): the Triton kernels for a ``QuantLinear`` whose input lives on a CUDA
  GPU, when Triton is installed and the layer is supported (both operands quantized, the
  reduction and output dims multiples of 16); the fake-quant module path otherwise.
- ``triton``: the kernels, or a one-line ``CoqatError`` that says why they cannot run.
- ``reference``: always the fake-quant module path of ``coqat.quant`` (the numerics
  definition; the kernels reproduce its codes and scales bit for bit).

Nothing here imports Triton until a GPU layer actually asks for it, so CPU-only installs
and tests never load it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError

__all__ = ["KERNEL_CHOICES", "triton_unavailable_reason", "check_kernels",
           "unsupported_reason", "kernel_forward", "layer_spec"]

KERNEL_CHOICES: tuple[str, ...] = ("auto", "triton", "reference")


def triton_unavailable_reason() -> str | None:
    """None if the Triton kernels can run on this machine, else why not (for messages)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'coqat[kernels]')"
    return None


def check_kernels(kernels: str) -> str:
    """Validate a ``--kernels`` value for this machine; returns it.

    ``triton`` on a machine without a CUDA GPU or without Triton is a CoqatError.
    """
    if kernels not in KERNEL_CHOICES:
        raise CoqatError(f"kernels = {kernels!r}; use one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise CoqatError(f"--kernels triton needs a CUDA GPU with Triton, but {reason}; "
                             "use --kernels auto (Triton where it can run, torch elsewhere) "
                             "or --kernels reference")
    return kernels


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> str | None:
    """None if this QuantLinear and input can run on the kernels, else why not."""
    from coqat.quant.modules import QuantLinear

    if not isinstance(module, QuantLinear):
        return f"{type(module).__name__} layers run on the reference path (only Linear has kernels)"
    if FLOAT_BITS in (module.w_bits, module.a_bits):
        return (f"w{module.w_bits}a{module.a_bits} leaves an operand in floating point; "
                "the low-bit GEMM needs both quantized")
    if module.w_block != module.a_block:
        return (f"weight and input use different Hadamard blocks "
                f"({module.w_block}, {module.a_block})")
    if not x.is_cuda:
        return f"the input is on {x.device.type}, not a CUDA GPU"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {x.dtype} is not bf16, fp16 or fp32"
    k, n = module.in_features, module.out_features
    if k % 16 or n % 16:
        return f"in_features {k} and out_features {n} must be multiples of 16 for the tensor cores"
    return None


def layer_spec(module: nn.Module, backend: str = "triton"):
    """The ``LinearSpec`` of a QuantLinear (its bits, quantizer, rotation block)."""
    from coqat.kernels.linear import linear_spec

    return linear_spec(module.w_bits, module.a_bits, module.w_block, module.method,
                       module.trust, module.clip_ratio, backend)


def kernel_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the kernels, or None when the reference path should run.

    Called by ``QuantLinear.forward`` with the layer's ``.kernels`` choice.
    """
    kernels = getattr(module, "kernels", "auto")
    if kernels == "reference" or (kernels == "auto" and not x.is_cuda):
        return None
    reason = triton_unavailable_reason() or unsupported_reason(module, x)
    if reason is not None:
        if kernels == "triton":
            raise CoqatError(f"--kernels triton cannot run layer {module.extra_repr()}: {reason}; "
                             "use --kernels auto to run such layers on the reference path")
        return None
    from coqat.kernels.linear import lowbit_linear

    return lowbit_linear(x, module.weight, module.bias, layer_spec(module))
