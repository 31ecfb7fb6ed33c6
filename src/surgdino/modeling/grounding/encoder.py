"""GroundingDINO's feature enhancer: per layer image↔text fusion, text self-attention (sub-sentence
mask, per-phrase position ids) and deformable image self-attention, each followed by its FFN.

TODO(unify): core (issue 10) extracts a generic deformable encoder with a per-layer hook; this
enhancer becomes that encoder + the fusion/text hook once it is on main.
"""

from __future__ import annotations

import torch
from torch import nn

from surgdino.modeling.grounding.attention import (
    FusionLayer,
    TextEnhancerLayer,
    activation_fn,
    sine_embedding_1d,
)
from surgdino.modeling.layers import MSDeformAttn
from surgdino.modeling.pixel_decoder import encoder_reference_points


class DeformableLayer(nn.Module):
    """Post-norm deformable self-attention over all levels + FFN."""

    def __init__(self, dim: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int,
                 dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.act = activation_fn(activation)

    def forward(self, src, pos, ref, shapes, pad):
        out = self.self_attn(src + pos, ref, src, shapes, None, pad)
        src = self.self_attn_layer_norm(src + self.dropout(out))
        out = self.fc2(self.dropout(self.act(self.fc1(src))))
        return self.final_layer_norm(src + self.dropout(out))


class EnhancerLayer(nn.Module):
    def __init__(self, *, dim: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int, dropout: float,
                 text_dropout: float, fusion_dropout: float, fusion_droppath: float, activation: str,
                 use_fusion: bool, use_text_enhancer: bool):
        super().__init__()
        self.fusion_layer = (FusionLayer(dim, ffn_dim // 2, n_heads // 2, fusion_dropout, fusion_droppath)
                             if use_fusion else None)
        self.text_enhancer_layer = (TextEnhancerLayer(dim, ffn_dim // 2, n_heads // 2, text_dropout, activation)
                                    if use_text_enhancer else None)
        self.deformable_layer = DeformableLayer(dim, ffn_dim, n_levels, n_heads, n_points, dropout, activation)


class FeatureEnhancer(nn.Module):
    """``num_layers`` × (fusion → text self-attention → deformable image self-attention)."""

    def __init__(self, *, num_layers: int = 6, dim: int = 256, ffn_dim: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0, text_dropout: float = 0.0,
                 fusion_dropout: float = 0.0, fusion_droppath: float = 0.1, activation: str = "relu",
                 use_fusion: bool = True, use_text_enhancer: bool = True):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(EnhancerLayer(
            dim=dim, ffn_dim=ffn_dim, n_levels=n_levels, n_heads=n_heads, n_points=n_points, dropout=dropout,
            text_dropout=text_dropout, fusion_dropout=fusion_dropout, fusion_droppath=fusion_droppath,
            activation=activation, use_fusion=use_fusion, use_text_enhancer=use_text_enhancer)
            for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, shapes: list[tuple[int, int]],
                ratios: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor,
                text_blocked: torch.Tensor | None, text_position_ids: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """src/pos [B, S, D], pad [B, S] (True = padding), ratios [B, L, 2]; text [B, T, D], text_pad [B, T],
        text_blocked [B, T, T] (True = may not attend), text_position_ids [B, T] → (src, text)."""
        ref = encoder_reference_points(shapes, ratios)  # [B, S, L, 2]
        if text_position_ids is None:
            text_position_ids = torch.arange(text.shape[1], device=text.device).expand(text.shape[0], -1)
        text_pos = sine_embedding_1d(text_position_ids, self.dim).to(text.dtype)  # [B, T, D]
        for layer in self.layers:
            if layer.fusion_layer is not None:
                src, text = layer.fusion_layer(src, text, pad, text_pad)
            if layer.text_enhancer_layer is not None:
                text = layer.text_enhancer_layer(text, text_blocked, text_pos)
            src = layer.deformable_layer(src, pos, ref, shapes, pad)
        return src, text
