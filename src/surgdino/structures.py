"""Small shared types: NestedTensor (GroundingDINO/DETR's padded batch) and image batching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class NestedTensor:
    """A padded batch ``tensors [B, C, H, W]`` with ``mask [B, H, W]`` (True = padding)."""

    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor | None):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> NestedTensor:
        mask = self.mask.to(device, non_blocking=non_blocking) if self.mask is not None else None
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor({tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def batch_images(images: Sequence[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0) -> NestedTensor:
    """Pad ``[C, Hi, Wi]`` images to one ``[B, C, H, W]`` tensor (H, W multiples of ``size_divisibility``)."""
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    h = max(int(img.shape[-2]) for img in images)
    w = max(int(img.shape[-1]) for img in images)
    if size_divisibility > 1:
        h = (h + size_divisibility - 1) // size_divisibility * size_divisibility
        w = (w + size_divisibility - 1) // size_divisibility * size_divisibility
    batch = images[0].new_full((len(images), images[0].shape[0], h, w), pad_value)
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        mask[i, : img.shape[-2], : img.shape[-1]] = False
    return NestedTensor(batch, mask)


def nested_tensor_from_images(images: Sequence[torch.Tensor], size_divisibility: int = 0) -> NestedTensor:
    """Alias kept for GroundingDINO-style code."""
    return batch_images(images, size_divisibility)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Padding mask ``[B, H, W]`` (bool) reduced to ``size`` by nearest interpolation."""
    return F.interpolate(mask[None].float(), size=size, mode="nearest")[0].bool()
