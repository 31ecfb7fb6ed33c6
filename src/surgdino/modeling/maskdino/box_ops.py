"""Moved to ``surgdino.modeling.layers.geometry`` (issue 10); this name stays for code written before."""

from surgdino.modeling.layers.geometry import (  # noqa: F401
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
    pairwise_generalized_box_iou,
)
