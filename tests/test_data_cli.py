"""``surgdino data check|show`` through ``surgdino.cli.main``: exit codes, messages, PNGs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from surgdino.cli import main
from surgdino.data import DatasetCatalog


def make_dataset(root, n=3, size=(40, 48)):
    """``n`` images of HxW ``size`` with two polygon instruments each (class ids 7 and 3)."""
    h, w = size
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "img", f"t{i}.jpg"))
        images.append({"id": i + 1, "file_name": f"t{i}.jpg", "height": h, "width": w})
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "bbox": [4, 4, 20, 10], "iscrowd": 0,
                     "area": 200.0, "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]})
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 3, "bbox": [10, 20, 30, 15], "iscrowd": 0,
                     "area": 225.0, "segmentation": [[10, 20, 40, 20, 40, 35]]})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 3, "name": "needle_holder"}, {"id": 7, "name": "scalpel"}]}
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, data


def test_check_ok_prints_statistics(tmp_path, capsys):
    path, _ = make_dataset(str(tmp_path))
    rc = main(["data", "check", "--annotations", path, "--image-root", str(tmp_path / "img")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "images:" in out and "3" in out and "instances:" in out and "6" in out
    assert "mean 2.0, max 2" in out
    assert "needle_holder" in out and "scalpel" in out and "OK" in out


def test_check_lists_every_problem_and_exits_2(tmp_path, capsys):
    path, data = make_dataset(str(tmp_path))
    data["annotations"][0]["category_id"] = 731
    data["annotations"][3]["segmentation"] = [[1, 2, 3, 4, 5]]
    os.remove(tmp_path / "img" / "t2.jpg")
    with open(path, "w") as f:
        json.dump(data, f)
    rc = main(["data", "check", "--annotations", path, "--image-root", str(tmp_path / "img")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "annotations[0] (id 1): category_id 731 is not among the 2 categories" in err
    assert "annotations[3] (id 4): segmentation[0] has an odd number of coordinates" in err
    assert "images[2] (id 3): image file not found" in err
    assert "3 problems" in err


def test_check_decode_finds_corrupt_image(tmp_path, capsys):
    path, _ = make_dataset(str(tmp_path))
    jpg = tmp_path / "img" / "t1.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) * 2 // 3])  # header intact, scan data cut
    args = ["data", "check", "--annotations", path, "--image-root", str(tmp_path / "img")]
    assert main(args) == 0
    assert main(args + ["--decode"]) == 2
    err = capsys.readouterr().err
    assert "images[1] (id 2): " in err and "t1.jpg: cannot decode the image" in err


def test_check_bad_json_exits_2(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main(["data", "check", "--annotations", str(bad), "--image-root", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_show_writes_pngs(tmp_path, capsys):
    path, _ = make_dataset(str(tmp_path))
    out = tmp_path / "vis"
    rc = main(["data", "show", "--annotations", path, "--image-root", str(tmp_path / "img"), "--out", str(out),
               "--num", "2"])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == ["t0.png", "t1.png"]
    drawn = np.asarray(Image.open(out / "t0.png"))
    original = np.asarray(Image.open(tmp_path / "img" / "t0.jpg").convert("RGB"))
    assert drawn.shape == original.shape
    assert (drawn[8, 14] != original[8, 14]).any()  # inside the first mask


def test_show_from_config_dataset(tmp_path):
    make_dataset(str(tmp_path / "d"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("DATASETS:\n  REGISTER:\n    - {name: cli_show_ds, json_file: d/instances.json, image_root: d/img}\n")
    try:
        rc = main(["data", "show", "--dataset", "cli_show_ds", "--out", str(tmp_path / "o"), "--num", "1",
                   "--config-file", str(cfg)])
    finally:
        DatasetCatalog.clear()
    assert rc == 0 and os.listdir(tmp_path / "o") == ["t0.png"]


def test_show_unknown_dataset_and_missing_args(tmp_path, capsys):
    assert main(["data", "show", "--dataset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["data", "show", "--out", str(tmp_path)]) == 2
    DatasetCatalog.clear()


def test_help_texts(capsys):
    for cmd in (["data", "--help"], ["data", "check", "--help"], ["data", "synth", "--help"],
                ["data", "show", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--decode" in out and "--num-classes" in out and "--instances MIN MAX" in out


def test_synth_rejects_bad_ranges(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--instances", "5", "2"]) == 2
    assert "MIN <= MAX" in capsys.readouterr().err


def test_synth_then_check_and_check_by_dataset_name(tmp_path, capsys):
    out = tmp_path / "trays"
    rc = main(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1", "--num-classes", "4",
               "--image-size", "64", "--instances", "2", "3", "--seed", "1"])
    assert rc == 0
    assert main(["data", "check", "--annotations", str(out / "annotations" / "instances_train.json"),
                 "--image-root", str(out / "train"), "--decode"]) == 0
    # The same folder as the config's synthetic root: checked by name, nothing regenerated.
    try:
        rc = main(["data", "check", "--dataset", "synthetic_trays_val", "DATASETS.SYNTHETIC_ROOT", str(out)])
    finally:
        DatasetCatalog.clear()
    assert rc == 0
    assert "instances_val.json" in capsys.readouterr().out
