"""COCO evaluator: GT fed back gives AP 100, parity with pycocotools, empty inputs, per-class AP, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from surgdino.cli import main
from surgdino.errors import SurgDinoError
from surgdino.evaluation.coco_evaluator import (
    COCOEvaluator,
    evaluate_coco,
    evaluate_results_file,
    format_metrics,
    instances_to_coco_results,
    metric_names,
    prepare_ground_truth,
    run_coco_eval,
    summarize,
)

CAT_IDS = [3, 7, 11, 20]  # not contiguous on purpose; 20 has no ground truth


def make_gt(seed: int = 0, n_img: int = 4, per: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_img):
        h, w = int(rng.integers(80, 240)), int(rng.integers(80, 240))
        images.append({"id": 100 + i, "height": h, "width": w, "file_name": f"{i}.png"})
        for _ in range(per):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            poly = [x, y, x + bw, y, x + bw * 0.7, y + bh, x, y + bh * 0.8]
            area = float(mask_util.area(mask_util.frPyObjects([poly], h, w))[0])
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.choice(CAT_IDS[:3])),
                         "bbox": [x, y, bw, bh], "segmentation": [poly], "iscrowd": 0, "area": area})
    cats = [{"id": c, "name": f"tool{c}"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def gt_as_outputs(gt: dict) -> tuple[list[dict], list[dict]]:
    """Model-style inputs/outputs (tensors, contiguous labels) that reproduce the ground truth exactly."""
    to_contig = {c: i for i, c in enumerate(sorted(CAT_IDS))}
    inputs, outputs = [], []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) for a in anns]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float64)
        inputs.append({"image_id": img["id"], "height": h, "width": w})
        outputs.append({"boxes": boxes, "masks": torch.from_numpy(np.stack(masks)).bool(),
                        "scores": torch.linspace(1.0, 0.5, len(anns)),
                        "labels": torch.tensor([to_contig[a["category_id"]] for a in anns])})
    return inputs, outputs


def random_results(gt: dict, seed: int = 1, extra_on_first: int = 130) -> list[dict]:
    """Jittered copies of the ground truth, wrong classes, and a crowd of boxes on the first image (> 100)."""
    rng = np.random.default_rng(seed)
    imgs = {i["id"]: i for i in gt["images"]}
    res = []

    def add(image_id, bb, cat):
        img = imgs[image_id]
        x, y, bw, bh = bb
        rle = mask_util.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh * 0.9]], img["height"], img["width"])[0]
        res.append({"image_id": image_id, "category_id": int(cat), "bbox": [float(v) for v in bb],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "score": float(rng.random())})

    for a in gt["annotations"]:
        for _ in range(2):
            j = rng.normal(0, 3, 4)
            add(a["image_id"], [a["bbox"][0] + j[0], a["bbox"][1] + j[1], max(2.0, a["bbox"][2] + j[2]),
                                max(2.0, a["bbox"][3] + j[3])],
                a["category_id"] if rng.random() > 0.2 else rng.choice(CAT_IDS))
    first = gt["images"][0]
    for _ in range(extra_on_first):
        a = rng.choice([a for a in gt["annotations"] if a["image_id"] == first["id"]])
        j = rng.normal(0, 6, 4)
        add(first["id"], [a["bbox"][0] + j[0], a["bbox"][1] + j[1], max(2.0, a["bbox"][2] + j[2]),
                          max(2.0, a["bbox"][3] + j[3])], a["category_id"])
    return res


def _same(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.fixture(scope="module")
def gt() -> dict:
    return prepare_ground_truth(make_gt())


def test_ground_truth_fed_back_gives_ap_100(gt, tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator(json_file=str(path), output_dir=str(tmp_path / "out"))
    inputs, outputs = gt_as_outputs(gt)
    ev.process(inputs[:2], outputs[:2])
    ev.process(inputs[2:], outputs[2:])
    m = ev.evaluate()
    for t in ("segm", "bbox"):
        assert m[t]["AP"] == pytest.approx(100.0) and m[t]["AP50"] == pytest.approx(100.0)
        assert m[t]["AR100"] == pytest.approx(100.0)
        assert m["per_class"][t]["tool3"] == pytest.approx(100.0)
        assert math.isnan(m["per_class"][t]["tool20"])  # no ground truth for this class
    written = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert len(written) == len(gt["annotations"]) and {r["category_id"] for r in written} <= set(CAT_IDS)
    ev.reset()
    ev.process(inputs[:1], outputs[:1])  # only the images seen are evaluated
    assert ev.evaluate()["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 10, 300)])
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_parity_with_pycocotools(gt, iou_type, max_dets):
    res = random_results(gt)
    gt = dict(gt, annotations=[dict(a, iscrowd=int(a["id"] % 7 == 0)) for a in gt["annotations"]])  # some crowds
    slow = run_coco_eval(gt, res, iou_type, max_dets, use_fast_eval=False)
    fast = run_coco_eval(gt, res, iou_type, max_dets, use_fast_eval=True)
    ours_slow, ours_fast = summarize(slow, max_dets), summarize(fast, max_dets)
    assert list(ours_slow) == metric_names(max_dets)
    for k in ours_slow:
        assert _same(ours_slow[k], ours_fast[k]), k
    with contextlib.redirect_stdout(io.StringIO()):
        slow.summarize()
    stats = [float("nan") if s == -1 else 100 * s for s in slow.stats]
    if max_dets == (1, 10, 100):
        for k, s in zip(metric_names(max_dets), stats):
            assert _same(ours_slow[k], s), k
    else:  # pycocotools' summarize hard-codes maxDets=100 for AP: it finds no such column and says -1
        assert slow.stats[0] == -1
        for k, s in list(zip(metric_names(max_dets), stats))[1:]:
            assert _same(ours_slow[k], s), k
        p = np.asarray(slow.eval["precision"])[:, :, :, 0, 2]
        assert ours_slow["AP"] == pytest.approx(100 * p[p > -1].mean())
        assert ours_slow["AR300"] > ours_slow["AR10"]


def test_empty_results_and_empty_ground_truth(gt, tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator(json_file=str(path), max_dets=[1, 10, 300])
    inputs, _ = gt_as_outputs(gt)
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 5, 5, dtype=torch.bool),
             "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ev.process(inputs, [empty] * len(inputs))
    m = ev.evaluate()
    for t in ("segm", "bbox"):
        assert m[t]["AP"] == 0.0 and m[t]["AR300"] == 0.0 and m[t]["AP50"] == 0.0
    no_gt = dict(gt, annotations=[])
    for results in ([], random_results(gt)[:5]):
        m = evaluate_coco(no_gt, results)
        assert all(math.isnan(v) for v in m["segm"].values()) and all(math.isnan(v) for v in m["bbox"].values())


def test_per_class_table_and_dataset_metadata(gt, tmp_path):
    from surgdino.data.catalog import MetadataCatalog

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    # a dataset whose contiguous ids are in reverse order of the category ids
    id_map = {c: len(CAT_IDS) - 1 - i for i, c in enumerate(CAT_IDS)}
    MetadataCatalog.get("_test_eval_meta").set(json_file=str(path), thing_dataset_id_to_contiguous_id=id_map)
    ev = COCOEvaluator("_test_eval_meta", iou_types=["bbox"])
    inputs, outputs = gt_as_outputs(gt)
    for o in outputs:  # relabel into this dataset's contiguous order; drop tool7 predictions
        cats = [CAT_IDS[int(lbl)] for lbl in o["labels"]]
        keep = torch.tensor([c != 7 for c in cats])
        o["labels"] = torch.tensor([id_map[c] for c in cats])
        for k in ("boxes", "masks", "scores", "labels"):
            o[k] = o[k][keep]
    ev.process(inputs, outputs)
    m = ev.evaluate()
    assert set(m) == {"bbox", "per_class"}
    pc = m["per_class"]["bbox"]
    assert list(pc) == ["tool3", "tool7", "tool11", "tool20"]
    assert pc["tool3"] == pytest.approx(100) and pc["tool11"] == pytest.approx(100) and pc["tool7"] == 0.0
    assert math.isnan(pc["tool20"])
    assert m["bbox"]["AP"] == pytest.approx(200 / 3)
    table = format_metrics(m)
    assert "tool11" in table and "AR100" in table and "nan" in table


def test_rle_list_outputs_and_box_conversion():
    rle = mask_util.encode(np.asfortranarray(np.ones((4, 6, 1), dtype=np.uint8)))
    out = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "masks": rle, "scores": torch.tensor([0.5]),
           "labels": torch.tensor([1])}
    (r,) = instances_to_coco_results(out, 9, {0: 3, 1: 7})
    assert r["bbox"] == [1.0, 2.0, 3.0, 4.0] and r["category_id"] == 7 and r["image_id"] == 9
    assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [4, 6]


def test_evaluate_results_file_and_cli(gt, tmp_path, capsys):
    gt_path, dt_path, out = tmp_path / "gt.json", tmp_path / "dt.json", tmp_path / "m" / "metrics.json"
    gt_path.write_text(json.dumps(gt))
    inputs, outputs = gt_as_outputs(gt)
    to_id = dict(enumerate(sorted(CAT_IDS)))
    results = [r for i, o in zip(inputs, outputs) for r in instances_to_coco_results(o, i["image_id"], to_id)]
    dt_path.write_text(json.dumps(results))
    rc = main(["evaluate", "--annotations", str(gt_path), "--results", str(dt_path), "--output", str(out),
               "--max-dets", "1", "10", "300"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["segm"]["AP"] == pytest.approx(100) and m["bbox"]["AR300"] == pytest.approx(100)
    assert m["per_class"]["segm"]["tool20"] is None  # NaN is written as null
    assert "AP75" in capsys.readouterr().out
    bbox_only = evaluate_results_file(str(gt_path), str(dt_path), ["bbox"])
    assert set(bbox_only) == {"bbox", "per_class"}

    def fails(text: str, *needles: str) -> None:
        dt_path.write_text(text)
        capsys.readouterr()
        assert main(["evaluate", "--annotations", str(gt_path), "--results", str(dt_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(dt_path) in err, err
        for n in needles:
            assert n in err, err

    fails(json.dumps([dict(results[0], image_id=12345)]), "image_id 12345", "result 0")
    fails(json.dumps([results[0], dict(results[1], category_id=1)]), "category_id 1", "result 1")
    fails(json.dumps(results)[:-40], "not valid JSON", "line 1")
    fails(json.dumps({"annotations": results}), "JSON list")
    bad_size = dict(results[0], segmentation=dict(results[0]["segmentation"], size=[1, 1]))
    fails(json.dumps([bad_size]), "original image size")
    assert main(["evaluate", "--annotations", str(tmp_path / "nope.json"), "--results", str(dt_path)]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SurgDinoError, match="strictly increasing"):
        evaluate_coco(gt, results, max_dets=[10, 1])


def test_dataset_records_as_ground_truth(gt):
    from surgdino.data.catalog import DatasetCatalog, MetadataCatalog

    to_contig = {c: i for i, c in enumerate(CAT_IDS)}
    records = [{"file_name": f"/x/{img['id']}.png", "height": img["height"], "width": img["width"],
                "image_id": img["id"],
                "annotations": [dict(a, category_id=to_contig[a["category_id"]]) for a in gt["annotations"]
                                if a["image_id"] == img["id"]]} for img in gt["images"]]
    DatasetCatalog.register("_test_eval_records", lambda: records)
    MetadataCatalog.get("_test_eval_records").set(thing_classes=[f"tool{c}" for c in CAT_IDS],
                                                  thing_dataset_id_to_contiguous_id=to_contig)
    ev = COCOEvaluator("_test_eval_records")
    inputs, outputs = gt_as_outputs(gt)
    ev.process(inputs, outputs)
    m = ev.evaluate()
    assert m["segm"]["AP"] == pytest.approx(100) and m["bbox"]["AP"] == pytest.approx(100)
    assert math.isnan(m["per_class"]["segm"]["tool20"])


def test_evaluate_gathers_all_ranks(gt, tmp_path, monkeypatch):
    """Two ranks each process half of the images; rank 0 evaluates all of them, rank 1 returns {}."""
    from surgdino.evaluation import coco_evaluator

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    inputs, outputs = gt_as_outputs(gt)
    ranks = [COCOEvaluator(json_file=str(path), output_dir=str(tmp_path / f"r{r}")) for r in range(2)]
    for r, ev in enumerate(ranks):
        ev.process(inputs[r::2], outputs[r::2])
    states = [(ev._image_ids, ev._results) for ev in ranks]

    monkeypatch.setattr(coco_evaluator.comm, "is_main_process", lambda: False)
    monkeypatch.setattr(coco_evaluator.comm, "gather", lambda obj, dst=0: [])
    assert ranks[1].evaluate() == {}
    monkeypatch.setattr(coco_evaluator.comm, "is_main_process", lambda: True)
    monkeypatch.setattr(coco_evaluator.comm, "gather", lambda obj, dst=0: [obj, states[1]])
    m = ranks[0].evaluate()
    assert m["segm"]["AP"] == pytest.approx(100) and m["bbox"]["AR100"] == pytest.approx(100)
    written = json.loads((tmp_path / "r0" / "coco_instances_results.json").read_text())
    assert len(written) == len(gt["annotations"]) and not (tmp_path / "r1").exists()
    assert {r["image_id"] for r in written} == {img["id"] for img in gt["images"]}
