"""Scaffolding of the overfit tests (``test_maskdino_overfit``, ``test_grounding_overfit``,
``test_pooled_500_classes``): synthetic trays mapped once, a fixed-batch AdamW loop, COCO AP50.
The ``one_thread`` fixture is in ``conftest.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from surgdino.data.coco import load_coco_json
from surgdino.data.mapper import DatasetMapper
from surgdino.data.synthetic import generate_synthetic_dataset
from surgdino.evaluation import COCOEvaluator


@dataclass
class Trays:
    """``num_train`` synthetic trays: the COCO json, class names in label order, the mapped training
    inputs (no augmentation: the same trays every step) and the mapped evaluation inputs."""

    gt_json: str
    names: list[str]
    train: list[dict]
    test: list[dict]


def make_trays(root: str, *, num_classes: int, seed: int = 0, size: int = 128, instances: tuple[int, int] = (3, 5),
               num_train: int = 4, field_cm: float | None = None) -> Trays:
    extra = {} if field_cm is None else {"field_cm": field_cm}
    paths = generate_synthetic_dataset(root, num_train=num_train, num_val=0, num_classes=num_classes, image_size=size,
                                       seed=seed, instances_per_image=instances, progress=False, image_format="png",
                                       **extra)
    records = load_coco_json(paths["train_json"], paths["train_dir"])
    with open(paths["train_json"]) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    train = [DatasetMapper(is_train=True, augmentations=[])(r) for r in records]
    test = [DatasetMapper(is_train=False, augmentations=[])(r) for r in records]
    return Trays(paths["train_json"], names, train, test)


def overfit(model: torch.nn.Module, inputs: list[dict], iters: int, *, lr: float, clip: float,
            check: Callable[[dict], None] | None = None, drop_at: int | None = None) -> tuple[float, float]:
    """``iters`` AdamW steps (no weight decay, gradient norm clipped to ``clip``) of the trainable parameters on
    the same ``inputs``, the learning rate x 0.1 from step ``drop_at``; ``check(losses)`` runs on every step's loss
    dict. Returns the first and last total loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    first = last = None
    for it in range(iters):
        if it == drop_at:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        losses = model(inputs)
        if check is not None:
            check(losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        last = loss.item()
        first = last if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return first, last


def ap50(model: torch.nn.Module, gt_json: str, inputs: list[dict], iou_type: str) -> float:
    """COCO AP50 (0–1) of ``model``'s eval outputs on ``inputs``; the model is left in training mode."""
    model.eval()
    evaluator = COCOEvaluator(json_file=gt_json, iou_types=[iou_type])
    with torch.no_grad():
        outputs = model(inputs)
    evaluator.process(inputs, outputs)
    model.train()
    return evaluator.evaluate()[iou_type]["AP50"] / 100.0
