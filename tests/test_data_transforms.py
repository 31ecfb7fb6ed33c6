"""Augmentations: boxes stay the boxes of the masks, flips are exact, LSJ/crop sizes, copy-paste occlusion."""

import pytest
import torch
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from surgdino.data.transforms import (
    LargeScaleJitter,
    RandomCrop,
    ResizeShortestEdge,
    boxes_from_masks,
    build_flip,
    copy_paste,
    make_sample,
    sanitize_instances,
)


def random_sample(seed: int, h: int = 48, w: int = 64, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
        ry, rx = torch.randint(2, h // 3, (1,), generator=g).item(), torch.randint(2, w // 3, (1,), generator=g).item()
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0  # ellipses, some cut by the border
    labels = torch.randint(0, 7, (n,), generator=g)
    return make_sample(image, masks, labels)


def test_boxes_from_masks_matches_torchvision_plus_one():
    s = random_sample(0)
    masks = s["masks"].as_subclass(torch.Tensor)
    expected = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.equal(boxes_from_masks(masks), expected)
    empty = torch.zeros((2, 5, 6), dtype=torch.bool)
    empty[1, 2, 3] = True
    assert boxes_from_masks(empty).tolist() == [[0, 0, 0, 0], [3, 2, 4, 3]]


AUGS = {
    "hflip": lambda: v2.RandomHorizontalFlip(0.5),
    "vflip": lambda: v2.RandomVerticalFlip(0.5),
    "resize_choice": lambda: ResizeShortestEdge([24, 40, 72], 100),
    "resize_range": lambda: ResizeShortestEdge([20, 80], 90, "range"),
    "lsj": lambda: LargeScaleJitter(56, 0.1, 2.0),
    "crop_relative": lambda: RandomCrop("relative", [0.5, 0.7]),
    "crop_relative_range": lambda: RandomCrop("relative_range", [0.3, 0.5]),
    "crop_absolute": lambda: RandomCrop("absolute", [30, 20]),
    "crop_absolute_range": lambda: RandomCrop("absolute_range", [16, 40]),
    "pipeline": lambda: v2.Compose([*build_flip("both"), ResizeShortestEdge([32, 64], 96),
                                     RandomCrop("absolute_range", [20, 50]), LargeScaleJitter(40, 0.5, 1.5)]),
}


@pytest.mark.parametrize("name", sorted(AUGS))
def test_boxes_equal_mask_boxes_after_augmentation(name):
    aug = AUGS[name]()
    for seed in range(12):
        torch.manual_seed(seed)
        out = sanitize_instances(aug(random_sample(seed)))
        masks = out["masks"].as_subclass(torch.Tensor)
        h, w = F.get_size(out["image"])
        assert masks.dtype == torch.bool and masks.shape[1:] == (h, w)
        assert out["labels"].shape[0] == masks.shape[0] == out["boxes"].shape[0]
        assert bool((masks.flatten(1).sum(1) >= 1).all()), "empty masks must be dropped"
        assert torch.equal(out["boxes"].as_subclass(torch.Tensor), boxes_from_masks(masks))
        assert out["boxes"].canvas_size == (h, w)


def test_flip_boxes_exact_and_flip_twice_is_identity():
    s = random_sample(3)
    for op in (F.horizontal_flip, F.vertical_flip):
        once = {k: op(v) if k != "labels" else v for k, v in s.items()}
        # v2's box flip agrees exactly with the boxes of the flipped masks
        assert torch.equal(once["boxes"].as_subclass(torch.Tensor),
                           boxes_from_masks(once["masks"].as_subclass(torch.Tensor)))
        twice = {k: op(v) if k != "labels" else v for k, v in once.items()}
        for k in ("image", "masks", "boxes"):
            assert torch.equal(twice[k].as_subclass(torch.Tensor), s[k].as_subclass(torch.Tensor))


def test_lsj_output_size_and_padding():
    for seed, (h, w) in enumerate([(48, 64), (100, 30), (20, 20)]):
        torch.manual_seed(seed)
        s = random_sample(seed, h, w)
        for scale in (0.2, 1.0, 1.9):
            out = LargeScaleJitter(64, scale, scale, pad_value=128)(s)
            assert tuple(out["image"].shape) == (3, 64, 64) and tuple(out["masks"].shape[1:]) == (64, 64)
            if scale == 0.2:  # small image: everything beyond it is padding
                nh, nw = int(h * 64 * scale / max(h, w) + 0.5), int(w * 64 * scale / max(h, w) + 0.5)
                assert bool((out["image"][:, nh:, :] == 128).all()) and bool((out["image"][:, :, nw:] == 128).all())
                assert not bool(out["masks"][:, nh:, :].any()) and not bool(out["masks"][:, :, nw:].any())


def test_absolute_range_crop_sizes_in_range_and_non_square():
    crop = RandomCrop("absolute_range", [512, 1024])
    sizes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        ch, cw = crop.crop_hw(1200, 1500)
        assert 512 <= ch <= 1024 and 512 <= cw <= 1024
        sizes.add((ch, cw))
    assert any(ch != cw for ch, cw in sizes) and len(sizes) > 30
    torch.manual_seed(0)
    assert all(v <= 600 for v in crop.crop_hw(600, 300)[:1]) and crop.crop_hw(600, 300)[1] <= 300
    with pytest.raises(ValueError):
        RandomCrop("absolute_range", [1024, 512])


def _rect(h, w, y0, x0, y1, x1):
    m = torch.zeros((h, w), dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_copy_paste_occludes_masks_below_and_drops_covered():
    h, w = 40, 40
    tgt_masks = torch.stack([_rect(h, w, 5, 5, 15, 15),     # fully covered by the pasted instance
                             _rect(h, w, 10, 10, 30, 20),   # partly covered: cut
                             _rect(h, w, 30, 30, 38, 38),   # untouched
                             _rect(h, w, 0, 0, 40, 6)])     # 5/6 covered: below MIN_VISIBLE=0.5 -> dropped
    target = make_sample(torch.zeros((3, h, w), dtype=torch.uint8), tgt_masks, torch.tensor([1, 2, 3, 4]))
    src_masks = torch.stack([_rect(h, w, 0, 0, 40, 15)])
    source = make_sample(torch.full((3, h, w), 200, dtype=torch.uint8), src_masks, torch.tensor([9]))
    torch.manual_seed(0)
    out = copy_paste(target, source, max_pasted=5, min_visible=0.5)
    assert out["labels"].tolist() == [2, 3, 9]
    masks = out["masks"].as_subclass(torch.Tensor)
    alpha = src_masks[0]
    assert torch.equal(masks[0], tgt_masks[1] & ~alpha)
    assert torch.equal(masks[1], tgt_masks[2])
    assert torch.equal(masks[2], alpha)
    assert not bool((masks[:2] & alpha).any()), "pasted region must be removed from the masks below"
    img = out["image"].as_subclass(torch.Tensor)
    assert bool((img[:, alpha] == 200).all()) and bool((img[:, ~alpha] == 0).all())
    assert torch.equal(out["boxes"].as_subclass(torch.Tensor), boxes_from_masks(masks))
    assert out["boxes"][0].tolist() == [15.0, 10.0, 20.0, 30.0]


def test_copy_paste_random_subset_keeps_invariants():
    for seed in range(10):
        torch.manual_seed(seed)
        tgt, src = random_sample(seed, 40, 40, 6), random_sample(seed + 100, 40, 40, 6)
        out = copy_paste(tgt, src, max_pasted=3, min_visible=0.2)
        masks = out["masks"].as_subclass(torch.Tensor)
        src_masks = src["masks"].as_subclass(torch.Tensor)
        is_pasted = torch.tensor([any(torch.equal(m, s) for s in src_masks) for m in masks])
        assert 1 <= int(is_pasted.sum()) <= 3
        alpha = masks[is_pasted].any(dim=0)
        assert not bool((masks[~is_pasted] & alpha).any())
        assert torch.equal(out["boxes"].as_subclass(torch.Tensor), boxes_from_masks(masks))
        assert bool((masks.flatten(1).sum(1) >= 1).all())


def test_lsj_mask_window_gather_equals_resize_then_crop():
    lsj = LargeScaleJitter(48, 0.2, 2.5)
    for seed in range(10):
        s = random_sample(seed, 37 + seed, 53)
        torch.manual_seed(seed)
        p = lsj.make_params([s["image"]])
        ref = F.crop(F.resize(s["masks"], p["size"]), p["top"], p["left"], 48, 48)
        assert torch.equal(lsj.transform(s["masks"], p).as_subclass(torch.Tensor), ref.as_subclass(torch.Tensor))
