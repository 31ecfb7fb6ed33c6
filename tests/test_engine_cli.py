"""``surgdino train | predict | demo`` through the command line with a tiny real MaskDINO on a tiny generated
COCO dataset; bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from test_engine_helpers import losses_of, tiny_maskdino_model_cfg

from surgdino.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from surgdino.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("trays")
    info = generate_synthetic_dataset(str(root), num_train=8, num_val=3, num_classes=3, image_size=64,
                                      instances_per_image=(2, 3), progress=False)
    cfg = {
        "MODEL": tiny_maskdino_model_cfg(3),  # a real MaskDINO, tiny
        "DATASETS": {"REGISTER": [
            {"name": "engcli_train", "json_file": info["train_json"], "image_root": info["train_dir"]},
            {"name": "engcli_val", "json_file": info["val_json"], "image_root": info["val_dir"]}],
            "TRAIN": ["engcli_train"], "TEST": ["engcli_val"]},
        "INPUT": {"DATASET_MAPPER_NAME": "coco_instance", "MIN_SIZE_TRAIN": [64], "MAX_SIZE_TRAIN": 64,
                  "MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 64},
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"IMS_PER_BATCH": 2, "BASE_LR": 0.001, "MAX_ITER": 20, "WARMUP_ITERS": 0, "STEPS": [],
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
    assert "AP50" in printed and printed.count("Per-class segm AP") == 1  # the tables once, at the end
    (ev,) = (tmp_path / "ev").glob("eval_model_final_*")  # evaluation writes into its own subfolder
    assert json.loads((ev / "inference" / "engcli_val" / "results.json").read_text())["segm"]

    assert main(["train", "--config-file", data["yaml"], "--eval-only", "OUTPUT_DIR", str(tmp_path / "tta"),
                 "MODEL.WEIGHTS", str(out / "model_final.pth"), "TEST.AUG.ENABLED", "True",
                 "TEST.AUG.MIN_SIZES", "[48, 64]", "TEST.AUG.MAX_SIZE", "100"]) == 0
    assert "test-time augmentation" in next((tmp_path / "tta").glob("eval_*/log.txt")).read_text()

    pred = tmp_path / "pred"
    assert main(["predict", "--config-file", data["yaml"], "MODEL.WEIGHTS", str(out / "model_final.pth"),
                 "TEST.KEEP_EMPTY_MASKS", "True",  # a 20-iteration model's masks are empty: keep them all
                 "--input", data["val_dir"], "--output", str(pred), "--score-threshold", "0"]) == 0
    pngs = sorted(n for n in os.listdir(pred) if n.endswith(".png"))
    assert len(pngs) == 3
    results = json.loads((pred / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} == {0, 1, 2}  # every detection scores >= 0: all of them kept
    assert len(results) == 3 * 8 * 3  # images x queries x classes (top-k over query x class pairs)
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    meta = json.loads((pred / "images.json").read_text())
    assert len(meta["thing_classes"]) == 3 and len(meta["images"]) == 3


KILL_AT_6 = """
import os, signal, sys
from surgdino.engine import defaults
from surgdino.engine.trainer import HookBase

class Kill(HookBase):
    def after_step(self):  # after the checkpoint at 4 and the metrics of 5 and 6 were written
        if self.trainer.iter + 1 == 6:
            os.kill(os.getpid(), signal.SIGKILL)

build_hooks = defaults.Trainer.build_hooks
defaults.Trainer.build_hooks = lambda self: build_hooks(self) + [Kill()]
from surgdino.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_resume_after_sigkill_matches_uninterrupted(data, tmp_path):
    """MaskDINO (drop path on) with a data-loading worker, killed with SIGKILL after its checkpoint at 4 and
    resumed with --resume: the same losses 5..8 and final weights as a run never interrupted."""
    common = ["--config-file", data["yaml"], "DATALOADER.NUM_WORKERS", "1", "SOLVER.MAX_ITER", "8",
              "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
              "DATASETS.TEST", "[]"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", *common, "OUTPUT_DIR", str(full)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_6, "train", *common, "OUTPUT_DIR", str(killed)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "model_0000004.pth").is_file() and not (killed / "model_final.pth").exists()
    assert sorted(losses_of(str(killed))) == [1, 2, 3, 4, 5, 6]

    assert main(["train", "--resume", *common, "OUTPUT_DIR", str(killed)]) == 0
    a, b = losses_of(str(full)), losses_of(str(killed))
    assert sorted(b) == list(range(1, 9))  # lines after the checkpoint were replaced, not duplicated
    assert len({round(v, 3) for v in a.values()}) > 1  # the losses do change
    for it in range(1, 9):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=1e-6), it
    wa = torch.load(full / "model_final.pth", weights_only=False)["model"]
    wb = torch.load(killed / "model_final.pth", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)


def _bad(args, capsys):
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


BAD_CASES = ["missing_config", "unknown_key", "missing_weights", "eval_no_weights", "eval_missing_weights",
             "empty_dataset", "eval_empty_dataset", "bad_device", "bad_num_gpus",
             "predict_missing_config", "predict_unknown_key", "predict_no_weights", "predict_missing_weights",
             "predict_no_images", "demo_unknown_key", "demo_missing_weights", "demo_odd_overrides"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_bad_arguments_one_line_exit_2(case, data, tmp_path, capsys):
    """Each command (train, train --eval-only, predict, demo) with a missing config, an unknown key, missing
    weights or an empty dataset: one line on stderr naming the problem, exit code 2, no traceback."""
    y = data["yaml"]
    out = ["OUTPUT_DIR", str(tmp_path / "o")]
    pred = ["--input", data["val_dir"], "--output", str(tmp_path / "p")]
    demo = ["demo", "--output", str(tmp_path / "d"), "--data-root", str(tmp_path / "data")]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    reg = json.dumps([{"name": f"engcli_empty_{case}", "json_file": str(empty), "image_root": str(tmp_path)}])
    cases = {
        "missing_config": (["train", "--config-file", str(tmp_path / "nope.yaml")], "config file not found"),
        "unknown_key": (["train", "--config-file", y, "SOLVER.BASE_LRR", "1"], "did you mean SOLVER.BASE_LR"),
        "missing_weights": (["train", "--config-file", y, *out, "MODEL.WEIGHTS", "nope.pth"],
                            "MODEL.WEIGHTS file not found"),
        "eval_no_weights": (["train", "--config-file", y, "--eval-only", *out], "needs weights"),
        "eval_missing_weights": (["train", "--config-file", y, "--eval-only", *out, "MODEL.WEIGHTS", "nope.pth"],
                                 "MODEL.WEIGHTS file not found"),
        "empty_dataset": (["train", "--config-file", y, *out, "DATASETS.REGISTER", reg,
                           "DATASETS.TRAIN", "['engcli_empty_empty_dataset']"], "no image"),
        "eval_empty_dataset": (["train", "--config-file", y, "--eval-only", *out, "MODEL.WEIGHTS", y,
                                "DATASETS.REGISTER", reg, "DATASETS.TEST", "['engcli_empty_eval_empty_dataset']"],
                               "no image"),
        "bad_num_gpus": (["train", "--config-file", y, *out, "--num-gpus", "0"], "--num-gpus 0"),
        "bad_device": (["train", "--config-file", y, *out, "MODEL.DEVICE", "cuda:7"], "MODEL.DEVICE"),
        "predict_missing_config": (["predict", "--config-file", str(tmp_path / "nope.yaml"), *pred,
                                    "MODEL.WEIGHTS", y], "config file not found"),
        "predict_unknown_key": (["predict", "--config-file", y, *pred, "MODEL.WEIGHTS", y, "TEST.SCORE_THRESH", "1"],
                                "did you mean TEST.SCORE_THRESHOLD"),
        "predict_no_weights": (["predict", "--config-file", y, *pred], "needs weights"),
        "predict_missing_weights": (["predict", "--config-file", y, *pred, "MODEL.WEIGHTS", "nope.pth"],
                                    "MODEL.WEIGHTS file not found"),
        "predict_no_images": (["predict", "--config-file", y, "MODEL.WEIGHTS", "x.pth", "--input",
                               str(tmp_path / "*.png"), "--output", str(tmp_path / "p")], "no images found"),
        "demo_unknown_key": ([*demo, "SOLVER.BASE_LRR", "1"], "did you mean SOLVER.BASE_LR"),
        "demo_missing_weights": ([*demo, "MODEL.WEIGHTS", "nope.pth"], "MODEL.WEIGHTS file not found"),
        "demo_odd_overrides": ([*demo, "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
    }
    args, expect = cases[case]
    if case == "bad_device":
        if torch.cuda.device_count() > 7:
            pytest.skip("machine has a cuda:7")
    rc, err = _bad(args, capsys)
    assert rc == 2
    assert len(err) == 1 and expect.lower() in err[0].lower(), err
    assert "Traceback" not in "\n".join(err)
    if case.startswith("demo"):
        assert not (tmp_path / "data").exists()  # checked before generating the dataset


def test_cli_two_processes_train_real_maskdino(data, tmp_path):
    """``--num-gpus 2`` on CPU: two gloo processes train the real tiny MaskDINO (DDP, sharded loader, gathered
    metrics) with losses close to one process with the same total batch; only rank 0 writes files."""
    common = ["--config-file", data["yaml"], "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2",
              "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
              "DATASETS.TEST", "[]", "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *common, "OUTPUT_DIR", str(one)]) == 0
    assert main(["train", "--num-gpus", "2", *common, "OUTPUT_DIR", str(two)]) == 0
    a, b = losses_of(str(one)), losses_of(str(two))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]  # one metrics line per iteration: rank 0 alone writes
    assert (two / "model_final.pth").is_file() and not list(two.glob("log.txt.rank*"))
    for it in a:  # same images per iteration; random point sampling differs per process
        assert b[it] == pytest.approx(a[it], rel=0.05), it
