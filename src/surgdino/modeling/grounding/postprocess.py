"""GroundingDINO inference for one image: class scores from token probabilities (mean over each class's
tokens, Open-GroundingDino's post-processing), top-k (query, class) pairs, boxes in original pixels."""

from __future__ import annotations

import torch

from surgdino.modeling.grounding.prompts import class_scores
from surgdino.modeling.maskdino.box_ops import box_cxcywh_to_xyxy


class GroundingPostProcessor:
    """``num_select``: detections kept per image (top-k over query × class); ``score_threshold``: drop below."""

    def __init__(self, *, num_select: int = 300, score_threshold: float = 0.0):
        self.k = num_select
        self.score_threshold = score_threshold

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, positive_map: torch.Tensor,
                 out_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``logits [Q, Tmax]``, ``boxes [Q, 4]`` (cxcywh normalised to the image), ``positive_map [C, T]``,
        ``out_size`` (height, width) → ``{"boxes" [K, 4] xyxy pixels, "scores" [K], "labels" [K]}``."""
        prob = class_scores(logits.float().sigmoid(), positive_map)  # [Q, C]
        q, c = prob.shape
        scores, flat = prob.flatten().topk(min(self.k, q * c))
        qidx, labels = flat // c, flat % c
        h, w = out_size
        xyxy = box_cxcywh_to_xyxy(boxes[qidx].float()) * torch.tensor([w, h, w, h], device=boxes.device)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        keep = scores >= self.score_threshold
        return {"boxes": xyxy[keep], "scores": scores[keep], "labels": labels[keep]}
