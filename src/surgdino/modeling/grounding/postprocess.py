"""GroundingDINO inference for one image: class scores from token probabilities (mean over each class's
tokens, Open-GroundingDino's post-processing), top-k (query, class) pairs, boxes in original pixels; and
the free-text prediction's box threshold (``threshold_detections``, shared by ``predict --prompt`` and
the ONNX path)."""

from __future__ import annotations

import torch

from surgdino.modeling.grounding.prompts import class_scores
from surgdino.modeling.layers.geometry import box_cxcywh_to_xyxy


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


@torch.no_grad()
def threshold_detections(logits: torch.Tensor, boxes: torch.Tensor, positive_map: torch.Tensor,
                         out_size: tuple[int, int], box_threshold: float) -> dict[str, torch.Tensor]:
    """IDEA's ``predict``: ``logits [Q, Tmax]``, ``boxes [Q, 4]`` (normalised cxcywh) → queries whose best
    probability over the class names' tokens exceeds ``box_threshold``, best first: ``{"boxes" [K, 4] xyxy in
    ``out_size`` pixels, "scores" [K], "labels" [K] (the class of highest mean token probability), "probs"
    [K, T] (token probabilities of the prompt's T tokens)}``."""
    t = positive_map.shape[1]
    probs = logits[:, :t].float().sigmoid()  # [Q, T]
    pmap = positive_map.to(logits.device)
    in_name = pmap.bool().any(0)  # [T]
    scores = probs.masked_fill(~in_name, 0.0).max(-1).values  # [Q]
    keep = (scores > box_threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    h, w = out_size
    xyxy = box_cxcywh_to_xyxy(boxes[keep].float()) * torch.tensor([w, h, w, h], device=boxes.device)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    labels = class_scores(probs[keep], pmap).argmax(-1)
    return {"boxes": xyxy, "scores": scores[keep], "labels": labels, "probs": probs[keep]}
