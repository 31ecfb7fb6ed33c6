"""Models: ``build_model(cfg)`` looks up ``MODEL.META_ARCHITECTURE`` in the registry and builds it from the keyword
arguments its ``from_config`` returns (every part's ``from_config`` returns keyword arguments)."""

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
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
    return arch(**arch.from_config(cfg))


__all__ = ["build_model"]
