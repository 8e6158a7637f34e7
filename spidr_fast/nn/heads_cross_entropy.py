"""L prediction heads over K classes whose logits are never materialised: the `heads_cross_entropy` op as a module."""

import math

import torch
from torch import Tensor, nn

from spidr_fast import ops


class FusedHeads(nn.Module):
    """L heads (weight (L, K, D), bias (L, K)); forward returns the loss per frame averaged over heads.

    cosine_temperature: None for linear heads (as DinoSR/SpidR); a positive float for HuBERT's cosine logits,
    cosine(x, W_k) / cosine_temperature. ignore_index: labels equal to it add nothing (F.cross_entropy's, and the
    label `OnlineCodebook` gives the frames it leaves out).
    """

    def __init__(
        self,
        num_heads: int,
        dim: int,
        num_classes: int,
        *,
        bias: bool = True,
        cosine_temperature: float | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.cosine_temperature, self.ignore_index = cosine_temperature, ignore_index
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))
        self.bias = nn.Parameter(torch.empty(num_heads, num_classes)) if bias else None
        # nn.Linear's initialisation, head by head.
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """x (L, N, D) per head, or (N, D) read by every head; labels (L, N) int64 in [0, K), or ignore_index.

        Returns loss (N,) float32 (mean over heads of the cross-entropy) and mean_probs (L, K), the predicted
        distribution averaged over frames (for perplexities), without gradient.
        """
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], *x.shape)
        return ops.heads_cross_entropy(
            x,
            self.weight,
            self.bias,
            labels,
            cosine_temperature=self.cosine_temperature,
            ignore_index=self.ignore_index,
        )
