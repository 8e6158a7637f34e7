"""Cross-entropy of L linear prediction heads against codebook labels.

Shapes:
    x       (L, N, D)  the frames each head reads (an expanded view when all heads read the same frames)
    weight  (L, K, D)  head weights; bias (L, K) or None
    labels  (L, N)     int64 target codewords
"""

import torch

from spidr_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from spidr_fast.ops._dispatch import implementation, register


@register("heads_cross_entropy", "reference")
def _heads_cross_entropy_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers, num_frames = labels.shape
    if bias is None:
        logits = torch.bmm(x, weight.transpose(1, 2))
    else:  # the bias inside the matmul, as nn.Linear does
        logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    # Sum over layers, then divide, in the order of the official loss.
    loss = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(0) / num_layers
    with torch.no_grad():
        mean_probs = log_probs.exp().sum(1) / max(num_frames, 1)
    return loss, mean_probs


def heads_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over heads of the cross-entropy of softmax(x_l W_lᵀ + b_l) against labels_l.

    Args:
        x: (L, N, D); weight: (L, K, D); bias: (L, K) or None; labels: (L, N) int64 in [0, K).
    Returns:
        loss (N,) float32, differentiable in x, weight and bias;
        mean_probs (L, K) float32, the softmax averaged over the N frames (zeros when N = 0), without gradient.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, ndim=2, dtypes=(torch.int64,))
    num_layers, num_codewords, dim = weight.shape
    check_shape("x", x, (num_layers, x.shape[1], dim), meaning="(L, N, D)")
    check_shape("labels", labels, (num_layers, x.shape[1]), meaning="(L, N)")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (num_layers, num_codewords), meaning="(L, K)")
    check_same_device(x=x, weight=weight, bias=bias, labels=labels)
    return implementation("heads_cross_entropy", x.device)(x, weight, bias, labels)
