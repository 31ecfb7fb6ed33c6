"""The modules that are exported: uint8 pixels + padding mask in, raw head outputs out: MaskDINO's
(``ExportModule``) or a GroundingDINO's for a fixed class list whose text features are baked in
(``GroundingExportModule``)."""

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

    outputs = RAW_OUTPUTS

    def __init__(self, model: nn.Module):
        super().__init__()
        if callable(getattr(model, "set_class_names", None)):
            raise SurgDinoError("a GroundingDINO model exports through GroundingExportModule(model, class_names)")
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


GROUNDING_OUTPUTS = ("pred_logits", "pred_boxes")


class GroundingExportModule(nn.Module):
    """A GroundingDINO for the fixed prompt of ``class_names``: ``images`` uint8 ``[B, 3, H, W]`` and
    ``pad_mask`` as ``ExportModule`` → the last decoder layer's ``pred_logits [B, Q, T]`` (token logits
    of the prompt's T tokens, -inf off the text) and ``pred_boxes [B, Q, 4]`` (cxcywh normalised to each image's unpadded extent).

    The text encoder runs once, here: its projected features and masks are buffers (constants of the
    graph); ``positive_map [C, T]`` maps tokens to classes for the post-processing."""

    outputs = GROUNDING_OUTPUTS

    def __init__(self, model: nn.Module, class_names: list[str]):
        super().__init__()
        self.model = model
        model.set_class_names(class_names)
        prompt = model.prompt()
        with torch.no_grad():
            text = model.text_inputs(prompt, 1)
        self.text_names = [k for k, v in text.items() if v is not None]
        for k in self.text_names:
            self.register_buffer(k, text[k].detach().clone(), persistent=False)
        self.positive_map = prompt.positive_map.detach().clone()  # [C, T]

    def forward(self, images: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = ((images.float() - m.pixel_mean) / m.pixel_std).masked_fill(pad_mask[:, None], 0.0)  # [B, 3, H, W]
        b = images.shape[0]
        text = {k: getattr(self, k).expand(b, *getattr(self, k).shape[1:]) for k in self.text_names}
        out = m.forward_tensors(x, pad_mask, **text)
        return out["pred_logits"], out["pred_boxes"]
