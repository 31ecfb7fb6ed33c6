"""Datasets: catalog (datasets by name), COCO loading and validation, synthetic trays, mappers.

Names are imported on first use (PEP 562), so the command line builds its parser without numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetCatalog": "surgdino.data.catalog",
    "Metadata": "surgdino.data.catalog",
    "MetadataCatalog": "surgdino.data.catalog",
    "register_coco_instances": "surgdino.data.catalog",
    "register_datasets_from_config": "surgdino.data.catalog",
    "ValidationReport": "surgdino.data.coco",
    "decode_segmentation": "surgdino.data.coco",
    "load_coco_json": "surgdino.data.coco",
    "validate_coco": "surgdino.data.coco",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
