"""MaskDINO's pixel decoder: a multi-scale deformable encoder over backbone levels, then an FPN-style
fusion with the stride-4 level into the mask features that every query's mask is a dot product with.

Padding is honoured everywhere: deformable attention ignores padded tokens, group norms take their
statistics from the unpadded region only, and convolutions see zeros beyond the image, so an image
gives the same features alone or padded inside a batch.

``official=True`` computes as IDEA-Research/MaskDINO's ``MaskDINOEncoder`` (``MODEL.MaskDINO.ARCHITECTURE
official``): input projections with a conv bias; for a fine-first encoder, its extra levels appended coarsest
first; with more than one extra level, their position embeddings in creation order whatever the levels' order
(its code reverses the extra levels but not their positions); at least one FPN level (with res2 in the encoder,
res2 is fused again, as ``adapter_1``). Padding is then ignored by the meta-architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.config.keys.maskdino import encoder_in_features, encoder_level_order, is_official
from surgdino.modeling.backbone.base import ShapeSpec
from surgdino.modeling.layers.deformable_encoder import DeformableEncoder
from surgdino.modeling.layers.masked_norm import ConvNorm
from surgdino.registry import PIXEL_DECODER_REGISTRY
from surgdino.structures import resize_mask


@PIXEL_DECODER_REGISTRY.register("MaskDINOEncoder")
class MaskDINOEncoder(DeformableEncoder):
    """Input projections → the generic deformable encoder over ``transformer_in_features`` (+ extra stride-2 levels up to
    ``total_num_feature_levels``), then mask features at ``common_stride`` fused from the finer backbone levels.

    ``forward(features, pad_mask)`` returns ``mask_features [B, mask_dim, H/4, W/4]``, the encoder's
    levels (coarse first for ``low2high``) and their padding masks. Modules are created in their
    historical order (projections, encoder, FPN), hence ``build_encoder`` instead of the base ``__init__``.
    """

    def __init__(self, *, input_shape: dict[str, ShapeSpec], transformer_in_features: list[str],
                 conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN", num_heads: int = 8,
                 n_points: int = 4, dim_feedforward: int = 1024, dropout: float = 0.0, enc_layers: int = 6,
                 total_num_feature_levels: int = 4, common_stride: int = 4, feature_order: str = "low2high",
                 official: bool = False):
        nn.Module.__init__(self)
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
        self.official = official
        bias = True if official else None
        self.input_proj = nn.ModuleList(ConvNorm(input_shape[f].channels, conv_dim, 1, norm=norm, bias=bias)
                                        for f in enc)
        cin = input_shape[enc[-1]].channels
        extra = []
        for _ in range(self.num_extra):
            extra.append(ConvNorm(cin, conv_dim, 3, stride=2, norm=norm, bias=bias))
            cin = conv_dim
        self.extra_proj = nn.ModuleList(extra)
        self.build_encoder(conv_dim, dim_feedforward, dropout, total_num_feature_levels, num_heads, n_points,
                           enc_layers)
        # FPN fusion: backbone levels finer than the finest encoder level, down to common_stride
        finest = input_shape[enc[0]].stride
        self.fpn_features = [f for f in by_stride if common_stride <= input_shape[f].stride < finest][::-1]
        if official and not self.fpn_features:  # MaskDINO fuses at least one level (res2 even when encoded)
            self.fpn_features = by_stride[:1]
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
            feature_order=encoder_level_order(cfg), official=is_official(cfg))

    def forward(self, features: dict[str, torch.Tensor], pad_mask: torch.Tensor  # type: ignore[override]
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """features {name: [B, C, Hl, Wl]}; pad_mask [B, H, W] (True = padding) of the input images."""
        srcs, masks = [], []
        for f, proj in zip(self.enc_features, self.input_proj):  # fine → coarse
            m = resize_mask(pad_mask, features[f].shape[-2:])
            x, _ = proj(features[f], m)
            srcs.append(x)
            masks.append(m)
        x, m = features[self.enc_features[-1]], masks[-1]
        extra_srcs, extra_masks = [], []
        for proj in self.extra_proj:
            x, m = proj(x, m)
            extra_srcs.append(x)
            extra_masks.append(m)
        if self.feature_order == "low2high":  # coarse first
            srcs, masks = (srcs + extra_srcs)[::-1], (masks + extra_masks)[::-1]
        elif self.official:  # MaskDINO appends its extra levels coarsest first after the fine-first ones
            srcs, masks = srcs + extra_srcs[::-1], masks + extra_masks[::-1]
        else:
            srcs, masks = srcs + extra_srcs, masks + extra_masks
        pos_levels = None
        if self.official and len(extra_srcs) > 1:  # MaskDINO's positions of the extra levels: creation order
            n = len(srcs) - len(extra_srcs)
            at = 0 if self.feature_order == "low2high" else n
            pos_levels = list(zip(srcs, masks))
            pos_levels[at:at + len(extra_srcs)] = list(zip(extra_srcs, extra_masks))
        src, levels = super().forward(srcs, masks, pos_levels=pos_levels)
        outs = levels.unflatten(src)  # [B, D, Hl, Wl]
        shapes = levels.shapes
        finest = int(max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1]))
        y, y_mask = outs[finest], masks[finest]
        for f, lat, out in zip(self.fpn_features, self.lateral, self.output):
            m = resize_mask(pad_mask, features[f].shape[-2:])
            cur, _ = lat(features[f], m)
            y = cur + F.interpolate(y, size=cur.shape[-2:], mode="bilinear", align_corners=False)
            y, y_mask = out(y, m)
        mask_features = self.mask_features(y).masked_fill(y_mask[:, None], 0.0)  # [B, mask_dim, H/4, W/4]
        return mask_features, outs, masks
