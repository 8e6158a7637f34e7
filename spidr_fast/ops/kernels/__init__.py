"""Fused Triton kernels, one file per op: kernels, then the launcher registered as the op's "triton" backend."""

from spidr_fast.ops.kernels import codebook_assign, codebook_ema, heads_cross_entropy

__all__ = ["codebook_assign", "codebook_ema", "heads_cross_entropy"]
