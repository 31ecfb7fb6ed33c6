"""Config-versus-dataset checks run before training (``train``, ``--eval-only``, ``config show``).

Problems that would otherwise surface late: a model with more or fewer classes than its dataset
(a raw KeyError in the final evaluation, after the whole training), train and test datasets whose
class lists differ (contiguous ids would mean different classes), and fewer queries than a
DETR-family model needs for the densest image (a warning naming both numbers and the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)

# DETR-family models need several times more queries than objects (one query per object after
# matching, the rest learn "no object"); below twice the maximum a dense image loses instances.
QUERY_FACTOR = 2


@dataclass(frozen=True)
class DatasetStats:
    """What the checks and ``config init`` need to know about one dataset."""

    name: str
    source: str  # the json file, for messages
    num_images: int
    num_instances: int
    max_instances: int  # non-crowd instances in the densest image
    classes: tuple[str, ...]


def dataset_stats(name: str) -> DatasetStats:
    """Statistics of a registered dataset (loads, and so validates, it)."""
    from surgdino.data.catalog import DatasetCatalog, MetadataCatalog

    records = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    counts = [sum(1 for a in r.get("annotations", []) if not a.get("iscrowd", 0)) for r in records]
    return DatasetStats(name=name, source=str(meta.get("json_file", name)), num_images=len(records),
                        num_instances=sum(counts), max_instances=max(counts, default=0),
                        classes=tuple(meta.get("thing_classes", None) or ()))


def _uses_num_classes(cfg: Any) -> bool:
    """Closed-vocabulary models size their class head by ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``."""
    return "grounding" not in str(cfg.MODEL.META_ARCHITECTURE).lower()


def check_classes(cfg: Any, stats: list[DatasetStats]) -> None:
    """The config's class count equals each dataset's, and all datasets share one class list."""
    if not stats:
        return
    first = stats[0]
    for s in stats[1:]:
        if s.classes and first.classes and s.classes != first.classes:
            extra = sorted(set(s.classes) ^ set(first.classes))[:5]
            diff = f" (differing: {extra})" if extra else " (same names, other order)"
            raise ConfigError(f"dataset {s.name!r} ({s.source}) has {len(s.classes)} categories and "
                              f"{first.name!r} ({first.source}) has {len(first.classes)}{diff}; train and test "
                              "datasets need the same categories list (the same ids) so class numbers mean the same")
    if not _uses_num_classes(cfg):
        return
    num = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    k = len(first.classes)
    if k and num != k:
        if num < k:
            why = f"its category ids {num}..{k - 1} (contiguous) cannot be held by the model"
        else:
            why = (f"the model would predict classes {k}..{num - 1} that the dataset does not have "
                   "(and its evaluation could not name them)")
        raise ConfigError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num} but dataset {first.name!r} ({first.source}) has "
                          f"{k} categories: {why}; set MODEL.SEM_SEG_HEAD.NUM_CLASSES {k}")


def query_warnings(cfg: Any, stats: list[DatasetStats]) -> list[str]:
    """Warnings when the densest training image has more instances than the queries (or detections
    kept per image) comfortably hold."""
    dense = max(stats, key=lambda s: s.max_instances, default=None)
    if dense is None or dense.max_instances == 0 or not hasattr(cfg.MODEL, "MaskDINO"):
        return []
    n = dense.max_instances
    out = []
    m = cfg.MODEL.MaskDINO
    where = f"dataset {dense.name!r} has up to {n} instances per image"
    if m.NUM_OBJECT_QUERIES < QUERY_FACTOR * n:
        out.append(f"{where} but MODEL.MaskDINO.NUM_OBJECT_QUERIES is {m.NUM_OBJECT_QUERIES}: DETR-family models "
                   f"need several times more queries than objects; raise MODEL.MaskDINO.NUM_OBJECT_QUERIES to at "
                   f"least {QUERY_FACTOR * n} (and FIRST_SELECTED_QUERIES with it)")
    if cfg.TEST.DETECTIONS_PER_IMAGE < n:
        out.append(f"{where} but TEST.DETECTIONS_PER_IMAGE is {cfg.TEST.DETECTIONS_PER_IMAGE}: instances are "
                   f"lost at inference; raise TEST.DETECTIONS_PER_IMAGE to at least {n}")
    if cfg.TEST.MAX_DETS and max(cfg.TEST.MAX_DETS) < n:
        out.append(f"{where} but TEST.MAX_DETS is {list(cfg.TEST.MAX_DETS)}: COCO AP counts only that many "
                   f"detections per image; raise its last value to at least {n}")
    return out


def check_datasets(cfg: Any, *, train: bool = True) -> list[str]:
    """Check the config against its datasets (registered first): class counts are errors, query
    budgets warnings (logged and returned)."""
    from surgdino.data.catalog import register_datasets_from_config

    register_datasets_from_config(cfg)
    train_stats = [dataset_stats(n) for n in cfg.DATASETS.TRAIN] if train else []
    test_stats = [dataset_stats(n) for n in cfg.DATASETS.TEST]
    check_classes(cfg, train_stats + test_stats)
    warnings = query_warnings(cfg, train_stats)
    for w in warnings:
        logger.warning(w)
    return warnings
