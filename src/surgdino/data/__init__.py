"""Datasets: catalog (datasets by name), COCO loading and validation, synthetic trays, mappers."""

from surgdino.data.catalog import (
    DatasetCatalog,
    Metadata,
    MetadataCatalog,
    register_coco_instances,
    register_datasets_from_config,
)
from surgdino.data.coco import ValidationReport, decode_segmentation, load_coco_json, validate_coco

__all__ = [
    "DatasetCatalog",
    "Metadata",
    "MetadataCatalog",
    "ValidationReport",
    "decode_segmentation",
    "load_coco_json",
    "register_coco_instances",
    "register_datasets_from_config",
    "validate_coco",
]
