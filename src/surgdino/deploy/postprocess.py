"""Post-processing outside the graph, one implementation for the PyTorch and ONNX paths.

``postprocess`` runs ``InstancePostProcessor`` (top-k, score threshold, one label per query, mask
overlap threshold, masks at the original size) on a batch of raw outputs given as torch tensors or
numpy arrays (onnxruntime's); the results are in the same kind. A GroundingDINO export's outputs go
through ``predict --prompt``'s box threshold instead (settings with a ``positive_map``). ``match_detections`` compares two
result lists detection for detection (what export's self-check and the tests use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from surgdino.modeling.maskdino.model import RAW_OUTPUTS
from surgdino.modeling.maskdino.postprocess import InstancePostProcessor


def postprocess(raw: Mapping[str, Any], image_sizes: Sequence[tuple[int, int]], out_sizes: Sequence[tuple[int, int]],
                settings: Mapping[str, Any] | InstancePostProcessor) -> list[dict[str, Any]]:
    """Per image ``{"boxes" [N, 4] xyxy, "masks" [N, H, W] bool, "scores" [N], "labels" [N]}`` at ``out_sizes``.

    ``raw``: ``RAW_OUTPUTS`` for a padded batch (``mask_features`` covers the padded input);
    ``image_sizes``: each image's unpadded (h, w) in that batch; ``settings``: the post-processor or
    its keyword arguments (an export's ``surgdino.postprocess`` metadata)."""
    if not isinstance(settings, InstancePostProcessor) and "positive_map" in settings:
        return _grounded(raw, out_sizes, settings)
    proc = settings if isinstance(settings, InstancePostProcessor) else InstancePostProcessor(**settings)
    as_numpy = isinstance(raw[RAW_OUTPUTS[0]], np.ndarray)
    t = {k: torch.as_tensor(raw[k]) for k in RAW_OUTPUTS}
    padded = tuple(int(s) * 4 for s in t["mask_features"].shape[-2:])  # mask features are at stride 4
    out = []
    for i, (size, out_size) in enumerate(zip(image_sizes, out_sizes)):
        r = proc(t["pred_logits"][i], t["pred_boxes"][i], t["pred_embeds"][i], t["mask_features"][i],
                 image_size=tuple(int(v) for v in size), padded_size=padded,
                 out_size=tuple(int(v) for v in out_size))
        out.append({k: v.cpu().numpy() for k, v in r.items()} if as_numpy else r)
    return out


def _grounded(raw: Mapping[str, Any], out_sizes: Sequence[tuple[int, int]], settings: Mapping[str, Any]
              ) -> list[dict[str, Any]]:
    """A GroundingDINO export's ``pred_logits`` / ``pred_boxes`` → per image ``{"boxes", "scores", "labels"}``
    (``threshold_detections``, as ``predict --prompt``) with the export's ``positive_map`` and ``box_threshold``."""
    from surgdino.modeling.grounding.postprocess import threshold_detections

    as_numpy = isinstance(raw["pred_logits"], np.ndarray)
    logits, boxes = torch.as_tensor(raw["pred_logits"]), torch.as_tensor(raw["pred_boxes"])
    pmap = torch.as_tensor(settings["positive_map"], dtype=torch.float32)
    out = []
    for i, out_size in enumerate(out_sizes):
        r = threshold_detections(logits[i], boxes[i], pmap, tuple(int(v) for v in out_size),
                                 float(settings["box_threshold"]))
        r.pop("probs")
        out.append({k: v.cpu().numpy() for k, v in r.items()} if as_numpy else r)
    return out


def match_detections(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *, box_tol: float = 1e-3,
                     min_iou: float = 0.999) -> dict[str, Any]:
    """Whether two result lists hold the same detections in the same order: same labels, boxes within
    ``box_tol`` pixels, mask IoU >= ``min_iou``; with the worst box difference and IoU seen."""
    worst_box, worst_iou, same = 0.0, 1.0, len(a) == len(b)
    for x, y in zip(a, b):
        lx, ly = np.asarray(torch.as_tensor(x["labels"])), np.asarray(torch.as_tensor(y["labels"]))
        if lx.shape != ly.shape or not (lx == ly).all():
            same = False
            continue
        if len(lx) == 0:
            continue
        bx, by = np.asarray(torch.as_tensor(x["boxes"])), np.asarray(torch.as_tensor(y["boxes"]))
        worst_box = max(worst_box, float(np.abs(bx - by).max()))
        if "masks" not in x:  # boxes only (GroundingDINO)
            continue
        mx = np.asarray(torch.as_tensor(x["masks"])).reshape(len(lx), -1)
        my = np.asarray(torch.as_tensor(y["masks"])).reshape(len(ly), -1)
        inter, union = (mx & my).sum(1), (mx | my).sum(1)
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        worst_iou = min(worst_iou, float(iou.min()))
    same = same and worst_box <= box_tol and worst_iou >= min_iou
    return {"same": bool(same), "max_box_diff": worst_box, "min_mask_iou": worst_iou,
            "detections": [len(x["labels"]) for x in a]}
