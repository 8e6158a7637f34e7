"""The one dq row behind the gradient rule (docs/flash-attention.md, "Dropout: one Philox call per four weights").

Runs the case matrix's d128 bf16 dropout-0.17 case (seed 0) through the CPU emulator, then replays, in float64,
FlashAttention-2's rounding points for row 2 of the length-5 sequence (head 1): P from the 16-bit inputs, dS rounded
to bf16 once, dq summed and rounded. Prints both replays' distance to our kernel's row and the errors' ratio.

    python docs/artifacts/flash_dq_row_replay.py      # from the repository root, about 20 s
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import test_kernels_attention as matrix  # noqa: E402

from spidr_fast import build_extension, ops  # noqa: E402
from spidr_fast.ops.kernels import attention as attention_kernel  # noqa: E402

attention_kernel.use_extension(build_extension.load(build_extension.build(emulate=True)[0]))
ops.set_backend("cuda")
saved = {}
matrix.assert_flash_rule = lambda name, mine, low, exact: saved.setdefault(name, (mine, low, exact))
torch.manual_seed(0)
matrix.check_against_float32(matrix.TILE_EDGES, 2, 128, torch.bfloat16, 0.17)
mine, low, exact = (x.float() for x in saved["dq"])
print(f"dq max error: ours {(mine - exact).abs().max():.4f}, PyTorch bf16 {(low - exact).abs().max():.4f}")

torch.manual_seed(0)  # the matrix's inputs again: qkv, then dO
total = sum(matrix.TILE_EDGES)
qkv, grad_out = torch.randn(total, 3, 2, 128), torch.randn(total, 2, 128)
start, end = (int(x) for x in matrix.cu_seqlens_of(matrix.TILE_EDGES)[8:10])
rng_state = torch.tensor([0x1234_5678_9ABC, 17])
keep = matrix.dropout_keep_masks(rng_state, 2, matrix.cu_seqlens_of(matrix.TILE_EDGES), 0.17, "cpu")[8][1].double()


def bf16(x):
    return x.to(torch.bfloat16).double()


q, k, v = (bf16(qkv[start:end, i, 1]) for i in range(3))
dout, scale = bf16(grad_out[start:end, 1]), 128**-0.5
probs = torch.softmax(q @ k.T * scale, -1)
grad_probs = (dout @ v.T) * keep / 0.83
out = bf16((bf16(probs * keep) @ v) / 0.83)
row = start + 2
for name, delta in (
    ("rowsum(P * dP)", (probs * grad_probs).sum(-1, keepdim=True)),
    ("rowsum(dO * O), O rounded", (dout * out).sum(-1, keepdim=True)),
):
    replay = bf16(bf16(probs * (grad_probs - delta)) @ k * scale)[2]
    print(f"replay with delta = {name}: max distance to our row {(replay - mine[row, 1]).abs().max():.2e}")
