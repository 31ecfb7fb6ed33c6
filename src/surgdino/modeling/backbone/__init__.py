"""Backbones, selected by ``MODEL.BACKBONE.NAME`` from ``BACKBONE_REGISTRY`` (entries: ``builder(cfg) → Backbone``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from surgdino.registry import BACKBONE_REGISTRY

if TYPE_CHECKING:
    from surgdino.modeling.backbone.base import Backbone, ShapeSpec

_MODULES = ("surgdino.modeling.backbone.convnext", "surgdino.modeling.backbone.surgeryclip",
            "surgdino.modeling.backbone.resnet", "surgdino.modeling.backbone.swin")


def _fill_registry() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def __getattr__(name: str) -> Any:
    """``Backbone`` and ``ShapeSpec`` on first use: importing this package (the command line does) needs no torch."""
    if name in ("Backbone", "ShapeSpec"):
        from surgdino.modeling.backbone import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_backbone(cfg) -> Backbone:
    _fill_registry()
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg)


__all__ = ["Backbone", "ShapeSpec", "build_backbone", "BACKBONE_REGISTRY"]
