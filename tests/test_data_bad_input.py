"""Bad input gives one clear line, never a hang or a traceback: malformed RLE, 16-bit and EXIF-rotated
images, file names leaving the image root, empty image lists, decompression bombs, output paths that
are files, existing datasets, errors inside data-loader workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from surgdino.cli import main
from surgdino.data.coco import load_coco_json, validate_coco
from surgdino.data.imageio import image_size, read_image
from surgdino.data.loader import build_loader_from_records
from surgdino.data.mapper import DatasetMapper
from surgdino.data.rle import compressed_counts, rle_problem
from surgdino.errors import DataError, SurgDinoError

H, W = 24, 32


def _rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def make_dataset(root, segmentation=None, file_names=None, size=(H, W)) -> str:
    """Two PNG images with one RLE instance each; returns the json path (image root = ``root``)."""
    h, w = size
    names = file_names or ["a.png", "b.png"]
    for n in names:
        p = os.path.join(root, n)
        if not os.path.isabs(n) and ".." not in n:
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(p)
    mask = np.zeros((h, w), bool)
    mask[4:10, 6:20] = True
    segm = segmentation or _rle(mask)
    data = {"images": [{"id": 7 + i, "file_name": n, "height": h, "width": w} for i, n in enumerate(names)],
            "categories": [{"id": 3, "name": "clamp"}],
            "annotations": [{"id": 1 + i, "image_id": 7 + i, "category_id": 3, "bbox": [6, 4, 14, 6], "iscrowd": 0,
                             "segmentation": segm} for i in range(len(names))]}
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


# ---------------------------------------------------------------------------- malformed RLE
def test_compressed_counts_decode_like_pycocotools():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        m = rng.random((h, w)) < rng.random()
        if t % 3 == 0:
            m = np.zeros((h, w), bool)
            m[2:h // 2, 1:w // 3] = True
        r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        runs = compressed_counts(r["counts"])
        assert runs.sum() == h * w
        # re-encoding the decoded run lengths gives pycocotools' string back
        assert mask_util.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)["counts"] == r["counts"]
        assert rle_problem({"size": [h, w], "counts": r["counts"].decode()}, h, w) is None


@pytest.mark.parametrize("counts, why", [("0", "sum to 0"), ("P1", "sum to 32"), ("ab`", "truncated"),
                                         ("~~", "alphabet"), ([3, -1], "non-negative"), ([5, 5], "sum to 10")])
def test_malformed_rle_rejected_by_check_and_loading(tmp_path, capsys, counts, why):
    path = make_dataset(str(tmp_path), segmentation={"size": [H, W], "counts": counts})
    report = validate_coco(path, str(tmp_path))
    assert len(report.problems) == 2 and all(why in p for p in report.problems), report.problems
    with pytest.raises(DataError, match=why):
        load_coco_json(path, str(tmp_path))
    assert main(["data", "check", "--annotations", path, "--image-root", str(tmp_path)]) == 2
    assert "annotations[0] (id 1): segmentation RLE" in capsys.readouterr().err


def _evaluate_in_subprocess(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``surgdino evaluate`` in a child with a timeout: pycocotools hangs on malformed RLE (rleIou)."""
    try:
        return subprocess.run([sys.executable, "-m", "surgdino", "evaluate", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("surgdino evaluate hung on malformed input")


def test_malformed_rle_rejected_by_evaluate(tmp_path):
    good = _rle(np.pad(np.ones((6, 14), bool), ((4, H - 10), (6, W - 20))))
    bad = {"size": [H, W], "counts": "P1"}  # covers 32 of 768 pixels
    gt_bad = make_dataset(str(tmp_path), segmentation=bad)
    dt = [{"image_id": 7, "category_id": 3, "score": 0.9, "bbox": [6, 4, 14, 6], "segmentation": good}]
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    r = _evaluate_in_subprocess(["--annotations", gt_bad, "--results", str(tmp_path / "dt.json")])
    assert r.returncode == 2 and "sum to 32" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    os.makedirs(tmp_path / "ok", exist_ok=True)
    gt_good = make_dataset(str(tmp_path / "ok"))
    dt[0]["segmentation"] = bad
    (tmp_path / "dt_bad.json").write_text(json.dumps(dt))
    r = _evaluate_in_subprocess(["--annotations", gt_good, "--results", str(tmp_path / "dt_bad.json")])
    assert r.returncode == 2 and "result 0" in r.stderr and "sum to 32" in r.stderr, r.stderr


@pytest.mark.parametrize("change, message", [
    ({"score": float("nan")}, "finite numeric score"),
    ({"bbox": [6, 4, float("nan"), 6]}, "4 finite numbers"),
    ({"bbox": [6, 4, -14, 6]}, "w, h >= 0"),
])
def test_evaluate_rejects_nan_scores_and_bad_boxes(tmp_path, capsys, change, message):
    gt = make_dataset(str(tmp_path))
    dt = [{"image_id": 7, "category_id": 3, "score": 0.9, "bbox": [6, 4, 14, 6], **change}]
    (tmp_path / "dt.json").write_text(json.dumps(dt))  # NaN is written as the NaN literal Python's json reads
    assert main(["evaluate", "--annotations", gt, "--results", str(tmp_path / "dt.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "result 0" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- images
def test_16_bit_png_scaled_by_its_range(tmp_path):
    a = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in steps of 257
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit image
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert (rgb[..., 0] == rgb[..., 2]).all()
    mapped = DatasetMapper(is_train=False, augmentations=[])({"file_name": str(tmp_path / "g16.png"), "image_id": 1})
    assert mapped["image"].permute(1, 2, 0).numpy().tolist() == rgb.tolist()


def _exif_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A 20x40 (HxW stored) JPEG tagged to be shown rotated; returns the stored pixels."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # left band white
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return stored


def test_exif_orientation_same_in_check_training_and_predict(tmp_path, capsys):
    from surgdino.engine.predictor import predict_files

    _exif_jpeg(tmp_path / "r.jpg")
    upright = read_image(tmp_path / "r.jpg")
    assert upright.shape == (40, 20, 3)  # rotated 90°: W and H swap
    assert image_size(tmp_path / "r.jpg") == (20, 40) == image_size(tmp_path / "r.jpg", decode=True)

    def dataset(h, w):
        data = {"images": [{"id": 1, "file_name": "r.jpg", "height": h, "width": w}],
                "categories": [{"id": 1, "name": "x"}], "annotations": []}
        (tmp_path / "j.json").write_text(json.dumps(data))
        return str(tmp_path / "j.json")

    stored_size = dataset(20, 40)  # the size before rotation: what training would not see
    for decode in (False, True):
        problems = validate_coco(stored_size, str(tmp_path), decode_images=decode).problems
        assert len(problems) == 1 and "EXIF orientation" in problems[0], problems
    records = load_coco_json(dataset(40, 20), str(tmp_path))
    assert validate_coco(str(tmp_path / "j.json"), str(tmp_path), decode_images=True).ok
    mapped = DatasetMapper(is_train=False, augmentations=[])(records[0])
    np.testing.assert_array_equal(mapped["image"].permute(1, 2, 0).numpy(), upright)

    class Recorder:  # the predictor's model replaced: this test is about which pixels reach it
        thing_classes, contiguous_to_dataset_id = ["x"], None
        seen: list = []

        def __call__(self, image, image_id, file_name):
            self.seen.append(image)
            return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                    "masks": torch.zeros(0, *image.shape[:2], dtype=torch.bool)}

    rec = Recorder()
    predict_files(rec, [str(tmp_path / "r.jpg")], str(tmp_path / "pred"))
    np.testing.assert_array_equal(rec.seen[0], upright)


def test_decompression_bomb_is_one_clear_line(tmp_path, monkeypatch, capsys):
    path = make_dataset(str(tmp_path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # H*W = 768 > 2 x 100: PIL's DecompressionBombError
    with pytest.raises(DataError, match="decompression bomb") as e:
        read_image(tmp_path / "a.png")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 500 < 768 <= 1000: only PIL's warning; refused too
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(tmp_path / "a.png")
    assert main(["data", "check", "--annotations", path, "--image-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "images[0] (id 7): " in err and "decompression bomb" in err and "Traceback" not in err
    with pytest.raises(DataError, match="decompression bomb"):
        DatasetMapper(is_train=False, augmentations=[])(load_coco_json(path, str(tmp_path))[0])


def test_corrupt_image_error_is_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "x.png")
    assert "x.png: cannot decode the image" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- file names and image lists
@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_file_names_leaving_the_image_root_are_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(b"")
    path = make_dataset(str(root), file_names=["a.png", name])
    report = validate_coco(path, str(root))
    assert any("leaves the image root" in p and "images[1]" in p for p in report.problems), report.problems
    with pytest.raises(DataError, match="leaves the image root"):
        load_coco_json(path, str(root))


def test_empty_image_list_is_an_error_in_data_check(tmp_path, capsys):
    (tmp_path / "e.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    assert main(["data", "check", "--annotations", str(tmp_path / "e.json"), "--image-root", str(tmp_path)]) == 2
    assert "'images' is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------- outputs
def test_existing_file_as_output_folder_is_a_clear_error(tmp_path, capsys):
    from surgdino.config import load_config
    from surgdino.engine.defaults import default_setup
    from surgdino.engine.predictor import predict_files

    gt = make_dataset(str(tmp_path))
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(SurgDinoError, match="is a file, not a folder"):
        predict_files(object(), [str(tmp_path / "a.png")], str(taken))
    with pytest.raises(SurgDinoError, match="OUTPUT_DIR .*is a file"):
        default_setup(load_config(None, ["OUTPUT_DIR", str(taken)]))
    with pytest.raises(SurgDinoError, match="lies under the file"):
        predict_files(object(), [str(tmp_path / "a.png")], str(taken / "sub"))
    dt = tmp_path / "dt.json"
    dt.write_text("[]")
    assert main(["evaluate", "--annotations", gt, "--results", str(dt), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["data", "show", "--annotations", gt, "--image-root", str(tmp_path), "--out", str(taken)]) == 2
    assert main(["data", "synth", "--out", str(taken), "--num-train", "1", "--num-val", "0"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert taken.read_text() == "mine"


def test_synth_refuses_an_existing_dataset(tmp_path, capsys):
    out = tmp_path / "trays"
    args = ["data", "synth", "--out", str(out), "--num-train", "1", "--num-val", "1", "--num-classes", "2",
            "--image-size", "32", "--instances", "1", "2"]
    assert main(args) == 0
    ann = out / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text().replace('"name"', '"name" ', 1))  # the user's edit
    before = ann.read_text()
    assert main([*args, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a dataset" in err and "instances_train.json" in err
    assert ann.read_text() == before


# ---------------------------------------------------------------------------- data-loader workers
def test_worker_errors_read_like_in_process_errors(tmp_path):
    path = make_dataset(str(tmp_path))
    records = load_coco_json(path, str(tmp_path))
    os.remove(records[1]["file_name"])
    mapper = DatasetMapper(is_train=False, augmentations=[])
    messages = []
    for workers in (0, 1):
        loader = build_loader_from_records(records, mapper, num_workers=workers, training=False)
        with pytest.raises(DataError) as e:
            list(loader)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "b.png: image file not found" in messages[1]
    assert "\n" not in messages[1] and "Traceback" not in messages[1]


def test_deeply_nested_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    assert main(["data", "check", "--annotations", str(tmp_path / "deep.json"), "--image-root", str(tmp_path)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    gt = make_dataset(str(tmp_path))
    assert main(["evaluate", "--annotations", gt, "--results", str(tmp_path / "deep.json")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and len(err.strip().splitlines()) == 1


def test_mapper_refuses_malformed_rle_of_python_registered_records(tmp_path):
    """Records built in Python skip load_coco_json; the mapper still never decodes a malformed RLE."""
    make_dataset(str(tmp_path))
    record = {"file_name": str(tmp_path / "a.png"), "height": H, "width": W, "image_id": 1,
              "annotations": [{"id": 5, "category_id": 0, "iscrowd": 0, "bbox": [0, 0, 4, 4],
                               "segmentation": {"size": [H, W], "counts": "P1"}}]}
    with pytest.raises(DataError, match="annotation 5: segmentation RLE runs sum to 32"):
        DatasetMapper(is_train=True, augmentations=[])(record)
