"""ONNX export of tiny DI-MaskDINO / MaskDINO models: onnxruntime = PyTorch on raw outputs (1e-4) for
images of two sizes padded to the export's fixed input, and (``--dynamic``) for inputs of two sizes and
batch sizes with one file; same final detections (boxes within 1e-3 px, same labels, mask IoU >= 0.999),
the checkpoint's EMA weights exported, metadata round trip, the Predictor API on both paths,
``predict --onnx`` on a folder, and the errors for a too small dynamic trace, foreign files and
unexportable models.

One fixed-size and one dynamic export per model type are shared by the tests of this module (an
export and its self-check take ~10-30 s per model on the loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from surgdino.cli import main as cli_main
from surgdino.config import load_config
from surgdino.deploy.graph import ExportModule
from surgdino.deploy.postprocess import match_detections, postprocess
from surgdino.deploy.runtime import OnnxModel
from surgdino.errors import SurgDinoError
from surgdino.modeling import build_model
from surgdino.modeling.maskdino.model import RAW_OUTPUTS

DEMO = str(Path(__file__).parents[1] / "src" / "surgdino" / "configs" / "demo" / "dimaskdino_atto_trays.yaml")
SHRINK = ["MODEL.DEVICE", "cpu", "MODEL.MaskDINO.DEC_LAYERS", "2", "INPUT.MIN_SIZE_TEST", "64",
          "INPUT.MAX_SIZE_TEST", "96", "TEST.DETECTIONS_PER_IMAGE", "12"]
VARIANTS = {"di": [], "maskdino": ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "MaskDINODecoder"]}
CLASSES = ["scalpel", "forceps", "scissors", "clamp", "retractor"]


def _checkpoint(tmp: Path, opts: list[str]) -> tuple[str, dict, dict]:
    """A checkpoint whose ``ema`` weights differ from its ``model`` weights; returns (path, model, ema)."""
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, opts))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ema = {k: (v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=g)) if v.is_floating_point()
           and v.numel() > 1 else v.clone() for k, v in state.items()}
    path = tmp / "model_final.pth"
    torch.save({"model": state, "ema": {"model": ema, "updates": 7, "decay": 0.999}, "thing_classes": CLASSES,
                "thing_dataset_id_to_contiguous_id": {str(10 + i): i for i in range(5)}}, path)
    return str(path), state, ema


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"onnx_{request.param}")
    opts = SHRINK + VARIANTS[request.param]
    weights, state, ema = _checkpoint(tmp, opts)
    out = str(tmp / "model.onnx")
    rc = cli_main(["export", "--config-file", DEMO, *opts, "MODEL.WEIGHTS", weights, "--output", out])
    assert rc == 0 and os.path.isfile(out) and not os.path.exists(out + ".partial")
    return {"onnx": out, "weights": weights, "opts": opts, "state": state, "ema": ema, "name": request.param}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported_dynamic(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"onnx_dynamic_{request.param}")
    opts = SHRINK + VARIANTS[request.param] + ["MODEL.MaskDINO.INITIALIZE_BOX_TYPE", "mask2box"]  # boxes of masks
    weights, state, ema = _checkpoint(tmp, opts)
    out = str(tmp / "model.onnx")
    rc = cli_main(["export", "--config-file", DEMO, *opts, "MODEL.WEIGHTS", weights, "--output", out, "--dynamic"])
    assert rc == 0 and os.path.isfile(out)
    return {"onnx": out, "weights": weights, "opts": opts, "ema": ema, "name": request.param}


def _module(opts: list[str], state: dict) -> ExportModule:
    model = build_model(load_config(DEMO, opts)).eval()
    model.load_state_dict(state)
    return ExportModule(model).eval()


def _batch(h: int, w: int, sizes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(sizes), 3, h, w), dtype=torch.uint8, generator=g)
    pad = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (a, b) in enumerate(sizes):
        pad[i, :a, :b] = False
    return images, pad


@pytest.mark.parametrize("size", [(96, 96), (64, 90), (91, 64)])
def test_raw_outputs_and_detections_equal_pytorch(exported, size):
    h, w, sizes = 96, 96, [size]  # the export's fixed input (the test side 96); smaller images padded to it
    images, pad = _batch(h, w, sizes, seed=size[1])
    with torch.no_grad():
        want = dict(zip(RAW_OUTPUTS, _module(exported["opts"], exported["ema"])(images, pad)))
    got = OnnxModel(exported["onnx"])(images, pad)
    for k in RAW_OUTPUTS:
        assert got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], atol=1e-4, rtol=0), (k, float((got[k] - want[k]).abs().max()))
    post = {"detections_per_image": 12, "score_threshold": 0.0, "one_label_per_query": False,
            "overlap_threshold": 0.8}
    out_sizes = [(3 * a // 2, 2 * b) for a, b in sizes]
    a = postprocess({k: v.numpy() for k, v in got.items()}, sizes, out_sizes, post)  # numpy in → numpy out
    b = postprocess(want, sizes, out_sizes, post)
    assert isinstance(a[0]["boxes"], np.ndarray) and isinstance(b[0]["boxes"], torch.Tensor)
    for x, y in zip(a, b):
        assert len(y["labels"]) > 0
        assert x["labels"].tolist() == y["labels"].tolist()
        assert np.abs(x["boxes"] - y["boxes"].numpy()).max() <= 1e-3
        assert x["masks"].shape == tuple(y["masks"].shape)
    assert match_detections(a, b)["min_mask_iou"] >= 0.999


def test_exports_the_ema_weights(exported):
    images, pad = _batch(96, 96, [(64, 96)], seed=3)
    got = OnnxModel(exported["onnx"])(images, pad)["pred_logits"]
    with torch.no_grad():
        ema = _module(exported["opts"], exported["ema"])(images, pad)[0]
        plain = _module(exported["opts"], exported["state"])(images, pad)[0]
    assert (got - ema).abs().max() < 1e-4 < (got - plain).abs().max()


def test_metadata_round_trip(exported):
    meta = OnnxModel(exported["onnx"]).meta
    cfg = load_config(DEMO, exported["opts"] + ["MODEL.WEIGHTS", exported["weights"]])
    assert meta["class_names"] == CLASSES
    assert meta["dataset_ids"] == {i: 10 + i for i in range(5)}
    assert yaml.safe_load(meta["config"]) == yaml.safe_load(cfg.merge({"MODEL.DEVICE": "cpu"}).dump())
    assert meta["preprocess"]["min_size"] == 64 and meta["preprocess"]["max_size"] == 96
    assert (meta["preprocess"]["height"], meta["preprocess"]["width"]) == (96, 96)  # the longest test side
    assert meta["postprocess"]["detections_per_image"] == 12
    assert meta["weights"] == os.path.abspath(exported["weights"])


def test_predictor_onnx_equals_pytorch(exported):
    from surgdino import Predictor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 120, 3), dtype=np.uint8),
              Image.fromarray(rng.integers(0, 256, (100, 70, 3), dtype=np.uint8))]
    onnx_p = Predictor(exported["onnx"])
    torch_p = Predictor(DEMO, exported["weights"], opts=exported["opts"], size=(96, 96))  # padded as the export
    a, b = onnx_p(images), torch_p(images)
    assert len(a) == 2 and a[1]["masks"].shape[1:] == (100, 70)
    assert match_detections(a, b)["same"]
    assert a[0]["names"] == [CLASSES[i] for i in a[0]["labels"]] == b[0]["names"]
    alone_onnx, alone_torch = onnx_p(images[1]), torch_p(images[1])  # one image: a dict, padded on its own
    assert isinstance(alone_onnx, dict) and match_detections([alone_onnx], [alone_torch])["same"]


def test_predict_onnx_on_a_folder(exported, tmp_path):
    if exported["name"] != "di":
        pytest.skip("the command line is tested on one model type")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(64, 96), (120, 80)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    rc = cli_main(["predict", "--onnx", exported["onnx"], "--input", str(folder), "--output", str(out),
                   "--score-threshold", "0"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["coco_results.json", "im0.png", "im1.png", "images.json"]
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {10 + i for i in range(5)}
    assert json.loads((out / "images.json").read_text())["thing_classes"] == CLASSES


def test_foreign_and_stale_onnx_files_are_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["y"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 4, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    rc = cli_main(["predict", "--onnx", str(foreign), "--input", str(tmp_path / "imgs"), "--output",
                   str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a SurgDINO ONNX export (no surgdino metadata at all)" in err and "surgdino export" in err
    model = onnx.load(foreign)
    for k, v in (("surgdino.format", "surgdino-onnx/1"), ("surgdino.config", "{}"), ("surgdino.class_names", "[]")):
        model.metadata_props.add(key=k, value=v)
    stale = tmp_path / "stale.onnx"
    onnx.save(model, stale)
    with pytest.raises(SurgDinoError, match="missing metadata surgdino.preprocess, surgdino.postprocess"):
        OnnxModel(stale)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(SurgDinoError, match="cannot load it as an ONNX model"):
        OnnxModel(tmp_path / "junk.onnx")


# (padded input H, W, unpadded sizes per image): two input sizes of another shape than the trace's 96x96
DYNAMIC_INPUTS = [(64, 128, [(64, 120)]), (160, 96, [(160, 96), (112, 70)])]


@pytest.mark.parametrize("inputs", DYNAMIC_INPUTS, ids=["64x128", "160x96_batch2"])
def test_dynamic_export_equals_pytorch_at_other_sizes(exported_dynamic, inputs):
    h, w, sizes = inputs
    images, pad = _batch(h, w, sizes, seed=h)
    with torch.no_grad():
        want = dict(zip(RAW_OUTPUTS, _module(exported_dynamic["opts"], exported_dynamic["ema"])(images, pad)))
    model = OnnxModel(exported_dynamic["onnx"])
    assert model.batch is None and model.meta["preprocess"]["height"] is None
    got = model(images, pad)
    assert got["mask_features"].shape[-2:] == (h // 4, w // 4)
    for k in RAW_OUTPUTS:
        assert got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], atol=1e-4, rtol=0), (k, float((got[k] - want[k]).abs().max()))
    post = {"detections_per_image": 12, "score_threshold": 0.0, "one_label_per_query": False,
            "overlap_threshold": 0.8}
    out_sizes = [(2 * a, 3 * b // 2) for a, b in sizes]
    a = postprocess({k: v.numpy() for k, v in got.items()}, sizes, out_sizes, post)
    b = postprocess(want, sizes, out_sizes, post)
    assert all(len(y["labels"]) > 0 for y in b)
    r = match_detections(a, b)
    assert r["same"] and r["max_box_diff"] <= 1e-3 and r["min_mask_iou"] >= 0.999, r


def test_dynamic_predictor_batches_any_size(exported_dynamic):
    from surgdino import Predictor

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), rng.integers(0, 256, (150, 60, 3), dtype=np.uint8)]
    onnx_p = Predictor(exported_dynamic["onnx"])
    torch_p = Predictor(DEMO, exported_dynamic["weights"], opts=exported_dynamic["opts"])  # padded to divisibility
    a, b = onnx_p(images), torch_p(images)
    assert a[1]["masks"].shape[1:] == (150, 60)
    assert match_detections(a, b)["same"]


def test_mask_boxes_export_with_an_uneven_last_chunk(tmp_path):
    """mask2box selection boxes, a chunk of queries at a time: 60 queries in chunks of 16 (the user
    configuration's 800 in chunks of 128 have an uneven last chunk too)."""
    from types import SimpleNamespace

    import onnxruntime as ort

    decoder = build_model(load_config(DEMO, SHRINK)).decoder.eval()

    class Boxes(torch.nn.Module):
        def forward(self, embeds, mask_features, feat_sizes, fallback):
            inputs = SimpleNamespace(feat_sizes=feat_sizes, mask_features=mask_features)
            return decoder.mask_boxes(embeds, inputs, fallback, chunk=16)

    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 60, 8, generator=g)
    embeds[0, :5] = 0.0  # empty masks: these queries keep their fallback box
    args = (embeds, torch.randn(1, 8, 24, 20, generator=g), torch.tensor([[20.0, 17.0]]), torch.randn(1, 60, 4, generator=g))
    path = str(tmp_path / "boxes.onnx")
    # the query count as the selection's TopK gives it: not a static shape of the graph
    torch.onnx.export(Boxes(), args, path, dynamo=False, opset_version=18, input_names=["e", "m", "s", "f"],
                      dynamic_axes={"e": {1: "queries"}, "f": {1: "queries"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(["e", "m", "s", "f"], (a.numpy() for a in args))))[0]
    assert np.abs(got - Boxes()(*args).numpy()).max() < 1e-5


def test_dynamic_trace_too_small_is_refused(tmp_path):
    from surgdino.deploy.export import export_onnx

    weights, _, _ = _checkpoint(tmp_path, SHRINK)
    with pytest.raises(SurgDinoError, match="--dynamic --height 32 --width 32: trace at a side of at least 64"):
        export_onnx(load_config(DEMO, SHRINK + ["MODEL.WEIGHTS", weights]), str(tmp_path / "m.onnx"), dynamic=True,
                    height=32, width=32)
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_unexportable_model_names_the_part():
    with pytest.raises(SurgDinoError, match="Linear cannot be exported: it has no tensor-only forward"):
        ExportModule(torch.nn.Linear(2, 2))
