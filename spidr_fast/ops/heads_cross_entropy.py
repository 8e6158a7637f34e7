"""Cross-entropy of L linear prediction heads against codebook labels.

Shapes:
    x       (L, N, D)  the frames each head reads (an expanded view when all heads read the same frames)
    weight  (L, K, D)  head weights; bias (L, K) or None
    labels  (L, N)     int64 target codewords, or ignore_index

The forward and the backward are custom ops declared by `_dispatch.custom_op`, joined by `register_autograd`.
Logits are scale · x Wᵀ + b: scale is 1 for linear heads, 1 / temperature for cosine heads (x and W normalised
first).
"""

import torch
import torch.nn.functional as F

from spidr_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor, check_values_in_range
from spidr_fast.ops._dispatch import custom_op, register


def _reference_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    if bias is None:
        logits = torch.bmm(x, weight.transpose(1, 2))
        return logits if scale == 1.0 else logits * scale
    # The bias inside the matmul, as nn.Linear does.
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2), alpha=scale)


@register("heads_cross_entropy", "reference")
def _heads_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_layers = labels.shape[0]
    logits = _reference_logits(x, weight, bias, scale).float()
    lse = torch.logsumexp(logits, dim=-1)
    kept = labels != ignore_index
    target = logits.gather(-1, torch.where(kept, labels, 0).unsqueeze(-1)).squeeze(-1)
    # Sum over layers, then divide, in the order of the official loss.
    loss = torch.where(kept, lse - target, 0).sum(0) / num_layers
    probs = torch.exp(logits - lse.unsqueeze(-1)) * kept.unsqueeze(-1)
    mean_probs = probs.sum(1) / kept.sum(1, keepdim=True).clamp_min(1)
    return loss, mean_probs, lse


@register("heads_cross_entropy_backward", "reference")
def _heads_cross_entropy_backward_reference(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_layers, num_codewords = weight.shape[:2]
    kept = labels != ignore_index
    probs = torch.exp(_reference_logits(x, weight, bias, scale).float() - lse.unsqueeze(-1))
    onehot = F.one_hot(torch.where(kept, labels, 0), num_codewords)
    grad_rows = torch.where(kept, grad_loss.float() / num_layers, 0)
    grad = (probs - onehot) * grad_rows.unsqueeze(-1)
    # As autograd does: the logits' gradient in the input dtype feeds the two matmuls.
    grad_logits = (grad * scale).to(x.dtype)
    return torch.bmm(grad_logits, weight), torch.bmm(grad_logits.transpose(1, 2), x), grad.sum(1)


def _fake_forward(x, weight, bias, labels, scale, ignore_index):  # noqa: ANN001, ANN202
    num_layers, num_codewords = weight.shape[:2]
    loss, lse = x.new_empty(labels.shape[1], dtype=torch.float32), x.new_empty(labels.shape, dtype=torch.float32)
    return loss, x.new_empty((num_layers, num_codewords), dtype=torch.float32), lse


def _fake_backward(grad_loss, x, weight, *_):  # noqa: ANN001, ANN202
    grad_bias = weight.new_empty(weight.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), grad_bias


_heads_cross_entropy_op = custom_op("heads_cross_entropy", fake=_fake_forward)
_heads_cross_entropy_backward_op = custom_op("heads_cross_entropy_backward", fake=_fake_backward)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, labels, scale, ignore_index = inputs
    ctx.save_for_backward(x, weight, bias, labels, output[2])
    ctx.scale, ctx.ignore_index = scale, ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_mean_probs, _grad_lse):  # noqa: ANN001, ANN202
    x, weight, bias, labels, lse = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _heads_cross_entropy_backward_op(
        grad_loss, x, weight, bias, labels, lse, ctx.scale, ctx.ignore_index
    )
    return grad_x, grad_weight, None if bias is None else grad_bias.to(bias.dtype), None, None, None


_heads_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def heads_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    cosine_temperature: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over heads of the cross-entropy of softmax(x_l W_lᵀ + b_l) against labels_l.

    Args:
        x: (L, N, D); weight: (L, K, D) in x's dtype (under autocast, all are cast to its dtype);
        bias: (L, K) or None; labels: (L, N) int64 in [0, K), or ignore_index.
        cosine_temperature: None for linear heads; else HuBERT's cosine logits,
            cosine(x_l, W_l,k) / cosine_temperature (+ b_l,k when a bias is given).
        ignore_index: as F.cross_entropy's: a label equal to it adds nothing to the loss, the gradients or
            mean_probs (padding, unmasked frames).
    Returns:
        loss (N,) float32, differentiable in x, weight and bias: Σ_l ce_l / L, where ce_l is
            F.cross_entropy(reduction="none")'s, 0 on ignored labels. F.cross_entropy's mean over the frames kept is
            loss.sum() * L / (labels != ignore_index).sum();
        mean_probs (L, K) float32, the softmax averaged over each head's frames not ignored (zeros when there are
            none), without gradient.

    Label values are checked on CPU tensors (ValueError naming labels); on CUDA the Triton kernel checks them on
    the device (an asynchronous device-side assert, no host sync), the reference's gather as PyTorch does.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES)
    if torch.is_autocast_enabled(x.device.type):  # a custom op is opaque to autocast: cast as it would for a matmul
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t if t is None else t.to(dtype) for t in (x, weight, bias))
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    check_tensor("labels", labels, ndim=2, dtypes=(torch.int64,))
    num_layers, num_codewords, dim = weight.shape
    check_shape("x", x, (num_layers, x.shape[1], dim), meaning="(L, N, D)")
    check_shape("labels", labels, (num_layers, x.shape[1]), meaning="(L, N)")
    check_values_in_range(
        "labels", labels, num_codewords, meaning=f"K = {num_codewords} codewords", ignore_index=ignore_index
    )
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (num_layers, num_codewords), meaning="(L, K)")
    check_same_device(x=x, weight=weight, bias=bias, labels=labels)
    scale = 1.0
    if cosine_temperature is not None:
        if not cosine_temperature > 0:
            raise ValueError(f"cosine_temperature must be positive, got {cosine_temperature}")
        x, weight, scale = F.normalize(x, dim=-1), F.normalize(weight, dim=-1), 1.0 / cosine_temperature
    loss, mean_probs, _ = _heads_cross_entropy_op(x, weight, bias, labels, scale, ignore_index)
    return loss, mean_probs
