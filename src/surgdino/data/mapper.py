"""Dataset mapper: one dataset record -> one model input dict (decoded, augmented, tensors).

Output per image: ``{"image": uint8 [3, H, W], "height", "width" (original size), "image_id",
"file_name", "instances": {"boxes": float32 [N, 4] xyxy, "masks": bool [N, H, W], "classes": int64
[N]}}`` (``instances`` only in training). Masks are decoded once per image from polygons or RLE and
then augmented as masks; boxes are always the boxes of the final masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from surgdino.data import imageio
from surgdino.data.coco import decode_segmentation
from surgdino.data.rle import rle_problem
from surgdino.data.transforms import (
    LargeScaleJitter,
    RandomCrop,
    ResizeShortestEdge,
    Sample,
    build_flip,
    color_jitter,
    copy_paste,
    make_sample,
    sanitize_instances,
)
from surgdino.errors import ConfigError, DataError

MAPPER_NAMES = ("coco_instance", "coco_instance_lsj", "coco_instance_copy_paste")


def read_image(file_name: str) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``[3, H, W]`` through ``data.imageio.read_image`` (EXIF applied)."""
    return torch.from_numpy(imageio.read_image(file_name)).permute(2, 0, 1).contiguous()  # [3, H, W]


def annotations_to_targets(record: dict[str, Any], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-crowd annotations of ``record`` -> (bool masks ``[N, H, W]``, int64 classes ``[N]``)."""
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    masks = np.zeros((len(annos), height, width), dtype=bool)  # [N, H, W]
    for i, anno in enumerate(annos):
        segm = anno.get("segmentation")
        if not segm:
            raise DataError(f"{record.get('file_name')}: annotation {anno.get('id', i)} has no 'segmentation'; "
                            "instance segmentation needs a polygon or RLE mask for every non-crowd instance")
        if isinstance(segm, dict) and [int(s) for s in segm.get("size", [])] != [height, width]:
            raise DataError(f"{record.get('file_name')}: annotation {anno.get('id', i)} has an RLE of size "
                            f"{segm.get('size')}, but the image is {height}x{width}; fix 'segmentation.size'")
        problem = rle_problem(segm, height, width) if isinstance(segm, dict) else None
        if problem:  # records registered from Python skip load_coco_json's checks; decoding would read garbage
            raise DataError(f"{record.get('file_name')}: annotation {anno.get('id', i)}: {problem}")
        masks[i] = decode_segmentation(segm, height, width)
    classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
    return torch.from_numpy(masks), classes


class DatasetMapper:
    """Reads, decodes and augments a record; optionally pastes instances of another record on top.

    ``augmentations`` are v2 transforms applied to the sample dict (see ``transforms.py``). With
    ``copy_paste_prob > 0`` and a ``paste_source`` (records to draw from), another record goes
    through the same augmentations and a subset of its instances is pasted (``transforms.copy_paste``).
    ``__call__(record, seed)`` is deterministic for a given seed (torch's CPU generator is forked).
    """

    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[v2.Transform],
        image_format: str = "RGB",
        copy_paste_prob: float = 0.0,
        max_pasted: int = 10,
        min_visible: float = 0.1,
        min_pixels: int = 1,
        paste_source: Sequence[dict[str, Any]] | None = None,
    ):
        self.is_train = is_train
        self.augmentations = v2.Compose(list(augmentations)) if augmentations else None
        self.image_format = image_format
        self.copy_paste_prob = float(copy_paste_prob)
        self.max_pasted = int(max_pasted)
        self.min_visible = float(min_visible)
        self.min_pixels = int(min_pixels)
        self.paste_source = paste_source

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool = True) -> dict:
        """Augmentations chosen by ``INPUT.DATASET_MAPPER_NAME`` (training) or the test resize."""
        inp = cfg.INPUT
        if not is_train:
            augs: list[v2.Transform] = []
            if inp.MIN_SIZE_TEST > 0:
                augs.append(ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST))
            return dict(is_train=False, augmentations=augs, image_format=inp.FORMAT)

        name = inp.DATASET_MAPPER_NAME
        if name not in MAPPER_NAMES:
            raise ConfigError(f"INPUT.DATASET_MAPPER_NAME: unknown mapper {name!r}; use one of {MAPPER_NAMES}")
        augs = build_flip(inp.RANDOM_FLIP)
        if name == "coco_instance":
            if inp.MIN_SIZE_TRAIN_SAMPLING == "range" and len(inp.MIN_SIZE_TRAIN) != 2:
                raise ConfigError(f"INPUT.MIN_SIZE_TRAIN: sampling 'range' needs two sizes (low, high), "
                                  f"got {list(inp.MIN_SIZE_TRAIN)}")
            if not inp.MIN_SIZE_TRAIN:
                raise ConfigError("INPUT.MIN_SIZE_TRAIN: empty; give at least one shortest-edge size, e.g. (800,)")
            augs.append(ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING))
            if inp.CROP.ENABLED:
                try:
                    augs.append(RandomCrop(inp.CROP.TYPE, inp.CROP.SIZE))
                except ValueError as e:
                    raise ConfigError(f"INPUT.CROP.SIZE / INPUT.CROP.TYPE: {e}") from e
        else:
            if not 0 < inp.MIN_SCALE <= inp.MAX_SCALE:
                raise ConfigError(f"INPUT.MIN_SCALE / INPUT.MAX_SCALE: need 0 < MIN_SCALE <= MAX_SCALE, "
                                  f"got {inp.MIN_SCALE}, {inp.MAX_SCALE}")
            if inp.IMAGE_SIZE <= 0:
                raise ConfigError(f"INPUT.IMAGE_SIZE: must be positive, got {inp.IMAGE_SIZE}")
            augs.append(LargeScaleJitter(inp.IMAGE_SIZE, inp.MIN_SCALE, inp.MAX_SCALE))
        if inp.COLOR_AUG_SSD:
            augs.append(color_jitter())
        cp = inp.COPY_PASTE
        if name == "coco_instance_copy_paste" and not 0.0 <= cp.PROB <= 1.0:
            raise ConfigError(f"INPUT.COPY_PASTE.PROB: must be in [0, 1], got {cp.PROB}")
        return dict(
            is_train=True,
            augmentations=augs,
            image_format=inp.FORMAT,
            copy_paste_prob=cp.PROB if name == "coco_instance_copy_paste" else 0.0,
            max_pasted=cp.MAX_PASTED,
            min_visible=cp.MIN_VISIBLE,
        )

    @property
    def uses_copy_paste(self) -> bool:
        return self.is_train and self.copy_paste_prob > 0

    def _load(self, record: dict[str, Any], with_targets: bool) -> tuple[Sample, int, int]:
        file_name = record["file_name"]
        image = read_image(file_name)  # [3, H, W]
        h, w = int(image.shape[1]), int(image.shape[2])
        rh, rw = int(record.get("height", h)), int(record.get("width", w))
        if (rh, rw) != (h, w):
            raise DataError(f"{file_name}: the image is {w}x{h} (WxH) but its record says {rw}x{rh}; "
                            "fix 'width'/'height' in the annotation json or replace the image")
        if with_targets:
            masks, classes = annotations_to_targets(record, h, w)
        else:
            masks, classes = torch.zeros((0, h, w), dtype=torch.bool), torch.zeros(0, dtype=torch.int64)
        return make_sample(image, masks, classes), h, w

    def _augment(self, sample: Sample) -> Sample:
        return self.augmentations(sample) if self.augmentations is not None else sample

    def _paste(self, sample: Sample, record: dict[str, Any]) -> Sample:
        if not self.paste_source or float(torch.rand(())) >= self.copy_paste_prob:
            return sample
        n = len(self.paste_source)
        j = int(torch.randint(n, ()))
        if n > 1 and self.paste_source[j].get("image_id") == record.get("image_id"):
            j = (j + 1) % n
        source = self._augment(self._load(self.paste_source[j], True)[0])
        return copy_paste(sample, source, max_pasted=self.max_pasted, min_visible=self.min_visible,
                          min_pixels=self.min_pixels)

    def _map(self, record: dict[str, Any]) -> dict[str, Any]:
        sample, h, w = self._load(record, self.is_train)
        sample = self._augment(sample)
        if self.uses_copy_paste:
            sample = self._paste(sample, record)
        image = sample["image"].as_subclass(torch.Tensor).contiguous()  # [3, H', W'] uint8
        if self.image_format == "BGR":
            image = image.flip(0)
        out = {"image": image, "height": h, "width": w, "image_id": record.get("image_id"),
               "file_name": record["file_name"]}
        if self.is_train:
            sample = sanitize_instances(sample, self.min_pixels)
            out["instances"] = {
                "boxes": sample["boxes"].as_subclass(torch.Tensor).to(torch.float32),  # [N, 4] xyxy
                "masks": sample["masks"].as_subclass(torch.Tensor).to(torch.bool).contiguous(),  # [N, H', W']
                "classes": sample["labels"].to(torch.int64),  # [N]
            }
        return out

    def __call__(self, record: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        if seed is None:
            return self._map(record)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed) % (2**63))
            return self._map(record)
