"""Test-time augmentation: flip/unflip exactness, scales, merging of duplicates, identity with one view."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgdino.errors import SurgDinoError
from surgdino.evaluation.tta import (
    InstanceTTA,
    hflip_instances,
    mask_iou,
    merge_detections,
    shortest_edge_size,
)


class BrightRegionModel(nn.Module):
    """Detects the bright pixels of channel 0 (class 1) and of channel 1 (class 2), in original pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, batch: list[dict]) -> list[dict]:
        out = []
        for d in batch:
            img = d["image"]  # [3, h, w] uint8
            self.seen.append(tuple(img.shape[-2:]))
            boxes, masks, scores, labels = [], [], [], []
            for ch, label, score in ((0, 1, 0.9), (1, 2, 0.6)):
                m = F.interpolate((img[ch] > 127).float()[None, None], size=(d["height"], d["width"]),
                                  mode="nearest")[0, 0].bool()  # [H, W]
                if not m.any():
                    continue
                ys, xs = torch.nonzero(m, as_tuple=True)
                boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
                masks.append(m)
                scores.append(score)
                labels.append(label)
            out.append({"boxes": torch.stack(boxes), "masks": torch.stack(masks),
                        "scores": torch.tensor(scores), "labels": torch.tensor(labels)})
        return out


def tray(h: int = 40, w: int = 60) -> dict:
    """An image with an asymmetric L-shaped object in channel 0 and a bar in channel 1."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0, 4:20, 6:10] = 255
    img[0, 16:20, 6:30] = 255
    img[1, 28:36, 40:56] = 255
    return {"image": img, "height": h, "width": w, "image_id": 1}


def test_flip_unflip_is_exact():
    d = tray()
    model = BrightRegionModel().eval()
    (ref,) = model([d])
    flipped = model([dict(d, image=d["image"].flip(-1))])[0]
    back = hflip_instances(flipped, d["width"])
    assert torch.equal(back["masks"], ref["masks"]) and torch.equal(back["boxes"], ref["boxes"])
    (out,) = InstanceTTA(model, min_sizes=[40], max_size=1000, flip=True)([d])
    assert torch.equal(out["masks"], ref["masks"]) and torch.equal(out["boxes"], ref["boxes"])
    assert torch.allclose(out["scores"], ref["scores"]) and torch.equal(out["labels"], ref["labels"])


def test_scales_and_merging_reduce_duplicates():
    d = tray()
    model = BrightRegionModel().eval()
    tta = InstanceTTA(model, min_sizes=[20, 40, 80], max_size=120, flip=True)
    assert tta.views() == [(20, False), (20, True), (40, False), (40, True), (80, False), (80, True)]
    (out,) = tta([d])
    assert model.seen == [(20, 30), (20, 30), (40, 60), (40, 60), (80, 120), (80, 120)]
    assert out["masks"].shape == (2, 40, 60)  # 12 detections → one per object
    assert sorted(out["labels"].tolist()) == [1, 2]
    (ref,) = model([d])
    for k in range(2):
        j = int((ref["labels"] == out["labels"][k]).nonzero())
        inter = (out["masks"][k] & ref["masks"][j]).sum()
        assert inter / (out["masks"][k] | ref["masks"][j]).sum() > 0.9
    assert torch.allclose(out["scores"].sort().values, torch.tensor([0.6, 0.9]))  # found in every view
    assert InstanceTTA(model, [20, 40], 100, detections_per_image=1)([d])[0]["scores"].tolist() == pytest.approx([0.9])


def test_one_view_is_the_models_own_output():
    d = tray()

    class Duplicating(BrightRegionModel):
        def forward(self, batch):  # duplicates (same class, same mask) must survive: nothing to merge
            out = super().forward(batch)
            return [{k: torch.cat([v, v]) for k, v in o.items()} for o in out]

    model = Duplicating().eval()
    (ref,) = model([d])
    (out,) = InstanceTTA(model, min_sizes=[40], max_size=1000, flip=False)([d])
    assert set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref)


def test_merge_detections_vote_box_and_classes():
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[0, 0:5, 0:5] = True
    masks[1, 0:5, 0:6] = True  # IoU 25/30 with 0: merged
    masks[2, 0:5, 0:5] = True  # same mask, other class: kept apart
    masks[3, 6:9, 6:9] = True
    boxes = torch.tensor([[0, 0, 5, 5], [0, 0, 6, 5], [0, 0, 5, 5], [6, 6, 9, 9]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.3, 0.8, 0.5])
    labels = torch.tensor([0, 0, 1, 0])
    views = torch.tensor([0, 1, 0, 1])
    out = merge_detections(boxes, masks, scores, labels, views, num_views=2, merge_iou=0.7, score_merge="max")
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert torch.equal(out["masks"][0], masks[0])  # vote 0.9/1.2 on column 5 ≤ 0.5 → not in the mask
    assert out["boxes"][0].tolist() == [0, 0, 5, 5] and out["labels"].tolist() == [0, 1, 0]
    vote = merge_detections(boxes, masks, scores, labels, views, num_views=2, merge_iou=0.7)
    assert vote["scores"].tolist() == pytest.approx([0.6, 0.4, 0.25])  # (0.9 + 0.3)/2, 0.8/2, 0.5/2
    mean = merge_detections(boxes, masks, scores, labels, views, num_views=2, score_merge="mean")
    assert mean["scores"].tolist() == pytest.approx([0.8, 0.6, 0.5])  # sorted by merged score
    assert mean["labels"].tolist() == [1, 0, 0]


def test_mask_iou_and_sizes():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 30, 40, generator=g) > 0.5
    inter = (m[:, None] & m[None]).flatten(2).sum(-1).float()
    union = (m[:, None] | m[None]).flatten(2).sum(-1).float()
    assert torch.allclose(mask_iou(m), inter / union, atol=1e-6)
    big = torch.zeros(2, 600, 800, dtype=torch.bool)
    big[0, 100:300, 100:500] = True
    big[1, 100:300, 200:500] = True
    assert mask_iou(big, iou_size=128)[0, 1].item() == pytest.approx(0.75, abs=0.04)  # soft IoU of block means
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)
    with pytest.raises(SurgDinoError, match="MIN_SIZES"):
        InstanceTTA(nn.Identity(), [], 100)
    with pytest.raises(SurgDinoError, match="MERGE_IOU"):
        InstanceTTA(nn.Identity(), [10], 100, merge_iou=0.0)


def test_from_config():
    from surgdino.config import load_config

    cfg = load_config(None, ["TEST.AUG.MIN_SIZES", "[32, 64]", "TEST.AUG.FLIP", "False",
                             "TEST.DETECTIONS_PER_IMAGE", "300"])
    tta = InstanceTTA(**InstanceTTA.from_config(cfg, nn.Identity()))
    assert tta.views() == [(32, False), (64, False)] and tta.detections_per_image == 300


def test_no_detections_in_any_view():
    class Empty(nn.Module):
        def forward(self, batch):
            return [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, d["height"], d["width"], dtype=torch.bool),
                     "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)} for d in batch]

    (out,) = InstanceTTA(Empty(), [20, 40], 100)([tray()])
    assert out["masks"].shape == (0, 40, 60) and out["boxes"].shape == (0, 4) and out["labels"].numel() == 0
