"""Block Walsh-Hadamard rotation: the "H" of QuEST's ``Q(xH)``.

A Hadamard rotation spreads each row's energy evenly over its coordinates, so that after it
the values look Gaussian and an RMS-based clip (``ALPHA[b] * rms``) fits them well. It is
orthonormal, so rotating both operands of a matmul along the reduction dim leaves the
product unchanged: ``(xH)(wH)^T = x H H^T w^T = x w^T``.

Numerics (the definition every backend implements; changed by issue #15 so that the
rotation can run on tensor cores):

- H is the Sylvester-ordered +-1 Hadamard matrix of size ``block`` (``H_1 = [1]``,
  ``H_2n = [[H_n, H_n], [H_n, -H_n]]``), applied independently to every contiguous block
  of ``block`` elements along the last dim. It is symmetric and, once scaled, ``H H = I``.
- Each output is ``fl32(S * s)``: ``S`` is the +-1 sum of the block's values (taken as
  float32), accumulated in float32, and ``s = fl32(2 ** (-log2(block) / 2))`` is the
  normalization, applied afterwards as one float32 multiply. The result is float32.
- The products with +-1 are exact; only the float32 additions round, and the order and
  grouping of those additions is the backend's (a tensor-core dot with float32
  accumulation in ``coqat.kernels``). Where every partial sum is exact in float32 - bf16
  inputs whose magnitudes within a block span less than ~2^9, small integers - all
  backends give the same bits. Elsewhere they can differ in the last bits of ``S``, and a
  quantization code computed from the rotated value can then differ by one step, only where
  that value sits at a rounding tie of the quantizer. ``tests/test_kernels.py`` bounds how
  often that happens (DESIGN.md section 4).
- The torch implementation here (the CPU path, and the oracle of the tests) takes ``S``
  exactly rounded: the sums in float64 (exact for float32 inputs unless a block's
  magnitudes span more than ~2^22), rounded once to float32. That is one conforming order
  of additions with a property no float32 BLAS has: the bits do not depend on the CPU,
  the BLAS build or the thread count, so a run resumes bit-exactly on another machine and
  the ONNX export (which computes the same exactly rounded sums in the graph) reproduces
  coqat's codes. It costs about 5% of a CPU training step against a float32 matmul
  (reports/kernels.md, "CPU"); the GPU kernels keep float32 accumulation.

The rotation is the custom op ``coqat::hadamard`` so that ``torch.compile`` keeps it as one
node (no graph break, one fused kernel on the GPU). This module gives it the torch
implementation, used on every device; ``coqat.kernels`` registers a Triton implementation
for CUDA tensors.

Only torch is imported here: ``coqat.bitconfig`` imports ``hadamard_block_for`` and must
stay free of training dependencies.
"""

from __future__ import annotations

import functools
import threading

import torch

from coqat.bitconfig import hadamard_block_for
from coqat.errors import CoqatError

__all__ = ["hadamard_transform", "hadamard_block_for", "hadamard_scale", "sylvester_matrix",
           "hadamard_reference", "device_constant"]


def hadamard_scale(block: int) -> float:
    """The float64 normalization ``2 ** (-log2(block) / 2)`` = 1/sqrt(block).

    The rotation multiplies by this value rounded to float32 (exact for even log2(block)).
    """
    return 2.0 ** (-(int(block).bit_length() - 1) / 2)


def _check_block(n: int, block: int) -> int:
    block = int(block)
    if block < 1 or block & (block - 1):
        raise CoqatError(f"Hadamard block {block} is not a power of two >= 1; use hadamard_block_for(dim)")
    if n % block:
        raise CoqatError(
            f"Hadamard block {block} does not divide the last dim {n}; use hadamard_block_for({n})")
    return block


def device_constant(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` copied to ``device`` for a cache of constants that live for the process.

    Such a constant is made at its first use, and on CUDA that can be the warm-up run of a
    CUDA graph (``torch.compile(mode="reduce-overhead")``, what coqat's training step uses on
    one GPU): during it the allocations of the calling thread go to the graph's private
    pool, and a live tensor that is not a graph output fails torch's pool check ("tensor(s)
    in the cudagraph pool not tracked as outputs"; every compiled QAT run on an H100,
    2026-12-07). So on CUDA the copy is made by a thread of its own, whose allocations the
    pool does not take, and is complete when this returns.
    """
    if device.type != "cuda":
        return t.to(device)
    if device.index is None:                   # the new thread's current device is not ours
        device = torch.device("cuda", torch.cuda.current_device())
    made: list[torch.Tensor] = []
    failed: list[BaseException] = []

    def copy() -> None:
        try:
            with torch.cuda.device(device):
                out = t.to(device)
                torch.cuda.current_stream(device).synchronize()
            made.append(out)
        except BaseException as e:             # re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=copy, name="coqat-device-constant")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


@functools.lru_cache(maxsize=64)
def _pm1_matrix(block: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The +-1 Sylvester matrix in ``dtype`` on ``device``; a constant, built once."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return device_constant(h, device)


def sylvester_matrix(block: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The unnormalized +-1 Sylvester Hadamard matrix of size ``block``, float64.

    Cached per (block, device): it is a constant, never mutate it.
    """
    return _pm1_matrix(int(block), torch.device(device), torch.float64)


def hadamard_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """The torch implementation of the definition: the +-1 sums exactly rounded to float32
    (a float64 matmul), then one float32 multiply by the normalization. ``block`` must
    divide ``x.shape[-1]``."""
    h = _pm1_matrix(int(block), x.device, torch.float64)
    rows = x.to(torch.float32).to(torch.float64).reshape(-1, block)
    y = (rows @ h).to(torch.float32).reshape(x.shape)
    return y.mul_(torch.full((), hadamard_scale(block), dtype=torch.float32, device=x.device))


@torch.library.custom_op("coqat::hadamard", mutates_args=())
def _hadamard_op(x: torch.Tensor, block: int) -> torch.Tensor:
    return hadamard_reference(x, block)


@_hadamard_op.register_fake
def _hadamard_fake(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def _hadamard_setup(ctx, inputs, output) -> None:
    x, block = inputs
    ctx.block, ctx.in_dtype = block, x.dtype


def _hadamard_backward(ctx, grad: torch.Tensor):
    # y = (x H) s with H symmetric, so the VJP is (g H) s: the same rotation. Gradients are
    # not part of the numerics contract; they come back in the input's dtype.
    return _hadamard_op(grad.contiguous(), ctx.block).to(ctx.in_dtype), None


_hadamard_op.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """Rotate each ``block``-sized chunk of the last dim by the orthonormal Hadamard matrix.

    ``block`` must be a power of two dividing ``x.shape[-1]``; block 1 is the identity (still
    returned as float32). The output is float32; the gradient is rotated by the same
    transform (H^T = H) and returned in ``x``'s dtype. See the module docstring for the
    numerics.
    """
    if not torch.is_floating_point(x):
        raise CoqatError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise CoqatError("hadamard_transform needs a tensor with at least one dim")
    block = _check_block(x.shape[-1], block)
    if block == 1:
        return x.to(torch.float32)
    return _hadamard_op(x.contiguous(), block)
