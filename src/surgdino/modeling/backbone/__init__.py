"""Backbones, selected by ``MODEL.BACKBONE.NAME`` from ``BACKBONE_REGISTRY`` (entries: ``builder(cfg) → Backbone``)."""

from __future__ import annotations

import importlib

from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.registry import BACKBONE_REGISTRY

_MODULES = ("surgdino.modeling.backbone.convnext", "surgdino.modeling.backbone.surgeryclip", "surgdino.modeling.backbone.swin")


def _fill_registry() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def build_backbone(cfg) -> Backbone:
    _fill_registry()
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg)


__all__ = ["Backbone", "ShapeSpec", "build_backbone", "BACKBONE_REGISTRY"]
