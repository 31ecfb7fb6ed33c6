"""Attention blocks of GroundingDINO: multi-head attention with separate q/k/v projections, the
image↔text bi-directional attention with layer scale, and the contrastive token head.

Parameter names follow transformers' ``GroundingDino*`` modules so its checkpoints load by renaming
prefixes only (``modeling/grounding/hf.py``).
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


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention, batch first; ``mask`` is bool ``[B, Tq, Tk]`` or ``[B, Tk]``
    with True = may NOT attend (padding / other phrase)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, tq, d = q.shape
        h = self.num_heads
        qh = self.query(q).view(b, tq, h, d // h).transpose(1, 2)  # [B, h, Tq, d/h]
        kh = self.key(k).view(b, -1, h, d // h).transpose(1, 2)
        vh = self.value(v).view(b, -1, h, d // h).transpose(1, 2)
        attn_mask = None
        if mask is not None:
            m = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # [B, 1, Tq|1, Tk]
            attn_mask = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, d))


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


def activation_fn(name: str):
    return {"relu": F.relu, "gelu": F.gelu}[name]


class TextEnhancerLayer(nn.Module):
    """Post-norm text self-attention (restricted by the sub-sentence mask) + FFN, half the image width."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.layer_norm_before = nn.LayerNorm(dim)
        self.layer_norm_after = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.act = activation_fn(activation)

    def forward(self, text: torch.Tensor, blocked: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        """text [B, T, D]; blocked [B, T, T] True = may not attend; pos [B, T, D]."""
        q = text if pos is None else text + pos
        text = self.layer_norm_before(text + self.dropout(self.self_attn(q, q, text, blocked)))
        out = self.fc2(self.dropout(self.act(self.fc1(text))))
        return self.layer_norm_after(text + self.dropout(out))


class ContrastiveHead(nn.Module):
    """Class logits as dot products of query and text-token features: ``[B, Q, max_text_len]``,
    -inf on tokens outside the text (and on padding up to ``max_text_len``)."""

    def __init__(self, max_text_len: int = 256):
        super().__init__()
        self.max_text_len = max_text_len

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        logits = queries @ text.transpose(-1, -2)  # [B, Q, T]
        logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
        width = max(self.max_text_len, logits.shape[-1])
        return F.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))
