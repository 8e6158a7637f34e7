"""One full training step with the fused ops (Triton codebook ops and heads, our flash-attention) against the same
step on the plain-PyTorch reference ops: same weights, batch and seed, on the same device.

The bar is PyTorch's own: a float32 step on the reference ops is the truth, the bf16-autocast step on the reference
ops is what PyTorch achieves at training precision, and the fused bf16 step must be no further from the truth than
twice that, for the loss, the gradients, the weights after AdamW and the codebooks after their EMA update. Norm-wise
relative errors: a label flipped at a near-tie moves a codeword a little, not the whole comparison.

On a GPU (marked gpu; benchmarks/device_check.sh runs it) the fused step runs every Triton kernel and our
flash-attention, whatever the dispatch's measured defaults pick for CUDA tensors. On a CPU it runs the Triton kernels in the interpreter with attention on its reference, which checks the
test itself before a GPU ever sees it.
"""

import pytest
import torch
from helpers import MODELS, TINY

from spidr_fast.ops import _dispatch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# TINY twice as wide, so that heads are 64 wide as the flash-attention kernels take them; no dropout, whose draws
# differ between implementations.
WIDER = dict(encoder_embed_dim=128, encoder_num_heads=2, encoder_ff_interm_features=256, codebook_size=64)
NO_DROPOUT = dict(encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_layer_drop=0.0)
CONFIG = TINY | WIDER | NO_DROPOUT | dict(extractor_conv_layer_config=[(64, 10, 5), (64, 3, 2), (64, 2, 2)])


def training_step(name, backend, autocast, samples, **per_op):
    """Loss, gradients, weights and codebook state after one step of a freshly seeded model and batch."""
    torch.manual_seed(0)
    model_class, config_class = MODELS[name]
    model = model_class(config_class(**CONFIG)).to(DEVICE).train()
    waveforms = torch.randn(3, samples, device=DEVICE)
    frames = model.feature_extractor(waveforms[:1]).shape[1]
    mask_indices = torch.stack([torch.randperm(frames, device=DEVICE)[: frames // 2] for _ in range(3)])
    lengths = torch.tensor([frames, frames - 61, frames - 130], device=DEVICE)  # off the 64-frame tiles
    attention_mask = (torch.arange(frames, device=DEVICE) < lengths.unsqueeze(1))[:, None, None, :]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with _dispatch.backends(backend, **per_op), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = model(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
        loss.mean().backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    optimizer.step()
    model.update_ema(1)
    state = model.state_dict()
    codebooks = torch.cat([v.flatten() for k, v in state.items() if k.startswith("codebooks.")])
    weights = torch.cat([p.detach().flatten() for p in params])
    return {"loss": loss.detach().float(), "gradients": grads, "weights": weights, "codebooks": codebooks}


def relative_error(value, truth):
    return ((value.double() - truth.double()).norm() / truth.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_training_step_is_as_close_to_float32_as_pytorch_bf16(name):
    samples = 16_000 if CUDA else 3_000  # 798 frames (13 tiles of 64) on a GPU; the interpreter is slow
    # CUDA: every Triton kernel and our flash-attention, also where the reference is the measured default (the
    # codebook assignment and attention on sm_90), so that each fused kernel is checked inside a step.
    fused_backend, attention = ("triton", "cuda") if CUDA else ("triton", None)
    truth = training_step(name, "reference", autocast=False, samples=samples)
    pytorch = training_step(name, "reference", autocast=True, samples=samples)
    fused = training_step(name, fused_backend, autocast=True, samples=samples, attention=attention)
    for key, value in truth.items():
        assert torch.isfinite(fused[key]).all(), key
        bar = relative_error(pytorch[key], value)
        assert relative_error(fused[key], value) <= 2 * bar + 1e-6, (key, relative_error(fused[key], value), bar)
