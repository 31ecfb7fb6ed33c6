"""Official MaskDINO / DI-MaskDINO YAML files (IDEA-Research/MaskDINO, CQU-ADHRI-Lab and Hello2015 DI-MaskDINO),
loaded as they are.

- A config whose ``_BASE_`` chain uses only the official projects' keys (detectron2's and their
  ``add_maskdino_config``'s) and names an official backbone is an **official config**: unless the chain sets
  ``MODEL.MaskDINO.ARCHITECTURE`` itself, it selects ``official`` (the official computation, so official
  checkpoints give official outputs), with one log line. A chain with any SurgDINO-only key is ours.
- Keys of the official projects (or detectron2) that SurgDINO does not implement are all named in one
  error, each with its reason (``unsupported_keys``), instead of a "did you mean" per key.
"""

from __future__ import annotations

from collections.abc import Iterable

ARCHITECTURE_KEY = "MODEL.MaskDINO.ARCHITECTURE"
OFFICIAL_BACKBONES = ("build_resnet_backbone", "D2SwinTransformer", "D2ConvNeXt")


def _keys(prefix: str, leaves: str) -> set[str]:
    return {prefix + leaf for leaf in leaves.split()}


# keys of detectron2's defaults and of the official add_maskdino_config / add_swin / ConvNeXt configs that
# SurgDINO also declares (names only)
OFFICIAL_KEYS: set[str] = (
    _keys("", "OUTPUT_DIR SEED CUDNN_BENCHMARK VIS_PERIOD VERSION")
    | _keys("MODEL.", "META_ARCHITECTURE WEIGHTS DEVICE PIXEL_MEAN PIXEL_STD MASK_ON BACKBONE.NAME BACKBONE.FREEZE_AT")
    | _keys("MODEL.RESNETS.", "DEPTH OUT_FEATURES NORM STRIDE_IN_1X1 NUM_GROUPS WIDTH_PER_GROUP STEM_OUT_CHANNELS "
            "RES2_OUT_CHANNELS RES5_DILATION RES5_MULTI_GRID STEM_TYPE")
    | _keys("MODEL.SWIN.", "PRETRAIN_IMG_SIZE PATCH_SIZE EMBED_DIM DEPTHS NUM_HEADS WINDOW_SIZE MLP_RATIO QKV_BIAS "
            "QK_SCALE DROP_RATE ATTN_DROP_RATE DROP_PATH_RATE APE PATCH_NORM OUT_FEATURES USE_CHECKPOINT")
    | _keys("MODEL.CONVNEXT.", "DEPTHS DIMS DROP_PATH_RATE LAYER_SCALE_INIT_VALUE OUT_FEATURES")
    | _keys("MODEL.SEM_SEG_HEAD.", "NAME IN_FEATURES IGNORE_VALUE NUM_CLASSES CONVS_DIM COMMON_STRIDE NORM LOSS_WEIGHT "
            "MASK_DIM PIXEL_DECODER_NAME DIM_FEEDFORWARD NUM_FEATURE_LEVELS TOTAL_NUM_FEATURE_LEVELS "
            "TRANSFORMER_ENC_LAYERS DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES "
            "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS FEATURE_ORDER")
    | _keys("MODEL.MaskDINO.", "TRANSFORMER_DECODER_NAME DEEP_SUPERVISION NO_OBJECT_WEIGHT CLASS_WEIGHT MASK_WEIGHT "
            "DICE_WEIGHT BOX_WEIGHT GIOU_WEIGHT COST_CLASS_WEIGHT COST_MASK_WEIGHT COST_DICE_WEIGHT COST_BOX_WEIGHT "
            "COST_GIOU_WEIGHT HIDDEN_DIM NUM_OBJECT_QUERIES NHEADS DROPOUT DIM_FEEDFORWARD ENC_LAYERS DEC_LAYERS "
            "INITIAL_PRED PRE_NORM BOX_LOSS ENFORCE_INPUT_PROJ TWO_STAGE INITIALIZE_BOX_TYPE DN DN_NOISE_SCALE DN_NUM "
            "PRED_CONV EVAL_FLAG SIZE_DIVISIBILITY TRAIN_NUM_POINTS OVERSAMPLE_RATIO IMPORTANCE_SAMPLE_RATIO "
            "FIRST_SELECTED_QUERIES NUM_GUIDING_TOKENS TI_LAYERS TEST.INSTANCE_ON TEST.SEMANTIC_ON TEST.PANOPTIC_ON "
            "TEST.OBJECT_MASK_THRESHOLD TEST.OVERLAP_THRESHOLD TEST.TEST_FOUCUS_ON_BOX")
    | _keys("DATASETS.", "TRAIN TEST")
    | _keys("DATALOADER.", "NUM_WORKERS SAMPLER_TRAIN REPEAT_THRESHOLD FILTER_EMPTY_ANNOTATIONS ASPECT_RATIO_GROUPING")
    | _keys("INPUT.", "FORMAT MASK_FORMAT DATASET_MAPPER_NAME MIN_SIZE_TRAIN MIN_SIZE_TRAIN_SAMPLING MAX_SIZE_TRAIN "
            "MIN_SIZE_TEST MAX_SIZE_TEST RANDOM_FLIP IMAGE_SIZE MIN_SCALE MAX_SCALE CROP.ENABLED CROP.TYPE CROP.SIZE "
            "SIZE_DIVISIBILITY COLOR_AUG_SSD")
    | _keys("SOLVER.", "OPTIMIZER IMS_PER_BATCH BASE_LR MOMENTUM WEIGHT_DECAY WEIGHT_DECAY_NORM WEIGHT_DECAY_EMBED "
            "WEIGHT_DECAY_BIAS BACKBONE_MULTIPLIER MAX_ITER STEPS GAMMA LR_SCHEDULER_NAME WARMUP_ITERS "
            "WARMUP_FACTOR WARMUP_METHOD REFERENCE_WORLD_SIZE CHECKPOINT_PERIOD CLIP_GRADIENTS.ENABLED "
            "CLIP_GRADIENTS.CLIP_TYPE CLIP_GRADIENTS.CLIP_VALUE CLIP_GRADIENTS.NORM_TYPE AMP.ENABLED")
    | _keys("TEST.", "EVAL_PERIOD DETECTIONS_PER_IMAGE AUG.ENABLED AUG.MIN_SIZES AUG.MAX_SIZE AUG.FLIP")
)

_NO_SEMANTIC = "semantic / panoptic segmentation is not part of SurgDINO (instance segmentation only)"
# official (or detectron2) keys SurgDINO does not declare, with the reason
UNSUPPORTED: dict[str, str] = {
    "MODEL.MaskDINO.SEMANTIC_CE_LOSS": _NO_SEMANTIC,
    "MODEL.MaskDINO.PANO_BOX_LOSS": _NO_SEMANTIC,
    "MODEL.MaskDINO.TEST.PANO_TEMPERATURE": _NO_SEMANTIC,
    "MODEL.MaskDINO.TEST.PANO_TRANSFORM_EVAL": _NO_SEMANTIC,
    "MODEL.MaskDINO.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": _NO_SEMANTIC,
    "MODEL.MaskDINO.TEST.EVAL_FLAG": "it only selects which evaluators MaskDINO's train_net builds (use MODEL.MaskDINO.EVAL_FLAG, kept at 1)",
    "MODEL.MaskDINO.LEARN_TGT": "learnable decoder queries are not supported (queries are selected from the encoder, TWO_STAGE)",
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": "semantic-segmentation crops are not part of SurgDINO",
    "Default_loading": "a switch of DI-MaskDINO's train_net, not a model or data setting",
}
# detectron2 sections SurgDINO has no counterpart for (R-CNN heads, other backbones, panoptic data)
UNSUPPORTED_PREFIXES: dict[str, str] = {
    "MODEL.RPN.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.ROI_HEADS.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.ROI_BOX_HEAD.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.ROI_MASK_HEAD.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.ROI_KEYPOINT_HEAD.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.ANCHOR_GENERATOR.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.PROPOSAL_GENERATOR.": "detectron2's R-CNN parts are not part of SurgDINO",
    "MODEL.RETINANET.": "detectron2's RetinaNet is not part of SurgDINO",
    "MODEL.FPN.": "the FPN backbone is not part of SurgDINO (MaskDINO's pixel decoder builds the feature pyramid)",
    "MODEL.PANOPTIC_FPN.": _NO_SEMANTIC,
    "MODEL.KEYPOINT_ON": "keypoints are not part of SurgDINO",
    "MODEL.LOAD_PROPOSALS": "detectron2's R-CNN parts are not part of SurgDINO",
    "DATASETS.PROPOSAL_FILES_": "detectron2's R-CNN parts are not part of SurgDINO",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_": "detectron2's R-CNN parts are not part of SurgDINO",
    "TEST.KEYPOINT_OKS_SIGMAS": "keypoints are not part of SurgDINO",
    "TEST.PRECISE_BN.": "precise BN is not implemented (the backbones use frozen or no BatchNorm)",
    "SOLVER.NESTEROV": "SGD without Nesterov only",
    "SOLVER.BIAS_LR_FACTOR": "one learning rate for biases and weights (SOLVER.WEIGHT_DECAY_BIAS sets their decay)",
    "SOLVER.RESCALE_INTERVAL": "the schedule is in iterations, not rescaled",
    "SOLVER.NUM_DECAYS": "WarmupMultiStepLR with SOLVER.STEPS sets the decays",
    "SOLVER.POLY_LR_": "the poly schedule is not implemented (WarmupMultiStepLR or WarmupCosineLR)",
    "SOLVER.BASE_LR_END": "WarmupCosineLR ends at 0",
}


def unsupported_reason(name: str) -> str | None:
    """Why ``name`` (a key SurgDINO does not declare) is an official / detectron2 key we do not honour; None
    when it is no such key (then it is a typo, and the loader suggests the closest key)."""
    if name in UNSUPPORTED:
        return UNSUPPORTED[name]
    return next((why for prefix, why in UNSUPPORTED_PREFIXES.items() if name.startswith(prefix)), None)


def is_official_config(names: Iterable[str], backbone: str | None) -> bool:
    """The keys a YAML chain sets are all official ones, it names an official backbone and leaves
    ``MODEL.MaskDINO.ARCHITECTURE`` unset."""
    names = set(names)
    return (bool(names) and ARCHITECTURE_KEY not in names and names <= OFFICIAL_KEYS
            and backbone in OFFICIAL_BACKBONES)
