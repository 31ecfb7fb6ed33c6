"""What GroundingDINO adds to the shared layers: the image↔text bi-directional attention with layer
scale (GLIP's, no counterpart in the closed-set models), the text sine positions and the contrastive
token head. Parameter names follow transformers' ``GroundingDino*`` modules (``modeling/grounding/hf.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn


def sine_embedding_1d(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Position ids ``[B, T]`` → ``[B, T, dim]`` interleaved sin/cos of ``2π·id / temperature^(2i/dim)``
    (the text position embedding of the feature enhancer)."""
    dim_t = torch.arange(dim, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim)
    x = pos.to(torch.float32)[..., None] * (2 * math.pi) / dim_t  # [B, T, dim]
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class BiAttention(nn.Module):
    """Image↔text cross-attention sharing one similarity matrix: image tokens attend to text tokens
    and text tokens to image tokens (GLIP's / GroundingDINO's BiMultiHeadAttention)."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.scale = (embed_dim // num_heads) ** -0.5
        self.dropout = dropout
        self.vision_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.values_vision_proj = nn.Linear(dim, embed_dim)
        self.values_text_proj = nn.Linear(dim, embed_dim)
        self.out_vision_proj = nn.Linear(embed_dim, dim)
        self.out_text_proj = nn.Linear(embed_dim, dim)
        for lin in (self.vision_proj, self.text_proj, self.values_vision_proj, self.values_text_proj,
                    self.out_vision_proj, self.out_text_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)  # [B, h, T, e/h]

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_pad: torch.Tensor | None,
                text_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """vision [B, S, D], text [B, T, D], pads True = padding → (delta vision [B, S, D], delta text [B, T, D])."""
        b, s, _ = vision.shape
        t = text.shape[1]
        q = self._heads(self.vision_proj(vision) * self.scale)
        k = self._heads(self.text_proj(text))
        v_vis = self._heads(self.values_vision_proj(vision))
        v_txt = self._heads(self.values_text_proj(text))
        sim = q @ k.transpose(-1, -2)  # [B, h, S, T]
        # the reference's fp16 guards: shift by the global max and clamp before the two softmaxes
        sim = (sim - sim.max()).clamp(-50000, 50000)
        sim_t = sim.transpose(-1, -2)  # [B, h, T, S]
        sim_t = (sim_t - sim_t.max(-1, keepdim=True)[0]).clamp(-50000, 50000)
        if vision_pad is not None:
            sim_t = sim_t.masked_fill(vision_pad[:, None, None, :], float("-inf"))
        if text_pad is not None:
            sim = sim.masked_fill(text_pad[:, None, None, :], float("-inf"))
        p_vis = F.dropout(sim.softmax(-1), self.dropout, self.training)
        p_txt = F.dropout(sim_t.softmax(-1), self.dropout, self.training)
        out_v = (p_vis @ v_txt).transpose(1, 2).reshape(b, s, self.embed_dim)
        out_t = (p_txt @ v_vis).transpose(1, 2).reshape(b, t, self.embed_dim)
        return self.out_vision_proj(out_v), self.out_text_proj(out_t)


class FusionLayer(nn.Module):
    """Pre-norm bi-attention whose outputs enter the residual through a per-channel layer scale (init 1e-4)."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0, drop_path: float = 0.1,
                 init_scale: float = 1e-4):
        super().__init__()
        self.layer_norm_vision = nn.LayerNorm(dim)
        self.layer_norm_text = nn.LayerNorm(dim)
        self.attn = BiAttention(dim, embed_dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.vision_param = nn.Parameter(torch.full((dim,), init_scale))
        self.text_param = nn.Parameter(torch.full((dim,), init_scale))

    def forward(self, vision, text, vision_pad, text_pad):
        vision = self.layer_norm_vision(vision)
        text = self.layer_norm_text(text)
        dv, dt = self.attn(vision, text, vision_pad, text_pad)
        return vision + self.drop_path(self.vision_param * dv), text + self.drop_path(self.text_param * dt)


class ContrastiveHead(nn.Module):
    """Class logits as dot products of query and text-token features: ``[B, Q, T]``, -inf on tokens
    outside the text (transformers pads them to ``max_text_len`` with -inf: ``GroundingDINO.forward_hf``)."""

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        logits = queries @ text.transpose(-1, -2)  # [B, Q, T]
        return logits.masked_fill(~text_valid[:, None, :], float("-inf"))
