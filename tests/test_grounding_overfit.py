"""Learning works end to end for GroundingDINO: a tiny detector (ConvNeXt-atto, frozen MiniLM text
encoder, the class names as the caption) overfits 4 synthetic trays: box AP50 >= 0.9 on them."""

from __future__ import annotations

import json

import pytest
import torch

from surgdino.config import load_config
from surgdino.data.coco import load_coco_json
from surgdino.data.mapper import DatasetMapper
from surgdino.data.synthetic import generate_synthetic_dataset
from surgdino.evaluation import COCOEvaluator
from surgdino.modeling import build_model

NUM_CLASSES = 5
SIZE = 128
ITERS = 160
TINY = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.BACKBONE.NAME", "convnext_atto",
        "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0", "MODEL.GDINO.TEXT_ENCODER.NAME", "minilm",
        "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4", "MODEL.GDINO.DIM_FEEDFORWARD", "128",
        "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2", "MODEL.GDINO.NUM_QUERIES", "30",
        "MODEL.GDINO.NUM_FEATURE_LEVELS", "3", "MODEL.GDINO.FUSION_DROPPATH", "0.0", "MODEL.GDINO.NUM_SELECT", "100"]


@pytest.fixture(scope="module")
def trays(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdino_overfit")
    paths = generate_synthetic_dataset(str(root), num_train=4, num_val=0, num_classes=NUM_CLASSES, image_size=SIZE,
                                       seed=0, instances_per_image=(3, 5), progress=False, image_format="png")
    records = load_coco_json(paths["train_json"], paths["train_dir"])
    with open(paths["train_json"]) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    train = [DatasetMapper(is_train=True, augmentations=[])(r) for r in records]
    test = [DatasetMapper(is_train=False, augmentations=[])(r) for r in records]
    return paths["train_json"], names, train, test


def _box_ap50(model, gt_json: str, inputs: list[dict]) -> float:
    model.eval()
    evaluator = COCOEvaluator(json_file=gt_json, iou_types=["bbox"])
    with torch.no_grad():
        outputs = model(inputs)
    assert set(outputs[0]) == {"boxes", "scores", "labels"}
    evaluator.process(inputs, outputs)
    model.train()
    return evaluator.evaluate()["bbox"]["AP50"] / 100.0


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_overfits_four_trays_with_class_names_as_prompt(trays, one_thread):
    gt_json, names, train, test = trays
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY))
    model.set_class_names(names)
    assert " . ".join(n.lower() for n in names) in model.prompt().caption
    before = _box_ap50(model, gt_json, test)
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen, as the reference's BERT
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(ITERS):
        losses = model(train)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_interm"} <= set(losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    after = _box_ap50(model, gt_json, test)
    last = loss.item()
    assert last < 0.5 * first
    assert before < 0.5, f"untrained model already has box AP50 {before:.2f}: the test proves nothing"
    assert after >= 0.9, f"box AP50 {after:.2f} after {ITERS} iterations (before {before:.2f}, loss {first:.1f} -> {last:.1f})"
