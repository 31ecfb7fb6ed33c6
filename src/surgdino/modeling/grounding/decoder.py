"""GroundingDINO's cross-modality decoder: per layer query self-attention, text cross-attention,
deformable image cross-attention and FFN (post-norm), with iterative box refinement and a
contrastive class head over text tokens on every layer.

TODO(unify): core (issue 10) extracts a generic box-refinement decoder loop; this loop becomes it
with the text cross-attention as an extra per-layer input once that is on main.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgdino.modeling.grounding.attention import ContrastiveHead, MultiheadAttention, activation_fn
from surgdino.modeling.layers import MLP, MSDeformAttn, gen_sineembed_for_position


def logit(x: torch.Tensor) -> torch.Tensor:
    """Inverse sigmoid with the reference's clamp (x to [1e-5, 1 - 1e-5])."""
    return torch.special.logit(x, eps=1e-5)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int, dropout: float = 0.0,
                 activation: str = "relu", use_text_cross_attention: bool = True):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        if use_text_cross_attention:
            self.encoder_attn_text = MultiheadAttention(dim, n_heads)
            self.encoder_attn_text_layer_norm = nn.LayerNorm(dim)
        else:
            self.encoder_attn_text = None
        self.encoder_attn = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.act = activation_fn(activation)

    def forward(self, tgt, pos, ref_input, memory, pad, shapes, text, text_pad, self_attn_mask=None):
        q = tgt + pos
        tgt = self.self_attn_layer_norm(tgt + self.dropout(self.self_attn(q, q, tgt, self_attn_mask)))
        if self.encoder_attn_text is not None:
            out = self.encoder_attn_text(tgt + pos, text, text, text_pad)
            tgt = self.encoder_attn_text_layer_norm(tgt + self.dropout(out))
        out = self.encoder_attn(tgt + pos, ref_input, memory, shapes, None, pad)
        tgt = self.encoder_attn_layer_norm(tgt + self.dropout(out))
        out = self.fc2(self.dropout(self.act(self.fc1(tgt))))
        return self.final_layer_norm(tgt + self.dropout(out))


def _box_head(dim: int) -> MLP:
    head = MLP(dim, dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


class GroundingDecoder(nn.Module):
    """``num_layers`` refinement steps; returns per layer ``pred_logits [B, Q, 256]`` and ``pred_boxes [B, Q, 4]``."""

    def __init__(self, *, num_layers: int = 6, dim: int = 256, ffn_dim: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0, activation: str = "relu",
                 use_text_cross_attention: bool = True, max_text_len: int = 256, share_box_head: bool = True):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(DecoderLayer(dim, ffn_dim, n_levels, n_heads, n_points, dropout, activation,
                                                 use_text_cross_attention) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.reference_points_head = MLP(2 * dim, dim, dim, 2)
        head = _box_head(dim)
        # shared: one module listed num_layers times (its parameters appear once in the state dict)
        self.bbox_embed = nn.ModuleList([head] * num_layers if share_box_head
                                        else [copy.deepcopy(head) for _ in range(num_layers)])
        self.class_embed = ContrastiveHead(max_text_len)

    def forward(self, tgt: torch.Tensor, ref: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor,
                shapes: list[tuple[int, int]], ratios: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
                self_attn_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tgt [B, Q, D], ref [B, Q, 4] (sigmoid cxcywh), memory [B, S, D], pad [B, S], ratios [B, L, 2],
        text [B, T, D], text_valid [B, T] → ``pred_logits [N, B, Q, Tmax]``, ``pred_boxes [N, B, Q, 4]``."""
        text_pad = ~text_valid
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]  # [B, 1, L, 4]
        logits, boxes = [], []
        for layer, box_head in zip(self.layers, self.bbox_embed):
            ref_input = ref[:, :, None] * ratios4  # [B, Q, L, 4]
            pos = self.reference_points_head(gen_sineembed_for_position(ref_input[:, :, 0], self.dim))
            tgt = layer(tgt, pos, ref_input, memory, pad, shapes, text, text_pad, self_attn_mask)
            ref_logit = logit(ref)
            hs = self.layer_norm(tgt)
            boxes.append((box_head(hs) + ref_logit).sigmoid())  # prediction from the normed state
            logits.append(self.class_embed(hs, text, text_valid))
            ref = (box_head(tgt) + ref_logit).sigmoid().detach()  # the reference refines from the raw state
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}
