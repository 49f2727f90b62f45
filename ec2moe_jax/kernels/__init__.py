"""Compute kernels XLA does not provide: a threaded one-row matmul for CPU decode steps."""

from ec2moe_jax.kernels.matvec import available, matmul, uses_kernel

__all__ = ["available", "matmul", "uses_kernel"]
