"""Model inputs from per-image dicts: normalised, padded images, their padding mask and training
targets. What ``MaskDINO.forward_tensors`` needs is tensors only; this is the list-of-dicts side."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.layers.geometry import box_xyxy_to_cxcywh
from surgdino.structures import batch_images


@dataclass
class Batch:
    """``images [B, 3, H, W]`` normalised and padded, ``pad_mask [B, H, W]`` (True = padding), per image
    ``image_sizes`` (h, w) unpadded and ``out_sizes`` (height, width) wanted for results; ``targets`` in training."""

    images: torch.Tensor
    pad_mask: torch.Tensor
    image_sizes: list[tuple[int, int]]
    out_sizes: list[tuple[int, int]]
    targets: list[dict] | None = None


class Preprocessor(nn.Module):
    """``(image - pixel_mean) / pixel_std``, padding to a multiple of ``size_divisibility``; targets as the
    criterion takes them: ``labels [N]``, ``boxes [N, 4]`` cxcywh normalised to the image, ``masks [N, H, W]``
    padded like the batch. Mean and std are non-persistent buffers (they follow the model's device)."""

    def __init__(self, pixel_mean: list[float], pixel_std: list[float], size_divisibility: int = 32):
        super().__init__()
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    def targets(self, batched_inputs: list[dict], padded: tuple[int, int]) -> list[dict]:
        out = []
        dev = self.pixel_mean.device
        for x in batched_inputs:
            inst = x["instances"]
            h, w = x["image"].shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=dev)
            masks = inst["masks"].to(dev).bool()
            masks = F.pad(masks, (0, padded[1] - w, 0, padded[0] - h))  # [N, Hp, Wp]
            out.append({"labels": inst["classes"].to(dev).long(),
                        "boxes": box_xyxy_to_cxcywh(inst["boxes"].to(dev).float() / scale), "masks": masks})
        return out

    def forward(self, batched_inputs: list[dict], with_targets: bool = False) -> Batch:
        dev = self.pixel_mean.device
        images = [(x["image"].to(dev).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        batch = batch_images(images, self.size_divisibility)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        outs = [(int(x.get("height", h)), int(x.get("width", w))) for x, (h, w) in zip(batched_inputs, sizes)]
        targets = self.targets(batched_inputs, tuple(batch.tensors.shape[-2:])) if with_targets else None
        return Batch(batch.tensors, batch.mask, sizes, outs, targets)
