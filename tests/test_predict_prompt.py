"""``surgdino predict --prompt``: free-text GroundingDINO prediction with the reference's box/text thresholds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.engine.grounded_predictor import GroundedPredictor, grounded_detections
from surgdino.modeling import build_model

TINY = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "False",
        "MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0",
        "MODEL.GDINO.TEXT_ENCODER.NAME", "minilm", "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4",
        "MODEL.GDINO.DIM_FEEDFORWARD", "128", "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2",
        "MODEL.GDINO.NUM_QUERIES", "30", "MODEL.GDINO.NUM_FEATURE_LEVELS", "3", "MODEL.GDINO.FUSION_DROPPATH", "0.0",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160"]
CLASSES = ["Mayo scissors", "Allis forceps", "14.5 cm ruler"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random tiny GroundingDINO saved as training would (with the dataset's class names)."""
    root = tmp_path_factory.mktemp("gdino_predict")
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY))
    path = root / "model_final.pth"
    torch.save({"model": model.state_dict(), "thing_classes": CLASSES,
                "thing_dataset_id_to_contiguous_id": {"3": 0, "5": 1, "9": 2}}, path)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (120, 150)), ("b.jpg", (100, 100))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    return str(path), str(images)


def test_box_and_text_thresholds_follow_the_reference(weights):
    path, _ = weights
    cfg = load_config(None, TINY + ["MODEL.WEIGHTS", path])
    predictor = GroundedPredictor(cfg, "mayo scissors . 14.5 cm ruler", box_threshold=0.0, text_threshold=0.0)
    assert predictor.thing_classes == ["mayo scissors", "14.5 cm ruler"]
    assert predictor.contiguous_to_dataset_id == {0: 3, 1: 9}  # prompt names are dataset classes: their ids
    model = predictor.model
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    everything = grounded_detections(model, image, (96, 128), box_threshold=0.0, text_threshold=0.0)
    prompt = model.prompt()
    img = (image.float() - model.pixel_mean) / model.pixel_std
    from surgdino.structures import batch_images

    batch = batch_images([img], model.size_divisibility)
    with torch.no_grad():
        raw = model.forward_tensors(batch.tensors, batch.mask, **model.text_inputs(prompt, 1))
    probs = raw["pred_logits"][0, :, : prompt.num_tokens].sigmoid()
    in_name = prompt.positive_map.bool().any(0)
    best = probs[:, in_name].max(-1).values  # [Q]: the reference's score, over the names' tokens
    torch.testing.assert_close(everything["scores"], best.sort(descending=True).values)
    thr = float(best.median())
    some = grounded_detections(model, image, (96, 128), box_threshold=thr, text_threshold=0.0)
    assert len(some["scores"]) == int((best > thr).sum()) and (some["scores"] > thr).all()
    assert all(p and set(p.split()) <= {"mayo", "scissors", "14.5", "cm", "ruler"} for p in some["phrases"])
    none_words = grounded_detections(model, image, (96, 128), box_threshold=0.0, text_threshold=1.0)
    assert set(none_words["phrases"]) == {""}  # no token above the text threshold: empty phrases
    assert (some["boxes"][:, 2] <= 128).all() and (some["boxes"][:, 3] <= 96).all()


def test_predict_cli_with_prompt_and_without(weights, tmp_path):
    path, images = weights
    out = tmp_path / "pred"
    opts = TINY + ["MODEL.WEIGHTS", path]
    assert main(["predict", "--input", images, "--output", str(out), "--prompt", "mayo scissors . kelly clamp",
                 "--box-threshold", "0.0", *opts]) == 0
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {0, 1}  # "kelly clamp" is no dataset class: indices
    assert all(r["phrase"] is not None and set(r["phrase"].split()) <= {"mayo", "scissors", "kelly", "clamp"}
               for r in results)
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "coco_results.json", "images.json"]
    meta = json.loads((out / "images.json").read_text())
    assert meta["thing_classes"] == ["mayo scissors", "kelly clamp"]
    out2 = tmp_path / "pred2"  # no --prompt: the dataset's class names, dataset category ids
    assert main(["predict", "--input", images, "--output", str(out2), "--box-threshold", "0.0", *opts]) == 0
    results = json.loads((out2 / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 5, 9}
    assert json.loads((out2 / "images.json").read_text())["thing_classes"] == CLASSES
    assert main(["predict", "--input", images, "--output", str(out2), "--box-threshold", "1.5", *opts]) == 2
