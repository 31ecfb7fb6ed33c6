"""Synthetic instrument trays: names, occlusion-correct masks, COCO files, determinism."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from surgdino.data.synth_instruments import FAMILIES
from surgdino.data.synthetic import generate_synthetic_dataset, instrument_class_names, render_tray
from surgdino.errors import SurgDinoError


def test_class_names_readable_unique_and_bounded():
    names = instrument_class_names(500)
    assert len(names) == 500 and len(set(names)) == 500
    assert instrument_class_names(12) == names[:12]
    for name, family in zip(names[:7], FAMILIES):  # the first classes cycle over the families
        assert f" {family}, " in name
    assert all(" cm, " in n for n in names)
    with pytest.raises(SurgDinoError, match="num_classes"):
        instrument_class_names(501)
    with pytest.raises(SurgDinoError):
        instrument_class_names(0)


@pytest.mark.parametrize("min_visible", [0.0, 0.3])
def test_render_tray_masks_disjoint_and_visible(min_visible):
    rng = np.random.default_rng(3)
    img, instances = render_tray(rng, 120, 160, 12, 25, min_visible)
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    assert 0 < len(instances) <= 25
    if min_visible == 0.0:
        assert len(instances) >= 18  # only fully hidden instances are dropped
    masks = np.stack([inst["mask"] for inst in instances])  # [N, H, W]
    assert masks.dtype == bool and masks.shape[1:] == (120, 160)
    assert masks.sum(0).max() <= 1, "a pixel belongs to two visible masks"
    for inst in instances:
        area = int(inst["mask"].sum())
        assert area > 0 and area >= min_visible * inst["full_area"]
        assert 0 <= inst["category_id"] < 12


def test_render_tray_deterministic_and_min_visible_only_filters():
    img_a, inst_a = render_tray(np.random.default_rng(7), 96, 96, 7, 20, 0.0)
    img_b, inst_b = render_tray(np.random.default_rng(7), 96, 96, 7, 20, 0.6)
    img_c, _ = render_tray(np.random.default_rng(8), 96, 96, 7, 20, 0.0)
    assert np.array_equal(img_a, img_b) and not np.array_equal(img_a, img_c)
    kept = {inst["mask"].tobytes() for inst in inst_a}
    assert len(inst_b) < len(inst_a) and all(inst["mask"].tobytes() in kept for inst in inst_b)


def test_field_cm_zooms_instruments():
    """Half the tray width in view draws each instrument twice as long: about 4x the full (unoccluded) area."""
    def mean_full_area(field_cm):
        areas = [inst["full_area"] for seed in range(4)
                 for inst in render_tray(np.random.default_rng(seed), 128, 128, 7, 4, 0.0, field_cm=field_cm)[1]]
        return float(np.mean(areas))

    ratio = mean_full_area(20.0) / mean_full_area(40.0)
    assert 3.0 < ratio < 5.5, ratio


def test_long_tail_makes_classes_uneven():
    counts = np.zeros(10, int)
    for seed in range(3):
        _, instances = render_tray(np.random.default_rng(seed), 64, 64, 10, 60, 0.0, long_tail=1.5)
        for inst in instances:
            counts[inst["category_id"]] += 1
    assert counts[0] > 3 * counts[5:].mean()


def _read(out):
    with open(os.path.join(out, "annotations", "instances_train.json"), "rb") as f:
        raw = f.read()
    return raw, json.loads(raw)


def test_generate_dataset_layout_annotations_and_determinism(tmp_path):
    kwargs = dict(num_train=3, num_val=2, num_classes=12, image_size=(96, 128), instances_per_image=(6, 10),
                  progress=False)
    out = generate_synthetic_dataset(str(tmp_path / "a"), seed=5, **kwargs)
    assert out["num_classes"] == 12
    assert out["train_json"] == str(tmp_path / "a" / "annotations" / "instances_train.json")
    assert os.path.isfile(out["val_json"]) and os.path.isdir(out["train_dir"]) and os.path.isdir(out["val_dir"])
    raw, data = _read(tmp_path / "a")
    assert [c["id"] for c in data["categories"]] == list(range(1, 13))
    assert [c["name"] for c in data["categories"]] == instrument_class_names(12)
    assert {c["supercategory"] for c in data["categories"]} == set(FAMILIES)
    assert len(data["images"]) == 3
    per_image = {}
    for ann in data["annotations"]:
        image = data["images"][ann["image_id"] - 1]
        seg = ann["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [96, 128] == [image["height"], image["width"]]
        m = mask_util.decode(seg)
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == mask_util.toBbox(seg).tolist()
        assert ann["area"] == float(m.sum()) and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 12
        per_image.setdefault(ann["image_id"], []).append(m)
    for masks in per_image.values():
        assert 0 < len(masks) <= 10
        assert np.stack(masks).sum(0).max() <= 1
    with Image.open(os.path.join(out["train_dir"], data["images"][0]["file_name"])) as im:
        assert im.size == (128, 96)
        px_a = np.asarray(im.convert("RGB"))
    with Image.open(os.path.join(out["val_dir"], "000001.jpg")) as im:
        assert not np.array_equal(px_a, np.asarray(im.convert("RGB")))  # val uses its own seed

    generate_synthetic_dataset(str(tmp_path / "b"), seed=5, workers=2, **kwargs)
    raw_b, _ = _read(tmp_path / "b")
    assert raw_b == raw  # byte-identical, whatever the number of workers
    for split in ("train", "val"):
        for name in sorted(os.listdir(tmp_path / "a" / split)):
            a = np.asarray(Image.open(tmp_path / "a" / split / name))
            b = np.asarray(Image.open(tmp_path / "b" / split / name))
            assert np.array_equal(a, b)
    generate_synthetic_dataset(str(tmp_path / "c"), seed=6, **kwargs)
    assert _read(tmp_path / "c")[0] != raw


def test_generate_dataset_png_and_bad_arguments(tmp_path):
    out = generate_synthetic_dataset(str(tmp_path), num_train=1, num_val=0, num_classes=3, image_size=64,
                                     instances_per_image=(2, 3), progress=False, image_format="png")
    assert os.listdir(out["train_dir"]) == ["000001.png"]
    assert json.load(open(out["val_json"]))["images"] == []
    for bad in (dict(image_size=8), dict(instances_per_image=(5, 2)), dict(min_visible=1.5), dict(num_classes=501),
                dict(num_train=-1), dict(image_format="gif"), dict(long_tail=-1.0), dict(field_cm=0.5)):
        with pytest.raises(SurgDinoError):
            generate_synthetic_dataset(str(tmp_path / "bad"), **{"progress": False, **bad})
