"""Fused low-bit kernels (Triton on CUDA) and their torch reference with identical integer semantics."""
