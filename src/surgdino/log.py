"""Package logger: ``get_logger(__name__)``; the engine adds a file handler under OUTPUT_DIR."""

from __future__ import annotations

import logging
import sys

_CONFIGURED = False


def get_logger(name: str = "surgdino") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("surgdino")
        if not root.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("surgdino") else f"surgdino.{name}")
