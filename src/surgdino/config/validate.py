"""Cross-key checks run after merging (conflicting keys are errors that say the fix)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from surgdino.errors import ConfigError

if TYPE_CHECKING:
    from surgdino.config.core import Config

# DATASETS.REGISTER fields and the other spellings accepted for them (any case).
DATASET_FIELDS = {"name": ("name",), "json_file": ("json_file", "json"), "image_root": ("image_root",)}


def normalize_dataset_item(item: Any) -> Any:
    """``{NAME, JSON, IMAGE_ROOT}`` (the README's spelling) and ``{name, json_file, image_root}`` are the
    same item; fields are returned in the lowercase spelling. Unknown fields are kept (validation names them)."""
    if not isinstance(item, Mapping):
        return item
    spellings = {alias: field for field, aliases in DATASET_FIELDS.items() for alias in aliases}
    out: dict[str, Any] = {}
    for k, v in item.items():
        out[spellings.get(str(k).lower(), k)] = v
    return out



def validate(cfg: Config) -> None:
    s = cfg.SOLVER
    if s.STEPS and any(b <= a for a, b in zip(s.STEPS, s.STEPS[1:])):
        raise ConfigError(f"SOLVER.STEPS = {s.STEPS} must be increasing")
    if s.IMS_PER_BATCH < 1:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} must be >= 1")
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE in ("absolute", "absolute_range") and len(cfg.INPUT.CROP.SIZE) != 2:
        raise ConfigError(f"INPUT.CROP.SIZE = {cfg.INPUT.CROP.SIZE} must hold two numbers")
    weights = cfg.MODEL.WEIGHTS
    if weights and os.path.isdir(os.path.expanduser(weights)):
        inside = sorted(f for f in os.listdir(os.path.expanduser(weights)) if f.endswith((".pth", ".pkl", ".pt")))
        hint = f", e.g. {os.path.join(weights, 'model_final.pth' if 'model_final.pth' in inside else inside[0])}" if inside else ""
        raise ConfigError(f"MODEL.WEIGHTS {weights} is a directory, not a weights file; give a .pth or .pkl file{hint}")
    _check_register(cfg.DATASETS.REGISTER)
    for hook in _EXTRA_CHECKS:
        hook(cfg)


_EXTRA_CHECKS: list = []


def register_check(fn):
    """Modules add cross-key checks of their own section (e.g. the pixel decoder's feature levels)."""
    _EXTRA_CHECKS.append(fn)
    return fn


def _check_register(items: list) -> None:
    """Each ``DATASETS.REGISTER`` item is ``{name, json_file, image_root}`` (or ``{NAME, JSON, IMAGE_ROOT}``)."""
    fields = list(DATASET_FIELDS)
    for i, item in enumerate(items):
        where = f"DATASETS.REGISTER[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} = {item!r} must be a mapping {{name, json_file, image_root}}")
        label = f"{where} ({item['name']!r})" if item.get("name") else where
        unknown = sorted(str(k) for k in item if k not in DATASET_FIELDS)
        if unknown:
            close = [difflib.get_close_matches(k.lower(), fields, n=1, cutoff=0.5) for k in unknown]
            hints = [f"{k} (did you mean {c[0]}?)" if c else k for k, c in zip(unknown, close)]
            raise ConfigError(f"{label} has unknown field(s) {', '.join(hints)}; allowed: name, json_file (or JSON), "
                              "image_root")
        missing = [k for k in fields if not item.get(k)]
        if missing:
            raise ConfigError(f"{label} is missing {', '.join(missing)}; each item needs name, json_file (the COCO "
                              "json) and image_root (the folder of its images)")
