"""Config: _BASE_ merging, KEY VALUE overrides, type conversion, and every error a user can hit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from surgdino.cli import main
from surgdino.config import closest_key, default_config, load_config, save_config, schema
from surgdino.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = ROOT / "configs" / "dimaskdino_convnext_tiny_medical_instruments.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_key_has_type_default_and_doc():
    keys = schema()
    assert len(keys) > 100
    for name, key in keys.items():
        assert key.doc.strip(), name
        assert key.default is not None, name
    # The user document's keys are all declared (MISSION.md's table).
    for leaf in ["NUM_FEATURE_LEVELS", "NUM_OBJECT_QUERIES", "FIRST_SELECTED_QUERIES", "NUM_GUIDING_TOKENS",
                 "DEC_LAYERS", "TI_LAYERS", "TRAIN_NUM_POINTS", "DN_NUM", "OVERLAP_THRESHOLD",
                 "IMS_PER_BATCH", "BASE_LR", "DEPTHS", "DIMS", "DROP_PATH_RATE", "MASK_WEIGHT", "DICE_WEIGHT"]:
        assert any(k.split(".")[-1] == leaf for k in keys), leaf


def test_medical_config_loads_with_document_values():
    cfg = load_config(str(MEDICAL))
    m = cfg.MODEL.MaskDINO
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 500
    assert (m.NUM_OBJECT_QUERIES, m.FIRST_SELECTED_QUERIES, m.NUM_GUIDING_TOKENS) == (400, 800, 100)
    assert (m.DEC_LAYERS, m.TI_LAYERS, m.TRAIN_NUM_POINTS, m.DN_NUM) == (9, 3, 16384, 150)
    assert m.TEST.OVERLAP_THRESHOLD == 0.6
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS == 4
    assert cfg.MODEL.CONVNEXT.DEPTHS == [3, 3, 9, 3]
    assert cfg.SOLVER.STEPS == [25000, 28125]  # tuple string "(25000, 28125)" converted
    assert cfg.DATASETS.TRAIN == ["medical_instruments_train"]


def test_base_inheritance_relative_paths_and_override_order(tmp_path):
    write(tmp_path / "bases" / "base.yaml", "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 7\nMODEL:\n  MaskDINO:\n    DEC_LAYERS: 2\n")
    child = write(tmp_path / "child.yaml", "_BASE_: bases/base.yaml\nSOLVER:\n  MAX_ITER: 11\n")
    cfg = load_config(str(child), ["MODEL.MaskDINO.DEC_LAYERS", "5"])
    assert cfg.SOLVER.BASE_LR == 0.5  # from the base
    assert cfg.SOLVER.MAX_ITER == 11  # child wins over base
    assert cfg.MODEL.MaskDINO.DEC_LAYERS == 5  # command line wins over files
    assert cfg.SOLVER.GAMMA == default_config().SOLVER.GAMMA


def test_dataset_paths_relative_to_config_file(tmp_path):
    text = "DATASETS:\n  REGISTER:\n    - {name: a, json_file: ann/train.json, image_root: imgs}\n"
    cfg = load_config(str(write(tmp_path / "sub" / "c.yaml", text)))
    item = cfg.DATASETS.REGISTER[0]
    assert item["json_file"] == str(tmp_path / "sub" / "ann" / "train.json")
    assert item["image_root"] == str(tmp_path / "sub" / "imgs")


@pytest.mark.parametrize(
    "opts, value",
    [
        (["SOLVER.BASE_LR", "2e-4"], ("SOLVER.BASE_LR", 2e-4)),
        (["SOLVER.AMP.ENABLED", "False"], ("SOLVER.AMP.ENABLED", False)),
        (["SOLVER.STEPS", "(10, 20)"], ("SOLVER.STEPS", [10, 20])),
        (["SOLVER.STEPS", "[10,20]"], ("SOLVER.STEPS", [10, 20])),
        (["INPUT.CROP.SIZE", "(512, 1024)"], ("INPUT.CROP.SIZE", [512.0, 1024.0])),
        (["DATASETS.TRAIN", "('a', 'b')"], ("DATASETS.TRAIN", ["a", "b"])),
        (["DATASETS.TRAIN", "only_one"], ("DATASETS.TRAIN", ["only_one"])),
        (["SOLVER.MAX_ITER", "1e3"], ("SOLVER.MAX_ITER", 1000)),
    ],
)
def test_overrides_convert_to_key_type(opts, value):
    cfg = load_config(None, opts)
    assert cfg.get(value[0]) == value[1]
    assert type(cfg.get(value[0])) is type(value[1])


def test_unknown_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean MODEL\.MaskDINO\.DEC_LAYERS"):
        load_config(None, ["MODEL.MaskDINO.DEC_LAYER", "3"])
    bad = write(tmp_path / "bad.yaml", "MODEL:\n  MaskDINO:\n    NUM_OBJECT_QUERY: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert "bad.yaml" in str(e.value) and "MODEL.MaskDINO.NUM_OBJECT_QUERIES" in str(e.value)
    assert closest_key("model.maskdino.dec_layers") == "MODEL.MaskDINO.DEC_LAYERS"


@pytest.mark.parametrize(
    "opts, pattern",
    [
        (["SOLVER.MAX_ITER", "many"], r"SOLVER\.MAX_ITER = 'many' is not a valid int"),
        (["SOLVER.AMP.ENABLED", "maybe"], r"SOLVER\.AMP\.ENABLED = 'maybe' is not a valid bool"),
        (["SOLVER.STEPS", "(1, x)"], r"SOLVER\.STEPS"),
        (["INPUT.DATASET_MAPPER_NAME", "coco_copy_paste"], r"not one of .*did you mean 'coco_instance_copy_paste'"),
        (["SOLVER.STEPS", "(20, 10)"], r"must be increasing"),
        (["SOLVER.BASE_LR"], r"KEY VALUE pairs"),
    ],
)
def test_wrong_values_name_key_value_and_type(opts, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, opts)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="named as _BASE_"):
        load_config(str(write(tmp_path / "c.yaml", "_BASE_: nowhere.yaml\n")))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(write(tmp_path / "y.yaml", "SOLVER: [\n")))
    with pytest.raises(ConfigError, match="cycle"):
        write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
        load_config(str(write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")))


def test_config_is_frozen_and_merge_makes_a_copy():
    cfg = default_config()
    with pytest.raises(ConfigError, match="frozen"):
        cfg.SOLVER.BASE_LR = 1.0
    new = cfg.merge({"SOLVER.BASE_LR": "0.25"})
    assert new.SOLVER.BASE_LR == 0.25 and cfg.SOLVER.BASE_LR != 0.25


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(str(MEDICAL), ["SOLVER.BASE_LR", "3e-4"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again.flat() == cfg.flat()


def test_cli_show_and_keys(capsys):
    # the template's dataset paths are placeholders: --no-check prints it without reading them
    assert main(["config", "show", "--no-check", "--config-file", str(MEDICAL), "SOLVER.BASE_LR", "0.0002"]) == 0
    out = capsys.readouterr().out
    assert "BASE_LR: 0.0002" in out and "NUM_CLASSES: 500" in out
    assert main(["config", "keys", "MODEL.MaskDINO.TI"]) == 0
    out = capsys.readouterr().out
    assert "MODEL.MaskDINO.TI_LAYERS" in out and "token-interaction" in out
    assert main(["config", "show", "SOLVER.NOPE", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key SOLVER.NOPE" in err and "Traceback" not in err
    assert main(["config", "keys", "NO.SUCH.PREFIX"]) == 2


def test_env_offline():
    # CI sets it; the CLI sets it too so nothing tries the hub.
    main(["config", "keys", "OUTPUT_DIR"])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
