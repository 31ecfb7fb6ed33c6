"""``surgdino config init``: a commented config sized from the user's COCO dataset.

Reads the training (and validation) json, measures classes, images, instances per image, object
and image sizes, and writes a YAML that inherits a packaged model (the preset) and sets every key
the data decides, each with a comment saying why. The same lines are printed.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import Any

from surgdino.errors import ConfigError

# DETR-family detectors match one query per object; the others must learn "no object". They need
# several times more queries than the densest image has objects (DINO: 900 queries for COCO's ≤ ~100).
QUERY_FACTOR = 3


@dataclass(frozen=True)
class Preset:
    base: str  # packaged config inherited through _BASE_
    what: str
    min_queries: int  # the base's queries: never fewer
    dn_groups: int  # denoising groups wanted for the densest image (each adds 2 x max instances queries)
    min_dn: int
    max_short_side: int  # input short side cap (CPU cost grows with pixels)
    batch: int
    epochs: int
    lr: float


PRESETS = {
    "demo": Preset("surgdino://demo/dimaskdino_atto_trays.yaml",
                   "the demo's CPU-sized DI-MaskDINO (ConvNeXt-atto, 64-wide heads, 3 decoder layers)",
                   min_queries=30, dn_groups=1, min_dn=20, max_short_side=384, batch=4, epochs=20, lr=1e-3),
    "tray": Preset("surgdino://Base-DIMaskDINO-ConvNeXt.yaml",
                   "DI-MaskDINO on ConvNeXt-Tiny with the paper's defaults (6 decoder layers, 256 wide)",
                   min_queries=300, dn_groups=3, min_dn=100, max_short_side=800, batch=8, epochs=50, lr=1e-4),
    "user-document": Preset("surgdino://dimaskdino_convnext_tiny_medical_instruments.yaml",
                            "the user document's dense-tray DI-MaskDINO (ConvNeXt-Tiny, res2-res5, 9 decoder "
                            "layers, 100 guiding tokens)",
                            min_queries=400, dn_groups=5, min_dn=150, max_short_side=1024, batch=8, epochs=50,
                            lr=1e-4),
}


@dataclass(frozen=True)
class Stats:
    json_file: str
    image_root: str
    classes: tuple[str, ...]
    num_images: int
    num_instances: int
    max_instances: int
    mean_instances: float
    short_side: int  # median image short side, pixels
    long_side: int  # median image long side
    object_side: float  # median sqrt(area) of the instances, pixels
    small_side: float  # 5th percentile of sqrt(area)


def guess_image_root(json_file: str) -> str:
    """``root/annotations/instances_train.json`` → ``root/train`` if it exists, else the json's folder."""
    folder = os.path.dirname(os.path.abspath(json_file))
    stem = os.path.splitext(os.path.basename(json_file))[0]
    split = stem.split("_")[-1] if "_" in stem else stem
    parent = os.path.dirname(folder) if os.path.basename(folder) == "annotations" else folder
    for candidate in (os.path.join(parent, split), os.path.join(parent, "images", split), os.path.join(parent, "images")):
        if os.path.isdir(candidate):
            return candidate
    return parent


def measure(json_file: str, image_root: str) -> Stats:
    """Load (and so validate) the dataset and measure what sizes the config."""
    from surgdino.data.coco import load_coco

    records, cats = load_coco(json_file, image_root)
    classes = tuple(c["name"] for c in cats)
    if not records:
        raise ConfigError(f"{json_file}: no images; config init needs a dataset with images")
    counts = [sum(1 for a in r["annotations"] if not a.get("iscrowd", 0)) for r in records]
    sides = sorted(math.sqrt(max(float(a.get("area", 0.0)), 0.0)) for r in records for a in r["annotations"]
                   if not a.get("iscrowd", 0))
    return Stats(
        json_file=os.path.abspath(json_file), image_root=os.path.abspath(image_root), classes=classes,
        num_images=len(records), num_instances=sum(counts), max_instances=max(counts),
        mean_instances=sum(counts) / len(counts),
        short_side=int(statistics.median(min(r["height"], r["width"]) for r in records)),
        long_side=int(statistics.median(max(r["height"], r["width"]) for r in records)),
        object_side=statistics.median(sides) if sides else 0.0,
        small_side=sides[len(sides) // 20] if sides else 0.0,
    )


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def choose(train: Stats, val: Stats | None, preset_name: str) -> list[tuple[str, Any, str]]:
    """(key, value, why) for every key the data decides."""
    preset = PRESETS[preset_name]
    densest = max(train.max_instances, val.max_instances if val else 0, 1)
    k = len(train.classes)
    out: list[tuple[str, Any, str]] = []
    out.append(("MODEL.SEM_SEG_HEAD.NUM_CLASSES", k, f"{k} categories in {os.path.basename(train.json_file)}"))
    queries = max(preset.min_queries, _round_up(QUERY_FACTOR * densest, 10))
    out.append(("MODEL.MaskDINO.NUM_OBJECT_QUERIES", queries,
                f"up to {densest} instances per image; DETR-family models need several times more queries than "
                f"objects (>= {QUERY_FACTOR}x; the preset's {preset.min_queries} at least)"))
    out.append(("MODEL.MaskDINO.FIRST_SELECTED_QUERIES", 2 * queries,
                "DI-MaskDINO's first selection keeps twice the queries (the paper's 600 for 300)"))
    dn = max(preset.min_dn, preset.dn_groups * densest)
    out.append(("MODEL.MaskDINO.DN_NUM", dn,
                f"denoising groups = DN_NUM // {densest} (max instances) = {dn // densest}; each group adds "
                f"2 x {densest} queries in training"))
    dets = min(max(100, _round_up(QUERY_FACTOR * densest, 10)), queries * k)
    out.append(("TEST.DETECTIONS_PER_IMAGE", dets,
                f"top-k over (query, class) pairs, well above the {densest} instances of the densest image"))
    out.append(("TEST.MAX_DETS", [1, 10, dets], "COCO maxDets: AP counts at most the last number of detections "
                                                "per image"))
    short = min(train.short_side, preset.max_short_side)
    scale = short / max(train.short_side, 1)
    long_side = _round_up(train.long_side * scale, 32)
    if preset_name != "demo":  # the LSJ mapper of the ConvNeXt-Tiny configs: square crops of IMAGE_SIZE
        size = min(_round_up(train.long_side, 32), 1024)
        out.append(("INPUT.IMAGE_SIZE", size, f"large-scale jitter crops at the median long side "
                                              f"{train.long_side} px (at most the document's 1024)"))
    else:
        out.append(("INPUT.MIN_SIZE_TRAIN", [short],
                    f"median image short side {train.short_side} px"
                    + (f", capped at {preset.max_short_side} for the CPU-sized demo preset" if scale < 1 else "")))
        out.append(("INPUT.MAX_SIZE_TRAIN", long_side, f"median long side {train.long_side} px at the same scale"))
    out.append(("INPUT.MIN_SIZE_TEST", short, "the training scale"))
    out.append(("INPUT.MAX_SIZE_TEST", long_side, "the training scale"))
    batch = preset.batch
    iters_per_epoch = max(1, math.ceil(train.num_images / batch))
    max_iter = max(20, preset.epochs * iters_per_epoch)
    out.append(("SOLVER.IMS_PER_BATCH", batch, f"the {preset_name} preset's batch"))
    out.append(("SOLVER.BASE_LR", preset.lr, f"the {preset_name} preset's learning rate (AdamW)"))
    out.append(("SOLVER.MAX_ITER", max_iter,
                f"{preset.epochs} epochs of {train.num_images} images at batch {batch}"))
    steps = [int(max_iter * 0.8), int(max_iter * 0.9)] if preset_name != "demo" else [int(max_iter * 0.86)]
    out.append(("SOLVER.STEPS", steps, "learning rate x 0.1 at " + (
        "80% and 90% of training (the document's epochs 40 and 45 of 50)" if len(steps) == 2 else "86% (the demo's)")))
    out.append(("SOLVER.WARMUP_ITERS", min(max(10, max_iter // 30), 1000), "~3% of training (10 to 1000 iterations)"))
    period = max(10, max_iter // 4)
    out.append(("SOLVER.CHECKPOINT_PERIOD", period, "four checkpoints per run (and one on interruption)"))
    out.append(("TEST.EVAL_PERIOD", period if val else 0, "evaluate four times (curves, model_best.pth)"
                if val else "no validation split given (--val)"))
    return out


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _register_item(name: str, s: Stats, out_dir: str) -> str:
    def rel(p: str) -> str:
        try:
            return os.path.relpath(p, out_dir)
        except ValueError:  # another drive
            return p

    return f"    - {{name: {name}, json_file: {_yaml_value(rel(s.json_file))}, image_root: {_yaml_value(rel(s.image_root))}}}"


def render(train: Stats, val: Stats | None, preset_name: str, choices: list[tuple[str, Any, str]],
           output: str) -> str:
    """The YAML text: header with the dataset's statistics, datasets, then the chosen keys, each commented."""
    preset = PRESETS[preset_name]
    stem = os.path.splitext(os.path.basename(output))[0]
    out_dir = os.path.dirname(os.path.abspath(output))
    lines = [
        f"# Written by `surgdino config init --preset {preset_name}` for {train.json_file}:",
        f"#   {len(train.classes)} classes, {train.num_images} images, {train.num_instances} instances "
        f"({train.mean_instances:.1f} per image, at most {train.max_instances}),",
        f"#   images {train.short_side}x{train.long_side} px (median short x long side), objects "
        f"{train.object_side:.0f} px across (median sqrt(area); 5% under {train.small_side:.0f} px).",
    ]
    if val:
        lines.append(f"#   validation {val.json_file}: {val.num_images} images, at most {val.max_instances} instances.")
    lines += [
        f"# Model: {preset.what}.",
        "# Every other key comes from the _BASE_: `surgdino config show --config-file "
        f"{os.path.basename(output)}` prints them all,",
        "# `surgdino config keys` documents them.",
        f"_BASE_: {preset.base}",
        "DATASETS:",
        "  REGISTER:  # paths relative to this file",
        _register_item(f"{stem}_train", train, out_dir),
    ]
    if val:
        lines.append(_register_item(f"{stem}_val", val, out_dir))
    lines += [f"  TRAIN: [{stem}_train]", f"  TEST: [{stem}_val]" if val else "  TEST: []"]
    tree: dict[str, Any] = {}
    for key, value, why in choices:
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = (value, why)

    def emit(node: dict[str, Any], indent: int) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 2)
            else:
                value, why = v
                lines.append(" " * indent + f"{k}: {_yaml_value(value)}  # {why}")

    emit(tree, 0)
    lines.append(f"OUTPUT_DIR: ./output/{stem}")
    return "\n".join(lines) + "\n"


def init_config(train_json: str, output: str, *, val_json: str | None = None, image_root: str | None = None,
                val_image_root: str | None = None, preset: str = "demo", force: bool = False,
                log: Any = print) -> str:
    """Measure the dataset, write the config to ``output`` and ``log`` what was chosen and why; returns the text."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: one of {sorted(PRESETS)}")
    if os.path.isdir(output):
        raise ConfigError(f"--output {output} is a directory; give a file name such as {os.path.join(output, 'my.yaml')}")
    if os.path.exists(output) and not force:
        raise ConfigError(f"--output {output} exists; choose another name or add --force to overwrite it")
    for flag, path in (("--annotations", train_json), ("--val", val_json)):
        if path and os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a directory, not a COCO json file")
    train = measure(train_json, image_root or guess_image_root(train_json))
    val = measure(val_json, val_image_root or guess_image_root(val_json)) if val_json else None
    if val and val.classes != train.classes:
        raise ConfigError(f"{val_json} has other categories than {train_json} ({len(val.classes)} vs "
                          f"{len(train.classes)}); both splits need the same categories list")
    choices = choose(train, val, preset)
    text = render(train, val, preset, choices, output)
    from surgdino.config.core import load_config

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        load_config(tmp)  # what we write must load
    except ConfigError:
        os.remove(tmp)
        raise
    os.replace(tmp, output)
    log(f"{os.path.basename(train_json)}: {len(train.classes)} classes, {train.num_images} images, "
        f"{train.num_instances} instances (at most {train.max_instances} per image), images "
        f"{train.short_side}x{train.long_side} px, objects ~{train.object_side:.0f} px")
    log(f"preset {preset}: {PRESETS[preset].what} (_BASE_: {PRESETS[preset].base})")
    for key, value, why in choices:
        log(f"  {key} = {_yaml_value(value)}: {why}")
    if train.small_side and train.small_side * (choices_value(choices, "INPUT.MIN_SIZE_TEST") / train.short_side) < 8:
        log("  note: 5% of the objects are under 8 px across at this input size; raise INPUT.MIN_SIZE_* for them")
    log(f"wrote {output}; train with: surgdino train --config-file {output}")
    return text


def choices_value(choices: list[tuple[str, Any, str]], key: str) -> Any:
    return next(v for k, v, _ in choices if k == key)
