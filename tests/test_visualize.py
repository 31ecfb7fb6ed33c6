"""Drawing instances and plotting training curves / per-class AP."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from surgdino.errors import DataError
from surgdino.visualize import (
    draw_instances,
    instance_colors,
    plot_per_class_ap,
    plot_training_curves,
    save_image,
)


def test_draw_instances_changes_pixels_inside_masks_only():
    img = np.full((64, 80, 3), 128, np.uint8)
    masks = np.zeros((2, 64, 80), bool)
    masks[0, 30:50, 10:30] = True
    masks[1, 30:50, 50:70] = True
    boxes = np.array([[10, 30, 30, 50], [50, 30, 70, 50]], np.float32)
    out = draw_instances(img, boxes, masks, [0, 1], ["scalpel", "forceps"], scores=[0.9, 0.8])
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (img == 128).all()  # input untouched
    inside0, inside1 = out[40, 20], out[40, 60]
    assert (inside0 != 128).any() and (inside1 != 128).any()
    assert (inside0 != inside1).any()  # distinct colours per instance
    assert (out[5, 75] == 128).all()  # far from everything: unchanged
    # alpha 0.5 of the instance colour over grey inside the mask
    expected = np.round(0.5 * 128 + 0.5 * instance_colors(2)[0].astype(float))
    assert np.abs(inside0.astype(float) - expected).max() <= 1


def test_draw_instances_accepts_tensors_and_no_masks():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8).permute(1, 2, 0)  # [H, W, 3]
    out = draw_instances(img, torch.tensor([[2.0, 10.0, 20.0, 30.0]]), None, torch.tensor([3]), None,
                         scores=torch.tensor([0.5]))
    assert out[20, 2].any()  # the box's left edge
    empty = draw_instances(np.zeros((16, 16, 3), np.uint8), np.zeros((0, 4)), np.zeros((0, 16, 16), bool), [], [])
    assert not empty.any()
    with pytest.raises(ValueError, match="masks"):
        draw_instances(np.zeros((16, 16, 3), np.uint8), np.zeros((1, 4)), np.zeros((1, 8, 8), bool), [0], ["a"])


def test_instance_colors_distinct():
    c = instance_colors(30).astype(int)
    dist = np.abs(c[:, None] - c[None]).sum(-1) + np.eye(30, dtype=int) * 1000
    assert dist.min() > 20


def test_save_image_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    path = save_image(str(tmp_path / "sub" / "a.png"), arr)
    assert (np.asarray(Image.open(path)) == arr).all()


def test_plot_training_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = []
    for it in range(20, 620, 20):
        row = {"iter": it, "total_loss": 5.0 / math.sqrt(it), "loss_ce": 1.0 / it, "loss_mask": 0.5,
               "loss_ce_0": 2.0 / it, "loss_dice": 0.3, "lr": 1e-4 if it < 400 else 1e-5}
        lines.append(json.dumps(row))
        if it % 200 == 0:
            lines.append(json.dumps({"iter": it, "segm/AP": it / 20, "segm/AP50": it / 10, "bbox/AP": it / 25}))
    lines.append('{"iter": 640, "total_lo')  # half-written last line
    path.write_text("\n".join(lines))
    written = plot_training_curves(str(path), str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["eval_bbox.png", "eval_segm.png", "losses.png", "lr.png", "total_loss.png"]
    for p in written:
        assert Image.open(p).size[0] > 100
    with pytest.raises(DataError, match="not found"):
        plot_training_curves(str(tmp_path / "missing.jsonl"), str(tmp_path))


def test_plot_per_class_ap(tmp_path):
    out = plot_per_class_ap({"scalpel": 55.0, "mayo": 12.5, "allis": float("nan")}, str(tmp_path / "ap.png"))
    assert Image.open(out).size[1] > 100
