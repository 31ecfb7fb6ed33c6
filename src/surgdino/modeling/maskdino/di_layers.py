"""Layers of DI-MaskDINO used by both designs (``de_imbalance`` and ``de_imbalance_official``)."""

from __future__ import annotations

import torch

from surgdino.modeling.layers.blocks import CrossAttentionLayer, SelfAttentionLayer

TokenInteractionLayer = SelfAttentionLayer  # post-norm self-attention among the first-selected tokens + FFN


class GuidedTokenUpdate(CrossAttentionLayer):
    """BATO's token update: every encoder token cross-attends to the guiding tokens, then residual, norm, FFN.

    Queries are ``memory + memory_pos``, keys ``guide + guide_pos``, values ``guide`` (the guiding tokens'
    mask embeddings). Padding tokens come back unchanged.
    """

    def forward(self, memory: torch.Tensor, memory_pos: torch.Tensor, memory_mask: torch.Tensor,  # type: ignore[override]
                guide: torch.Tensor, guide_pos: torch.Tensor) -> torch.Tensor:
        """``memory, memory_pos [B, S, D]``, ``memory_mask [B, S]`` (True = padding), ``guide, guide_pos [B, G, D]``."""
        return torch.where(memory_mask[..., None], memory, super().forward(memory, memory_pos, guide, guide_pos))


def replicate_padding(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W]`` with padded rows/columns (``pad [B, H, W]``, True = padding, bottom/right) replaced by
    the last valid ones, so bilinear upsampling gives at valid pixels what it gives for the image alone."""
    b, _, h, w = x.shape
    vh = (~pad[:, :, 0]).sum(1).clamp(min=1)  # [B]
    vw = (~pad[:, 0, :]).sum(1).clamp(min=1)
    rows = torch.minimum(torch.arange(h, device=x.device)[None], vh[:, None] - 1)  # [B, H]
    cols = torch.minimum(torch.arange(w, device=x.device)[None], vw[:, None] - 1)  # [B, W]
    x = torch.gather(x, 2, rows[:, None, :, None].expand(-1, x.shape[1], -1, w))
    return torch.gather(x, 3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))


def feature_valid(mf: torch.Tensor, feat_sizes: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` 1 inside each image's unpadded extent ``feat_sizes [B, 2]`` of ``mf [B, C, h, w]``, else 0."""
    fh, fw = mf.shape[-2:]
    dev = mf.device
    return ((torch.arange(fh, device=dev)[None, :, None] < feat_sizes[:, 0, None, None])
            & (torch.arange(fw, device=dev)[None, None, :] < feat_sizes[:, 1, None, None]))[:, None].to(mf.dtype)
