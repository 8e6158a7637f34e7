"""DinoSR: a student transformer on masked frames predicts, through L linear heads, the codewords that L online
EMA codebooks assign to the instance-normalised outputs of the last L layers of an EMA teacher."""

import copy

import torch
from torch import Tensor, nn

from spidr_fast import ops
from spidr_fast.distributed import is_distributed, sum_over_ranks
from spidr_fast.models.components import FeatureExtractor, FeatureProjection, Transformer
from spidr_fast.models.config import DinoSRConfig
from spidr_fast.ops._dispatch import backend_name
from spidr_fast.nn.codebook import EMACodebooks


def perplexity(probs: Tensor) -> Tensor:
    """2 ** entropy (bits) of each distribution along the last dimension, as the official metric."""
    return torch.exp2(-(probs * (probs + 1e-8).log2()).sum(-1))


def masked_frame_index(mask_indices: Tensor, num_frames: int) -> Tensor:
    """(B, M) masked positions per row → (B * M,) indices into the B * num_frames frames, row by row."""
    offsets = torch.arange(mask_indices.shape[0], device=mask_indices.device).unsqueeze(1) * num_frames
    return (mask_indices + offsets).reshape(-1)


def _frame_mask(attention_mask: Tensor | None, batch: int, frames: int) -> Tensor | None:
    """The official (B, 1, 1, T) attention mask, or a (B, T) one, as (B, T) bool, True on real frames."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape not in ((batch, frames), (batch, 1, 1, frames)):
        raise ValueError(
            f"attention_mask must be bool of shape (B, T) or (B, 1, 1, T) with B = {batch} and T = {frames} frames, "
            f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    return attention_mask.reshape(batch, frames)


def _masking(
    mask_indices: Tensor | None, mask: Tensor | None, batch: int, frames: int, device: torch.device
) -> tuple[Tensor | None, Tensor]:
    """The (B, T) mask to embed (None: nothing masked) and the flat indices of the frames that take a loss."""
    if mask_indices is not None and mask is not None:
        raise ValueError("give either mask_indices (B, M) or mask (B, T), not both")
    if mask_indices is not None:
        if mask_indices.dim() != 2 or mask_indices.shape[0] != batch or mask_indices.dtype != torch.int64:
            raise ValueError(
                f"mask_indices must be int64 of shape (B, M) with B = {batch}, "
                f"got {mask_indices.dtype} {tuple(mask_indices.shape)}"
            )
        embedded = torch.zeros(batch, frames, dtype=torch.bool, device=device).scatter_(1, mask_indices, True)
        return embedded, masked_frame_index(mask_indices, frames)
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, frames):
            raise ValueError(
                f"mask must be bool of shape (B, T) = {(batch, frames)} frames, got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask, mask.flatten().nonzero().squeeze(1)  # rows may mask different numbers of frames
    return None, torch.arange(batch * frames, device=device)


class DinoSR(nn.Module):
    config_class = DinoSRConfig

    def __init__(self, cfg: DinoSRConfig | None = None) -> None:
        super().__init__()
        cfg = self.config_class() if cfg is None else cfg
        self.cfg = cfg
        dim = cfg.encoder_embed_dim
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg.extractor_conv_layer_config[-1][0], dim)
        self.student = Transformer(cfg)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, cfg.codebook_size), nn.LogSoftmax(dim=-1)) for _ in range(cfg.num_codebooks)
        )
        self.codebooks = EMACodebooks(cfg.num_codebooks, cfg.codebook_size, dim, cfg.codebook_decay)
        # Official: the teacher starts as a freshly initialised float32 copy of the student, outside autograd.
        self.teacher = copy.deepcopy(self.student).float()
        self.teacher.apply(Transformer.init_weights)
        self.teacher.requires_grad_(requires_grad=False)
        self.teacher.eval()
        self.projection_dropout = nn.Dropout(cfg.encoder_projection_dropout)
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.current_step: Tensor
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.int64))
        self.freeze_step = cfg.freeze_step
        self._extractor_frozen = False
        # Official behaviour: a training forward updates the codebooks. When True, forward returns the batch
        # statistics instead ("codebook_counts", "codebook_sums") and `update_codebooks` applies them.
        self.defer_codebook_updates = False

    @property
    def num_codebooks(self) -> int:
        return len(self.codebooks)

    @property
    def extractor_frozen(self) -> bool:
        """Whether the feature extractor and projection are frozen (from freeze_step on): they take no gradient."""
        return self._extractor_frozen

    def compile_encoders(self, backend: str = "inductor") -> None:
        """torch.compile the student's and the teacher's transformer layers with dynamic batch and time sizes from
        the first call, so cropped batches of every length share one graph each and nothing recompiles after
        warm-up; and the feature extractor, where `ops.feature_extractor` runs it channels-last (a GPU, layer_norm
        mode): its layers are custom ops there. Its reference, the official strided convolutions, stays eager:
        inductor (torch 2.13) fails on their symbolic lengths (ValueRangeError), and padding batches to fixed length
        buckets instead would spend compute on padding and change the official crop."""
        self.student.compile_layers(backend)
        self.teacher.compile_layers(backend)
        device = self.mask_embedding.device
        if self.cfg.extractor_mode == "layer_norm" and backend_name("feature_extractor", device) != "reference":
            self.feature_extractor.forward = torch.compile(self.feature_extractor.forward, backend=backend, dynamic=True)

    def train(self, mode: bool = True) -> "DinoSR":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops anything
        return self

    # --- teacher ---------------------------------------------------------------------------------------------------

    def ema_decay(self, step: int) -> float:
        """Linear from ema_start_decay to ema_final_decay over ema_final_step steps, then 1 from freeze_step."""
        cfg = self.cfg
        if step < cfg.ema_final_step:
            return cfg.ema_final_decay - (cfg.ema_final_decay - cfg.ema_start_decay) * (1 - step / cfg.ema_final_step)
        return cfg.ema_final_decay if step < cfg.freeze_step else 1.0

    def freeze_extractor(self) -> None:
        self.feature_extractor.requires_grad_(requires_grad=False)
        self.feature_projection.requires_grad_(requires_grad=False)
        self._extractor_frozen = True

    @torch.no_grad()
    def update_ema(self, step: int) -> float:
        """Move the teacher towards the student with this step's decay (returned); freeze at freeze_step."""
        self.current_step.fill_(step)
        decay = self.ema_decay(step)
        if not self._extractor_frozen and step >= self.freeze_step:
            self.freeze_extractor()
        if 0.0 < decay < 1.0:
            lerp_teacher, lerp_student, copy_teacher, copy_student = [], [], [], []
            excluded = tuple(self.cfg.ema_exclude_layers)
            for (name, teacher_param), student_param in zip(
                self.teacher.named_parameters(), self.student.parameters(), strict=True
            ):
                if name.startswith(excluded):
                    copy_teacher.append(teacher_param)
                    copy_student.append(student_param)
                else:
                    lerp_teacher.append(teacher_param)
                    lerp_student.append(student_param)
            if lerp_teacher:
                torch._foreach_lerp_(lerp_teacher, lerp_student, 1 - decay)
            if copy_teacher:
                torch._foreach_copy_(copy_teacher, copy_student)
        return decay

    # --- features --------------------------------------------------------------------------------------------------

    def _features(self, waveforms: Tensor) -> Tensor:
        if waveforms.dim() != 2 or not waveforms.is_floating_point():
            raise ValueError(
                f"waveforms must be float of shape (B, samples), got {waveforms.dtype} {tuple(waveforms.shape)}"
            )
        return self.feature_projection(self.feature_extractor(waveforms))

    def get_intermediate_outputs(self, waveforms: Tensor, *, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Each student layer's output before the residual, (B, T, D) each, first layer first."""
        x = self._features(waveforms)
        return self.student.get_intermediate_outputs(x, _frame_mask(attention_mask, *x.shape[:2]))

    def _head_inputs(self, waveforms: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """What each head reads, (B, T, D) each; DinoSR: the student's last output for every head."""
        x = self._features(waveforms)
        return [self.student(x, _frame_mask(attention_mask, *x.shape[:2]))] * self.num_codebooks

    def get_codebooks(
        self, waveform: Tensor, *, attention_mask: Tensor | None = None, onehot: bool = False
    ) -> list[Tensor | None]:
        """Per student layer, the head's codeword probabilities (one-hot argmax with `onehot`), None where no head
        reads that layer. As the official, size-1 dimensions are squeezed."""
        units: list[Tensor | None] = [None] * (len(self.student.layers) - self.num_codebooks)
        for head, y in zip(self.heads, self._head_inputs(waveform, attention_mask), strict=True):
            probs = head(y).float().exp().squeeze()
            units.append(nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]) if onehot else probs)
        return units

    @torch.no_grad()
    def get_targets(self, waveforms: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """The codewords that the EMA codebooks assign to the teacher's last layers at every frame: the training
        targets, (L, B, T) int64."""
        feats = self._features(waveforms)
        batch, frames, _ = feats.shape
        frame_mask = _frame_mask(attention_mask, batch, frames)
        _, teacher_layers = self.teacher.run_layers(feats, frame_mask, keep_last=self.num_codebooks)
        every_frame = torch.arange(batch * frames, device=feats.device)
        labels, _, _ = self.codebooks.assign_layers(teacher_layers, every_frame)
        return labels.view(-1, batch, frames)

    # --- objective -------------------------------------------------------------------------------------------------

    def _student_predictions(self, x: Tensor, frame_mask: Tensor | None, frame_index: Tensor) -> Tensor:
        """(L, N, D): the frames each head reads."""
        y = self.student(x, frame_mask).flatten(0, 1).index_select(0, frame_index)
        return y.expand(self.num_codebooks, *y.shape)

    def forward(
        self,
        waveforms: Tensor,
        *,
        mask_indices: Tensor | None = None,
        mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss per masked frame (N,) and the target and prediction perplexities, averaged over codebooks.

        Args:
            waveforms: (B, samples).
            mask_indices: (B, M) int64 masked frames, the same count per row; or `mask` (B, T) bool.
                With neither, no frame is masked and every frame takes a loss.
            attention_mask: (B, 1, 1, T) or (B, T) bool, True on real frames; None when nothing is padded.
        """
        feats = self._features(waveforms)
        batch, frames, _ = feats.shape
        frame_mask = _frame_mask(attention_mask, batch, frames)
        embedded, frame_index = _masking(mask_indices, mask, batch, frames, feats.device)
        x = self.projection_dropout(feats.clone())
        if embedded is not None:
            x = torch.where(embedded.unsqueeze(-1), self.mask_embedding.to(x.dtype).expand_as(x), x)
        predictions = self._student_predictions(x, frame_mask, frame_index)

        with torch.no_grad():
            _, teacher_layers = self.teacher.run_layers(feats, frame_mask, keep_last=self.num_codebooks)
            # Official targets: statistics over all T frames, padding included (no lengths), fused with assignment.
            labels, batch_counts, batch_sums = self.codebooks.assign_layers(teacher_layers, frame_index)

        weight = torch.stack([head[0].weight for head in self.heads])
        bias = torch.stack([head[0].bias for head in self.heads])
        loss, mean_probs = ops.heads_cross_entropy(predictions, weight, bias, labels)
        if self.defer_codebook_updates:
            num_frames = batch_counts[0].sum().clamp_min(1)
            return loss, {
                "target_ppl": perplexity(batch_counts / num_frames).sum() / self.num_codebooks,
                "pred_ppl": perplexity(mean_probs).sum() / self.num_codebooks,
                "codebook_counts": batch_counts,
                "codebook_sums": batch_sums,
            }
        target_probs, pred_probs = self._sync_statistics_and_update_codebooks(batch_counts, batch_sums, mean_probs)
        return loss, {
            "target_ppl": perplexity(target_probs).sum() / self.num_codebooks,
            "pred_ppl": perplexity(pred_probs).sum() / self.num_codebooks,
        }

    @torch.no_grad()
    def _sync_statistics_and_update_codebooks(
        self, batch_counts: Tensor, batch_sums: Tensor, mean_probs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Sum the batch statistics over ranks in one all-reduce, update the codebooks in training, and return the
        target and prediction distributions over codewords (L, K) of the global batch."""
        update = self.training and self.codebooks.decay < 1.0
        num_frames = batch_counts[0].sum()
        if is_distributed():
            parts = [batch_counts, mean_probs * num_frames, num_frames] + ([batch_sums] if update else [])
            batch_counts, prob_sums, num_frames, *rest = sum_over_ranks(*parts)
            batch_sums = rest[0] if update else batch_sums
            mean_probs = prob_sums / num_frames.clamp_min(1)
        if update:
            self.codebooks.update_(batch_counts, batch_sums)
        return batch_counts / num_frames.clamp_min(1), mean_probs

    @torch.no_grad()
    def update_codebooks(self, batch_counts: Tensor, batch_sums: Tensor) -> None:
        """Apply the statistics that forward returned with `defer_codebook_updates`, summed over micro-batches:
        one all-reduce over ranks, then the EMA update. For gradient accumulation and skipped steps."""
        if self.codebooks.decay >= 1.0:
            return
        self.codebooks.update_(*sum_over_ranks(batch_counts, batch_sums))
