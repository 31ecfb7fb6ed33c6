"""COCO evaluation (``COCOEvaluator``, ``evaluate_results_file``) and test-time augmentation (``InstanceTTA``).

Names are imported on first use (PEP 562), so the command line builds its parser without torch.
"""
from __future__ import annotations

from surgdino.lazy import lazy_exports

_EXPORTS = {
    "COCOEvaluator": "surgdino.evaluation.coco_evaluator",
    "evaluate_coco": "surgdino.evaluation.coco_evaluator",
    "evaluate_results_file": "surgdino.evaluation.coco_evaluator",
    "format_metrics": "surgdino.evaluation.coco_evaluator",
    "instances_to_coco_results": "surgdino.evaluation.coco_evaluator",
    "metric_names": "surgdino.evaluation.coco_evaluator",
    "InstanceTTA": "surgdino.evaluation.tta",
    "merge_detections": "surgdino.evaluation.tta",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
