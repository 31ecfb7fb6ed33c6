"""SurgeryCLIP: CLIP Surgery's ViT as a single- or multi-scale detection backbone (``MODEL.BACKBONE.NAME surgeryclip``).

Public API (split over ``surgeryclip_checkpoint``, ``surgeryclip_model`` and ``surgeryclip_backbone``):
``SurgeryCLIP.from_checkpoint``, ``clip_feature_surgery``, ``similarity_map``, ``SurgeryCLIPBackbone``,
``build_surgeryclip_backbone(args)`` and the registered config builder.
"""

from __future__ import annotations

from surgdino.modeling.backbone.surgeryclip_backbone import (
    SimpleFeaturePyramid,
    SurgeryCLIPBackbone,
    build_surgeryclip_backbone,
)
from surgdino.modeling.backbone.surgeryclip_checkpoint import (
    CLIPArch,
    CLIPCheckpoint,
    infer_arch,
    read_clip_checkpoint,
)
from surgdino.modeling.backbone.surgeryclip_model import (
    QuickGELU,
    SurgeryCLIP,
    VisionTransformer,
    clip_feature_surgery,
    similarity_map,
)
from surgdino.registry import BACKBONE_REGISTRY


@BACKBONE_REGISTRY.register("surgeryclip")
def build_surgeryclip_from_config(cfg) -> SurgeryCLIPBackbone:
    """Registry entry: the backbone described by ``cfg.MODEL.SURGERYCLIP`` (and ``MODEL.PIXEL_MEAN/STD``)."""
    return SurgeryCLIPBackbone(**SurgeryCLIPBackbone.from_config(cfg))


__all__ = [
    "CLIPArch", "CLIPCheckpoint", "QuickGELU", "SimpleFeaturePyramid", "SurgeryCLIP", "SurgeryCLIPBackbone",
    "VisionTransformer", "build_surgeryclip_backbone", "build_surgeryclip_from_config", "clip_feature_surgery",
    "infer_arch", "read_clip_checkpoint", "similarity_map",
]
