"""COCO loading (polygons, compressed / uncompressed RLE, crowd, empty images), validation messages, catalog."""

import copy
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from surgdino.config import load_config
from surgdino.data import (
    DatasetCatalog,
    MetadataCatalog,
    decode_segmentation,
    load_coco_json,
    register_coco_instances,
    register_datasets_from_config,
    validate_coco,
)
from surgdino.data.catalog import load_coco_dataset
from surgdino.errors import ConfigError, DataError

H, W = 24, 32


def _rle_mask():
    m = np.zeros((H, W), dtype=np.uint8)
    m[4:10, 6:20] = 1  # 6 x 14 block
    return m


def make_coco(root):
    """A tiny COCO dataset in ``root``: 3 images (one without annotations), categories with ids 9, 2, 5."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(os.path.join(root, "images", f"{i}.png"))
    compressed = mask_util.encode(np.asfortranarray(_rle_mask()))
    compressed["counts"] = compressed["counts"].decode("ascii")
    # Uncompressed RLE: column-major run lengths, starting with zeros.
    flat = _rle_mask().flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    data = {
        "images": [{"id": 10 + i, "file_name": f"images/{i}.png", "height": H, "width": W} for i in range(3)],
        "categories": [{"id": 9, "name": "mayo"}, {"id": 2, "name": "allis"}, {"id": 5, "name": "babcock"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 9, "bbox": [2, 2, 10, 8], "iscrowd": 0, "area": 80.0,
             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [6, 4, 14, 6], "iscrowd": 0, "area": 84.0,
             "segmentation": compressed},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [6, 4, 14, 6], "iscrowd": 1, "area": 84.0,
             "segmentation": {"size": [H, W], "counts": runs}},
        ],
    }
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, data


def write(tmp_path, data):
    path = os.path.join(tmp_path, "instances.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_load_polygons_rle_crowd_and_empty(tmp_path):
    path, _ = make_coco(str(tmp_path))
    records = load_coco_dataset("tiny_test", path, str(tmp_path))  # fills the dataset's metadata
    assert [r["image_id"] for r in records] == [10, 11, 12]
    assert records[2]["annotations"] == []  # empty images are kept
    assert os.path.isabs(records[0]["file_name"]) and os.path.isfile(records[0]["file_name"])
    a0, a1 = records[0]["annotations"]
    # Original ids 2, 5, 9 → contiguous 0, 1, 2.
    assert a0["category_id"] == 2 and a1["category_id"] == 0
    assert records[1]["annotations"][0]["category_id"] == 1 and records[1]["annotations"][0]["iscrowd"] == 1
    meta = MetadataCatalog.get("tiny_test")
    assert meta.thing_classes == ["allis", "babcock", "mayo"]
    assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 5: 1, 9: 2}
    # Compressed and uncompressed RLE decode to the same mask; the polygon to its rectangle.
    m_compressed = decode_segmentation(a1["segmentation"], H, W)
    m_raw = decode_segmentation(records[1]["annotations"][0]["segmentation"], H, W)
    assert m_compressed.dtype == bool and (m_compressed == _rle_mask().astype(bool)).all()
    assert (m_raw == m_compressed).all()
    poly = decode_segmentation(a0["segmentation"], H, W)
    assert poly[5, 5] and not poly[20, 20]
    MetadataCatalog.remove("tiny_test")


def test_missing_bbox_and_area_are_derived(tmp_path):
    path, data = make_coco(str(tmp_path))
    for a in data["annotations"]:
        del a["bbox"], a["area"]
    records = load_coco_json(write(tmp_path, data), str(tmp_path))
    assert records[0]["annotations"][0]["bbox"] == [2, 2, 10, 8]
    assert records[0]["annotations"][1]["bbox"] == [6, 4, 14, 6]
    assert records[1]["annotations"][0]["bbox"] == [6, 4, 14, 6]
    assert [a["area"] for a in records[0]["annotations"]] == [80.0, 84.0]  # from the masks
    assert records[1]["annotations"][0]["area"] == 84.0


def _mutations():
    """(name, mutate(data, root), expected substrings of the one problem)."""

    def missing_file(d, root):
        os.remove(os.path.join(root, "images", "1.png"))

    def dup_image(d, root):
        d["images"][2]["id"] = 10

    def dup_ann(d, root):
        d["annotations"][1]["id"] = 1

    def unknown_cat(d, root):
        d["annotations"][1]["category_id"] = 731

    def box_outside(d, root):
        d["annotations"][0]["bbox"] = [20, 2, 14, 8]  # x2 = 34 > 32 + 1

    def box_size(d, root):
        d["annotations"][0]["bbox"] = [2, 2, 0, 8]

    def short_poly(d, root):
        d["annotations"][0]["segmentation"] = [[2, 2, 12, 2]]

    def odd_poly(d, root):
        d["annotations"][0]["segmentation"] = [[2, 2, 12, 2, 12, 10, 2]]

    def bad_coordinate(d, root):
        d["annotations"][0]["segmentation"] = [[2, 2, "12", 2, 12, float("nan")]]

    def rle_size(d, root):
        d["annotations"][1]["segmentation"]["size"] = [H * 2, W]

    def no_file_name(d, root):
        del d["images"][0]["file_name"]

    def no_height(d, root):
        del d["images"][0]["height"]

    def unknown_image(d, root):
        d["annotations"][0]["image_id"] = 99

    return [
        ("missing image file", missing_file, ["images[1]", "image file not found", "1.png"]),
        ("duplicate image id", dup_image, ["images[2]", "duplicate image id 10"]),
        ("duplicate annotation id", dup_ann, ["annotations[1]", "duplicate annotation id 1"]),
        ("unknown category", unknown_cat,
         ["annotations[1] (id 2)", "category_id 731 is not among the 3 categories", "fix the id or add the category"]),
        ("box outside", box_outside, ["annotations[0]", "bbox", "leaves the 32x24 image"]),
        ("box size", box_size, ["annotations[0]", "bbox", "non-positive size"]),
        ("polygon < 3 points", short_poly, ["annotations[0]", "segmentation[0]", "at least 3"]),
        ("odd coordinates", odd_poly, ["annotations[0]", "segmentation[0]", "odd number of coordinates"]),
        ("non-number coordinate", bad_coordinate, ["annotations[0]", "segmentation[0]", "flat list of numbers"]),
        ("RLE size", rle_size, ["annotations[1]", "RLE size", "does not match"]),
        ("no file_name", no_file_name, ["images[0]", "file_name"]),
        ("no height", no_height, ["images[0]", "'height'"]),
        ("unknown image", unknown_image, ["annotations[0]", "image_id 99"]),
    ]


@pytest.mark.parametrize("name,mutate,expected", _mutations(), ids=[m[0] for m in _mutations()])
def test_each_problem_names_file_index_field(tmp_path, name, mutate, expected):
    _, data = make_coco(str(tmp_path))
    data = copy.deepcopy(data)
    mutate(data, str(tmp_path))
    path = write(tmp_path, data)
    with pytest.raises(DataError) as e:
        load_coco_json(path, str(tmp_path))
    problems = e.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("instances.json: ")
    for s in expected:
        assert s in problems[0], (s, problems[0])
    report = validate_coco(path, str(tmp_path))
    assert not report.ok and any(expected[-1] in p for p in report.problems)


def test_all_problems_listed_not_just_first(tmp_path):
    _, data = make_coco(str(tmp_path))
    data["annotations"][0]["category_id"] = 731
    data["annotations"][1]["bbox"] = [2, 2, -1, 8]
    data["images"][2]["width"] = 0
    with pytest.raises(DataError) as e:
        load_coco_json(write(tmp_path, data), str(tmp_path))
    assert len(e.value.problems) == 3
    assert "3 problems" in str(e.value)


def test_wrong_types_are_problems_not_crashes(tmp_path):
    _, data = make_coco(str(tmp_path))
    data["annotations"][0]["category_id"] = [9]
    data["annotations"][1]["id"] = {"a": 1}
    data["annotations"][2]["image_id"] = "11"
    data["annotations"].append(["not", "an", "object"])
    with pytest.raises(DataError) as e:
        load_coco_json(write(tmp_path, data), str(tmp_path))
    assert [p.split(":")[1].strip() for p in e.value.problems] == [
        "annotations[0] (id 1)", "annotations[1] (id {'a'", "annotations[2] (id 3)", "annotations[3]"]


def test_invalid_json_and_missing_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON at line 1"):
        load_coco_json(str(bad), str(tmp_path))
    report = validate_coco(str(bad), str(tmp_path))
    assert not report.ok
    with pytest.raises(DataError) as e:
        load_coco_json(write(tmp_path, {"images": []}), str(tmp_path))
    assert any("'annotations'" in p for p in e.value.problems) and any("'categories'" in p for p in e.value.problems)


def test_validate_images_decode_and_size(tmp_path):
    path, data = make_coco(str(tmp_path))
    report = validate_coco(path, str(tmp_path), decode_images=True)
    assert report.ok, report.problems
    assert (report.num_images, report.num_instances, report.images_without_annotations) == (3, 3, 1)
    assert report.instances_per_image_max == 2 and report.per_class == {"allis": 1, "babcock": 1, "mayo": 1}
    # A corrupt image is only found by decoding; a wrong size by reading the header.
    with open(os.path.join(tmp_path, "images", "0.png"), "r+b") as f:
        f.truncate(45)  # header intact, pixels cut off
    assert validate_coco(path, str(tmp_path)).ok
    decoded = validate_coco(path, str(tmp_path), decode_images=True)
    assert len(decoded.problems) == 1 and "images[0]" in decoded.problems[0] and "cannot decode" in decoded.problems[0]
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(os.path.join(tmp_path, "images", "1.png"))
    sized = validate_coco(path, str(tmp_path))
    assert len(sized.problems) == 1 and "images[1]" in sized.problems[0] and "32x25" in sized.problems[0]


def test_box_within_one_pixel_is_accepted(tmp_path):
    _, data = make_coco(str(tmp_path))
    data["annotations"][0]["bbox"] = [-0.8, 2, 32.6, 8]
    assert len(load_coco_json(write(tmp_path, data), str(tmp_path))) == 3


def test_catalog_register_from_python(tmp_path):
    path, _ = make_coco(str(tmp_path))
    name = "tiny_py_test"
    try:
        register_coco_instances(name, path, str(tmp_path))
        register_coco_instances(name, path, str(tmp_path))  # same files: no-op
        with pytest.raises(DataError, match="already registered"):
            register_coco_instances(name, path, str(tmp_path / "elsewhere"))
        # Metadata loads the dataset lazily.
        assert MetadataCatalog.get(name).thing_classes == ["allis", "babcock", "mayo"]
        assert MetadataCatalog.get(name).evaluator_type == "coco"
        assert len(DatasetCatalog.get(name)) == 3
        assert DatasetCatalog.get(name) is not DatasetCatalog.get(name)  # new list each time
        with pytest.raises(ConfigError, match="unknown dataset 'nope'.*DATASETS.REGISTER"):
            DatasetCatalog.get("nope")
    finally:
        DatasetCatalog.remove(name)
    assert name not in DatasetCatalog.names()


def test_register_datasets_from_config(tmp_path):
    make_coco(str(tmp_path / "data"))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "DATASETS:\n"
        "  REGISTER:\n"
        "    - {name: tiny_cfg_train, json_file: data/instances.json, image_root: data}\n"
        "  TRAIN: [tiny_cfg_train]\n"
        f"  SYNTHETIC_ROOT: {tmp_path / 'synth'}\n"
    )
    cfg = load_config(str(cfg_file))
    try:
        names = register_datasets_from_config(cfg)
        assert "tiny_cfg_train" in names and "synthetic_trays_train" in names
        register_datasets_from_config(cfg)  # again: no error
        records = DatasetCatalog.get("tiny_cfg_train")
        assert records[0]["file_name"] == str(tmp_path / "data" / "images" / "0.png")
        assert MetadataCatalog.get("tiny_cfg_train").json_file == str(tmp_path / "data" / "instances.json")
        assert MetadataCatalog.get("synthetic_trays_val").json_file == str(
            tmp_path / "synth" / "annotations" / "instances_val.json")
    finally:
        DatasetCatalog.clear()
    bad = cfg.merge({"DATASETS.REGISTER": [{"name": "x", "json_file": "a.json"}]})
    with pytest.raises(ConfigError, match=r"DATASETS.REGISTER\[0\] \('x'\) is missing image_root"):
        register_datasets_from_config(bad)
    DatasetCatalog.clear()


def test_config_redeclaration_replaces_dataset(tmp_path):
    make_coco(str(tmp_path / "a"))
    make_coco(str(tmp_path / "b"))
    try:
        for folder in ("a", "b"):
            cfg = load_config(None, ["DATASETS.REGISTER", str([{"name": "tiny_redecl", "json_file": str(
                tmp_path / folder / "instances.json"), "image_root": str(tmp_path / folder)}])])
            register_datasets_from_config(cfg)
            assert DatasetCatalog.get("tiny_redecl")[0]["file_name"].startswith(str(tmp_path / folder))
    finally:
        DatasetCatalog.clear()


def test_synthetic_generated_once_on_first_use(tmp_path, monkeypatch):
    import surgdino.data.synthetic as synthetic

    calls = []
    real = synthetic.generate_synthetic_dataset

    def tiny(out_dir, **kw):
        calls.append(out_dir)
        return real(out_dir, num_train=2, num_val=1, num_classes=3, image_size=48, instances_per_image=(1, 2),
                    progress=False)

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", tiny)
    root = tmp_path / "cache" / "trays"
    cfg = load_config(None, ["DATASETS.SYNTHETIC_ROOT", str(root)])
    try:
        register_datasets_from_config(cfg)
        assert not root.exists()  # registering is lazy
        assert len(MetadataCatalog.get("synthetic_trays_train").thing_classes) == 3
        assert len(DatasetCatalog.get("synthetic_trays_train")) == 2
        assert len(DatasetCatalog.get("synthetic_trays_val")) == 1
        assert len(calls) == 1 and (root / "annotations" / "instances_val.json").is_file()
        assert [p.name for p in root.parent.iterdir()] == ["trays"]  # no temporary folder left
    finally:
        DatasetCatalog.clear()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a dataset")
    try:
        register_datasets_from_config(cfg.merge({"DATASETS.SYNTHETIC_ROOT": str(tmp_path / "other")}))
        with pytest.raises(DataError, match="exists but has no annotations"):
            DatasetCatalog.get("synthetic_trays_train")
    finally:
        DatasetCatalog.clear()


def _surgdino_imports(path: str) -> set[str]:
    """Every ``surgdino.*`` module a source file imports, at module level or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("surgdino"):
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("surgdino")}
    return names


def test_data_and_evaluation_import_one_way():
    """data ← evaluation ← engine: no data module imports evaluation or engine, evaluation never imports
    engine, and COCO loading knows nothing of the catalog (the catalog loads through it)."""
    import surgdino

    pkg = os.path.dirname(surgdino.__file__)
    for sub, banned in (("data", ("surgdino.evaluation", "surgdino.engine")), ("evaluation", ("surgdino.engine",))):
        for name in sorted(os.listdir(os.path.join(pkg, sub))):
            if name.endswith(".py") and name != "cli.py":  # command modules sit above everything
                bad = sorted(m for m in _surgdino_imports(os.path.join(pkg, sub, name)) if m.startswith(banned))
                assert not bad, f"{sub}/{name} imports {bad}"
    coco = _surgdino_imports(os.path.join(pkg, "data", "coco.py"))
    assert not any(m.startswith("surgdino.data.catalog") for m in coco), sorted(coco)
