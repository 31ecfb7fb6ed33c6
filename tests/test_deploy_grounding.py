"""ONNX export of a tiny GroundingDINO with its class names baked in as the prompt: onnxruntime = PyTorch
on the raw outputs (1e-4; one logit per prompt token), the same detections through the shared
box-threshold post-processing, class names and the token → class map in the metadata, the Predictor on
both paths, and the one-line refusal of ``--dynamic``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_predict_prompt import CLASSES
from test_predict_prompt import TINY as PREDICT_TINY

from surgdino.config import load_config
from surgdino.deploy.export import export_onnx, raw_difference
from surgdino.deploy.graph import GroundingExportModule
from surgdino.deploy.postprocess import match_detections, postprocess
from surgdino.deploy.runtime import OnnxModel
from surgdino.errors import SurgDinoError
from surgdino.modeling import build_model

TINY = PREDICT_TINY + ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]  # later keys win


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_gdino")
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY))
    weights = str(tmp / "model_final.pth")
    torch.save({"model": model.state_dict(), "thing_classes": CLASSES,
                "thing_dataset_id_to_contiguous_id": {"3": 0, "5": 1, "9": 2}}, weights)
    cfg = load_config(None, TINY + ["MODEL.WEIGHTS", weights])
    out = str(tmp / "gdino.onnx")
    report = export_onnx(cfg, out)
    return {"onnx": out, "cfg": cfg, "state": model.state_dict(), "report": report}


def _batch(sizes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(sizes), 3, 128, 128), dtype=torch.uint8, generator=g)
    pad = torch.ones(len(sizes), 128, 128, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pad[i, :h, :w] = False
    return images, pad


@pytest.mark.parametrize("size", [(128, 128), (96, 120)])
def test_raw_outputs_and_detections_equal_pytorch(exported, size):
    model = build_model(load_config(None, TINY)).eval()
    model.load_state_dict(exported["state"])
    module = GroundingExportModule(model, CLASSES).eval()
    images, pad = _batch([size], seed=size[1])
    with torch.no_grad():
        want = dict(zip(module.outputs, module(images, pad)))
    onnx_model = OnnxModel(exported["onnx"])
    got = onnx_model(images, pad)
    assert want["pred_logits"].shape[-1] == module.positive_map.shape[1]  # one logit per prompt token
    for k in module.outputs:
        assert got[k].shape == want[k].shape and raw_difference(got[k].numpy(), want[k].numpy()) <= 1e-4, k
    meta = onnx_model.meta
    assert meta["kind"] == "grounding" and meta["class_names"] == CLASSES
    assert np.allclose(meta["postprocess"]["positive_map"], module.positive_map.numpy())
    post = dict(meta["postprocess"], box_threshold=0.0)  # every query, so there is something to compare
    out_sizes = [(2 * size[0], 3 * size[1] // 2)]
    a = postprocess({k: v.numpy() for k, v in got.items()}, [size], out_sizes, post)
    b = postprocess(want, [size], out_sizes, post)
    assert len(b[0]["labels"]) == 30 and "masks" not in a[0]
    r = match_detections(a, b)
    assert r["same"] and r["max_box_diff"] <= 1e-3, r


def test_predictor_onnx_equals_pytorch(exported):
    from surgdino import Predictor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (128, 80, 3), dtype=np.uint8)]
    onnx_p = Predictor(exported["onnx"])
    torch_p = Predictor(exported["cfg"], size=(128, 128))  # padded as the export
    assert onnx_p.post["box_threshold"] == torch_p.post["box_threshold"] == 0.35  # predict --prompt's default
    onnx_p.post["box_threshold"] = torch_p.post["box_threshold"] = 0.0  # every query: something to compare
    a, b = onnx_p(images), torch_p(images)
    assert [len(r["labels"]) for r in b] == [30, 30] and match_detections(a, b)["same"]
    assert a[0]["names"] == [CLASSES[i] for i in a[0]["labels"]] == b[0]["names"]


def test_dynamic_grounding_export_says_why_not(exported, tmp_path):
    with pytest.raises(SurgDinoError, match="--dynamic: a GroundingDINO exports at a fixed --height/--width only"):
        export_onnx(exported["cfg"], str(tmp_path / "m.onnx"), dynamic=True)


def test_predict_onnx_on_a_folder(exported, tmp_path):
    import json
    import os

    from PIL import Image

    from surgdino.cli import main as cli_main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    out = tmp_path / "out"
    assert cli_main(["predict", "--onnx", exported["onnx"], "--input", str(folder), "--output", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "coco_results.json", "images.json"]
    results = json.loads((out / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 5, 9} and all("segmentation" not in r for r in results)
