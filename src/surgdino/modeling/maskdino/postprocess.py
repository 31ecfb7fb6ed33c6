"""Instance inference: top-k (query, class) pairs, masks only for the kept queries, at original resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgdino.config.keys.maskdino import is_official
from surgdino.modeling.maskdino.box_ops import box_cxcywh_to_xyxy


class InstancePostProcessor:
    """Turns one image's raw outputs into ``{"boxes", "masks", "scores", "labels"}`` in original pixels.

    ``detections_per_image``: top-k over query×class pairs (any k, above 100 too). ``score_threshold``:
    drop detections scoring below it. ``one_label_per_query``: each query keeps only its best class.
    ``overlap_threshold``: a detection whose mask IoU with a higher-scored detection is >= this is dropped
    (class-agnostic; 1.0 turns it off). Score = class probability × mean mask probability inside the mask.
    ``keep_empty_masks``: detections whose mask has no pixel (score 0 by construction) are dropped
    unless this is True (``TEST.KEEP_EMPTY_MASKS``), so results and drawings hold only real detections.
    ``border_clamp``: mask logits beyond the feature map's edge repeat its edge (bilinear resizing as
    ``F.interpolate``, MaskDINO's code; the official architecture) instead of being zero.
    """

    def __init__(self, *, detections_per_image: int = 100, score_threshold: float = 0.0,
                 one_label_per_query: bool = False, overlap_threshold: float = 0.8, chunk: int = 64,
                 keep_empty_masks: bool = False, border_clamp: bool = False):
        self.k = detections_per_image
        self.score_threshold = score_threshold
        self.one_label_per_query = one_label_per_query
        self.overlap_threshold = overlap_threshold
        self.chunk = chunk
        self.keep_empty_masks = keep_empty_masks
        self.padding_mode = "border" if border_clamp else "zeros"

    @classmethod
    def from_config(cls, cfg) -> dict:
        return dict(detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, score_threshold=cfg.TEST.SCORE_THRESHOLD,
                    one_label_per_query=cfg.TEST.ONE_LABEL_PER_QUERY,
                    overlap_threshold=cfg.MODEL.MaskDINO.TEST.OVERLAP_THRESHOLD,
                    keep_empty_masks=cfg.TEST.KEEP_EMPTY_MASKS, border_clamp=is_official(cfg))

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, embeds: torch.Tensor, mask_features: torch.Tensor,
                 image_size: tuple[int, int], padded_size: tuple[int, int], out_size: tuple[int, int]) -> dict:
        """``logits [Q, C]``, ``boxes [Q, 4]`` (cxcywh normalised to the image), ``embeds [Q, D]``,
        ``mask_features [D, h, w]`` covering ``padded_size``; ``image_size`` = unpadded input (h, w);
        ``out_size`` = original (height, width) the results are given in."""
        q, c = logits.shape
        prob = logits.float().sigmoid()
        if self.one_label_per_query:
            scores, labels = prob.max(-1)
            scores, qidx = scores.topk(min(self.k, q))
            labels = labels[qidx]
        else:
            scores, flat = prob.flatten().topk(min(self.k, q * c))
            qidx, labels = flat // c, flat % c
        height, width = out_size
        # output pixel centres → normalised coordinates of the padded mask-feature map
        ys = (torch.arange(height, device=logits.device, dtype=torch.float32) + 0.5) * image_size[0] / height / padded_size[0]
        xs = (torch.arange(width, device=logits.device, dtype=torch.float32) + 0.5) * image_size[1] / width / padded_size[1]
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None] * 2 - 1  # [1, H, W, 2]
        # a query kept with several classes shares one mask: compute each kept query's mask once
        uq, inv = torch.unique(qidx, return_inverse=True)
        masks, mask_scores = [], []
        for part in uq.split(self.chunk):
            m = torch.einsum("kd,dhw->khw", embeds[part].float(), mask_features.float())  # [k, h, w]
            up = F.grid_sample(m[None], grid, mode="bilinear", padding_mode=self.padding_mode,
                               align_corners=False)[0]  # [k, H, W] logits
            binary = up > 0
            inside = up.sigmoid_().mul_(binary).flatten(1).sum(1)  # probabilities summed inside the mask
            mask_scores.append(inside / binary.flatten(1).sum(1).clamp(min=1))
            masks.append(binary)
        if masks:
            masks_u = torch.cat(masks)
            scores = scores * torch.cat(mask_scores)[inv]
        else:
            masks_u = torch.zeros(0, height, width, dtype=torch.bool, device=logits.device)
        masks = masks_u[inv]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=logits.device)
        out_boxes = box_cxcywh_to_xyxy(boxes[qidx].float()) * scale
        keep = scores >= self.score_threshold
        if not self.keep_empty_masks:
            keep &= masks_u.flatten(1).any(1)[inv]  # an empty mask is no detection
        if self.overlap_threshold < 1.0 and keep.any():
            keep &= self._not_overlapping(masks_u, inv, scores, keep)
        return {"boxes": out_boxes[keep], "masks": masks[keep], "scores": scores[keep], "labels": labels[keep]}

    def _not_overlapping(self, masks_u: torch.Tensor, inv: torch.Tensor, scores: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
        """True where no higher-scored kept detection overlaps the mask by IoU >= threshold (vectorised).
        Detection i's mask is ``masks_u[inv[i]]``; IoUs on every 4th pixel (nearest ×0.25) of large masks."""
        idx = keep.nonzero()[:, 0]
        order = idx[scores[idx].argsort(descending=True)]
        h, w = masks_u.shape[-2:]
        if min(h, w) >= 64:  # same pixels as F.interpolate(scale_factor=0.25, mode="nearest")
            masks_u = masks_u[:, ::4, ::4][:, :int(h * 0.25), :int(w * 0.25)]
        small = masks_u.flatten(1).float()[inv[order]]  # [K, P]
        inter = small @ small.T
        area = small.sum(1)
        iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
        suppressed = (iou.triu(1) >= self.overlap_threshold).any(0)  # overlapped by an earlier (higher) one
        out = torch.zeros_like(keep)
        out[order[~suppressed]] = True
        return out
