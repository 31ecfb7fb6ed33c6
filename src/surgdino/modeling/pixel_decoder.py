"""MaskDINO's pixel decoder: a multi-scale deformable encoder over backbone levels, then an FPN-style
fusion with the stride-4 level into the mask features that every query's mask is a dot product with.

Padding is honoured everywhere: deformable attention ignores padded tokens, group norms take their
statistics from the unpadded region only, and convolutions see zeros beyond the image, so an image
gives the same features alone or padded inside a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.config.keys.maskdino import encoder_in_features
from surgdino.modeling.backbone.base import ShapeSpec
from surgdino.modeling.layers import MSDeformAttn, PositionEmbeddingSine
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


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "GN":
        return MaskedGroupNorm(32 if channels % 32 == 0 else 1, channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "LN":
        return MaskedGroupNorm(1, channels)
    return nn.Identity()


class ConvNorm(nn.Module):
    """Conv → norm (→ ReLU) that zeroes padded positions before the conv and uses masked statistics."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, norm: str = "GN", relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm)
        self.norm = _norm(norm, cout)
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


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention, then a feed-forward network."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor) -> torch.Tensor:
        out = self.self_attn(src + pos, reference_points, src, spatial_shapes, None, padding_mask)
        src = self.norm1(src + self.dropout(out))
        out = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(out))


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per level the unpadded fraction of height and width: masks [B, H, W] → ``[B, L, 2]`` (w, h)."""
    out = []
    for m in masks:
        h, w = m.shape[-2:]
        vh = (~m[:, :, 0]).sum(1).float() / h
        vw = (~m[:, 0, :]).sum(1).float() / w
        out.append(torch.stack([vw, vh], -1))
    return torch.stack(out, 1)


def encoder_reference_points(shapes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every token, normalised to its image's unpadded extent and projected to every
    level: ``[B, S, L, 2]`` (x, y)."""
    device = ratios.device
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)  # [B, h*w]
        rx = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([rx, ry], -1))
    ref = torch.cat(refs, 1)  # [B, S, 2]
    return ref[:, :, None] * ratios[:, None]  # [B, S, L, 2]


class MaskDINOEncoder(nn.Module):
    """Deformable encoder over ``transformer_in_features`` (+ extra stride-2 levels up to
    ``total_num_feature_levels``), then mask features at ``common_stride`` fused from the finer backbone levels.

    ``forward(features, pad_mask)`` returns ``mask_features [B, mask_dim, H/4, W/4]``, the encoder's
    levels (coarse first for ``low2high``) and their padding masks.
    """

    def __init__(self, *, input_shape: dict[str, ShapeSpec], transformer_in_features: list[str],
                 conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN", num_heads: int = 8,
                 n_points: int = 4, dim_feedforward: int = 1024, dropout: float = 0.0, enc_layers: int = 6,
                 total_num_feature_levels: int = 4, common_stride: int = 4, feature_order: str = "low2high"):
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"encoder features {missing} not produced by the backbone ({sorted(input_shape)})")
        by_stride = sorted(input_shape, key=lambda k: input_shape[k].stride)
        enc = sorted(transformer_in_features, key=lambda k: input_shape[k].stride)  # fine → coarse
        self.enc_features = enc
        self.num_extra = total_num_feature_levels - len(enc)
        if self.num_extra < 0:
            raise ValueError("total_num_feature_levels must be >= the number of encoder input features")
        self.feature_order = feature_order
        self.total_levels = total_num_feature_levels
        self.input_proj = nn.ModuleList(ConvNorm(input_shape[f].channels, conv_dim, 1, norm=norm) for f in enc)
        cin = input_shape[enc[-1]].channels
        extra = []
        for _ in range(self.num_extra):
            extra.append(ConvNorm(cin, conv_dim, 3, stride=2, norm=norm))
            cin = conv_dim
        self.extra_proj = nn.ModuleList(extra)
        self.pe = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(total_num_feature_levels, conv_dim).normal_())
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(conv_dim, dim_feedforward, dropout, total_num_feature_levels, num_heads, n_points)
            for _ in range(enc_layers))
        # FPN fusion: backbone levels finer than the finest encoder level, down to common_stride
        finest = input_shape[enc[0]].stride
        self.fpn_features = [f for f in by_stride if common_stride <= input_shape[f].stride < finest][::-1]
        if finest > common_stride and not self.fpn_features:
            raise ValueError(f"no backbone level at stride {common_stride} for the mask features")
        self.lateral = nn.ModuleList(ConvNorm(input_shape[f].channels, conv_dim, 1, norm=norm) for f in self.fpn_features)
        self.output = nn.ModuleList(ConvNorm(conv_dim, conv_dim, 3, norm=norm, relu=True) for _ in self.fpn_features)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        nn.init.xavier_uniform_(self.mask_features.weight)
        nn.init.zeros_(self.mask_features.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        h = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            input_shape={k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
            transformer_in_features=encoder_in_features(cfg), conv_dim=h.CONVS_DIM, mask_dim=h.MASK_DIM,
            norm=h.NORM, num_heads=h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            n_points=h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS, dim_feedforward=h.DIM_FEEDFORWARD,
            dropout=cfg.MODEL.MaskDINO.DROPOUT, enc_layers=h.TRANSFORMER_ENC_LAYERS,
            total_num_feature_levels=h.TOTAL_NUM_FEATURE_LEVELS, common_stride=h.COMMON_STRIDE,
            feature_order=h.FEATURE_ORDER)

    def forward(self, features: dict[str, torch.Tensor], pad_mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """features {name: [B, C, Hl, Wl]}; pad_mask [B, H, W] (True = padding) of the input images."""
        srcs, masks = [], []
        for f, proj in zip(self.enc_features, self.input_proj):  # fine → coarse
            m = resize_mask(pad_mask, features[f].shape[-2:])
            x, _ = proj(features[f], m)
            srcs.append(x)
            masks.append(m)
        x, m = features[self.enc_features[-1]], masks[-1]
        for proj in self.extra_proj:
            x, m = proj(x, m)
            srcs.append(x)
            masks.append(m)
        if self.feature_order == "low2high":  # coarse first, as MaskDINO
            srcs, masks = srcs[::-1], masks[::-1]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [self.pe(s, m).flatten(2).transpose(1, 2) + self.level_embed[i][None, None]
               for i, (s, m) in enumerate(zip(srcs, masks))]  # each [B, HW, D]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, D]
        pos = torch.cat(pos, 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        ratios = valid_ratios(masks)  # [B, L, 2]
        ref = encoder_reference_points(shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, mask_flat)
        outs = [o.transpose(1, 2).reshape(o.shape[0], -1, h, w)
                for o, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]  # [B, D, Hl, Wl]
        finest = int(max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1]))
        y, y_mask = outs[finest], masks[finest]
        for f, lat, out in zip(self.fpn_features, self.lateral, self.output):
            m = resize_mask(pad_mask, features[f].shape[-2:])
            cur, _ = lat(features[f], m)
            y = cur + F.interpolate(y, size=cur.shape[-2:], mode="bilinear", align_corners=False)
            y, y_mask = out(y, m)
        mask_features = self.mask_features(y).masked_fill(y_mask[:, None], 0.0)  # [B, mask_dim, H/4, W/4]
        return mask_features, outs, masks
