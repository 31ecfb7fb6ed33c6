"""COCO instance evaluation: bbox and segm AP/AR with configurable maxDets and a per-class AP table.

Matching and accumulation are COCOeval's (pycocotools, or faster-coco-eval's identical C++ port).
The summary is computed here from COCOeval's ``precision``/``recall`` arrays with the configured
maxDets: pycocotools' ``summarize()`` hard-codes maxDets=100 for AP, so with ``[1, 10, 300]`` it
reports AP = -1. Here AP, AP50, AP75, APs/m/l and ARs/m/l use the last maxDets value and
``AR<m>`` is reported for each value m; with the default ``[1, 10, 100]`` the numbers are exactly
pycocotools' ``stats`` (times 100). Undefined values (no ground truth in that range) are NaN.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from surgdino import comm
from surgdino.errors import SurgDinoError
from surgdino.evaluation.coco_json import (
    instances_to_coco_results,
    load_ground_truth,
    read_json,
    records_to_coco_dict,
    validate_results,
)
from surgdino.evaluation.coco_json import prepare_ground_truth as prepare_ground_truth
from surgdino.log import get_logger

logger = get_logger(__name__)

IOU_TYPES = ("segm", "bbox")
RESULTS_FILE = "coco_instances_results.json"


def metric_names(max_dets: Sequence[int]) -> list[str]:
    """Names of the summary metrics, in print order, for the given maxDets."""
    return ["AP", "AP50", "AP75", "APs", "APm", "APl", *[f"AR{m}" for m in max_dets], "ARs", "ARm", "ARl"]


def _check_max_dets(max_dets: Iterable[int]) -> list[int]:
    out = [int(m) for m in max_dets]
    if not out or any(m <= 0 for m in out) or out != sorted(set(out)):
        raise SurgDinoError(f"maxDets {out} must be positive and strictly increasing, e.g. [1, 10, 100] "
                            "(TEST.MAX_DETS / --max-dets); the last one gives AP")
    return out


def _check_iou_types(iou_types: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(iou_types))
    bad = [t for t in out if t not in IOU_TYPES]
    if bad or not out:
        raise SurgDinoError(f"iou type(s) {bad or out} not supported; choose from {list(IOU_TYPES)} (--iou-type)")
    return out


def _coco_api(use_fast_eval: bool) -> tuple[type, type]:
    if use_fast_eval:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def run_coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, max_dets: Sequence[int],
                  img_ids: Sequence[int] | None = None, use_fast_eval: bool = True) -> Any:
    """Run COCOeval evaluate + accumulate (quietly) and return the COCOeval object."""
    coco_cls, eval_cls = _coco_api(use_fast_eval)
    dts = []
    for r in results:  # copies: loadRes adds fields; segm area must come from the mask, so drop the box
        d = dict(r)
        d.pop("bbox" if iou_type == "segm" else "segmentation", None)
        dts.append(d)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dts:
            coco_dt = coco_gt.loadRes(dts)
        else:
            coco_dt = coco_cls()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": []}
            coco_dt.createIndex()
        kwargs = {"print_function": lambda *a, **k: None} if use_fast_eval else {}
        ev = eval_cls(coco_gt, coco_dt, iouType=iou_type, **kwargs)
        ev.params.maxDets = list(max_dets)
        if img_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in img_ids))
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean_valid(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean() * 100) if x.size else float("nan")


def summarize(coco_eval: Any, max_dets: Sequence[int]) -> dict[str, float]:
    """Summary metrics (percent) from COCOeval's accumulated arrays, with the configured maxDets."""
    p = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    recall = np.asarray(coco_eval.eval["recall"])  # [T, K, A, M]
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    mdet = {m: i for i, m in enumerate(p.maxDets)}
    last = mdet[max_dets[-1]]
    iou = {t: int(np.argmin(np.abs(np.asarray(p.iouThrs) - t))) for t in (0.5, 0.75)}
    out = {
        "AP": _mean_valid(precision[:, :, :, area["all"], last]),
        "AP50": _mean_valid(precision[iou[0.5], :, :, area["all"], last]),
        "AP75": _mean_valid(precision[iou[0.75], :, :, area["all"], last]),
        "APs": _mean_valid(precision[:, :, :, area["small"], last]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], last]),
        "APl": _mean_valid(precision[:, :, :, area["large"], last]),
    }
    for m in max_dets:
        out[f"AR{m}"] = _mean_valid(recall[:, :, area["all"], mdet[m]])
    out["ARs"] = _mean_valid(recall[:, :, area["small"], last])
    out["ARm"] = _mean_valid(recall[:, :, area["medium"], last])
    out["ARl"] = _mean_valid(recall[:, :, area["large"], last])
    return out


def per_class_ap(coco_eval: Any, gt: dict[str, Any]) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, last maxDets) per class name; NaN for a class without ground truth."""
    p = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    all_idx = list(p.areaRngLbl).index("all")
    out = {}
    for k, cid in enumerate(p.catIds):
        name = names[cid] if names[cid] not in out else f"{names[cid]} (id {cid})"
        out[name] = _mean_valid(precision[:, :, k, all_idx, -1])
    return out


def evaluate_coco(gt: dict[str, Any], results: list[dict[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
                  max_dets: Sequence[int] = (1, 10, 100), img_ids: Sequence[int] | None = None,
                  use_fast_eval: bool = True, source: str = "ground truth") -> dict[str, Any]:
    """Metrics of COCO ``results`` against ground truth ``gt`` (both already checked):
    ``{"segm": {...}, "bbox": {...}, "per_class": {"segm": {name: AP}, ...}}`` in percent."""
    max_dets = _check_max_dets(max_dets)
    iou_types = _check_iou_types(iou_types)
    names = metric_names(max_dets)
    metrics: dict[str, Any] = {}
    per_class: dict[str, dict[str, float]] = {}
    if not gt["annotations"]:
        logger.warning(f"{source} has no annotations: every COCO metric is undefined (NaN)")
        for t in iou_types:
            metrics[t] = dict.fromkeys(names, float("nan"))
            per_class[t] = {str(c.get("name", c["id"])): float("nan") for c in gt["categories"]}
    else:
        if not results:
            logger.warning("No detections to evaluate: AP and AR are 0 wherever there is ground truth")
        for t in iou_types:
            ev = run_coco_eval(gt, results, t, max_dets, img_ids, use_fast_eval)
            metrics[t] = summarize(ev, max_dets)
            per_class[t] = per_class_ap(ev, gt)
    metrics["per_class"] = per_class
    return metrics


def evaluate_results_file(gt_json: str, results_json: str, iou_types: Sequence[str] | None = None,
                          max_dets: Sequence[int] = (1, 10, 100), use_fast_eval: bool = True) -> dict[str, Any]:
    """Evaluate a COCO results json against a COCO annotation json (what ``surgdino evaluate`` runs).

    ``iou_types=None`` evaluates what the results hold: segm if every result has a segmentation, and bbox.
    """
    gt = load_ground_truth(gt_json)
    results = read_json(results_json, "results", "--results")
    if iou_types is None:
        has_segm = isinstance(results, list) and bool(results) and all(
            isinstance(r, dict) and "segmentation" in r for r in results)
        iou_types = ["segm", "bbox"] if has_segm else ["bbox"]
    iou_types = _check_iou_types(iou_types)
    validate_results(results, gt, iou_types, source=results_json, gt_source=gt_json)
    return evaluate_coco(gt, results, iou_types, max_dets, use_fast_eval=use_fast_eval, source=gt_json)


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_metrics(metrics: dict[str, Any], columns: int = 3) -> str:
    """The summary table (metric × iou type), then per-class AP in ``columns`` column pairs."""
    types = [t for t in metrics if t != "per_class"]
    if not types:
        return "(no metrics)"
    names = list(metrics[types[0]])
    lines = [f"{'AP (%)':<8}" + "".join(f"{t:>10}" for t in types)]  # AP and AR rows, both in percent
    lines += [f"{n:<8}" + "".join(f"{_fmt(metrics[t].get(n)):>10}" for t in types) for n in names]
    per_class = metrics.get("per_class") or {}
    for t in types:
        items = list((per_class.get(t) or {}).items())
        if not items:
            continue
        width = max(12, *(len(n) for n, _ in items))
        lines.append(f"Per-class {t} AP (%):")
        for i in range(0, len(items), columns):
            lines.append("  ".join(f"{n:<{width}} {_fmt(v):>7}" for n, v in items[i:i + columns]))
    return "\n".join(lines)


UNITS = ("percent: AP and AR are 0-100 (COCOeval's 0-1 values x 100); "
         "null = undefined (no ground truth in that range or class)")


def metrics_to_json(metrics: dict[str, Any], with_units: bool = False) -> Any:
    """The metrics with NaN as ``null`` (strict JSON); ``with_units`` adds a top-level ``"units"`` note."""
    if isinstance(metrics, dict):
        out = {k: metrics_to_json(v) for k, v in metrics.items()}
        return {"units": UNITS, **out} if with_units else out
    if isinstance(metrics, float) and math.isnan(metrics):
        return None
    return metrics


class COCOEvaluator:
    """Collects per-image predictions as COCO results (``process``) and computes COCO metrics (``evaluate``).

    Ground truth comes from the dataset's metadata ``json_file`` (or its records when it has none)
    or from an explicit ``json_file``. Predictions are RLE-encoded as they arrive, so memory stays
    small on dense trays; ``evaluate`` gathers them from all processes to rank 0 and evaluates only
    the images that were processed.
    """

    def __init__(self, dataset_name: str | None = None, *, json_file: str | None = None,
                 max_dets: Sequence[int] = (1, 10, 100), iou_types: Sequence[str] = IOU_TYPES,
                 output_dir: str | None = None, use_fast_eval: bool = True):
        if dataset_name is None and json_file is None:
            raise SurgDinoError("COCOEvaluator needs a dataset name (DATASETS.TEST) or a json_file of ground truth")
        self.max_dets = _check_max_dets(max_dets)
        self.iou_types = _check_iou_types(iou_types)
        self.output_dir = output_dir
        self.use_fast_eval = use_fast_eval
        self.source = json_file or dataset_name
        id_map = None
        if json_file is not None:
            self._gt = load_ground_truth(json_file)
        else:
            from surgdino.data.catalog import DatasetCatalog, MetadataCatalog

            meta = MetadataCatalog.get(dataset_name)
            id_map = meta.get("thing_dataset_id_to_contiguous_id")
            if meta.get("json_file"):
                self._gt = load_ground_truth(meta.json_file)
                self.source = meta.json_file
            else:
                records = DatasetCatalog.get(dataset_name)
                id_map = meta.get("thing_dataset_id_to_contiguous_id")
                inv = {v: k for k, v in id_map.items()} if id_map else None
                self._gt = records_to_coco_dict(records, meta.thing_classes, inv)
        if not id_map:  # the catalog's convention: contiguous ids in order of the dataset's category ids
            id_map = {cid: i for i, cid in enumerate(sorted(c["id"] for c in self._gt["categories"]))}
        self._contiguous_to_dataset_id = {int(v): int(k) for k, v in id_map.items()}
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any, dataset_name: str, output_dir: str | None = None) -> dict:
        return dict(dataset_name=dataset_name, max_dets=list(cfg.TEST.MAX_DETS), output_dir=output_dir)

    def reset(self) -> None:
        self._image_ids: list[int] = []
        self._results: list[dict[str, Any]] = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Convert one batch of model outputs to COCO results right away."""
        for inp, out in zip(inputs, outputs):
            image_id = int(inp["image_id"])
            self._image_ids.append(image_id)
            self._results.extend(instances_to_coco_results(out, image_id, self._contiguous_to_dataset_id))

    def evaluate(self) -> dict[str, Any]:
        """Metrics on rank 0 (``{}`` on other ranks); also writes ``coco_instances_results.json``."""
        gathered = comm.gather((self._image_ids, self._results), dst=0)
        if not comm.is_main_process():
            return {}
        image_ids = sorted({i for ids, _ in gathered for i in ids})
        unknown = sorted(set(image_ids) - {img["id"] for img in self._gt["images"]})
        if unknown:
            raise SurgDinoError(f"inputs have image_id(s) {unknown[:5]} that are not images of {self.source}; "
                                "evaluate a dataset against its own annotation json")
        results = [r for _, rs in gathered for r in rs]
        iou_types = list(self.iou_types)
        if results and "segm" in iou_types and not all("segmentation" in r for r in results):
            logger.warning("Predictions carry no masks: evaluating bbox only")
            iou_types = [t for t in iou_types if t != "segm"] or ["bbox"]
        validate_results(results, self._gt, iou_types, source="predictions", gt_source=self.source)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, RESULTS_FILE)
            with open(path, "w") as f:
                json.dump(results, f)
            logger.info(f"Wrote {len(results)} detections of {len(image_ids)} images to {path}")
        metrics = evaluate_coco(self._gt, results, iou_types, self.max_dets, img_ids=image_ids,
                                use_fast_eval=self.use_fast_eval, source=self.source)
        summary = "; ".join(f"{t} AP {m.get('AP', float('nan')):.1f}, AP50 {m.get('AP50', float('nan')):.1f}"
                            for t, m in metrics.items() if isinstance(m, dict) and "AP" in m)
        logger.info(f"COCO evaluation of {len(image_ids)} images ({self.source}), AP (%): {summary}")  # tables: printed once by the caller
        return metrics
