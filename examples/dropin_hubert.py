"""spidr_fast's fused ops dropped into a model that spidr_fast did not write: a wav2vec2-style convolutional front
end and `nn.TransformerEncoder` layers, trained with a DinoSR-style objective. An EMA teacher reads the unmasked
features; `OnlineCodebook` turns its frames into labels (and updates itself, as VectorQuantize would); the student
predicts them on the masked frames through `FusedHeads`, whose cross-entropy skips every label equal to -100
(padding and unmasked frames), as F.cross_entropy's ignore_index does.

    python examples/dropin_hubert.py --steps 20
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from spidr_fast.nn import FusedHeads, OnlineCodebook

CONV_LAYERS = [(10, 5), (3, 2), (3, 2), (2, 2)]  # (kernel, stride): 40x downsampling, wav2vec2's shape shortened


class DropInModel(nn.Module):
    def __init__(self, dim: int = 64, codebook_size: int = 32, num_layers: int = 2) -> None:
        super().__init__()
        self.front_end = nn.Sequential(
            *(
                nn.Sequential(nn.Conv1d(1 if i == 0 else dim, dim, kernel, stride), nn.GELU())
                for i, (kernel, stride) in enumerate(CONV_LAYERS)
            )
        )
        self.mask_embedding = nn.Parameter(torch.rand(dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.student = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.codebook = OnlineCodebook(dim, codebook_size, decay=0.9, metric="cosine")
        self.heads = FusedHeads(1, dim, codebook_size)

    def frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        for kernel, stride in CONV_LAYERS:
            num_samples = torch.div(num_samples - kernel, stride, rounding_mode="floor") + 1
        return num_samples

    def forward(self, waveforms: torch.Tensor, num_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms (B, samples), num_samples (B,) real samples per row → mean loss over the masked frames, and
        the labels (B, T)."""
        features = self.front_end(waveforms.unsqueeze(1)).transpose(1, 2)  # (B, T, D)
        batch, frames, _ = features.shape
        valid = torch.arange(frames, device=waveforms.device) < self.frames(num_samples).unsqueeze(1)
        masked = valid & (torch.rand(batch, frames, device=waveforms.device) < 0.5)
        with torch.no_grad():  # targets: the teacher's frames, normalised over time, assigned on the masked frames
            targets = F.instance_norm(self.teacher(features, src_key_padding_mask=~valid).transpose(1, 2))
            labels = self.codebook(targets.transpose(1, 2), mask=masked)  # -100 on every other frame
        x = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(features.dtype), features)
        predictions = self.student(x, src_key_padding_mask=~valid)  # PyTorch's padding mask: True on padding
        loss, _ = self.heads(predictions.flatten(0, 1), labels.view(1, -1))
        return loss.sum() / masked.sum().clamp_min(1), labels

    @torch.no_grad()
    def update_teacher(self, decay: float = 0.99) -> None:
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            teacher.lerp_(student, 1 - decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = DropInModel().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    waveforms = torch.randn(4, 8000)
    num_samples = torch.tensor([8000, 7000, 6000, 3000])
    for step in range(args.steps):
        loss, labels = model(waveforms, num_samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher()
        print(f"step {step} loss {loss.item():.4f} codewords assigned {labels[labels >= 0].unique().numel()}")


if __name__ == "__main__":
    main()
