"""Block Walsh-Hadamard rotation: the "H" of QuEST's ``Q(xH)``.

A Hadamard rotation spreads each row's energy evenly over its coordinates, so that after it
the values look Gaussian and an RMS-based clip (``ALPHA[b] * rms``) fits them well. It is
orthonormal, so rotating both operands of a matmul along the reduction dim leaves the
product unchanged: ``(xH)(wH)^T = x H H^T w^T = x w^T``.

Numerics (the reference that GPU kernels are tested against bit for bit):

- H is the Sylvester-ordered Hadamard matrix of size ``block`` (``H_1 = [1]``,
  ``H_2n = [[H_n, H_n], [H_n, -H_n]]``), applied independently to every contiguous block
  of ``block`` elements along the last dim. It is symmetric and, once scaled, ``H H = I``.
- The unnormalized +-1 sums run in float64. For float32/bfloat16 inputs the sums
  are exact (a float32 has 24 significant bits; a sum of <= 2**7 of them fits float64's
  53 unless the row's magnitudes span ~2**20), so the summation order does not matter and
  any backend (a dense matmul, a butterfly, a tensor-core kernel with exact accumulation)
  reproduces the same float64 value.
- That value is multiplied by the float64 constant ``2 ** (-log2(block) / 2)`` and
  rounded ONCE to float32. The result is always float32.

Only torch is imported here: ``coqat.bitconfig`` imports ``hadamard_block_for`` and must
stay free of training dependencies.
"""

from __future__ import annotations

import functools

import torch

from coqat.bitconfig import hadamard_block_for
from coqat.errors import CoqatError

__all__ = ["hadamard_transform", "hadamard_block_for", "hadamard_scale", "sylvester_matrix"]


def hadamard_scale(block: int) -> float:
    """The float64 normalization ``2 ** (-log2(block) / 2)`` = 1/sqrt(block)."""
    return 2.0 ** (-(int(block).bit_length() - 1) / 2)


def _check_block(n: int, block: int) -> int:
    block = int(block)
    if block < 1 or block & (block - 1):
        raise CoqatError(f"Hadamard block {block} is not a power of two >= 1; use hadamard_block_for(dim)")
    if n % block:
        raise CoqatError(
            f"Hadamard block {block} does not divide the last dim {n}; use hadamard_block_for({n})")
    return block


@functools.lru_cache(maxsize=64)
def sylvester_matrix(block: int, device: str = "cpu") -> torch.Tensor:
    """The unnormalized +-1 Sylvester Hadamard matrix of size ``block``, float64.

    Cached per (block, device): it is a constant, built once, never mutated.
    """
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def _hadamard_forward(x: torch.Tensor, block: int) -> torch.Tensor:
    """The numerics definition: exact +-1 sums in float64, one scale, one rounding to float32.

    The sums are computed as a float64 matmul with the +-1 matrix (a BLAS/tensor-core
    product is much faster than log2(block) butterfly passes); because every partial sum is
    exact, the order the backend sums in cannot change the result.
    """
    y = x.to(torch.float64)
    if block > 1:
        shape = y.shape
        h = sylvester_matrix(block, str(y.device))
        y = (y.reshape(-1, block) @ h).reshape(shape) * hadamard_scale(block)
    return y.to(torch.float32)


def _rotate_f32(g: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return g.to(torch.float32)
    h = sylvester_matrix(block, str(g.device)).to(torch.float32) * hadamard_scale(block)
    return (g.to(torch.float32).reshape(-1, block) @ h).reshape(g.shape)


class _HadamardFn(torch.autograd.Function):
    """y = x H (blockwise). H is symmetric and orthonormal, so the VJP is g H as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        ctx.in_dtype = x.dtype
        return _hadamard_forward(x, block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Gradients are not part of the bit-exact contract (only forward values are), so
        # the backward rotation runs in float32: half the cost of the float64 forward.
        return _rotate_f32(grad, ctx.block).to(ctx.in_dtype), None


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """Rotate each ``block``-sized chunk of the last dim by the orthonormal Hadamard matrix.

    ``block`` must be a power of two dividing ``x.shape[-1]``; block 1 is the identity (still
    returned as float32). The output is float32; the gradient is rotated by the same
    transform (H^T = H) and returned in ``x``'s dtype. See the module docstring for the
    exact numerics.
    """
    if not torch.is_floating_point(x):
        raise CoqatError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise CoqatError("hadamard_transform needs a tensor with at least one dim")
    block = _check_block(x.shape[-1], block)
    return _HadamardFn.apply(x, block)
