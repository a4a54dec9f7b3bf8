"""Which backend a quantized layer runs on: ``use_kernels`` and the ``--kernels`` choice.

``coqat.quant.quantize_model`` only swaps layers; every QuantLinear then runs the fake-quant
forward of ``coqat.quant`` (the numerics definition). ``use_kernels(model, kernels)`` moves
the layers that can onto the kernels by setting their ``kernel_forward`` hook:

- ``auto`` (default): the Triton kernels for a ``QuantLinear`` whose input lives on a CUDA
  GPU, when Triton is installed and the layer is supported (both operands quantized, the
  reduction and output dims multiples of 16); the fake-quant forward otherwise.
- ``triton``: the kernels, or a one-line ``CoqatError`` that says why they cannot run.
- ``reference``: always the fake-quant forward.

``check_kernels`` is the one place a ``--kernels`` value is validated. Nothing here imports
Triton, so CPU-only installs and tests never load it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.kernels.linear import LinearSpec, linear_spec, lowbit_linear
from coqat.quant.modules import QuantLinear

__all__ = ["KERNEL_CHOICES", "triton_unavailable_reason", "check_kernels", "use_kernels",
           "layer_spec", "unsupported_reason"]

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


def unsupported_reason(module: QuantLinear) -> str | None:
    """None if this QuantLinear can run on the kernels (given a CUDA input), else why not."""
    if FLOAT_BITS in (module.w_bits, module.a_bits):
        return (f"w{module.w_bits}a{module.a_bits} leaves an operand in floating point; "
                "the low-bit GEMM needs both quantized")
    if module.w_block != module.a_block:
        return (f"weight and input use different Hadamard blocks "
                f"({module.w_block}, {module.a_block})")
    k, n = module.in_features, module.out_features
    if k % 16 or n % 16:
        return f"in_features {k} and out_features {n} must be multiples of 16 for the tensor cores"
    return None


def layer_spec(module: QuantLinear, fast_accum: bool = False) -> LinearSpec:
    """The ``LinearSpec`` of a QuantLinear (its bits, quantizer, rotation block)."""
    return linear_spec(module.w_bits, module.a_bits, module.w_block, module.method,
                       module.trust, module.clip_ratio, fast_accum)


def _kernel_forward(module: QuantLinear, x: torch.Tensor, *, spec: LinearSpec | None,
                    reason: str | None, strict: bool) -> torch.Tensor | None:
    """The layer's output through the kernels, or None when the fake-quant forward should
    run. ``reason`` (why the layer cannot run, decided once by ``use_kernels``) and the
    input's device and dtype are the only things checked per call, so that a compiled
    step traces straight through."""
    if reason is None and not x.is_cuda:
        reason = f"the input is on {x.device.type}, not a CUDA GPU"
    if reason is None and x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        reason = f"input dtype {x.dtype} is not bf16, fp16 or fp32"
    if reason is not None:
        if strict:
            raise CoqatError(f"--kernels triton cannot run layer {module.extra_repr()}: "
                             f"{reason}; use --kernels auto to run such layers on the "
                             "reference path")
        return None
    return lowbit_linear(x, module.weight, module.bias, spec)


def use_kernels(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Put the QuantLinear layers of ``model`` on the ``kernels`` backend; in place.

    Call it after ``quantize_model`` (re-configuring a layer detaches it again). Returns the
    model. ``kernels`` as in the module docstring; ``reference`` detaches.
    """
    check_kernels(kernels)
    attach = kernels == "triton" or (kernels == "auto" and triton_unavailable_reason() is None)
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        m.__dict__.pop("kernel_forward", None)
        if not attach or not m.is_quantized:
            continue
        reason = unsupported_reason(m)
        spec = layer_spec(m) if reason is None else None
        m.kernel_forward = functools.partial(_kernel_forward, spec=spec, reason=reason,
                                             strict=kernels == "triton")
    return model
