"""Triton: the EMA update of the codebooks of every layer in one launch, in place.

Official rule, codeword by codeword: only codewords assigned at least once in the batch move,
    counts   = decay * counts   + (1 - decay) * batch_counts
    codebook = decay * codebook + (1 - decay) * batch_sums
the others keep their state bit for bit. The L·K codewords are flattened into one axis of programs.
"""

import torch
import triton
import triton.language as tl

from spidr_fast.ops._dispatch import register


@triton.jit
def _ema_update_kernel(
    codebook_ptr, counts_ptr, batch_counts_ptr, batch_sums_ptr, decay, num_codewords, dim,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    batch_counts = tl.load(batch_counts_ptr + k, mask=k < num_codewords, other=0.0)
    assigned = batch_counts != 0.0  # also false past the end
    counts = tl.load(counts_ptr + k, mask=assigned)
    tl.store(counts_ptr + k, decay * counts + (1.0 - decay) * batch_counts, mask=assigned)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        offsets = k[:, None] * dim + d[None, :]
        mask = assigned[:, None] & (d < dim)[None, :]
        codebook = tl.load(codebook_ptr + offsets, mask=mask)
        sums = tl.load(batch_sums_ptr + offsets, mask=mask)
        tl.store(codebook_ptr + offsets, decay * codebook + (1.0 - decay) * sums, mask=mask)


def ema_config(dim: int) -> dict:
    return dict(BLOCK_K=16, BLOCK_D=min(256, triton.next_power_of_2(dim)), num_warps=4)


@register("codebook_ema_update_", "triton")
def codebook_ema_update_triton(
    codebook: torch.Tensor, counts: torch.Tensor, batch_counts: torch.Tensor, batch_sums: torch.Tensor, decay: float
) -> None:
    if not (codebook.is_contiguous() and counts.is_contiguous()):
        raise ValueError(
            f"codebook and counts must be contiguous to be updated in place, got strides {codebook.stride()} and "
            f"{counts.stride()}"
        )
    num_codewords = counts.numel()
    config = ema_config(codebook.shape[-1])
    _ema_update_kernel[(triton.cdiv(num_codewords, config["BLOCK_K"]),)](
        codebook, counts, batch_counts.contiguous(), batch_sums.contiguous(), decay, num_codewords,
        codebook.shape[-1], **config,
    )  # fmt: skip
