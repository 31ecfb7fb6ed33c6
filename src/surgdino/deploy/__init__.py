"""Deployment: ONNX export (``export_onnx``), the onnxruntime model (``OnnxModel``), post-processing
shared by the PyTorch and ONNX paths, and the ``Predictor`` API. Names load on first use (no torch
at import)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Predictor": "surgdino.deploy.predictor", "export_onnx": "surgdino.deploy.export",
            "OnnxModel": "surgdino.deploy.runtime"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'surgdino.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
