"""Registries: backbones, meta-architectures, pixel decoders and decoders, filled on import; config names select them."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from surgdino.errors import ConfigError


class Registry:
    """name → object; ``@REG.register()`` or ``REG.register("name")(obj)``; ``REG.get(name)``."""

    def __init__(self, name: str):
        self.name = name
        self._items: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.name} registry already has {key!r}")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> Any:
        """The object registered as ``name``; ``key`` (the config key that named it) goes into the error."""
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{key} = {name!r}: " if key else ""
            raise ConfigError(f"{where}no {self.name} named {name!r}; available: {sorted(self._items)}{hint}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


BACKBONE_REGISTRY = Registry("backbone")
META_ARCH_REGISTRY = Registry("meta-architecture")
DECODER_REGISTRY = Registry("transformer decoder")
PIXEL_DECODER_REGISTRY = Registry("pixel decoder")
