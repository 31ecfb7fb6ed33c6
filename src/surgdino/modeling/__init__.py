"""Models: ``build_model(cfg)`` looks up ``MODEL.META_ARCHITECTURE`` in the registry and calls ``from_config``."""

from __future__ import annotations

import importlib

from surgdino.registry import META_ARCH_REGISTRY

_MODULES = ("surgdino.modeling.maskdino.model", "surgdino.modeling.grounding.model")


def build_model(cfg):
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE).from_config(cfg)


__all__ = ["build_model"]
