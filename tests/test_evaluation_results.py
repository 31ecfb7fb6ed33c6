"""What results hold and say: no empty-mask detections, units of every AP table, one rounding rule for
shortest-edge sizes, one segmentation area, and ``predict`` results scored by ``surgdino evaluate``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_util

from surgdino.cli import main
from surgdino.data.transforms import ResizeShortestEdge
from surgdino.evaluation.coco_evaluator import evaluate_coco, format_metrics, prepare_ground_truth
from surgdino.evaluation.tta import InstanceTTA
from surgdino.modeling.maskdino.postprocess import InstancePostProcessor


def test_empty_mask_detections_dropped_by_default():
    # 3 queries, 2 classes; the mask embeddings of queries 0 and 2 give positive logits, query 1 none
    d, h, w = 2, 8, 8
    mask_features = torch.zeros(d, h, w)
    mask_features[0, 2:6, 2:6] = 1.0
    mask_features[1] = -1.0
    embeds = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 1.0]])  # query 1: logit -5 everywhere -> empty mask
    logits = torch.tensor([[3.0, -3.0], [4.0, -2.0], [-3.0, 2.0]])
    boxes = torch.full((3, 4), 0.5)
    args = (logits, boxes, embeds, mask_features, (h, w), (h, w), (16, 16))
    kept = InstancePostProcessor(detections_per_image=6, overlap_threshold=1.0)(*args)
    assert len(kept["scores"]) > 0 and kept["masks"].flatten(1).any(1).all()  # only real detections
    everything = InstancePostProcessor(detections_per_image=6, overlap_threshold=1.0, keep_empty_masks=True)(*args)
    assert len(everything["scores"]) == 6
    empty = ~everything["masks"].flatten(1).any(1)
    assert empty.sum() == 2 and (everything["scores"][empty] == 0).all()  # score 0 by construction
    assert len(kept["scores"]) == 6 - int(empty.sum())


def test_shortest_edge_rounding_is_one_rule_for_resize_and_tta():
    # 13 * 0.5 = 6.5: Python's round() gives 6 (half to even), detectron2's int(x + 0.5) gives 7
    cases = [(2, 13, 1, 1000), (480, 640, 800, 1333), (100, 1000, 800, 1333), (3, 5, 3, 0)]
    for h, w, short, cap in cases:
        resize = ResizeShortestEdge.output_size(h, w, short, cap)
        tta = InstanceTTA(torch.nn.Identity(), [short], cap or 10**6)
        view = tta._augment({"image": torch.zeros(3, h, w, dtype=torch.uint8)}, short, False)
        assert tuple(view["image"].shape[-2:]) == resize, (h, w, short, cap)
    assert ResizeShortestEdge.output_size(2, 13, 1, 1000) == (1, 7)


def test_segmentation_area_one_definition_in_loading_and_evaluation(tmp_path):
    from surgdino.data.coco import load_coco_json, segmentation_area

    m = np.zeros((20, 30), np.uint8)
    m[3:9, 4:19] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    segms = [{"size": [20, 30], "counts": rle["counts"].decode()}, [[2, 2, 12, 2, 12, 10, 2, 10]],
             {"size": [20, 30], "counts": [3, 5, 592]}]
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": s, "iscrowd": 0,
                             "bbox": [2, 2, 10, 8]} for i, s in enumerate(segms)]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    loaded = [a["area"] for a in load_coco_json(str(tmp_path / "gt.json"), str(tmp_path))[0]["annotations"]]
    evaluated = [a["area"] for a in prepare_ground_truth(data)["annotations"]]
    assert loaded == evaluated == [segmentation_area(s, 20, 30) for s in segms] == [90.0, 80.0, 5.0]


def test_tables_and_metrics_json_state_their_units(tmp_path, capsys):
    gt = {"images": [{"id": 1, "height": 10, "width": 10}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0}]}
    dt = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [1, 1, 4, 4]}]
    table = format_metrics(evaluate_coco(prepare_ground_truth(gt), dt, ["bbox"]))
    assert table.splitlines()[0].startswith("AP (%)") and "Per-class bbox AP (%):" in table
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--annotations", str(tmp_path / "gt.json"), "--results", str(tmp_path / "dt.json"),
                 "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["units"].startswith("percent") and metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert "AP (%)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny untrained MaskDINO's weights, with a COCO val set whose image ids are not 0..N-1."""
    from test_engine_helpers import tiny_maskdino_model_cfg

    from surgdino.config import load_config
    from surgdino.data.synthetic import generate_synthetic_dataset
    from surgdino.engine.defaults import Trainer

    root = tmp_path_factory.mktemp("pred")
    info = generate_synthetic_dataset(str(root / "data"), num_train=0, num_val=3, num_classes=3, image_size=64,
                                      instances_per_image=(2, 3), progress=False)
    data = json.loads(open(info["val_json"]).read())
    for img in data["images"]:  # ids 101, 102, ...: predict must keep them
        new = img["id"] + 100
        for a in data["annotations"]:
            if a["image_id"] == img["id"]:
                a["image_id"] = new
        img["id"] = new
    json_file = root / "val.json"
    json_file.write_text(json.dumps(data))
    cfg_dict = {"MODEL": tiny_maskdino_model_cfg(3), "INPUT": {"MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 64},
                "DATASETS": {"REGISTER": [{"name": "pred_val", "json_file": str(json_file),
                                           "image_root": info["val_dir"]}], "TRAIN": [], "TEST": ["pred_val"]}}
    yaml_path = root / "tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg_dict))
    torch.manual_seed(0)
    model = Trainer.build_model(load_config(str(yaml_path)))
    weights = root / "w.pth"
    torch.save({"model": model.state_dict()}, weights)
    return {"yaml": str(yaml_path), "weights": str(weights), "json": str(json_file), "images": info["val_dir"],
            "ids": sorted(img["id"] for img in data["images"])}


def test_predict_keeps_dataset_image_ids_and_evaluate_scores_them(tiny_run, tmp_path, capsys):
    r = tiny_run
    common = ["predict", "--config-file", r["yaml"], "--input", r["images"], "--score-threshold", "0"]
    weights = ["MODEL.WEIGHTS", r["weights"]]
    for extra, out in ((["--annotations", r["json"], "--image-root", r["images"]], "a"),
                       (["--annotations", r["json"]], "b"),  # matched by file name
                       (["--dataset", "pred_val"], "c")):
        assert main([*common, *extra, "--output", str(tmp_path / out), *weights]) == 0
        meta = json.loads((tmp_path / out / "images.json").read_text())
        assert sorted(im["id"] for im in meta["images"]) == r["ids"]
        results = json.loads((tmp_path / out / "coco_results.json").read_text())
        assert {d["image_id"] for d in results} <= set(r["ids"])
        assert all(d["category_id"] in (1, 2, 3) for d in results)
    capsys.readouterr()
    assert main(["evaluate", "--annotations", r["json"], "--results", str(tmp_path / "a" / "coco_results.json")]) == 0
    assert "AP (%)" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "plain"), *weights]) == 0  # without a json: numbered 0..N-1
    assert [im["id"] for im in json.loads((tmp_path / "plain" / "images.json").read_text())["images"]] == [0, 1, 2]
    os.makedirs(tmp_path / "other", exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "other" / "stranger.png")
    capsys.readouterr()
    assert main(["predict", "--config-file", r["yaml"], "--input", str(tmp_path / "other"), "--annotations", r["json"],
                 "MODEL.WEIGHTS", r["weights"], "--output", str(tmp_path / "d")]) == 2
    assert "stranger.png: its file name is not the file name of any image" in capsys.readouterr().err


def test_predict_skips_unreadable_files_and_writes_results(tiny_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in sorted(os.listdir(tiny_run["images"]))[:2]:
        (folder / n).write_bytes(open(os.path.join(tiny_run["images"], n), "rb").read())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["predict", "--config-file", tiny_run["yaml"], "--input", str(folder), "--output",
                 str(tmp_path / "out"), "MODEL.WEIGHTS", tiny_run["weights"]]) == 0
    meta = json.loads((tmp_path / "out" / "images.json").read_text())
    assert len(meta["images"]) == 2 and meta["skipped"] == [str(folder / "broken.jpg")]
    assert (tmp_path / "out" / "coco_results.json").is_file()
    assert len([n for n in os.listdir(tmp_path / "out") if n.endswith(".png")]) == 2
