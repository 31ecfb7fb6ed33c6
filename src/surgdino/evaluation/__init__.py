"""COCO evaluation (``COCOEvaluator``, ``evaluate_results_file``) and test-time augmentation (``InstanceTTA``)."""

from surgdino.evaluation.coco_evaluator import (
    COCOEvaluator,
    evaluate_coco,
    evaluate_results_file,
    format_metrics,
    instances_to_coco_results,
    metric_names,
)
from surgdino.evaluation.tta import InstanceTTA, merge_detections

__all__ = [
    "COCOEvaluator",
    "InstanceTTA",
    "evaluate_coco",
    "evaluate_results_file",
    "format_metrics",
    "instances_to_coco_results",
    "merge_detections",
    "metric_names",
]
