"""SpidR: DinoSR where head i reads the output (before the residual) of student layer i of the last L, the
teacher follows an exponential EMA schedule, and the student's unused last norm is frozen."""

import math

from torch import Tensor

from spidr_fast.models.config import SpidRConfig
from spidr_fast.models.dinosr import DinoSR


class SpidR(DinoSR):
    config_class = SpidRConfig
    cfg: SpidRConfig

    def __init__(self, cfg: SpidRConfig | None = None) -> None:
        super().__init__(cfg)
        # No loss reads the student's last norm: freezing it lets DDP run without find_unused_parameters.
        unused_norm = (
            self.student.layer_norm if self.cfg.encoder_layer_norm_first else self.student.layers[-1].final_layer_norm
        )
        unused_norm.requires_grad_(requires_grad=False)

    def ema_decay(self, step: int) -> float:
        """1 - (1 - ema_start_decay) · exp(-step / ema_timescale), and 1 once 1 - decay <= ema_threshold."""
        cfg = self.cfg
        decay = 1 - (1 - cfg.ema_start_decay) * math.exp(-step / cfg.ema_timescale)
        return decay if 1 - decay > cfg.ema_threshold else 1.0

    def _head_inputs(self, waveforms: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        return self.get_intermediate_outputs(waveforms, attention_mask=attention_mask)[-self.num_codebooks :]

    def _student_predictions(self, x: Tensor, frame_mask: Tensor | None, frame_index: Tensor) -> Tensor:
        _, layers = self.student.run_layers(x, frame_mask, keep_last=self.num_codebooks)
        return layers.flatten(1, 2).index_select(1, frame_index)
