"""The GroundingDINO meta-architecture (``MODEL.META_ARCHITECTURE GroundingDINO``): per-image dicts in;
weighted losses (train) or per-image ``{"boxes", "scores", "labels"}`` (eval) out, as MaskDINO.

Class names come from the dataset metadata (``class_names``) and become the prompt; ``forward_hf``
and ``from_hf_pretrained`` give transformers' interface for checkpoint parity.
"""

from __future__ import annotations

import torch

from surgdino.modeling.grounding.detector import GroundingDINODetector
from surgdino.registry import META_ARCH_REGISTRY


@META_ARCH_REGISTRY.register("GroundingDINO")
class GroundingDINO(GroundingDINODetector):
    """Detector + (optional) criterion, post-processing and prompt of class names."""

    def __init__(self, *, criterion=None, postprocessor=None, prompt=None, pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None, size_divisibility: int = 32, **detector_kwargs):
        super().__init__(**detector_kwargs)
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.prompt = prompt
        self.size_divisibility = max(size_divisibility, getattr(self.backbone, "size_divisibility", 0) or 0)
        mean = pixel_mean or [123.675, 116.28, 103.53]
        std = pixel_std or [58.395, 57.12, 57.375]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> GroundingDINO:
        from surgdino.modeling.grounding.build import build_grounding_dino

        return build_grounding_dino(cls, cfg)

    @classmethod
    def from_hf_pretrained(cls, folder: str) -> GroundingDINO:
        """A transformers ``GroundingDinoForObjectDetection`` folder (config.json + model.safetensors)."""
        from surgdino.modeling.grounding.hf import detector_kwargs, load_hf_state_dict, read_hf_folder

        config, state = read_hf_folder(folder)
        model = cls(**detector_kwargs(config))
        load_hf_state_dict(model, state, source=folder)
        return model.eval()

    def forward_hf(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """transformers' inputs (``pixel_mask`` 1 = image) → ``{"logits" [B, Q, 256], "pred_boxes" [B, Q, 4]}``."""
        b, _, h, w = pixel_values.shape
        pad = (torch.zeros(b, h, w, dtype=torch.bool, device=pixel_values.device) if pixel_mask is None
               else ~pixel_mask.bool())
        text = self.encode_text(input_ids, attention_mask, token_type_ids)
        out = self.forward_tensors(pixel_values, pad, **text)
        return {"logits": out["pred_logits"][-1], "pred_boxes": out["pred_boxes"][-1]}
