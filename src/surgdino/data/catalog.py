"""Datasets by name: ``DatasetCatalog`` (name → records) and ``MetadataCatalog`` (name → class names etc.).

Datasets are declared in the config (``DATASETS.REGISTER``: ``{name, json_file, image_root}``) or
registered from Python (``register_coco_instances`` / ``DatasetCatalog.register``); adding one never
needs an edit of the toolkit. The names ``synthetic_trays_train`` / ``synthetic_trays_val`` are
the generated instrument trays, created under ``DATASETS.SYNTHETIC_ROOT`` on first use.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from surgdino.errors import ConfigError, DataError
from surgdino.log import get_logger

logger = get_logger(__name__)

SYNTHETIC_NAMES = {"synthetic_trays_train": "train", "synthetic_trays_val": "val"}
DEFAULT_SYNTHETIC_ROOT = "~/.cache/surgdino/synthetic_trays"


class _DatasetCatalog:
    """Name → function returning a list of records; ``get`` calls it once and caches the result."""

    def __init__(self) -> None:
        self._fns: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def register(self, name: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
        if not callable(fn):
            raise DataError(f"dataset {name!r}: register() needs a function returning records, got {type(fn).__name__}")
        if name in self._fns:
            raise DataError(f"dataset {name!r} is already registered; remove it first or pick another name")
        self._fns[name] = fn

    def get(self, name: str) -> list[dict[str, Any]]:
        """The dataset's records (a new list; the record dicts are shared and must not be modified)."""
        if name not in self._fns:
            builtin = (f" ({name!r} is one of detectron2's built-in datasets, which official configs name; SurgDINO "
                       "has none built in: register it with its files)"
                       if re.match(r"^(coco|lvis|cityscapes|ade20k|voc|keypoints_coco|openimages)_", name) else "")
            raise ConfigError(
                f"unknown dataset {name!r}{builtin}; registered: {self.names() or 'none'}. Declare it in the config "
                "under DATASETS.REGISTER as {name, json_file, image_root} or call register_coco_instances()"
            )
        if name not in self._cache:
            records = self._fns[name]()
            if not isinstance(records, list):
                raise DataError(f"dataset {name!r}: its registered function returned {type(records).__name__}, "
                                "not a list of records")
            self._cache[name] = records
        return list(self._cache[name])

    def names(self) -> list[str]:
        return sorted(self._fns)

    list = names  # detectron2 spelling

    def __contains__(self, name: str) -> bool:
        return name in self._fns

    def remove(self, name: str) -> None:
        self._fns.pop(name, None)
        self._cache.pop(name, None)
        MetadataCatalog.remove(name)

    def clear(self) -> None:
        for name in list(self._fns):
            self.remove(name)


class Metadata:
    """An attribute bag for one dataset: ``thing_classes``, ``thing_dataset_id_to_contiguous_id``,
    ``json_file``, ``image_root``, ``evaluator_type``. Class attributes of a registered but not
    yet loaded dataset are filled by loading it on first access."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_loader", None)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        loader = self.__dict__.get("_loader")
        if loader is not None:
            loader()
            object.__setattr__(self, "_loader", None)
            if key in self.__dict__:
                return self.__dict__[key]
        raise AttributeError(f"metadata of dataset {self.name!r} has no {key!r}; it has {sorted(self.as_dict())}")

    def set(self, **kwargs: Any) -> Metadata:
        for k, v in kwargs.items():
            object.__setattr__(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"Metadata({self.as_dict()})"


class _MetadataCatalog:
    """Name → ``Metadata``, created empty on first ``get``."""

    def __init__(self) -> None:
        self._meta: dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        if name not in self._meta:
            self._meta[name] = Metadata(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._meta)

    def remove(self, name: str) -> None:
        self._meta.pop(name, None)


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def load_coco_dataset(name: str, json_file: str, image_root: str) -> list[dict[str, Any]]:
    """Records of a COCO json; fills dataset ``name``'s metadata (class names, id map, files)."""
    from surgdino.data.coco import load_coco

    records, cats = load_coco(json_file, image_root)
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        json_file=os.path.abspath(os.path.expanduser(json_file)),
        image_root=os.path.abspath(os.path.expanduser(image_root)), evaluator_type="coco",
    )
    return records


def register_coco_instances(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instance json; loading (and its validation) happens on first use.

    Registering the same name again with the same files is a no-op; with other files an error.
    """
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    if name in DatasetCatalog:
        meta = MetadataCatalog.get(name).__dict__
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        raise DataError(f"dataset {name!r} is already registered with json_file={meta.get('json_file')}, "
                        f"image_root={meta.get('image_root')}; use another name for {json_file}")
    DatasetCatalog.register(name, lambda: load_coco_dataset(name, json_file, image_root))
    meta = MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    object.__setattr__(meta, "_loader", lambda: DatasetCatalog.get(name))


def register_datasets_from_config(cfg: Any) -> list[str]:
    """Register every ``cfg.DATASETS.REGISTER`` item and the synthetic tray datasets; returns the names."""
    names = []
    seen: dict[str, int] = {}
    for i, item in enumerate(cfg.DATASETS.REGISTER):
        where = f"DATASETS.REGISTER[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} = {item!r} must be a mapping {{name, json_file, image_root}}")
        missing = [k for k in ("name", "json_file", "image_root") if not item.get(k)]
        if missing:
            raise ConfigError(f"{where} ({item.get('name', 'no name')!r}) is missing {', '.join(missing)}; each item "
                              "needs name, json_file (COCO json) and image_root (folder of the images)")
        unknown = sorted(set(item) - {"name", "json_file", "image_root"})
        if unknown:
            raise ConfigError(f"{where} ({item['name']!r}) has unknown field(s) {unknown}; "
                              "allowed: name, json_file, image_root")
        name = str(item["name"])
        if name in seen:
            raise ConfigError(f"{where}: dataset name {name!r} is also DATASETS.REGISTER[{seen[name]}]; names must be unique")
        if name in SYNTHETIC_NAMES:
            raise ConfigError(f"{where}: {name!r} is reserved for the generated trays; pick another name")
        seen[name] = i
        json_file = os.path.abspath(os.path.expanduser(str(item["json_file"])))
        image_root = os.path.abspath(os.path.expanduser(str(item["image_root"])))
        meta = MetadataCatalog.get(name).__dict__ if name in DatasetCatalog else {}
        if meta and (meta.get("json_file"), meta.get("image_root")) != (json_file, image_root):
            # The config is the source of truth for its names (a later config in the same process wins).
            logger.info(f"Dataset {name!r} re-declared by the config: {json_file} replaces {meta.get('json_file')}")
            DatasetCatalog.remove(name)
        try:
            register_coco_instances(name, json_file, image_root)
        except DataError as e:
            raise ConfigError(f"{where}: {e}") from None
        names.append(name)
    root = cfg.DATASETS.SYNTHETIC_ROOT or DEFAULT_SYNTHETIC_ROOT
    for name in SYNTHETIC_NAMES:
        register_synthetic(name, root)
        names.append(name)
    return names


def synthetic_paths(root: str, split: str) -> tuple[str, str]:
    """(json_file, image_root) of a generated split: ``root/annotations/instances_{split}.json``, ``root/{split}``."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def ensure_synthetic_dataset(root: str) -> None:
    """Generate the default synthetic trays under ``root`` unless they are there already.

    Generated into a temporary sibling folder and renamed, so concurrent processes never read a
    half-written dataset; in a process group rank 0 generates and the others wait.
    """
    from surgdino import comm

    root = os.path.abspath(os.path.expanduser(root))
    if all(os.path.isfile(synthetic_paths(root, s)[0]) for s in SYNTHETIC_NAMES.values()):
        return
    if os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root} exists but has no annotations/instances_{{train,val}}.json; delete it or point "
                        "DATASETS.SYNTHETIC_ROOT at another folder (it is generated there on first use)")
    if comm.is_main_process():
        from surgdino.data.synthetic import generate_synthetic_dataset

        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
        logger.info(f"Generating the synthetic tray dataset in {root} (first use)")
        try:
            generate_synthetic_dataset(tmp)
            if os.path.isdir(root) and not os.listdir(root):
                os.rmdir(root)
            os.rename(tmp, root)
        except OSError:
            if not all(os.path.isfile(synthetic_paths(root, s)[0]) for s in SYNTHETIC_NAMES.values()):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # left over if another process renamed first
    comm.synchronize()
    for split in SYNTHETIC_NAMES.values():
        if not os.path.isfile(synthetic_paths(root, split)[0]):
            raise DataError(f"{root}: the generator wrote no {synthetic_paths(root, split)[0]}")


def register_synthetic(name: str, root: str) -> None:
    """Register one synthetic split (``synthetic_trays_train``/``_val``), generated on first ``get``."""
    root = os.path.abspath(os.path.expanduser(root))
    split = SYNTHETIC_NAMES[name]
    json_file, image_root = synthetic_paths(root, split)
    if name in DatasetCatalog:
        if MetadataCatalog.get(name).__dict__.get("synthetic_root") == root:
            return
        DatasetCatalog.remove(name)  # a new SYNTHETIC_ROOT replaces the old one

    def load() -> list[dict[str, Any]]:
        ensure_synthetic_dataset(root)
        return load_coco_dataset(name, json_file, image_root)

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                         synthetic_root=root)
    object.__setattr__(meta, "_loader", lambda: DatasetCatalog.get(name))
