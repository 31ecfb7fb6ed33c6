"""The module that is exported: uint8 pixels + padding mask in, MaskDINO's raw head outputs out."""

from __future__ import annotations

import torch
from torch import nn

from surgdino.errors import SurgDinoError
from surgdino.modeling.maskdino.model import RAW_OUTPUTS


class ExportModule(nn.Module):
    """``images`` uint8 ``[B, 3, H, W]`` (resized like evaluation, padded bottom/right with anything),
    ``pad_mask`` bool ``[B, H, W]`` (True = padding) → ``RAW_OUTPUTS`` of ``model.forward_tensors``.

    Normalisation happens here, in the graph: ``(x - mean) / std`` with padding set to 0, which is what
    the model's ``Preprocessor`` gives (it normalises, then pads with zeros). The PyTorch predictor runs
    this same module, so both paths see the same inputs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "forward_tensors", None)) or not hasattr(model, "preprocessor"):
            raise SurgDinoError(f"MODEL.META_ARCHITECTURE {type(model).__name__} cannot be exported: it has no "
                                "tensor-only forward (forward_tensors(images, pad_mask)) and preprocessor; "
                                "export supports MaskDINO (MaskDINODecoder and DIMaskDINODecoder)")
        self.model = model

    def forward(self, images: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pre = self.model.preprocessor
        x = (images.float() - pre.pixel_mean) / pre.pixel_std  # [B, 3, H, W]
        x = x.masked_fill(pad_mask[:, None], 0.0)
        out = self.model.forward_tensors(x, pad_mask)
        return tuple(out[k] for k in RAW_OUTPUTS)
