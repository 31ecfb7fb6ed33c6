"""Post-norm transformer layers of the DETR family, written once.

``PostNormLayer`` is the vocabulary: ``residual(x, out, norm) = norm(x + dropout(out))``, the FFN
``residual(x, linear2(dropout(relu(linear1(x)))))`` and attention calls (queries/keys carry positions,
values do not). The layers built from it:

* ``SelfAttentionLayer`` — self-attention + FFN (DI-MaskDINO's token interaction; a text enhancer layer);
* ``CrossAttentionLayer`` — queries attend to other tokens + FFN (BATO's token update; image↔text fusion);
* ``DeformableEncoderLayer`` — multi-scale deformable self-attention + FFN;
* ``DeformableDecoderLayer`` — self-attention (with the denoising mask), deformable cross-attention, FFN.

Parameter names (``self_attn``, ``cross_attn``, ``norm1``.., ``linear1``, ``linear2``) are those of the
reference checkpoints and of the checkpoints written before these layers were shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.layers.ms_deform_attn import MSDeformAttn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class PostNormLayer(nn.Module):
    """Base of the layers below: subclasses create their sublayers, then ``add_ffn`` (which names the FFN's
    norm) and ``self.dropout``; creation order is the subclass's, so seeded initialisations do not move."""

    dropout: nn.Dropout

    def add_ffn(self, d_model: int, d_ffn: int, norm: str, activation: str = "relu") -> None:
        """Create ``linear1 [D → F]``, ``linear2 [F → D]`` and the LayerNorm ``norm`` after them;
        ``activation`` (``relu`` or ``gelu``) between the linears."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        setattr(self, norm, nn.LayerNorm(d_model))
        self._ffn_norm = norm
        self._act = ACTIVATIONS[activation]

    def residual(self, x: torch.Tensor, out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(x + self.dropout(out))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.linear2(self.dropout(self._act(self.linear1(x)))), getattr(self, self._ffn_norm))

    @staticmethod
    def attend(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn`` (batch-first) output without weights; masks are True = blocked."""
        return attn(query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]


class _AttentionFFNLayer(PostNormLayer):
    """One ``nn.MultiheadAttention`` named ``attn_name`` with its norm ``norm1``, then the FFN (``norm2``)."""

    attn_name = "self_attn"

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_heads: int, activation: str = "relu"):
        super().__init__()
        setattr(self, self.attn_name, nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True))
        self.norm1 = nn.LayerNorm(d_model)
        self.add_ffn(d_model, d_ffn, "norm2", activation)
        self.dropout = nn.Dropout(dropout)


class SelfAttentionLayer(_AttentionFFNLayer):
    """Self-attention among tokens (positions added to queries and keys), then FFN."""

    self_attn: nn.MultiheadAttention

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x, pos [B, K, D]``; ``key_padding_mask [B, K]`` True = token not to attend to."""
        q = k = x + pos
        x = self.residual(x, self.attend(self.self_attn, q, k, x, attn_mask, key_padding_mask), self.norm1)
        return self.ffn(x)


class CrossAttentionLayer(_AttentionFFNLayer):
    """Tokens ``x`` attend to ``other`` (queries ``x + pos``, keys ``other + other_pos``, values ``other``), then FFN."""

    attn_name = "cross_attn"
    cross_attn: nn.MultiheadAttention

    def forward(self, x: torch.Tensor, pos: torch.Tensor, other: torch.Tensor, other_pos: torch.Tensor,
                other_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x, pos [B, S, D]``, ``other, other_pos [B, G, D]``, ``other_padding_mask [B, G]`` (True = ignore)."""
        att = self.attend(self.cross_attn, x + pos, other + other_pos, other, key_padding_mask=other_padding_mask)
        return self.ffn(self.residual(x, att, self.norm1))


class DeformableEncoderLayer(PostNormLayer):
    """Multi-scale deformable self-attention over all levels' tokens, then FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, activation: str = "relu"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.add_ffn(d_model, d_ffn, "norm2", activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor) -> torch.Tensor:
        """``src, pos [B, S, D]``, ``reference_points [B, S, L, 2]``, ``padding_mask [B, S]`` (True = padding)."""
        out = self.self_attn(src + pos, reference_points, src, spatial_shapes, None, padding_mask)
        return self.ffn(self.residual(src, out, self.norm1))


class DeformableDecoderLayer(PostNormLayer):
    """Query self-attention (``attn_mask``: denoising groups), deformable cross-attention to the memory, FFN.

    ``self_attention`` and ``memory_attention`` are the two halves of ``forward``, so a subclass can put
    another sublayer between them (GroundingDINO's text cross-attention)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 activation: str = "relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.add_ffn(d_model, d_ffn, "norm3", activation)
        self.dropout = nn.Dropout(dropout)

    def self_attention(self, tgt: torch.Tensor, query_pos: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        q = k = tgt + query_pos
        return self.residual(tgt, self.attend(self.self_attn, q, k, tgt, attn_mask), self.norm1)

    def memory_attention(self, tgt: torch.Tensor, query_pos: torch.Tensor, ref_input: torch.Tensor,
                         memory: torch.Tensor, memory_mask: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        out = self.cross_attn(tgt + query_pos, ref_input, memory, shapes, None, memory_mask)
        return self.residual(tgt, out, self.norm2)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, ref_input: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor, shapes: list[tuple[int, int]],
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tgt, query_pos [B, Q, D]``, ``ref_input [B, Q, L, 4]`` (boxes scaled per level), ``memory [B, S, D]``,
        ``memory_mask [B, S]`` (True = padding), ``attn_mask [Q, Q]`` (True = blocked)."""
        tgt = self.self_attention(tgt, query_pos, attn_mask)
        tgt = self.memory_attention(tgt, query_pos, ref_input, memory, memory_mask, shapes)
        return self.ffn(tgt)
