"""COCO json in and out: ground truth read and checked, model outputs turned into results, results checked.

Everything pycocotools would trust is checked here first, with a message naming the file, the entry
and the fix: ids, boxes (finite, non-negative size), scores (finite), RLE sizes and counts (malformed
compressed counts make pycocotools read garbage or hang in ``rleIou``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from surgdino.data.coco import segmentation_area
from surgdino.data.rle import rle_problem
from surgdino.errors import SurgDinoError


def read_json(path: str, what: str, flag: str) -> Any:
    """Parse a json file; a missing file or invalid JSON is a SurgDinoError naming the file and the place."""
    if not os.path.isfile(path):
        raise SurgDinoError(f"{path}: {what} file not found; check the path ({flag})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SurgDinoError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                            f"fix the {what} file (is it truncated?)") from None
    except UnicodeDecodeError as e:
        raise SurgDinoError(f"{path}: not UTF-8 text ({e.reason}); is this really a COCO {what} file?") from None
    except RecursionError:
        raise SurgDinoError(f"{path}: nested too deeply to parse; is this really a COCO {what} file?") from None


def load_ground_truth(json_file: str) -> dict[str, Any]:
    """Read a COCO instances json for evaluation; fills ``iscrowd`` (0) and ``area`` (mask area) where missing."""
    data = read_json(json_file, "annotation", "json_file / --annotations")
    if not isinstance(data, dict):
        raise SurgDinoError(f"{json_file}: top level must be a JSON object with images, annotations and "
                            f"categories, got {type(data).__name__}")
    return prepare_ground_truth(data, json_file)


def prepare_ground_truth(data: dict[str, Any], source: str = "ground truth") -> dict[str, Any]:
    """Check the fields COCOeval needs and fill the optional ones; returns a new dict."""
    for field in ("images", "categories"):
        if not isinstance(data.get(field), list):
            raise SurgDinoError(f"{source}: field {field!r} must be a list; a COCO instances json has "
                                "images, annotations and categories")
    data = dict(data)
    images = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not all(isinstance(img.get(k), int) for k in ("id", "height", "width")):
            raise SurgDinoError(f"{source}: images[{i}] needs integer id, height and width")
        images[img["id"]] = img
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise SurgDinoError(f"{source}: categories[{i}] needs an integer id (and a name)")
    cat_ids = {c["id"] for c in data["categories"]}
    anns = []
    for i, a in enumerate(data.get("annotations") or []):
        where = f"{source}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict) or "id" not in a:
            raise SurgDinoError(f"{where} must be an object with an id")
        if a.get("image_id") not in images:
            raise SurgDinoError(f"{where} has image_id {a.get('image_id')!r}, not among the images; fix the id")
        if a.get("category_id") not in cat_ids:
            raise SurgDinoError(f"{where} has category_id {a.get('category_id')!r}, not among the categories")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise SurgDinoError(f"{where} needs bbox [x, y, w, h]")
        segm = a.get("segmentation")
        if isinstance(segm, dict):
            img = images[a["image_id"]]
            problem = (f"segmentation RLE size {segm.get('size')} is not the image's [height, width] = "
                       f"{[img['height'], img['width']]}" if segm.get("size") != [img["height"], img["width"]]
                       else rle_problem(segm, img["height"], img["width"]))
            if problem:
                raise SurgDinoError(f"{where}: {problem}")
        elif segm is not None and not (isinstance(segm, list) and all(isinstance(p, list) for p in segm)):
            raise SurgDinoError(f"{where}: segmentation must be a list of polygons or an RLE dict")
        a = dict(a)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = _segmentation_area(a.get("segmentation"), images[a["image_id"]], bbox)
        anns.append(a)
    data["annotations"] = anns
    return data


def _segmentation_area(segm: Any, img: dict[str, Any], bbox: list[float]) -> float:
    """Area of a polygon/RLE segmentation (COCO's definition of ``area``), else the box area."""
    if isinstance(segm, dict) or segm:
        return segmentation_area(segm, img["height"], img["width"])
    return float(bbox[2] * bbox[3])


def records_to_coco_dict(records: list[dict[str, Any]], thing_classes: Sequence[str],
                         contiguous_to_dataset_id: dict[int, int] | None = None) -> dict[str, Any]:
    """COCO ground truth from dataset records (contiguous category ids mapped back to dataset ids)."""
    to_id = contiguous_to_dataset_id or {i: i for i in range(len(thing_classes))}
    images, anns = [], []
    for r in records:
        images.append({"id": int(r["image_id"]), "height": int(r["height"]), "width": int(r["width"]),
                       "file_name": r.get("file_name", "")})
        for a in r.get("annotations", []):
            ann = {"id": len(anns) + 1, "image_id": int(r["image_id"]), "bbox": [float(v) for v in a["bbox"]],
                   "category_id": int(to_id[int(a["category_id"])]), "iscrowd": int(a.get("iscrowd", 0))}
            if a.get("segmentation") is not None:
                ann["segmentation"] = a["segmentation"]
            if "area" in a:
                ann["area"] = float(a["area"])
            anns.append(ann)
    cats = [{"id": int(to_id[i]), "name": str(n)} for i, n in enumerate(thing_classes)]
    return prepare_ground_truth({"images": images, "annotations": anns, "categories": cats}, "dataset records")


def instances_to_coco_results(output: dict[str, Any], image_id: int,
                              contiguous_to_dataset_id: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """One image's model output as COCO results: boxes XYWH, masks RLE (str counts), dataset category ids."""
    from pycocotools import mask as mask_util

    scores = torch.as_tensor(output["scores"]).detach().float().cpu().tolist()
    if not scores:
        return []
    labels = torch.as_tensor(output["labels"]).detach().cpu().tolist()
    boxes = torch.as_tensor(output["boxes"]).detach().float().cpu().reshape(-1, 4).clone()  # [K, 4] xyxy
    boxes[:, 2:] -= boxes[:, :2]  # [K, 4] xywh
    rles: list[dict[str, Any]] | None = None
    masks = output.get("masks")
    if isinstance(masks, torch.Tensor):
        m = masks.detach().cpu().bool().numpy()  # [K, H, W]
        rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))  # [H, W, K] → K RLEs
    elif masks is not None:
        rles = list(masks)
    results = []
    for k, (score, label, box) in enumerate(zip(scores, labels, boxes.tolist())):
        label = int(label)
        r = {"image_id": int(image_id), "score": float(score), "bbox": [float(v) for v in box],
             "category_id": int(contiguous_to_dataset_id[label]) if contiguous_to_dataset_id else label}
        if rles is not None:
            rle = rles[k]
            counts = rle["counts"]
            r["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                 "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        results.append(r)
    return results


def validate_results(results: Any, gt: dict[str, Any], iou_types: Sequence[str], source: str = "results",
                     gt_source: str = "the ground truth") -> None:
    """Check a COCO results list against the ground truth; raise a SurgDinoError naming the first problem."""
    if not isinstance(results, list):
        raise SurgDinoError(f"{source}: top level must be a JSON list of detections "
                            f"[{{image_id, category_id, score, bbox, segmentation}}], got {type(results).__name__}")
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, r in enumerate(results):
        where = f"{source}: result {i}"
        if not isinstance(r, dict):
            raise SurgDinoError(f"{where} must be an object with image_id, category_id, score and bbox/segmentation")
        if r.get("image_id") not in images:
            raise SurgDinoError(f"{where} has image_id {r.get('image_id')!r}, which is not an image of {gt_source}; "
                                "results must use the ids of its \"images\"")
        if r.get("category_id") not in cat_ids:
            raise SurgDinoError(f"{where} has category_id {r.get('category_id')!r}, not among the categories of "
                                f"{gt_source} ({len(cat_ids)} ids); use the dataset's category ids, not contiguous ones")
        score = r.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise SurgDinoError(f"{where} has score {score!r}; every detection needs a finite numeric score "
                                "(NaN or infinite scores cannot be ranked)")
        if "bbox" in iou_types:
            b = r.get("bbox")
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                raise SurgDinoError(f"{where} needs bbox [x, y, w, h] (4 numbers) for bbox evaluation; "
                                    "or pass --iou-type segm")
            if not all(math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0:
                raise SurgDinoError(f"{where} has bbox {b}; it must be 4 finite numbers [x, y, w, h] with "
                                    "w, h >= 0 (is it [x1, y1, x2, y2]?)")
        if "segm" in iou_types:
            s = r.get("segmentation")
            if not (isinstance(s, dict) and "counts" in s and isinstance(s.get("size"), list)):
                raise SurgDinoError(f"{where} needs segmentation as an RLE {{size: [h, w], counts}} for segm "
                                    "evaluation (pycocotools.mask.encode); or pass --iou-type bbox")
            img = images[r["image_id"]]
            if list(s["size"]) != [img["height"], img["width"]]:
                raise SurgDinoError(f"{where}: segmentation size {s['size']} differs from image {r['image_id']}'s "
                                    f"[height, width] = {[img['height'], img['width']]}; encode masks at the "
                                    "original image size")
            problem = rle_problem(s, img["height"], img["width"])  # malformed counts hang pycocotools
            if problem:
                raise SurgDinoError(f"{where}: {problem}")
