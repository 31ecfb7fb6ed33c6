"""Padding-aware convolution parts: a GroupNorm with statistics from unpadded positions only, and a
conv → norm (→ ReLU) block that zeroes padding before the conv, so an image gives the same features
alone or padded inside a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.structures import resize_mask


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics come from valid (unpadded) positions only; padded outputs are zero."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W]; valid [B, 1, H, W] float (1 = image) or None (plain GroupNorm)."""
        if valid is None:
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        xg = x.view(b, g, c // g, h * w)  # [B, G, C/G, HW]
        v = valid.view(b, 1, 1, h * w)
        count = (v.sum(-1, keepdim=True) * (c // g)).sum(-2, keepdim=True).clamp(min=1)  # [B, 1, 1, 1]
        mean = (xg * v).sum((-1, -2), keepdim=True) / count
        var = (((xg - mean) * v) ** 2).sum((-1, -2), keepdim=True) / count
        out = ((xg - mean) / torch.sqrt(var + self.eps)).view(b, c, h, w)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out * valid


def group_norm(channels: int) -> MaskedGroupNorm:
    """32 groups when ``channels`` allows, else one (layer-norm-like)."""
    return MaskedGroupNorm(32 if channels % 32 == 0 else 1, channels)


def make_norm(kind: str, channels: int) -> nn.Module:
    """``GN`` (masked, 32 groups), ``LN`` (masked, one group), ``BN`` or ``""`` (identity)."""
    if kind == "GN":
        return group_norm(channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "LN":
        return MaskedGroupNorm(1, channels)
    return nn.Identity()


class ConvNorm(nn.Module):
    """Conv → norm (→ ReLU) that zeroes padded positions before the conv and uses masked statistics."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, norm: str = "GN", relu: bool = False,
                 bias: bool | None = None):
        """``bias`` None: a bias only without a norm; True: always (MaskDINO's input projections)."""
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                              bias=(not norm) if bias is None else bias)
        self.norm = make_norm(norm, cout)
        self.relu = relu
        nn.init.xavier_uniform_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, C, H, W], pad_mask [B, H, W] (True = padding) → output and its padding mask."""
        if pad_mask is not None:
            x = x.masked_fill(pad_mask[:, None], 0.0)
        x = self.conv(x)
        out_mask = resize_mask(pad_mask, x.shape[-2:]) if pad_mask is not None else None
        valid = (~out_mask)[:, None].to(x.dtype) if out_mask is not None else None
        x = self.norm(x, valid) if isinstance(self.norm, MaskedGroupNorm) else self.norm(x)
        if self.relu:
            x = F.relu(x)
        return x, out_mask
