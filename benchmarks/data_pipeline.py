"""Data pipeline benchmark: training images/s and COCO evaluation time against plain pycocotools.

1. Training throughput: synthetic 512x512 trays through the copy-paste mapper (flip + large-scale
   jitter + occlusion-aware copy-paste), batched by ``build_loader_from_records`` with 0, 1 and 2
   workers; prints images/s.
2. Evaluation: ``num_images`` x ``instances`` ground-truth masks over ``classes`` classes with jittered
   predictions; ``surgdino.evaluation.evaluate_coco`` (faster-coco-eval) vs plain pycocotools
   (``COCO.loadRes`` + ``COCOeval`` for segm and bbox) on the same results, printed as a ratio.

    python benchmarks/data_pipeline.py --quick      # ~1-2 min on 2 CPU cores
    python benchmarks/data_pipeline.py              # 500 images x 30 instances x 500 classes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_util


def bench_training(out_dir: str, num_images: int, image_size: int, batches: int, workers_list: list[int]) -> None:
    from surgdino.data.coco import load_coco_json
    from surgdino.data.loader import build_loader_from_records
    from surgdino.data.mapper import DatasetMapper
    from surgdino.data.synthetic import generate_synthetic_dataset
    from surgdino.data.transforms import LargeScaleJitter, build_flip

    root = os.path.join(out_dir, "trays")
    t0 = time.perf_counter()
    generate_synthetic_dataset(root, num_train=num_images, num_val=0, num_classes=50, image_size=image_size,
                               seed=0, progress=False)
    records = load_coco_json(os.path.join(root, "annotations", "instances_train.json"), os.path.join(root, "train"))
    n_inst = sum(len(r["annotations"]) for r in records) / len(records)
    print(f"generated {len(records)} trays {image_size}x{image_size}, {n_inst:.1f} instances/image "
          f"in {time.perf_counter() - t0:.1f} s")
    mapper = DatasetMapper(is_train=True, augmentations=[*build_flip("horizontal"),
                                                         LargeScaleJitter(image_size, 0.1, 2.0)],
                           copy_paste_prob=1.0, max_pasted=10, min_visible=0.1, paste_source=records)
    batch_size = 2
    for workers in workers_list:
        loader = build_loader_from_records(records, mapper, batch_size=batch_size, num_workers=workers, seed=0)
        it = iter(loader)
        next(it)  # warm-up (worker start-up)
        t = time.perf_counter()
        insts = sum(len(x["instances"]["classes"]) for b in itertools.islice(it, batches) for x in b)
        dt = time.perf_counter() - t
        print(f"train loader, copy-paste + LSJ {image_size}px, {workers} workers: "
              f"{batches * batch_size / dt:6.1f} images/s ({insts / (batches * batch_size):.1f} instances/image)")
        del it, loader


def _ellipse(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(3, h / 5), rng.uniform(3, w / 5)
    yy, xx = np.ogrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)


def _rle(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def make_eval_data(num_images: int, instances: int, classes: int, size: int, seed: int = 0):
    """Ground truth (COCO dict) and results (list) with jittered, partly mislabelled predictions."""
    rng = np.random.default_rng(seed)
    images, annos, results = [], [], []
    for i in range(num_images):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": size, "width": size})
        for _ in range(instances):
            m = _ellipse(size, size, rng)
            if not m.any():
                continue
            rle = _rle(m)
            cat = int(rng.integers(1, classes + 1))
            annos.append({"id": len(annos) + 1, "image_id": i + 1, "category_id": cat, "segmentation": rle,
                          "area": float(m.sum()), "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0})
            dy, dx = rng.integers(-2, 3, size=2)
            p = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
            prle = _rle(p)
            pcat = cat if rng.random() < 0.8 else int(rng.integers(1, classes + 1))
            results.append({"image_id": i + 1, "category_id": pcat, "segmentation": prle,
                            "bbox": [float(v) for v in mask_util.toBbox(prle)], "score": float(rng.random())})
    cats = [{"id": c, "name": f"class_{c}"} for c in range(1, classes + 1)]
    return {"images": images, "annotations": annos, "categories": cats}, results


def pycocotools_eval(gt: dict, results: list, max_dets=(1, 10, 100)) -> dict:
    """The plain pycocotools recipe, as a user would write it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        for iou_type in ("segm", "bbox"):
            dts = [{k: v for k, v in r.items() if k != ("bbox" if iou_type == "segm" else "segmentation")}
                   for r in results]
            ev = COCOeval(coco_gt, coco_gt.loadRes(dts), iouType=iou_type)
            ev.params.maxDets = list(max_dets)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = 100 * ev.stats[0]
    return out


def bench_eval(num_images: int, instances: int, classes: int, size: int) -> None:
    from surgdino.evaluation.coco_evaluator import evaluate_coco

    t = time.perf_counter()
    gt, results = make_eval_data(num_images, instances, classes, size)
    print(f"eval data: {num_images} images x {instances} instances, {classes} classes, {len(results)} detections "
          f"({time.perf_counter() - t:.1f} s to make)")
    t = time.perf_counter()
    ours = evaluate_coco(gt, results, ("segm", "bbox"), (1, 10, 100))
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = pycocotools_eval(gt, results)
    t_ref = time.perf_counter() - t
    print(f"evaluation segm+bbox: surgdino {t_ours:.1f} s (AP segm {ours['segm']['AP']:.2f}, bbox "
          f"{ours['bbox']['AP']:.2f}) | pycocotools {t_ref:.1f} s (AP segm {ref['segm']:.2f}, bbox {ref['bbox']:.2f})"
          f" | speed-up x{t_ref / t_ours:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI-friendly)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as d:
            bench_training(d, num_images=8 if args.quick else 32, image_size=512, batches=5 if args.quick else 20,
                           workers_list=args.workers)
    if not args.skip_eval:
        if args.quick:
            bench_eval(num_images=100, instances=30, classes=500, size=256)
        else:
            bench_eval(num_images=500, instances=30, classes=500, size=512)


if __name__ == "__main__":
    main()
