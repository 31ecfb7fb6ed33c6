"""Sine position encodings: 2-D maps for feature levels (DETR) and per-query embeddings of points/boxes (DINO)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding; with a padding mask, positions are normalised by each image's unpadded extent.

    ``offset`` is added to the 1-based pixel index before normalising: 0 as in DETR/Mask2Former/MaskDINO
    (whose checkpoints expect it), -0.5 would be Deformable DETR's pixel-centre variant.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float | None = None, offset: float = 0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], mask [B, H, W] (True = padding) or None → [B, 2*num_pos_feats, H, W] (y then x)."""
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # [B, H, W] 1..h inside the image
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            # the last row/column holds the unpadded extent (cumsum stops growing in the padding)
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]
        return pos.to(x.dtype)


def _sine(coord: torch.Tensor, dim_t: torch.Tensor) -> torch.Tensor:
    """coord [...] (already × 2π) → [..., F] interleaved sin/cos."""
    pos = coord[..., None] / dim_t  # [..., F]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def gen_sineembed_for_position(pos_tensor: torch.Tensor, d_model: int = 256,
                               temperature: float = 10000) -> torch.Tensor:
    """DINO's query position embedding: pos [..., 2] (x, y) → [..., d_model] as (y, x); pos [..., 4]
    (x, y, w, h) → [..., 2*d_model] as (y, x, w, h). Coordinates are normalised to [0, 1]."""
    if pos_tensor.shape[-1] not in (2, 4):
        raise ValueError(f"pos_tensor last dim must be 2 or 4, got {pos_tensor.shape[-1]}")
    half = d_model // 2
    scale = 2 * math.pi
    dim_t = torch.arange(half, dtype=torch.float32, device=pos_tensor.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    pos = pos_tensor.to(torch.float32) * scale
    parts = [_sine(pos[..., 1], dim_t), _sine(pos[..., 0], dim_t)]  # y, x
    if pos_tensor.shape[-1] == 4:
        parts += [_sine(pos[..., 2], dim_t), _sine(pos[..., 3], dim_t)]  # w, h
    return torch.cat(parts, dim=-1).to(pos_tensor.dtype)
