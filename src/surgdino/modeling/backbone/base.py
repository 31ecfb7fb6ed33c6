"""The backbone contract: ``forward(images [B,3,H,W]) → {name: features}``, ``output_shape()``, ``size_divisibility``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ShapeSpec:
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class of detection backbones (detectron2's contract, without detectron2)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_shape(self) -> dict[str, ShapeSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of this (0 = any size)."""
        return 0
