"""Mapper (RLE/polygons, crowd, errors), samplers (LVIS repeat factors, sharding, resume), loaders."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from surgdino.config import load_config
from surgdino.data.loader import build_loader_from_records, build_test_loader, build_train_loader
from surgdino.data.mapper import DatasetMapper
from surgdino.data.samplers import (
    InferenceSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    repeat_factors_from_records,
)
from surgdino.data.transforms import LargeScaleJitter, boxes_from_masks, build_flip
from surgdino.errors import DataError


def _segmentation(kind: str, h: int, w: int, y0: int, x0: int, y1: int, x1: int):
    if kind == "polygon":
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_util.encode(m)
    if kind == "rle":
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [h, w], "counts": runs}


def make_records(folder, n=6, kinds=("polygon", "rle", "rle_list")):
    """Small RGB PNGs (landscape and portrait) with 3 rectangle instances each and one crowd region."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        h, w = (40, 56) if i % 3 else (56, 40)
        path = str(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        annos = []
        for j in range(3):
            y0, x0 = 2 + 4 * j, 3 + 5 * j
            y1, x1 = y0 + 12 + j, x0 + 10 + 2 * j
            annos.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": (i + j) % 4, "iscrowd": 0,
                          "segmentation": _segmentation(kinds[(i + j) % len(kinds)], h, w, y0, x0, y1, x1),
                          "area": float((y1 - y0) * (x1 - x0))})
        annos.append({"bbox": [0, 30, 10, 8], "category_id": 3, "iscrowd": 1, "area": 80.0,
                      "segmentation": _segmentation("rle", h, w, 30, 0, 38, 10)})
        records.append({"file_name": path, "height": h, "width": w, "image_id": i, "annotations": annos})
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return make_records(tmp_path_factory.mktemp("imgs"))


def cfg_for(mapper_name: str, *opts):
    return load_config(None, ["INPUT.DATASET_MAPPER_NAME", mapper_name, "INPUT.IMAGE_SIZE", "48",
                              "INPUT.MIN_SIZE_TRAIN", "(32, 48)", "INPUT.MAX_SIZE_TRAIN", "80",
                              "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64",
                              "INPUT.COPY_PASTE.PROB", "1.0", *opts])


def check_output(out, record):
    image, inst = out["image"], out["instances"]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert (out["height"], out["width"], out["image_id"]) == (record["height"], record["width"], record["image_id"])
    assert inst["masks"].dtype == torch.bool and tuple(inst["masks"].shape[1:]) == tuple(image.shape[1:])
    assert inst["boxes"].dtype == torch.float32 and inst["classes"].dtype == torch.int64
    assert inst["boxes"].shape[0] == inst["masks"].shape[0] == inst["classes"].shape[0]
    assert torch.equal(inst["boxes"], boxes_from_masks(inst["masks"]))
    assert bool((inst["masks"].flatten(1).sum(1) >= 1).all())


@pytest.mark.parametrize("name", ["coco_instance", "coco_instance_lsj", "coco_instance_copy_paste"])
def test_every_mapper_handles_polygons_and_rle(records, name):
    opts = ("INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "(20, 30)") if name == "coco_instance" else ()
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg_for(name, *opts), is_train=True))
    mapper.paste_source = records
    for i, rec in enumerate(records):
        out = mapper(rec, seed=i)
        check_output(out, rec)
        if name != "coco_instance":
            assert tuple(out["image"].shape[1:]) == (48, 48)
        else:
            assert 20 <= out["image"].shape[1] <= 30 and 20 <= out["image"].shape[2] <= 30
        # same seed, same sample
        again = mapper(rec, seed=i)
        assert torch.equal(again["image"], out["image"]) and torch.equal(again["instances"]["masks"],
                                                                         out["instances"]["masks"])


def test_mapper_decodes_rle_like_polygons_and_drops_crowd(records):
    mapper = DatasetMapper(is_train=True, augmentations=[])
    for rec in records:
        out = mapper(rec)
        inst = out["instances"]
        assert inst["classes"].tolist() == [a["category_id"] for a in rec["annotations"][:3]]  # crowd dropped
        for a, m in zip(rec["annotations"][:3], inst["masks"]):
            x, y, w, h = a["bbox"]
            expected = torch.zeros_like(m)
            expected[y:y + h, x:x + w] = True
            if isinstance(a["segmentation"], list):  # polygon rasterisation may differ by the edge pixels
                assert (m ^ expected).sum() <= w + h + 1
            else:
                assert torch.equal(m, expected)


def test_test_mapper_resizes_and_keeps_original_size(records):
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg_for("coco_instance_lsj"), is_train=False))
    out = mapper(records[0])
    assert "instances" not in out and (out["height"], out["width"]) == (56, 40)
    assert tuple(out["image"].shape) == (3, 45, 32)  # short side 32, long side 56*32/40=44.8 -> 45


def test_bad_image_raises_data_error_naming_file(records, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    rec = dict(records[0], file_name=str(bad))
    with pytest.raises(DataError, match="broken.jpg"):
        DatasetMapper(is_train=True, augmentations=[])(rec)
    with pytest.raises(DataError, match="width"):
        DatasetMapper(is_train=False, augmentations=[])(dict(records[0], height=41))


def test_repeat_factors_match_lvis_formula():
    def rec(*cats):
        return {"annotations": [{"category_id": c, "iscrowd": 0} for c in cats]}
    recs = [rec(0), rec(0, 1), rec(0), rec(0, 2), rec(), rec(0) | {"annotations": [
        {"category_id": 0, "iscrowd": 0}, {"category_id": 3, "iscrowd": 1}]}]
    t = 0.5
    f = {0: 5 / 6, 1: 1 / 6, 2: 1 / 6}
    r = {c: max(1.0, math.sqrt(t / fc)) for c, fc in f.items()}
    expected = [r[0], max(r[0], r[1]), r[0], max(r[0], r[2]), 1.0, r[0]]
    assert torch.allclose(repeat_factors_from_records(recs, t), torch.tensor(expected, dtype=torch.float64))
    # stochastic rounding: the mean count per epoch approaches the factor
    sampler = RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 0.25]), seed=1, rank=0, world_size=1)
    counts = torch.zeros(3)
    for e in range(400):
        counts += torch.bincount(sampler.epoch_indices(e), minlength=3)
    assert torch.allclose(counts / 400, torch.tensor([1.0, 2.5, 0.25]), atol=0.08)


@pytest.mark.parametrize("kind", ["plain", "repeat"])
def test_training_samplers_shard_disjointly_and_resume(kind):
    def make(rank, world):
        if kind == "plain":
            return TrainingSampler(10, seed=3, rank=rank, world_size=world)
        return RepeatFactorTrainingSampler([1.0, 1.5, 2.0, 1.0, 3.2, 1.0, 1.0], seed=3, rank=rank, world_size=world)

    full = make(0, 1)
    stream = list(itertools.islice(full, 300))
    shards = [list(itertools.islice(make(r, 3), 100)) for r in range(3)]
    # rank r gets global positions r, r+3, ...: together the ranks see the single-process stream
    interleaved = [shards[p % 3][p // 3] for p in range(180)]
    assert interleaved == stream[:180]
    if kind == "plain":  # each epoch is a permutation, so ranks are disjoint within an epoch
        for e in range(3):
            epoch = stream[10 * e: 10 * e + 10]
            assert sorted(epoch) == list(range(10))
    for k in (0, 7, 23, 61):
        s = make(1, 3)
        s.set_start(k)
        assert list(itertools.islice(s, 30)) == shards[1][k:k + 30]


def test_inference_sampler_contiguous_shards_cover_once():
    parts = [list(InferenceSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert list(InferenceSampler(2, rank=2, world_size=3)) == []


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a, b):
    return all(x["image_id"] == y["image_id"] and torch.equal(x["image"], y["image"])
               and torch.equal(x["instances"]["masks"], y["instances"]["masks"]) for x, y in zip(a, b))


def test_loader_is_deterministic_by_seed_for_0_and_2_workers_and_resumes(records):
    mapper = DatasetMapper(is_train=True, augmentations=[*build_flip("horizontal"), LargeScaleJitter(32, 0.3, 1.5)],
                           copy_paste_prob=0.5, paste_source=records)

    def loader(seed, workers=0, start=0, grouping=False):
        return build_loader_from_records(records, mapper, batch_size=2, num_workers=workers, seed=seed,
                                         start_iter=start, aspect_ratio_grouping=grouping)

    ref = _batches(loader(5), 5)
    assert all(len(b) == 2 for b in ref)
    with_workers = _batches(loader(5, workers=2), 5)
    assert all(_same(a, b) for a, b in zip(ref, with_workers))
    assert all(_same(a, b) for a, b in zip(_batches(loader(5), 5), ref))
    other = _batches(loader(6), 5)
    assert not all(_same(a, b) for a, b in zip(ref, other))
    resumed = _batches(loader(5, start=3), 2)
    assert all(_same(a, b) for a, b in zip(resumed, ref[3:]))
    grouped = _batches(loader(5, grouping=True), 6)
    for b in grouped:
        assert len({x["height"] > x["width"] for x in b}) == 1
    assert all(_same(a, b) for a, b in zip(_batches(loader(5, start=4, grouping=True), 2), grouped[4:]))


def test_build_loaders_from_config(records, tmp_path):
    images = [{"id": r["image_id"], "file_name": r["file_name"].rsplit("/", 1)[1], "height": r["height"],
               "width": r["width"]} for r in records]
    annos = [dict(a, id=100 * r["image_id"] + k, image_id=r["image_id"], category_id=a["category_id"] + 1)
             for r in records for k, a in enumerate(r["annotations"])]
    cats = [{"id": c + 1, "name": f"tool{c}"} for c in range(4)]
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annos, "categories": cats}))
    root = records[0]["file_name"].rsplit("/", 1)[0]
    reg = f"[{{'name': 'tiny_loader_ds', 'json_file': '{json_file}', 'image_root': '{root}'}}]"
    cfg = cfg_for("coco_instance_copy_paste", "DATASETS.REGISTER", reg, "DATASETS.TRAIN", "('tiny_loader_ds',)",
                  "DATALOADER.NUM_WORKERS", "0", "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                  "DATALOADER.REPEAT_THRESHOLD", "0.5", "SOLVER.IMS_PER_BATCH", "4", "SEED", "1")
    batch = next(iter(build_train_loader(cfg)))
    assert len(batch) == 4
    for out in batch:
        assert tuple(out["image"].shape) == (3, 48, 48) and out["instances"]["classes"].max() <= 3
    test = [b for b in build_test_loader(cfg, "tiny_loader_ds")]
    assert [b[0]["image_id"] for b in test] == [r["image_id"] for r in records]
