"""A generic multi-scale deformable encoder (Deformable DETR's): flatten the levels, add sine + level
position embeddings, compute reference points, run the layers — with a per-layer hook.

MaskDINO's pixel decoder is this plus input projections and the mask-feature FPN; GroundingDINO's
feature enhancer is this plus, before every layer, text self-attention and image↔text fusion (a
``pre_layer`` hook that holds the text state and returns the updated image tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from surgdino.modeling.layers.blocks import DeformableEncoderLayer
from surgdino.modeling.layers.geometry import encoder_reference_points, valid_ratios
from surgdino.modeling.layers.position_encoding import PositionEmbeddingSine


@dataclass
class FlatLevels:
    """Levels flattened to tokens: ``src, pos [B, S, D]``, ``mask [B, S]`` (True = padding), ``shapes``
    per level (H, W), ``ratios [B, L, 2]`` (unpadded w, h fraction), ``ref [B, S, L, 2]`` reference points."""

    src: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    shapes: list[tuple[int, int]]
    ratios: torch.Tensor
    ref: torch.Tensor

    def unflatten(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``tokens [B, S, D]`` → per level ``[B, D, H, W]``."""
        sizes = [h * w for h, w in self.shapes]
        return [o.transpose(1, 2).reshape(o.shape[0], -1, h, w)
                for o, (h, w) in zip(tokens.split(sizes, 1), self.shapes)]


# pre_layer(i, tokens [B, S, D], levels) → tokens: runs before encoder layer i
LayerHook = Callable[[int, torch.Tensor, FlatLevels], torch.Tensor]


class DeformableEncoder(nn.Module):
    """``forward(srcs, masks, pre_layer=None)``: levels ``[B, D, Hl, Wl]`` with padding masks ``[B, Hl, Wl]``
    → encoded tokens ``[B, S, D]`` and the ``FlatLevels`` they came from.

    Parameters: ``pe`` (no weights), ``level_embed [L, D]``, ``layers.i``. A subclass that owns more modules
    may skip this ``__init__`` and call ``build_encoder`` where its modules' creation order wants it.
    """

    layer_cls = DeformableEncoderLayer

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, num_layers: int = 6):
        super().__init__()
        self.build_encoder(d_model, d_ffn, dropout, n_levels, n_heads, n_points, num_layers)

    def build_encoder(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                      n_points: int, num_layers: int, pe_temperature: float = 10000,
                      activation: str = "relu") -> None:
        """``pe_temperature`` of the sine positions (GroundingDINO: 20); ``activation`` of the layers' FFNs."""
        self.pe = PositionEmbeddingSine(d_model // 2, temperature=pe_temperature, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model).normal_())
        self.layers = nn.ModuleList(self.layer_cls(d_model, d_ffn, dropout, n_levels, n_heads, n_points,
                                                   activation=activation) for _ in range(num_layers))

    def flatten(self, srcs: list[torch.Tensor], masks: list[torch.Tensor],
                pos_levels: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> FlatLevels:
        """``pos_levels``: the (level, mask) pairs whose sine positions (+ level embedding i) are concatenated
        as the tokens' positions, default the levels themselves (MaskDINO's code misorders its extra levels')."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [self.pe(s, m).flatten(2).transpose(1, 2) + self.level_embed[i][None, None]
               for i, (s, m) in enumerate(pos_levels or zip(srcs, masks))]  # each [B, HW, D]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, D]
        pos = torch.cat(pos, 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        ratios = valid_ratios(masks)  # [B, L, 2]
        return FlatLevels(src, pos, mask_flat, shapes, ratios, encoder_reference_points(shapes, ratios))

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pre_layer: LayerHook | None = None,
                pos_levels: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, FlatLevels]:
        levels = self.flatten(srcs, masks, pos_levels)
        src = levels.src
        for i, layer in enumerate(self.layers):
            if pre_layer is not None:
                src = pre_layer(i, src, levels)
            src = layer(src, levels.pos, levels.ref, levels.shapes, levels.mask)
        return src, levels
