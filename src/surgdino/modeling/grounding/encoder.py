"""GroundingDINO's feature enhancer: the shared ``DeformableEncoder`` (deformable image self-attention + FFN
per layer) with a per-layer hook that first fuses image and text (bi-attention with layer scale) and then
runs text self-attention (sub-sentence mask, per-phrase sine positions) + FFN, the shared
``SelfAttentionLayer`` at half the image FFN width.

Parameters: ``level_embed``, ``layers.i`` (deformable), ``fusion_layers.i``, ``text_layers.i``.
"""

from __future__ import annotations

import torch
from torch import nn

from surgdino.modeling.grounding.attention import FusionLayer, sine_embedding_1d
from surgdino.modeling.layers.blocks import SelfAttentionLayer
from surgdino.modeling.layers.deformable_encoder import DeformableEncoder, FlatLevels


class FeatureEnhancer(DeformableEncoder):
    """``num_layers`` × (fusion → text self-attention → deformable image self-attention)."""

    def __init__(self, *, num_layers: int = 6, dim: int = 256, ffn_dim: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0, text_dropout: float = 0.0,
                 fusion_dropout: float = 0.0, fusion_droppath: float = 0.1, activation: str = "relu",
                 use_fusion: bool = True, use_text_enhancer: bool = True, pe_temperature: float = 20):
        nn.Module.__init__(self)
        self.dim = dim
        self.text_heads = n_heads // 2
        self.build_encoder(dim, ffn_dim, dropout, n_levels, n_heads, n_points, num_layers,
                           pe_temperature=pe_temperature, activation=activation)
        self.fusion_layers = (nn.ModuleList(FusionLayer(dim, ffn_dim // 2, n_heads // 2, fusion_dropout, fusion_droppath)
                                            for _ in range(num_layers)) if use_fusion else None)
        self.text_layers = (nn.ModuleList(SelfAttentionLayer(dim, ffn_dim // 2, text_dropout, n_heads // 2, activation)
                                          for _ in range(num_layers)) if use_text_enhancer else None)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], text: torch.Tensor,
                text_pad: torch.Tensor, text_blocked: torch.Tensor | None,
                text_position_ids: torch.Tensor | None) -> tuple[torch.Tensor, FlatLevels, torch.Tensor]:
        """Levels ``[B, D, Hl, Wl]`` with padding masks; text ``[B, T, D]``, ``text_pad [B, T]``, ``text_blocked
        [B, T, T]`` (True = may not attend), ``text_position_ids [B, T]`` → (image tokens ``[B, S, D]``, their
        ``FlatLevels``, text ``[B, T, D]``)."""
        b, t = text.shape[:2]
        if text_position_ids is None:
            text_position_ids = torch.arange(t, device=text.device).expand(b, -1)
        text_pos = sine_embedding_1d(text_position_ids, self.dim).to(text.dtype)  # [B, T, D]
        blocked = None
        if text_blocked is not None:  # nn.MultiheadAttention wants [B * heads, T, T]
            blocked = text_blocked.repeat_interleave(self.text_heads, 0)
        state = {"text": text}

        def fuse_then_text(i: int, src: torch.Tensor, levels: FlatLevels) -> torch.Tensor:
            txt = state["text"]
            if self.fusion_layers is not None:
                src, txt = self.fusion_layers[i](src, txt, levels.mask, text_pad)
            if self.text_layers is not None:
                txt = self.text_layers[i](txt, text_pos, attn_mask=blocked)
            state["text"] = txt
            return src

        memory, levels = super().forward(srcs, masks, pre_layer=fuse_then_text)
        return memory, levels, state["text"]
