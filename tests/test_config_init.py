"""``config init`` sizes a config from the data; packaged configs by name (``surgdino://``); the
config-versus-dataset checks at the start of ``train`` and in ``config show``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.config.core import packaged_config_dir, packaged_configs
from surgdino.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["MODEL.MaskDINO.TRAIN_NUM_POINTS", "256", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "[]",
        "MODEL.DEVICE", "cpu", "MODEL_EMA.ENABLED", "False"]


@pytest.fixture(scope="module")
def trays(tmp_path_factory):
    from surgdino.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("init_trays")
    generate_synthetic_dataset(str(root), num_train=4, num_val=2, num_classes=3, image_size=64,
                               instances_per_image=(7, 9), progress=False)
    return root


def _init(trays: Path, out: Path, *extra: str) -> int:
    return main(["config", "init", "--annotations", str(trays / "annotations" / "instances_train.json"),
                 "--val", str(trays / "annotations" / "instances_val.json"), "--output", str(out), *extra])


@pytest.mark.slow
def test_config_init_writes_a_config_that_trains_and_evaluates(trays, tmp_path, capsys):
    out = tmp_path / "cfgs" / "mine.yaml"
    assert _init(trays, out) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    densest = max(len([a for a in json.load(open(trays / "annotations" / f"instances_{s}.json"))["annotations"]
                       if a["image_id"] == i]) for s in ("train", "val") for i in range(10))
    cfg = load_config(str(out))
    m = cfg.MODEL.MaskDINO
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    assert m.NUM_OBJECT_QUERIES >= 3 * densest and m.FIRST_SELECTED_QUERIES == 2 * m.NUM_OBJECT_QUERIES
    assert m.DN_NUM >= densest and cfg.TEST.DETECTIONS_PER_IMAGE >= densest
    assert cfg.TEST.MAX_DETS[-1] == cfg.TEST.DETECTIONS_PER_IMAGE
    assert cfg.INPUT.MIN_SIZE_TEST == 64 and cfg.INPUT.MIN_SIZE_TRAIN == [64]
    assert cfg.MODEL.BACKBONE.NAME == "convnext_atto"  # the demo preset's model
    assert "several times more queries than objects" in text and "several times more queries" in printed
    assert text.count("#") > 15  # commented
    assert cfg.DATASETS.REGISTER[0]["json_file"] == str(trays / "annotations" / "instances_train.json")
    assert "../" in text  # dataset paths relative to the config file
    # it trains (two iterations) and evaluates
    run = tmp_path / "run"
    rc = main(["train", "--config-file", str(out), "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "2",
               "OUTPUT_DIR", str(run), *FAST, "--threads", "1"])
    assert rc == 0
    results = json.load(open(run / "inference" / "mine_val" / "results.json"))
    assert "AP50" in json.dumps(results)
    assert (run / "model_final.pth").is_file()
    # an existing output is not overwritten without --force
    assert _init(trays, out) == 2 and "exists" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tray", "user-document"])
def test_config_init_presets_load(preset, trays, tmp_path, capsys):
    out = tmp_path / f"{preset}.yaml"
    assert _init(trays, out, "--preset", preset) == 0
    cfg = load_config(str(out))
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3 and cfg.MODEL.BACKBONE.NAME == "convnext"
    assert cfg.MODEL.MaskDINO.NUM_OBJECT_QUERIES == (300 if preset == "tray" else 400)
    assert cfg.DATASETS.TRAIN == [f"{preset}_train"] and len(cfg.SOLVER.STEPS) == 2


def test_packaged_config_by_name_everywhere(tmp_path, capsys):
    names = packaged_configs()
    assert "demo/dimaskdino_atto_trays.yaml" in names and "dimaskdino_convnext_tiny_medical_instruments.yaml" in names
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: surgdino://demo/dimaskdino_atto_trays.yaml\nSOLVER:\n  MAX_ITER: 7\n")
    cfg = load_config(str(child))
    assert cfg.MODEL.BACKBONE.NAME == "convnext_atto" and cfg.SOLVER.MAX_ITER == 7
    assert load_config("surgdino://demo/dimaskdino_atto_trays").flat() == load_config(
        os.path.join(packaged_config_dir(), "demo", "dimaskdino_atto_trays.yaml")).flat()
    with pytest.raises(ConfigError, match="did you mean surgdino://demo/dimaskdino_atto_trays.yaml"):
        load_config("surgdino://demo/dimaskdino_atto_tray.yaml")
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [f"surgdino://{n}" for n in names]
    # the repository's configs/ still load, and equal the packaged files they point to
    for name in ("dimaskdino_convnext_tiny_medical_instruments.yaml", "Base-DIMaskDINO-ConvNeXt.yaml"):
        assert load_config(str(ROOT / "configs" / name)).flat() == load_config(f"surgdino://{name}").flat()


def _tray_cfg(trays: Path, tmp_path: Path, **model) -> Path:
    cfg = {"_BASE_": "surgdino://demo/dimaskdino_atto_trays.yaml",
           "DATASETS": {"REGISTER": [
               {"name": "chk_train", "json_file": str(trays / "annotations" / "instances_train.json"),
                "image_root": str(trays / "train")},
               {"name": "chk_val", "json_file": str(trays / "annotations" / "instances_val.json"),
                "image_root": str(trays / "val")}], "TRAIN": ["chk_train"], "TEST": ["chk_val"]},
           "MODEL": {"SEM_SEG_HEAD": {"NUM_CLASSES": 3}, **model}, "OUTPUT_DIR": str(tmp_path / "out")}
    path = tmp_path / "chk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_queries_fewer_than_twice_the_instances_warn(trays, tmp_path, capsys):
    from surgdino.data.checks import check_datasets

    path = _tray_cfg(trays, tmp_path, MaskDINO={"NUM_OBJECT_QUERIES": 10, "FIRST_SELECTED_QUERIES": 20})
    warnings = check_datasets(load_config(str(path)))
    most = max(len([a for a in json.load(open(trays / "annotations" / "instances_train.json"))["annotations"]
                    if a["image_id"] == i]) for i in range(10))
    assert len(warnings) == 1
    assert f"up to {most} instances" in warnings[0] and "NUM_OBJECT_QUERIES is 10" in warnings[0]
    assert f"at least {2 * most}" in warnings[0]
    assert main(["config", "show", "--config-file", str(path)]) == 0
    err = capsys.readouterr().err
    assert "MODEL.MaskDINO.NUM_OBJECT_QUERIES" in err and "warning" in err
    assert check_datasets(load_config(str(_tray_cfg(trays, tmp_path)))) == []  # the demo's 30 >= 2 x 9


@pytest.mark.parametrize("num_classes", [2, 5])
def test_class_count_mismatch_caught_at_start(num_classes, trays, tmp_path, capsys):
    path = _tray_cfg(trays, tmp_path)
    rc = main(["train", "--config-file", str(path), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1
    assert f"NUM_CLASSES = {num_classes}" in err[0] and "set MODEL.SEM_SEG_HEAD.NUM_CLASSES 3" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main(["config", "show", "--config-file", str(path), "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                 str(num_classes)]) == 2  # config show checks the same


def test_config_show_validates_datasets_like_train(trays, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    data = json.load(open(trays / "annotations" / "instances_val.json"))
    data["annotations"][0]["category_id"] = 99
    bad.write_text(json.dumps(data))
    path = _tray_cfg(trays, tmp_path)
    reg = json.dumps([{"name": "chk_bad", "json_file": str(bad), "image_root": str(trays / "val")}])
    over = ["DATASETS.REGISTER", reg, "DATASETS.TRAIN", "['chk_bad']", "DATASETS.TEST", "[]"]
    assert main(["config", "show", "--config-file", str(path), *over]) == 2
    err = capsys.readouterr().err
    assert "category_id" in err and "--no-check" in err
    assert main(["config", "show", "--no-check", "--config-file", str(path), *over]) == 0
