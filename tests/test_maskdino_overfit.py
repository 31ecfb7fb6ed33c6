"""Learning works end to end: a tiny MaskDINO overfits 4 synthetic trays (mapper → model → losses →
post-processing → COCO mask AP50 >= 0.9 on the same images), for each registered decoder."""

from __future__ import annotations

import pytest
import torch

import surgdino.modeling.maskdino.model  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.config import load_config
from surgdino.data.coco import load_coco_json
from surgdino.data.mapper import DatasetMapper
from surgdino.data.synthetic import generate_synthetic_dataset
from surgdino.evaluation import COCOEvaluator
from surgdino.modeling import build_model
from surgdino.registry import DECODER_REGISTRY

NUM_CLASSES = 5
SIZE = 128
ITERS = 150
TINY = ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64", "MODEL.SEM_SEG_HEAD.MASK_DIM", "64",
        "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "128", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", "4",
        "MODEL.MaskDINO.HIDDEN_DIM", "64", "MODEL.MaskDINO.NHEADS", "4", "MODEL.MaskDINO.DIM_FEEDFORWARD", "128",
        "MODEL.MaskDINO.DEC_LAYERS", "2", "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "20",
        "MODEL.MaskDINO.TRAIN_NUM_POINTS", "512", "MODEL.MaskDINO.DN_NUM", "20",
        "MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "40", "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "10",
        "MODEL.MaskDINO.TI_LAYERS", "1"]


@pytest.fixture(scope="module")
def trays(tmp_path_factory):
    root = tmp_path_factory.mktemp("overfit")
    paths = generate_synthetic_dataset(str(root), num_train=4, num_val=0, num_classes=NUM_CLASSES, image_size=SIZE,
                                       seed=0, instances_per_image=(3, 5), progress=False, image_format="png")
    records = load_coco_json(paths["train_json"], paths["train_dir"])
    assert sum(len(r["annotations"]) for r in records) >= 12
    train = [DatasetMapper(is_train=True, augmentations=[])(r) for r in records]
    test = [DatasetMapper(is_train=False, augmentations=[])(r) for r in records]
    return paths["train_json"], train, test


def _mask_ap50(model, gt_json: str, inputs: list[dict]) -> float:
    model.eval()
    evaluator = COCOEvaluator(json_file=gt_json, iou_types=["segm"])
    with torch.no_grad():
        evaluator.process(inputs, model(inputs))
    model.train()
    return evaluator.evaluate()["segm"]["AP50"] / 100.0


@pytest.fixture
def one_thread():
    """Small tensors: one thread is as fast, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("decoder", ["MaskDINODecoder", "DIMaskDINODecoder"])
def test_overfits_four_trays(trays, decoder, one_thread):
    assert decoder in DECODER_REGISTRY
    gt_json, train, test = trays
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY + ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", decoder]))
    before = _mask_ap50(model, gt_json, test)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    first = None
    for _ in range(ITERS):
        loss = sum(model(train).values())
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = _mask_ap50(model, gt_json, test)
    last = loss.item()
    assert last < 0.6 * first
    assert before < 0.5, f"untrained model already has mask AP50 {before:.2f}: the test proves nothing"
    assert after >= 0.9, f"mask AP50 {after:.2f} after {ITERS} iterations (before {before:.2f}, loss {first:.1f} -> {last:.1f})"
