"""Learning works end to end for GroundingDINO: a tiny detector (ConvNeXt-atto, frozen MiniLM text
encoder, the class names as the caption) overfits 4 synthetic trays: box AP50 >= 0.9 on them."""

from __future__ import annotations

import pytest
import torch
from overfit_helpers import ap50, make_trays, overfit

from surgdino.config import load_config
from surgdino.modeling import build_model

NUM_CLASSES = 5
SIZE = 128
ITERS = 160
LR = 2e-3
TINY = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.BACKBONE.NAME", "convnext_atto",
        "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0", "MODEL.GDINO.TEXT_ENCODER.NAME", "minilm",
        "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4", "MODEL.GDINO.DIM_FEEDFORWARD", "128",
        "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2", "MODEL.GDINO.NUM_QUERIES", "30",
        "MODEL.GDINO.NUM_FEATURE_LEVELS", "3", "MODEL.GDINO.FUSION_DROPPATH", "0.0", "MODEL.GDINO.NUM_SELECT", "100"]


@pytest.fixture(scope="module")
def trays(tmp_path_factory):
    return make_trays(str(tmp_path_factory.mktemp("gdino_overfit")), num_classes=NUM_CLASSES, size=SIZE)


def _check(losses: dict) -> None:
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_interm"} <= set(losses)


def test_overfits_four_trays_with_class_names_as_prompt(trays, one_thread):
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY))
    model.set_class_names(trays.names)
    assert " . ".join(n.lower() for n in trays.names) in model.prompt().caption
    model.eval()
    with torch.no_grad():
        assert set(model(trays.test[:1])[0]) == {"boxes", "scores", "labels"}
    before = ap50(model, trays.gt_json, trays.test, "bbox")
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen, as the reference's BERT
    first, last = overfit(model, trays.train, ITERS, lr=LR, clip=1.0, check=_check)
    after = ap50(model, trays.gt_json, trays.test, "bbox")
    assert last < 0.5 * first
    assert before < 0.5, f"untrained model already has box AP50 {before:.2f}: the test proves nothing"
    assert after >= 0.9, f"box AP50 {after:.2f} after {ITERS} iterations (before {before:.2f}, loss {first:.1f} -> {last:.1f})"
