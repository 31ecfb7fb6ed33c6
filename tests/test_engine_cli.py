"""``surgdino train | predict`` through the command line on a tiny generated COCO dataset; bad arguments."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from test_engine_helpers import NAME, losses_of

from surgdino.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from surgdino.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("trays")
    info = generate_synthetic_dataset(str(root), num_train=8, num_val=3, num_classes=3, image_size=64,
                                      instances_per_image=(2, 3), progress=False)
    cfg = {
        "MODEL": {"META_ARCHITECTURE": NAME, "DEVICE": "cpu", "SEM_SEG_HEAD": {"NUM_CLASSES": 3}},
        "DATASETS": {"REGISTER": [
            {"name": "engcli_train", "json_file": info["train_json"], "image_root": info["train_dir"]},
            {"name": "engcli_val", "json_file": info["val_json"], "image_root": info["val_dir"]}],
            "TRAIN": ["engcli_train"], "TEST": ["engcli_val"]},
        "INPUT": {"DATASET_MAPPER_NAME": "coco_instance", "MIN_SIZE_TRAIN": [64], "MAX_SIZE_TRAIN": 64,
                  "MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 64},
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"IMS_PER_BATCH": 2, "BASE_LR": 0.01, "MAX_ITER": 20, "WARMUP_ITERS": 0, "STEPS": [],
                   "CHECKPOINT_PERIOD": 10, "LOG_PERIOD": 5, "CLIP_GRADIENTS": {"CLIP_VALUE": 1.0}},
        "TEST": {"EVAL_PERIOD": 10, "BEST_METRIC": "bbox/AP"},
        "SEED": 1,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"yaml": str(path), **info}


def test_cli_train_eval_predict(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out), "VIS_PERIOD", "10"]) == 0
    names = set(os.listdir(out))
    for f in ("config.yaml", "log.txt", "metrics.jsonl", "last_checkpoint", "model_0000010.pth",
              "model_final.pth", "model_best.pth", "total_loss.png"):
        assert f in names, f
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "total_loss" in r] == [5, 10, 15, 20]
    assert {r["iter"] for r in rows if "segm/AP" in r} == {10, 20}
    assert all("lr" in r for r in rows if "total_loss" in r)
    folder = out / "inference" / "engcli_val"
    assert (folder / "results.json").is_file() and (folder / "per_class_ap.txt").is_file()
    assert "Per-class segm AP" in (folder / "per_class_ap.txt").read_text()

    capsys.readouterr()
    assert main(["train", "--config-file", data["yaml"], "--eval-only", "OUTPUT_DIR", str(tmp_path / "ev"),
                 "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "Per-class segm AP" in printed
    assert json.loads((tmp_path / "ev" / "inference" / "engcli_val" / "results.json").read_text())["segm"]

    assert main(["train", "--config-file", data["yaml"], "--eval-only", "OUTPUT_DIR", str(tmp_path / "tta"),
                 "MODEL.WEIGHTS", str(out / "model_final.pth"), "TEST.AUG.ENABLED", "True",
                 "TEST.AUG.MIN_SIZES", "[48, 64]", "TEST.AUG.MAX_SIZE", "100"]) == 0
    assert "test-time augmentation" in (tmp_path / "tta" / "log.txt").read_text()

    pred = tmp_path / "pred"
    assert main(["predict", "--config-file", data["yaml"], "MODEL.WEIGHTS", str(out / "model_final.pth"),
                 "--input", data["val_dir"], "--output", str(pred), "--score-threshold", "0"]) == 0
    pngs = sorted(n for n in os.listdir(pred) if n.endswith(".png"))
    assert len(pngs) == 3
    results = json.loads((pred / "coco_results.json").read_text())
    assert len(results) == 3 and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    meta = json.loads((pred / "images.json").read_text())
    assert len(meta["thing_classes"]) == 3 and len(meta["images"]) == 3


def test_cli_resume_with_a_worker_matches(data, tmp_path):
    """Resuming with a data-loading worker continues the same data order and losses."""
    common = ["--config-file", data["yaml"], "DATALOADER.NUM_WORKERS", "1", "SOLVER.MAX_ITER", "8",
              "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
              "DATASETS.TEST", "[]"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", *common, "OUTPUT_DIR", str(full)]) == 0
    resumed.mkdir()
    shutil.copy(full / "model_0000004.pth", resumed / "model_0000004.pth")
    assert main(["train", "--resume", *common, "OUTPUT_DIR", str(resumed)]) == 0
    a, b = losses_of(str(full)), losses_of(str(resumed))
    assert sorted(b) == [5, 6, 7, 8]
    for it in b:
        assert b[it] == pytest.approx(a[it], abs=1e-6)


def _bad(args, capsys):
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("case", ["missing_config", "unknown_key", "missing_weights", "eval_no_weights",
                                  "empty_dataset", "predict_no_images", "bad_device", "bad_num_gpus"])
def test_cli_bad_arguments_one_line_exit_2(case, data, tmp_path, capsys):
    y = data["yaml"]
    out = ["OUTPUT_DIR", str(tmp_path / "o")]
    if case == "missing_config":
        args, expect = ["train", "--config-file", str(tmp_path / "nope.yaml")], "config file not found"
    elif case == "unknown_key":
        args, expect = ["train", "--config-file", y, "SOLVER.BASE_LRR", "1"], "did you mean SOLVER.BASE_LR"
    elif case == "missing_weights":
        args, expect = ["train", "--config-file", y, *out, "MODEL.WEIGHTS", "nope.pth"], "MODEL.WEIGHTS file not found"
    elif case == "eval_no_weights":
        args, expect = ["train", "--config-file", y, "--eval-only", *out], "needs weights"
    elif case == "empty_dataset":
        empty = tmp_path / "empty.json"
        empty.write_text(json.dumps({"images": [], "annotations": [],
                                     "categories": [{"id": 1, "name": "a"}]}))
        reg = [{"name": f"engcli_empty_{os.getpid()}", "json_file": str(empty), "image_root": str(tmp_path)}]
        args = ["train", "--config-file", y, *out, "DATASETS.REGISTER", json.dumps(reg),
                "DATASETS.TRAIN", f"['{reg[0]['name']}']"]
        expect = "no image"
    elif case == "predict_no_images":
        args = ["predict", "--config-file", y, "MODEL.WEIGHTS", "x.pth", "--input", str(tmp_path / "*.png"),
                "--output", str(tmp_path / "p")]
        expect = "no images found"
    elif case == "bad_num_gpus":
        args, expect = ["train", "--config-file", y, *out, "--num-gpus", "0"], "--num-gpus 0"
    else:
        args, expect = ["train", "--config-file", y, *out, "MODEL.DEVICE", "cuda:7"], "MODEL.DEVICE"
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("machine has a cuda:7")
    rc, err = _bad(args, capsys)
    assert rc == 2
    assert len(err) == 1 and expect.lower() in err[0].lower(), err
    assert "Traceback" not in "\n".join(err)
