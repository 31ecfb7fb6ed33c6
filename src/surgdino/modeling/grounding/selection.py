"""Language-guided query selection: every encoder token proposes a box; the ``num_queries`` tokens
whose best text-token logit is highest become the decoder's reference boxes. Works on any number
of levels, one included (the reference forbids two-stage selection there; nothing here needs two).
"""

from __future__ import annotations

import torch
from torch import nn

from surgdino.modeling.grounding.attention import ContrastiveHead
from surgdino.modeling.layers import MLP
from surgdino.modeling.maskdino.decoder import token_boxes


def encoder_proposals(memory: torch.Tensor, pad: torch.Tensor, shapes: list[tuple[int, int]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """memory [B, S, D], pad [B, S] → (memory with invalid tokens zeroed [B, S, D], proposal logits [B, S, 4]
    (inverse sigmoid of cxcywh; +inf for padding and for boxes touching the border))."""
    boxes = token_boxes(pad, shapes)  # [B, S, 4] cxcywh in [0, 1]
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True) & ~pad[..., None]  # [B, S, 1]
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), logits


class QuerySelection(nn.Module):
    """Proposal head on encoder tokens (linear + norm, contrastive class head, box MLP) and top-k selection."""

    def __init__(self, dim: int, num_queries: int, max_text_len: int, bbox_embed: nn.Module | None = None):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.class_embed = ContrastiveHead(max_text_len)
        self.bbox_embed = bbox_embed if bbox_embed is not None else MLP(dim, dim, 4, 3)
        if bbox_embed is None:
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, memory: torch.Tensor, pad: torch.Tensor, shapes: list[tuple[int, int]],
                text: torch.Tensor, text_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """→ ``topk [B, K]`` token indices, ``ref_boxes [B, K, 4]`` (detached, sigmoid), ``queries [B, K, D]``
        (selected encoder features, detached), ``enc_pred_logits [B, K, 256]``, ``enc_pred_boxes [B, K, 4]``."""
        masked, proposals = encoder_proposals(memory, pad, shapes)
        feats = self.enc_output_norm(self.enc_output(masked))  # [B, S, D]
        enc_logits = self.class_embed(feats, text, text_valid)  # [B, S, Tmax]
        enc_coords = self.bbox_embed(feats) + proposals  # [B, S, 4]
        k = min(self.num_queries, feats.shape[1])
        topk = enc_logits.max(-1)[0].topk(k, dim=1)[1]  # [B, K]
        sel_coords = torch.gather(enc_coords, 1, topk[..., None].expand(-1, -1, 4))  # [B, K, 4]
        sel_feats = torch.gather(feats, 1, topk[..., None].expand(-1, -1, feats.shape[-1]))  # [B, K, D]
        return {"topk": topk, "ref_boxes": sel_coords.detach().sigmoid(), "queries": sel_feats.detach(),
                # the encoder loss (IDEA's interm outputs): selected tokens' logits and boxes, with gradients
                "enc_pred_logits": self.class_embed(sel_feats, text, text_valid),
                "enc_pred_boxes": sel_coords.sigmoid()}
