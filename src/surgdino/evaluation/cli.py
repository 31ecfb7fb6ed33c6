"""``surgdino evaluate``: COCO metrics of any results json against a COCO annotation json."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="COCO bbox/segm AP and AR of a results json (any model) against annotations",
        description="Evaluate a COCO results json (list of {image_id, category_id, score, bbox, segmentation "
                    "RLE}) against a COCO instances json: AP, AP50, AP75, APs/m/l, AR per maxDets, ARs/m/l and "
                    "per-class AP, in percent (0-100). Prints the table; --output writes the metrics as JSON, "
                    "in percent too (its \"units\" field says so; NaN, i.e. undefined for lack of ground truth, "
                    "written as null).")
    p.add_argument("--annotations", required=True, metavar="GT_JSON", help="COCO instances json (ground truth)")
    p.add_argument("--results", required=True, metavar="DT_JSON", help="COCO results json (detections)")
    p.add_argument("--iou-type", nargs="+", choices=["segm", "bbox"], default=None,
                   help="what to evaluate (default: segm and bbox if every result has a segmentation, else bbox)")
    p.add_argument("--max-dets", nargs="+", type=int, default=[1, 10, 100], metavar="N",
                   help="COCO maxDets, increasing; the last one gives AP (dense trays: 1 10 300)")
    p.add_argument("--output", metavar="METRICS_JSON", default=None, help="write the metrics here as JSON (percent)")
    p.add_argument("--slow", action="store_true", help="use pycocotools instead of faster-coco-eval (same numbers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from surgdino.data.paths import check_output_file
    from surgdino.evaluation.coco_evaluator import evaluate_results_file, format_metrics, metrics_to_json

    if args.output:
        check_output_file(args.output, "--output")  # before the evaluation, not after it
    metrics = evaluate_results_file(args.annotations, args.results, args.iou_type, args.max_dets,
                                    use_fast_eval=not args.slow)
    print(format_metrics(metrics))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics_to_json(metrics, with_units=True), f, indent=1)
        print(f"metrics written to {args.output}")
    return 0
