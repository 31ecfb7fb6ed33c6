"""COCO instance json: load into dataset records and validate with one message per problem.

``load_coco_json`` runs every cheap check (structure, ids, boxes, polygons, RLE sizes, image files
present) and raises a ``DataError`` listing all problems; ``validate_coco`` returns them with
dataset statistics (and can decode every image). Messages name the file, the index, the field and
the fix, e.g. ``instances_train.json: annotations[812] (id 9133): category_id 731 is not among the
500 categories; fix the id or add the category``.

Over 400 lines on purpose: every check of a COCO file lives here, so that ``data check``, dataset
loading and evaluation report the same problems in the same words.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surgdino.data.paths import outside_root
from surgdino.data.rle import rle_problem
from surgdino.errors import DataError
from surgdino.log import get_logger

logger = get_logger(__name__)

# A box may leave the image by this many pixels (rounding in annotation tools) before it is an error.
BOX_TOLERANCE = 1.0
# At most this many problems are spelled out in a DataError message (all are in ``.problems``).
MAX_PROBLEMS_IN_MESSAGE = 20


@dataclass
class ValidationReport:
    """Problems found in a COCO json plus statistics of its images and instances."""

    json_file: str
    problems: list[str] = field(default_factory=list)
    num_images: int = 0
    num_instances: int = 0
    num_crowd: int = 0
    instances_per_image_mean: float = 0.0
    instances_per_image_max: int = 0
    images_without_annotations: int = 0
    per_class: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Human-readable statistics (classes sorted by count, rarest last)."""
        lines = [
            f"{self.json_file}",
            f"  images:                     {self.num_images}",
            f"  instances:                  {self.num_instances} ({self.num_crowd} crowd)",
            f"  instances per image:        mean {self.instances_per_image_mean:.1f}, max {self.instances_per_image_max}",
            f"  images without annotations: {self.images_without_annotations}",
            f"  classes:                    {len(self.per_class)}"
            f" ({sum(1 for c in self.per_class.values() if c == 0)} without instances)",
            "  instances per class:",
        ]
        width = max((len(n) for n in self.per_class), default=0)
        for name, count in sorted(self.per_class.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {name:<{width}}  {count}")
        return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _all_numbers(values: list[Any]) -> bool:
    """All items are finite ints/floats (fast for long polygons: type set and sum run in C)."""
    return set(map(type, values)) <= {int, float} and math.isfinite(sum(values))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_coco_json(json_file: str) -> dict[str, Any]:
    """Parse the json file; a missing file or invalid JSON is a DataError naming line and column."""
    if not os.path.isfile(json_file):
        raise DataError(f"{json_file}: annotation file not found; check the path (json_file / --annotations)")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                        "fix the file (is it truncated?)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{json_file}: not UTF-8 text ({e.reason}); is this really a COCO json?") from None
    except RecursionError:
        raise DataError(f"{json_file}: nested too deeply to parse; a COCO json is a few levels deep, "
                        "is this really one?") from None
    if not isinstance(data, dict):
        raise DataError(f"{json_file}: top level must be a JSON object with images, annotations and categories, "
                        f"got {type(data).__name__}")
    return data


def _polygon_bbox(polys: list[list[float]]) -> list[float]:
    xs = [c for p in polys for c in p[0::2]]
    ys = [c for p in polys for c in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _rle_object(segm: dict[str, Any]) -> dict[str, Any]:
    """A pycocotools RLE (compressed) from a compressed or uncompressed (list counts) RLE dict."""
    from pycocotools import mask as mask_util

    h, w = segm["size"]
    if isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, h, w)
    counts = segm["counts"]
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def segmentation_area(segm: list | dict, height: int, width: int) -> float:
    """Mask area in pixels of polygons or an RLE (COCO's ``area``), without decoding to a bitmap.

    Polygons with fewer than 3 points are ignored; the RLE must be valid (``data.rle.rle_problem``).
    """
    from pycocotools import mask as mask_util

    if isinstance(segm, dict):
        return float(mask_util.area(_rle_object(segm)))
    polys = [p for p in segm if len(p) >= 6]
    if not polys:
        return 0.0
    return float(mask_util.area(mask_util.merge(mask_util.frPyObjects(polys, height, width))))


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """A ``bool [height, width]`` mask from polygons (list of flat lists) or an RLE dict."""
    from pycocotools import mask as mask_util

    if isinstance(segm, dict):
        rle = _rle_object(segm)
    else:
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
    return mask_util.decode(rle).astype(bool)  # [H, W]


def _check_segmentation(segm: Any, h: int, w: int, where: str) -> tuple[list[str], str | None]:
    """Problems of one annotation's segmentation, and its kind ("polygon" / "rle") when usable."""
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) for s in size)):
            return [f"{where}: segmentation RLE has size {size!r}; it must be [height, width]"], None
        if counts is None or not isinstance(counts, (str, bytes, list)):
            return [f"{where}: segmentation RLE counts must be a string (compressed) or a list of run "
                    f"lengths (uncompressed), got {type(counts).__name__}"], None
        if list(size) != [h, w]:
            return [f"{where}: segmentation RLE size {size} does not match the image's [height, width] = "
                    f"[{h}, {w}]; re-encode the mask at the image's resolution or fix height/width"], None
        problem = rle_problem(segm, h, w)  # malformed compressed counts hang pycocotools
        if problem:
            return [f"{where}: {problem}"], None
        return [], "rle"
    if isinstance(segm, list):
        if not segm:
            return [f"{where}: segmentation is an empty list; add a polygon or an RLE, or remove the annotation"], None
        problems = []
        for j, poly in enumerate(segm):
            if not isinstance(poly, list) or not _all_numbers(poly):
                problems.append(f"{where}: segmentation[{j}] must be a flat list of numbers [x1, y1, x2, y2, ...]")
            elif len(poly) % 2:
                problems.append(f"{where}: segmentation[{j}] has an odd number of coordinates ({len(poly)}); "
                                "polygons are flat [x1, y1, x2, y2, ...] lists")
            elif len(poly) < 6:
                problems.append(f"{where}: segmentation[{j}] has {len(poly) // 2} points; a polygon needs at "
                                "least 3 (remove it or the annotation)")
        return problems, None if problems else "polygon"
    if segm is None:
        return [f"{where}: missing segmentation; add polygons or an RLE (instance segmentation needs masks)"], None
    return [f"{where}: segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"], None


def _scan(data: dict[str, Any], json_file: str, image_root: str, check_files: bool
          ) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """One pass over the json: (problems, records, sorted categories). Records are only valid without problems."""
    fname = os.path.basename(json_file)
    problems: list[str] = []
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    for k in missing:
        got = "missing" if k not in data else f"a {type(data[k]).__name__}, not a list"
        problems.append(f"{fname}: top-level key '{k}' is {got}; a COCO instance json needs "
                        f"'images', 'annotations' and 'categories' lists" + (" (may be empty)" if k == "annotations" else ""))
    if missing:
        return problems, [], []

    categories: dict[int, dict[str, Any]] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"{fname}: categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.append(f"{where}: needs an integer 'id' (and a 'name')")
            continue
        if cat["id"] in categories:
            problems.append(f"{where}: duplicate category id {cat['id']}; category ids must be unique")
            continue
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            problems.append(f"{where} (id {cat['id']}): needs a non-empty 'name' (class names are used in prompts and plots)")
        categories[cat["id"]] = cat
    if not categories and not problems:
        problems.append(f"{fname}: 'categories' is empty; list every class as {{\"id\": ..., \"name\": ...}}")
    sorted_ids = sorted(categories)
    id_map = {cid: i for i, cid in enumerate(sorted_ids)}

    images: dict[int, dict[str, Any]] = {}
    records: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"{fname}: images[{i}]: needs an integer 'id'")
            continue
        where = f"{fname}: images[{i}] (id {img['id']})"
        if img["id"] in images:
            problems.append(f"{where}: duplicate image id {img['id']} (also images[{images[img['id']]['_index']}]); "
                            "image ids must be unique")
            continue
        bad = False
        for k in ("height", "width"):
            if k not in img:
                problems.append(f"{where}: missing '{k}'; add the image's size in pixels")
                bad = True
            elif not (_is_int(img[k]) and img[k] > 0):
                problems.append(f"{where}: '{k}' = {img[k]!r} must be a positive integer")
                bad = True
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            problems.append(f"{where}: missing 'file_name'; add the image path relative to the image root")
            bad = True
        elif outside_root(img["file_name"]):
            problems.append(f"{where}: file_name {img['file_name']!r} leaves the image root (absolute path or '..'); "
                            "file names must be relative paths inside image_root / --image-root")
            bad = True
        images[img["id"]] = {**img, "_index": i}
        if bad:
            continue
        path = os.path.join(image_root, img["file_name"])
        if check_files and not os.path.isfile(path):
            problems.append(f"{where}: image file not found: {path}; check image_root / --image-root and file_name")
        records[img["id"]] = {"file_name": path, "height": img["height"], "width": img["width"],
                              "image_id": img["id"], "annotations": []}

    ann_ids: dict[Any, int] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(f"{fname}: annotations[{i}]: must be an object")
            continue
        where = f"{fname}: annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
        if "id" in ann:
            if not _is_int(ann["id"]) and not isinstance(ann["id"], str):
                problems.append(f"{where}: 'id' must be an integer")
            elif ann["id"] in ann_ids:
                problems.append(f"{where}: duplicate annotation id {ann['id']} (also annotations[{ann_ids[ann['id']]}]); "
                                "annotation ids must be unique")
            else:
                ann_ids[ann["id"]] = i
        n_before = len(problems)
        image_id = ann.get("image_id")
        img = images.get(image_id) if _is_int(image_id) else None
        if img is None:
            problems.append(f"{where}: image_id {image_id!r} is not among the {len(images)} images; "
                            "fix the id or add the image")
        cid = ann.get("category_id")
        if not _is_int(cid) or cid not in id_map:
            problems.append(f"{where}: category_id {cid!r} is not among the {len(categories)} categories; "
                            "fix the id or add the category")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, float):
            problems.append(f"{where}: iscrowd = {iscrowd!r} must be 0 or 1")
        if img is None or image_id not in records:
            continue
        h, w = img["height"], img["width"]
        segm = ann.get("segmentation")
        segm_problems, kind = _check_segmentation(segm, h, w, where)
        problems += segm_problems
        bbox = ann.get("bbox")
        if bbox is None and kind == "polygon":
            bbox = _polygon_bbox(segm)
        elif bbox is None and kind == "rle":
            from pycocotools import mask as mask_util

            bbox = [float(v) for v in mask_util.toBbox(_rle_object(segm))]
        if bbox is None:
            problems.append(f"{where}: missing bbox; add [x, y, width, height] in pixels")
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.append(f"{where}: bbox {bbox!r} must be 4 finite numbers [x, y, width, height]")
        else:
            x, y, bw, bh = bbox
            if bw <= 0 or bh <= 0:
                problems.append(f"{where}: bbox {bbox} has non-positive size (width {bw}, height {bh}); "
                                "bbox is [x, y, width, height], not [x1, y1, x2, y2]; fix or remove the annotation")
            elif (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE
                  or y + bh > h + BOX_TOLERANCE):
                problems.append(f"{where}: bbox {bbox} leaves the {w}x{h} image (x2 = {x + bw:g}, y2 = {y + bh:g}); "
                                "clip it to the image or fix the image's width/height")
        area = ann.get("area")
        if area is not None and not (_is_number(area) and area >= 0):
            problems.append(f"{where}: area = {area!r} must be a non-negative number (or leave it out)")
        if len(problems) > n_before or kind is None:
            continue
        if area is None:
            area = segmentation_area(segm, h, w)
        records[image_id]["annotations"].append({
            "bbox": [float(v) for v in bbox],
            "category_id": id_map[cid],
            "segmentation": segm,
            "iscrowd": int(iscrowd),
            "area": float(area),
        })
    cats = [categories[c] for c in sorted_ids]
    return problems, list(records.values()), cats


def _raise_problems(json_file: str, problems: list[str], image_root: str) -> None:
    shown = problems[:MAX_PROBLEMS_IN_MESSAGE]
    more = len(problems) - len(shown)
    msg = (f"{json_file}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the annotations:\n  "
           + "\n  ".join(shown)
           + (f"\n  ... and {more} more" if more else "")
           + f"\nList them all with: surgdino data check --annotations {json_file} --image-root {image_root}")
    raise DataError(msg, problems)


def load_coco(json_file: str, image_root: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, categories sorted by id) of a COCO instance json; see ``load_coco_json``."""
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    data = read_coco_json(json_file)
    problems, records, cats = _scan(data, json_file, image_root, check_files=True)
    if problems:
        _raise_problems(json_file, problems, image_root)
    n_inst = sum(len(r["annotations"]) for r in records)
    logger.info(f"Loaded {len(records)} images, {n_inst} instances, {len(cats)} classes from {json_file}")
    return records, cats


def load_coco_json(json_file: str, image_root: str) -> list[dict[str, Any]]:
    """Dataset records (file_name, height, width, image_id, annotations) from a COCO instance json.

    Category ids become contiguous 0..C-1 in order of the original ids; segmentations are kept as
    given (polygons or RLE). Images without annotations are kept. Any problem raises a DataError
    listing all of them. Class names and the id map: ``load_coco`` (the catalog fills a dataset's
    metadata from them).
    """
    return load_coco(json_file, image_root)[0]


def _check_image_file(path: str, h: int, w: int, where: str, decode: bool) -> str | None:
    """A problem with the image file (unreadable, size mismatch, undecodable pixels) or None.

    The size is the one training and ``predict`` see: EXIF orientation applied (``data.imageio``).
    """
    from surgdino.data.imageio import image_size

    try:
        size = image_size(path, decode=decode)  # (W, H) as read
    except DataError as e:
        return f"{where}: {e}"
    if (w, h) != size:
        hint = (" (the stored size before its EXIF orientation is applied; images are read upright: fix "
                "width/height and the annotations, or strip the EXIF orientation)" if (h, w) == size else "")
        return f"{where}: image {path} is {size[0]}x{size[1]} (WxH) but the json says {w}x{h}{hint}; " \
               "fix width/height in the json"
    return None


def validate_coco(json_file: str, image_root: str, check_images: bool = True,
                  decode_images: bool = False) -> ValidationReport:
    """All problems of a COCO json and statistics; ``check_images`` reads each image header
    (existence, size), ``decode_images`` decodes all pixels too (slow)."""
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    check_images = check_images or decode_images
    report = ValidationReport(json_file=json_file)
    try:
        data = read_coco_json(json_file)
    except DataError as e:
        report.problems.append(str(e))
        return report
    problems, records, cats = _scan(data, json_file, image_root, check_files=check_images)
    if isinstance(data.get("images"), list) and not data["images"]:
        problems.append(f"{os.path.basename(json_file)}: 'images' is empty; a dataset needs at least one image "
                        "(is this the right json?)")
    if check_images:
        fname = os.path.basename(json_file)
        index: dict[int, int] = {}
        for i, img in enumerate(data.get("images", [])):
            if isinstance(img, dict) and _is_int(img.get("id")):
                index.setdefault(img["id"], i)
        todo = [r for r in records if os.path.isfile(r["file_name"])]  # missing files: reported by _scan

        def check(r: dict[str, Any]) -> str | None:
            where = f"{fname}: images[{index.get(r['image_id'], '?')}] (id {r['image_id']})"
            return _check_image_file(r["file_name"], r["height"], r["width"], where, decode_images)

        # Threads: PIL releases the GIL while decoding; results keep the images' order.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems += [p for p in pool.map(check, todo, chunksize=16) if p]
    report.problems = problems
    counts = [sum(1 for a in r["annotations"] if not a["iscrowd"]) for r in records]
    report.num_images = len(data["images"]) if isinstance(data.get("images"), list) else 0
    report.num_instances = sum(len(r["annotations"]) for r in records)
    report.num_crowd = report.num_instances - sum(counts)
    report.instances_per_image_mean = float(np.mean(counts)) if counts else 0.0
    report.instances_per_image_max = max(counts, default=0)
    report.images_without_annotations = sum(1 for r in records if not r["annotations"])
    per_class = Counter(a["category_id"] for r in records for a in r["annotations"])
    names = [str(c.get("name", c["id"])) for c in cats]
    dup = {n for n, k in Counter(names).items() if k > 1}
    report.per_class = {(f"{n} (id {c['id']})" if n in dup else n): per_class.get(i, 0)
                        for i, (n, c) in enumerate(zip(names, cats))}
    return report
