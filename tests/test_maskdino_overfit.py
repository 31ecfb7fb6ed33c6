"""Learning works end to end: a tiny MaskDINO overfits 4 synthetic trays (mapper → model → losses →
post-processing → COCO mask AP50 >= 0.9 on the same images), for each registered decoder."""

from __future__ import annotations

import pytest
import torch
from overfit_helpers import ap50, make_trays, overfit

import surgdino.modeling.maskdino.model  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.config import load_config
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
    t = make_trays(str(tmp_path_factory.mktemp("overfit")), num_classes=NUM_CLASSES, size=SIZE)
    assert sum(len(x["instances"]["classes"]) for x in t.train) >= 12
    return t


@pytest.mark.parametrize("decoder", ["MaskDINODecoder", "DIMaskDINODecoder"])
def test_overfits_four_trays(trays, decoder, one_thread):
    assert decoder in DECODER_REGISTRY
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY + ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", decoder]))
    before = ap50(model, trays.gt_json, trays.test, "segm")
    first, last = overfit(model, trays.train, ITERS, lr=1e-3, clip=1.0)
    after = ap50(model, trays.gt_json, trays.test, "segm")
    assert last < 0.6 * first
    assert before < 0.5, f"untrained model already has mask AP50 {before:.2f}: the test proves nothing"
    assert after >= 0.9, f"mask AP50 {after:.2f} after {ITERS} iterations (before {before:.2f}, loss {first:.1f} -> {last:.1f})"


DENSE_SIZE, DENSE_FIELD_CM, DENSE_ITERS = 96, 16.0, 240


def test_masks_overfit_two_dense_trays(tmp_path, one_thread):
    """Issue 16: masks learn on dense trays. 2 trays of 20+ overlapping instruments (96 px, 16 cm in view):
    mask AP50 >= 0.9 on them, with about twice as many queries as instruments and 2 denoising groups."""
    t = make_trays(str(tmp_path), num_classes=NUM_CLASSES, size=DENSE_SIZE, instances=(24, 30), num_train=2,
                   field_cm=DENSE_FIELD_CM)
    assert min(len(x["instances"]["classes"]) for x in t.train) >= 20
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY + [
        "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "MaskDINODecoder", "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "40",
        "MODEL.MaskDINO.DN_NUM", "60", "MODEL.MaskDINO.TRAIN_NUM_POINTS", "1024", "TEST.DETECTIONS_PER_IMAGE", "100"]))
    before = ap50(model, t.gt_json, t.test, "segm")
    first, last = overfit(model, t.train, DENSE_ITERS, lr=3e-3, clip=1.0, drop_at=DENSE_ITERS * 3 // 4)
    after = ap50(model, t.gt_json, t.test, "segm")
    assert before < 0.5, f"untrained model already has mask AP50 {before:.2f}: the test proves nothing"
    assert after >= 0.9, (f"mask AP50 {after:.2f} on 2 dense trays after {DENSE_ITERS} iterations "
                          f"(before {before:.2f}, loss {first:.1f} -> {last:.1f})")
