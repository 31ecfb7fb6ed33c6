"""Datasets: catalog (datasets by name), COCO loading and validation, synthetic trays, mappers.

Names are imported on first use (PEP 562), so the command line builds its parser without numpy.
"""

from __future__ import annotations

from surgdino.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
