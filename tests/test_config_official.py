"""The official MaskDINO / DI-MaskDINO YAML files load as they are (their key sets and values, written here
from dicts: IDEA-Research/MaskDINO's R50 3-scale and Swin-L instance configs with their ``_BASE_`` chain,
CQU-ADHRI-Lab DI-MaskDINO's R50 4-scale config, Hello2015's ConvNeXt medical config) and select the
official architecture; keys we cannot honour are named, with reasons, in one error."""

from __future__ import annotations

import copy

import pytest
import yaml

from surgdino.config.core import load_config
from surgdino.data.catalog import DatasetCatalog
from surgdino.engine.checkpointer import read_checkpoint
from surgdino.errors import CheckpointError, ConfigError

MASKDINO_HEAD = {
    "NAME": "MaskDINOHead", "IGNORE_VALUE": 255, "NUM_CLASSES": 80, "LOSS_WEIGHT": 1.0, "CONVS_DIM": 256,
    "MASK_DIM": 256, "NORM": "GN", "PIXEL_DECODER_NAME": "MaskDINOEncoder", "DIM_FEEDFORWARD": 1024,
    "NUM_FEATURE_LEVELS": 3, "TOTAL_NUM_FEATURE_LEVELS": 3, "IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"], "COMMON_STRIDE": 4,
    "TRANSFORMER_ENC_LAYERS": 6,
}
MASKDINO_DEC = {
    "TRANSFORMER_DECODER_NAME": "MaskDINODecoder", "DEEP_SUPERVISION": True, "NO_OBJECT_WEIGHT": 0.1,
    "CLASS_WEIGHT": 4.0, "MASK_WEIGHT": 5.0, "DICE_WEIGHT": 5.0, "BOX_WEIGHT": 5.0, "GIOU_WEIGHT": 2.0,
    "HIDDEN_DIM": 256, "NUM_OBJECT_QUERIES": 300, "NHEADS": 8, "DROPOUT": 0.0, "DIM_FEEDFORWARD": 2048,
    "ENC_LAYERS": 0, "PRE_NORM": False, "ENFORCE_INPUT_PROJ": False, "SIZE_DIVISIBILITY": 32, "DEC_LAYERS": 9,
    "TRAIN_NUM_POINTS": 12544, "OVERSAMPLE_RATIO": 3.0, "IMPORTANCE_SAMPLE_RATIO": 0.75, "INITIAL_PRED": True,
    "TWO_STAGE": True, "DN": "seg", "DN_NUM": 100, "INITIALIZE_BOX_TYPE": "bitmask",
    "TEST": {"SEMANTIC_ON": False, "INSTANCE_ON": True, "PANOPTIC_ON": False, "OVERLAP_THRESHOLD": 0.8,
             "OBJECT_MASK_THRESHOLD": 0.25},
}
# Base-COCO-InstanceSegmentation.yaml of MaskDINO (DI-MaskDINO's R50 config carries the same keys inline)
BASE_COCO = {
    "MODEL": {"BACKBONE": {"FREEZE_AT": 0, "NAME": "build_resnet_backbone"},
              "WEIGHTS": "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
              "PIXEL_MEAN": [123.675, 116.280, 103.530], "PIXEL_STD": [58.395, 57.120, 57.375],
              "RESNETS": {"DEPTH": 50, "STEM_TYPE": "basic", "STEM_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False,
                          "OUT_FEATURES": ["res2", "res3", "res4", "res5"], "RES5_MULTI_GRID": [1, 1, 1]}},
    "DATASETS": {"TRAIN": '("coco_2017_train",)', "TEST": '("coco_2017_val",)'},
    "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.0001, "STEPS": "(327778, 355092)", "MAX_ITER": 368750,
               "WARMUP_FACTOR": 1.0, "WARMUP_ITERS": 10, "WEIGHT_DECAY": 0.05, "OPTIMIZER": "ADAMW",
               "BACKBONE_MULTIPLIER": 0.1,
               "CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": "full_model", "CLIP_VALUE": 0.01, "NORM_TYPE": 2.0},
               "AMP": {"ENABLED": True}},
    "INPUT": {"IMAGE_SIZE": 1024, "MIN_SCALE": 0.1, "MAX_SCALE": 2.0, "FORMAT": "RGB",
              "DATASET_MAPPER_NAME": "coco_instance_lsj"},
    "TEST": {"EVAL_PERIOD": 5000},
    "DATALOADER": {"FILTER_EMPTY_ANNOTATIONS": True, "NUM_WORKERS": 4},
    "VERSION": 2,
}
R50_3S = {"_BASE_": "Base-COCO-InstanceSegmentation.yaml",
          "MODEL": {"META_ARCHITECTURE": "MaskDINO", "SEM_SEG_HEAD": MASKDINO_HEAD, "MaskDINO": MASKDINO_DEC},
          "SOLVER": {"AMP": {"ENABLED": True}}, "TEST": {"EVAL_PERIOD": 5000}}
SWIN_L = {
    "_BASE_": "../Base-COCO-InstanceSegmentation.yaml",
    "MODEL": {"META_ARCHITECTURE": "MaskDINO", "BACKBONE": {"NAME": "D2SwinTransformer"},
              "SWIN": {"EMBED_DIM": 192, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [6, 12, 24, 48], "WINDOW_SIZE": 12,
                       "APE": False, "DROP_PATH_RATE": 0.3, "PATCH_NORM": True, "PRETRAIN_IMG_SIZE": 384},
              "WEIGHTS": "swin_large_patch4_window12_384_22k.pkl",
              "SEM_SEG_HEAD": {**MASKDINO_HEAD, "DIM_FEEDFORWARD": 2048, "NUM_FEATURE_LEVELS": 4,
                               "TOTAL_NUM_FEATURE_LEVELS": 5,
                               "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res2", "res3", "res4", "res5"],
                               "FEATURE_ORDER": "low2high"},
              "MaskDINO": {**MASKDINO_DEC, "EVAL_FLAG": 1}},
    "SOLVER": {"AMP": {"ENABLED": True}}, "TEST": {"EVAL_PERIOD": 5000},
}
DI_BASE = {
    "MODEL": {"META_ARCHITECTURE": "MaskDINO",
              "SEM_SEG_HEAD": {**MASKDINO_HEAD, "DIM_FEEDFORWARD": 2048, "TOTAL_NUM_FEATURE_LEVELS": 4,
                               "FEATURE_ORDER": "low2high"},
              "MaskDINO": {**MASKDINO_DEC, "TRANSFORMER_DECODER_NAME": "DIMaskDINODecoder",
                           "FIRST_SELECTED_QUERIES": 600, "NUM_GUIDING_TOKENS": 50, "DEC_LAYERS": 6, "TI_LAYERS": 2,
                           "EVAL_FLAG": 1, "INITIALIZE_BOX_TYPE": "mask2box"}},
    "SOLVER": {"AMP": {"ENABLED": True}}, "TEST": {"EVAL_PERIOD": 5000},
}
DI_R50 = {"_BASE_": "Base_DIMaskDINO_COCO.yaml", **{k: v for k, v in BASE_COCO.items()}}
MEDICAL = {
    "_BASE_": "Base_DIMaskDINO_COCO.yaml",
    "MODEL": {"BACKBONE": {"FREEZE_AT": 0, "NAME": "D2ConvNeXt"}, "WEIGHTS": "tools/convnext_tiny_22k_1k_224_d2.pth",
              "PIXEL_MEAN": [123.675, 116.280, 103.530], "PIXEL_STD": [58.395, 57.120, 57.375],
              "CONVNEXT": {"DEPTHS": [3, 3, 9, 3], "DIMS": [96, 192, 384, 768], "DROP_PATH_RATE": 0.2,
                           "LAYER_SCALE_INIT_VALUE": 1.0e-6, "OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
              "SEM_SEG_HEAD": {**MASKDINO_HEAD, "NUM_CLASSES": 20, "DIM_FEEDFORWARD": 2048, "NUM_FEATURE_LEVELS": 4,
                               "TOTAL_NUM_FEATURE_LEVELS": 4, "FEATURE_ORDER": "low2high"},
              "MaskDINO": {**DI_BASE["MODEL"]["MaskDINO"], "NUM_OBJECT_QUERIES": 400, "FIRST_SELECTED_QUERIES": 800,
                           "NUM_GUIDING_TOKENS": 100, "DROPOUT": 0.1, "DEC_LAYERS": 9, "TI_LAYERS": 3,
                           "TRAIN_NUM_POINTS": 16384, "DN_NUM": 150, "COST_CLASS_WEIGHT": 4.0,
                           "COST_DICE_WEIGHT": 5.0, "COST_MASK_WEIGHT": 5.0, "COST_BOX_WEIGHT": 5.0,
                           "COST_GIOU_WEIGHT": 2.0,
                           "TEST": {**MASKDINO_DEC["TEST"], "OVERLAP_THRESHOLD": 0.6, "OBJECT_MASK_THRESHOLD": 0.3}}},
    "DATASETS": {"TRAIN": '("opcoco38_train",)', "TEST": '("opcoco38_val",)'},
    "SOLVER": {**BASE_COCO["SOLVER"], "IMS_PER_BATCH": 1, "STEPS": "(25000, 28125)", "MAX_ITER": 31250,
               "WARMUP_ITERS": 500},
    "INPUT": {"IMAGE_SIZE": 1024, "MIN_SCALE": 0.2, "MAX_SCALE": 2.0, "FORMAT": "RGB",
              "DATASET_MAPPER_NAME": "coco_instance_lsj", "MASK_FORMAT": "bitmask", "COLOR_AUG_SSD": True},
    "TEST": {"EVAL_PERIOD": 1000, "DETECTIONS_PER_IMAGE": 50},
    "DATALOADER": {"FILTER_EMPTY_ANNOTATIONS": True, "NUM_WORKERS": 4, "SAMPLER_TRAIN": "TrainingSampler",
                   "ASPECT_RATIO_GROUPING": True},
    "VERSION": 2, "OUTPUT_DIR": "./output/medical_instruments_convnext_tiny",
}


def _write(folder, files: dict[str, dict]) -> None:
    for name, tree in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.fixture
def official(tmp_path):
    _write(tmp_path / "maskdino", {"Base-COCO-InstanceSegmentation.yaml": BASE_COCO,
                                   "maskdino_R50_bs16_50ep_3s.yaml": R50_3S,
                                   "swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml": SWIN_L})
    _write(tmp_path / "di", {"Base_DIMaskDINO_COCO.yaml": DI_BASE, "dimaskdino_r50_4scale_bs16_50ep.yaml": DI_R50,
                             "dimaskdino_convnext_tiny_medical_instruments.yaml": MEDICAL})
    return tmp_path


def test_official_configs_load_as_they_are_and_select_the_official_architecture(official):
    r50 = load_config(str(official / "maskdino/maskdino_R50_bs16_50ep_3s.yaml"))
    assert r50.MODEL.MaskDINO.ARCHITECTURE == "official"
    assert (r50.MODEL.BACKBONE.NAME, r50.MODEL.RESNETS.STRIDE_IN_1X1, r50.SOLVER.STEPS) == (
        "build_resnet_backbone", False, [327778, 355092])
    assert r50.DATASETS.TRAIN == ["coco_2017_train"] and r50.MODEL.MaskDINO.INITIALIZE_BOX_TYPE == "bitmask"

    swin = load_config(str(official / "maskdino/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml"))
    assert swin.MODEL.BACKBONE.NAME == "D2SwinTransformer" and swin.MODEL.MaskDINO.ARCHITECTURE == "official"
    assert (swin.MODEL.SWIN.EMBED_DIM, swin.MODEL.SWIN.WINDOW_SIZE, swin.MODEL.SWIN.DEPTHS) == (192, 12, [2, 2, 18, 2])
    assert swin.MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS == 5

    di = load_config(str(official / "di/dimaskdino_r50_4scale_bs16_50ep.yaml"))
    assert di.MODEL.MaskDINO.TRANSFORMER_DECODER_NAME == "DIMaskDINODecoder"
    assert (di.MODEL.MaskDINO.DEC_LAYERS, di.MODEL.MaskDINO.ARCHITECTURE) == (6, "official")

    med = load_config(str(official / "di/dimaskdino_convnext_tiny_medical_instruments.yaml"))
    assert (med.MODEL.BACKBONE.NAME, med.MODEL.MaskDINO.TI_LAYERS, med.MODEL.MaskDINO.TEST.OVERLAP_THRESHOLD) == (
        "D2ConvNeXt", 3, 0.6)


def test_official_semantics_of_keys_without_effect(official):
    """Official code ignores NUM_FEATURE_LEVELS (the encoder reads DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)
    and OBJECT_MASK_THRESHOLD (panoptic only): with the official architecture they are accepted as such;
    with ours, the same keys are errors that say the fix."""
    from surgdino.config.keys.maskdino import encoder_in_features

    med = official / "di/dimaskdino_convnext_tiny_medical_instruments.yaml"
    assert encoder_in_features(load_config(str(med))) == ["res3", "res4", "res5"]
    with pytest.raises(ConfigError, match="OBJECT_MASK_THRESHOLD = 0.3 is not supported"):
        load_config(str(med), ["MODEL.MaskDINO.ARCHITECTURE", "surgdino"])
    four = copy.deepcopy(R50_3S)
    four["MODEL"]["SEM_SEG_HEAD"]["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"] = ["res2", "res3", "res4", "res5"]
    _write(official / "maskdino", {"four.yaml": four})
    assert encoder_in_features(load_config(str(official / "maskdino/four.yaml"))) == ["res2", "res3", "res4", "res5"]
    with pytest.raises(ConfigError, match="NUM_FEATURE_LEVELS = 3 disagrees"):
        load_config(str(official / "maskdino/four.yaml"), ["MODEL.MaskDINO.ARCHITECTURE", "surgdino"])


def test_keys_we_cannot_honour_are_named_in_one_error(official):
    bad = copy.deepcopy(R50_3S)
    bad["MODEL"]["MaskDINO"]["SEMANTIC_CE_LOSS"] = True
    bad["MODEL"]["ROI_HEADS"] = {"NAME": "StandardROIHeads"}
    bad["MODEL"]["MaskDINO"]["DEC_LAYRES"] = 9
    _write(official / "maskdino", {"bad.yaml": bad})
    with pytest.raises(ConfigError) as e:
        load_config(str(official / "maskdino/bad.yaml"))
    msg = str(e.value)
    assert "3 keys cannot be used" in msg and "\n" not in msg
    assert "SEMANTIC_CE_LOSS" in msg and "semantic / panoptic segmentation is not part of SurgDINO" in msg
    assert "MODEL.ROI_HEADS.NAME" in msg and "R-CNN" in msg
    assert "DEC_LAYRES; did you mean MODEL.MaskDINO.DEC_LAYERS" in msg
    with pytest.raises(ConfigError, match="LEARN_TGT .*not implemented: learnable decoder queries"):
        load_config(None, ["MODEL.MaskDINO.LEARN_TGT", "True"])


def test_our_configs_stay_ours_and_the_switch_wins(official):
    for name in ("surgdino://dimaskdino_convnext_tiny_medical_instruments.yaml",
                 "surgdino://demo/dimaskdino_atto_trays.yaml"):
        assert load_config(name).MODEL.MaskDINO.ARCHITECTURE == "surgdino"
    mixed = copy.deepcopy(R50_3S)
    mixed["MODEL"]["MaskDINO"]["TI_LOSS_WEIGHT"] = 0.5  # a SurgDINO-only key: a config written for SurgDINO
    _write(official / "maskdino", {"mixed.yaml": mixed})
    assert load_config(str(official / "maskdino/mixed.yaml")).MODEL.MaskDINO.ARCHITECTURE == "surgdino"
    r50 = str(official / "maskdino/maskdino_R50_bs16_50ep_3s.yaml")
    assert load_config(r50, ["MODEL.MaskDINO.ARCHITECTURE", "surgdino"]).MODEL.MaskDINO.ARCHITECTURE == "surgdino"


def test_official_datasets_and_weights_fail_at_use_with_the_fix():
    with pytest.raises(ConfigError, match="coco_2017_train.*detectron2's built-in datasets.*DATASETS.REGISTER"):
        DatasetCatalog.get("coco_2017_train")
    with pytest.raises(CheckpointError, match="is a URL; SurgDINO downloads nothing"):
        read_checkpoint("detectron2://ImageNetPretrained/torchvision/R-50.pkl")


def test_official_key_tables_agree_with_the_schema():
    from surgdino.config.core import schema
    from surgdino.config.official import OFFICIAL_KEYS, UNSUPPORTED

    assert OFFICIAL_KEYS <= set(schema()), sorted(OFFICIAL_KEYS - set(schema()))
    assert not set(UNSUPPORTED) & set(schema())
