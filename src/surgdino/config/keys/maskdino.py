"""Keys of the backbone, pixel decoder (SEM_SEG_HEAD) and MaskDINO / DI-MaskDINO decoder."""

from surgdino.config.core import declare as d
from surgdino.log import get_logger

logger = get_logger(__name__)

d("MODEL.BACKBONE.NAME", "convnext", "str",
  "Backbone from the registry: convnext (sized by MODEL.CONVNEXT), convnext_{atto,femto,pico,nano,tiny,small,base}, D2ConvNeXt (alias of convnext), build_resnet_backbone or resnet (detectron2 ResNet, MODEL.RESNETS), D2SwinTransformer (MaskDINO's Swin, MODEL.SWIN), swin_{tiny,small,base,large} (GroundingDINO Swin presets), surgeryclip.")
d("MODEL.BACKBONE.FREEZE_AT", 0, "int", "Frozen backbone parts, counted as in detectron2: 0 = none, 1 = stem, 2 = stem + res2, 3 = + res3, 4 = + res4, 5 = stem and all four stages; frozen parts get no gradient and run in eval mode (no drop path); ConvNeXt output norms always train.")

d("MODEL.CONVNEXT.DEPTHS", [3, 3, 9, 3], "list[int]", "Blocks per stage (Tiny [3,3,9,3]; Small and Base [3,3,27,3]).")
d("MODEL.CONVNEXT.DIMS", [96, 192, 384, 768], "list[int]", "Channels per stage (Tiny/Small [96,192,384,768]; Base [128,256,512,1024]).")
d("MODEL.CONVNEXT.DROP_PATH_RATE", 0.2, "float", "Stochastic depth rate (linearly increasing over blocks).")
d("MODEL.CONVNEXT.LAYER_SCALE_INIT_VALUE", 1e-6, "float", "Initial layer-scale gamma.")
d("MODEL.CONVNEXT.OUT_FEATURES", ["res2", "res3", "res4", "res5"], "list[str]", "Stages returned (strides 4, 8, 16, 32).")
d("MODEL.CONVNEXT.GRAD_CHECKPOINTING", False, "bool", "Recompute ConvNeXt stage activations in backward to save memory (slower; training only, same gradients).")

h = "MODEL.SEM_SEG_HEAD."
d(h + "NAME", "MaskDINOHead", "str", "Head name (detectron2 compatibility); only MaskDINOHead (the pixel decoder + decoder here).")
d(h + "NUM_CLASSES", 80, "int", "Number of object classes (500 for the instrument catalogue).")
d(h + "IGNORE_VALUE", 255, "int", "Ignored label value of semantic segmentation; only 255 (instances have no ignored label).")
d(h + "LOSS_WEIGHT", 1.0, "float", "Multiplier of all head losses.")
d(h + "CONVS_DIM", 256, "int", "Channels of the pixel decoder.")
d(h + "MASK_DIM", 256, "int", "Channels of the stride-4 mask features (and of the mask embeddings).")
d(h + "NORM", "GN", "str", "Normalisation in the pixel decoder.", choices=["GN", "BN", "LN", ""])
d(h + "PIXEL_DECODER_NAME", "MaskDINOEncoder", "str", "Pixel decoder from the registry (surgdino.registry.PIXEL_DECODER_REGISTRY): MaskDINOEncoder (multi-scale deformable encoder + mask-feature FPN).")
d(h + "IN_FEATURES", ["res2", "res3", "res4", "res5"], "list[str]", "Backbone features the head may use.")
d(h + "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", ["res3", "res4", "res5"], "list[str]",
  "Backbone features entering the deformable encoder; must agree with NUM_FEATURE_LEVELS.")
d(h + "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 4, "int", "Sampling points per head and level in the encoder.")
d(h + "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 8, "int", "Attention heads in the encoder.")
d(h + "DIM_FEEDFORWARD", 1024, "int", "FFN width of encoder layers (MaskDINO configs use 1024).")
d(h + "NUM_FEATURE_LEVELS", 3, "int",
  "How many backbone levels feed the encoder: the last N of res2..res5 (4 = res2-res5). Real effect: sets DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES when that key is left at its default; a conflict is an error.")
d(h + "TOTAL_NUM_FEATURE_LEVELS", 4, "int", "Levels of the encoder: backbone levels plus extra stride-2 levels below the lowest resolution.")
d(h + "TRANSFORMER_ENC_LAYERS", 6, "int", "Deformable encoder layers.")
d(h + "COMMON_STRIDE", 4, "int", "Stride of the mask features (fused with the finest backbone level).")
d(h + "FEATURE_ORDER", "low2high", "str", "Order of encoder levels: low2high (coarse first) or high2low.", choices=["low2high", "high2low"])

m = "MODEL.MaskDINO."
d(m + "ARCHITECTURE", "surgdino", "str",
  "surgdino: our design (padding masks honoured, bias-free input projections, encoder and decoder see the levels in one order, invalid tokens never selected); official: IDEA-Research/MaskDINO's computation, so its checkpoints load unchanged and give its outputs (input-projection biases, reversed decoder level order, reference boxes from un-normed queries, no padding mask).",
  choices=["surgdino", "official"])
d(m + "TRANSFORMER_DECODER_NAME", "MaskDINODecoder", "str", "MaskDINODecoder, or DIMaskDINODecoder (De-Imbalance + BATO).",
  choices=["MaskDINODecoder", "DIMaskDINODecoder"])
d(m + "DEEP_SUPERVISION", True, "bool", "Losses on every decoder layer (and on the token-interaction outputs with DI).")
d(m + "NO_OBJECT_WEIGHT", 0.1, "float", "Weight of the no-object class; only 0.1 (kept for MaskDINO configs: the focal loss has no such class).")
d(m + "CLASS_WEIGHT", 4.0, "float", "Weight of the focal class loss.")
d(m + "MASK_WEIGHT", 5.0, "float", "Weight of the point-sampled mask BCE loss (raise to 7 for thin instruments).")
d(m + "DICE_WEIGHT", 5.0, "float", "Weight of the point-sampled dice loss.")
d(m + "BOX_WEIGHT", 5.0, "float", "Weight of the box L1 loss.")
d(m + "GIOU_WEIGHT", 2.0, "float", "Weight of the GIoU loss.")
d(m + "COST_CLASS_WEIGHT", 4.0, "float", "Hungarian matching cost weight of the focal class cost.")
d(m + "COST_MASK_WEIGHT", 5.0, "float", "Matching cost weight of point-sampled mask BCE.")
d(m + "COST_DICE_WEIGHT", 5.0, "float", "Matching cost weight of point-sampled dice.")
d(m + "COST_BOX_WEIGHT", 5.0, "float", "Matching cost weight of box L1.")
d(m + "COST_GIOU_WEIGHT", 2.0, "float", "Matching cost weight of GIoU.")
d(m + "FOCAL_ALPHA", 0.25, "float", "Focal loss alpha (class balance of positives).")
d(m + "FOCAL_GAMMA", 2.0, "float", "Focal loss gamma.")
d(m + "CLASS_PRIOR_PROB", 0.01, "float", "Initial class probability (bias prior) so the first loss is sane with many classes.")
d(m + "HIDDEN_DIM", 256, "int", "Transformer width.")
d(m + "NUM_OBJECT_QUERIES", 300, "int", "Queries selected from the encoder (400 for trays of 20-30 instruments).")
d(m + "NHEADS", 8, "int", "Attention heads in the decoder.")
d(m + "DROPOUT", 0.0, "float", "Dropout in the decoder.")
d(m + "DIM_FEEDFORWARD", 2048, "int", "FFN width of decoder layers.")
d(m + "ENC_LAYERS", 0, "int", "Only 0: encoder layers are SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS.")
d(m + "DEC_LAYERS", 9, "int", "Decoder layers (9 for complex scenes; the paper uses 6 with DI).")
d(m + "DEC_N_POINTS", 4, "int", "Deformable sampling points per head and level in the decoder.")
d(m + "INITIAL_PRED", True, "bool", "Also predict (and supervise) from the selected queries before decoder layer 0.")
d(m + "PRE_NORM", False, "bool", "Only False: the decoder is post-norm, as MaskDINO's.")
d(m + "BOX_LOSS", True, "bool", "Box L1 and GIoU losses on.")
d(m + "ENFORCE_INPUT_PROJ", False, "bool", "Only False (kept for MaskDINO configs: encoder and decoder widths are equal, no projection).")
d(m + "TWO_STAGE", True, "bool", "Select queries from encoder tokens (must be on; learnable queries are not supported).")
d(m + "INITIALIZE_BOX_TYPE", "mask2box", "str", "Initial boxes of selected queries: mask2box (from their predicted masks), bitmask (alias), no (from encoder box head).",
  choices=["mask2box", "bitmask", "no"])
d(m + "DN", "seg", "str", "Denoising training: seg (boxes and masks), standard (boxes only), no.", choices=["seg", "standard", "no"])
d(m + "DN_NOISE_SCALE", 0.4, "float", "Box noise scale of denoising queries.")
d(m + "DN_NUM", 100, "int", "Denoising query budget; groups = DN_NUM // max instances, at least 1 (never silently off).")
d(m + "DN_LABEL_NOISE_RATIO", 0.2, "float", "Fraction of denoising labels flipped to random classes.")
d(m + "PRED_CONV", False, "bool", "Only False (kept for MaskDINO configs: mask embeddings come from an MLP).")
d(m + "EVAL_FLAG", 1, "int", "Only 1 (kept for MaskDINO configs).")
d(m + "SIZE_DIVISIBILITY", 32, "int", "Batched images are padded to a multiple of this.")
d(m + "TRAIN_NUM_POINTS", 12544, "int", "Points sampled per mask for the mask losses and costs (16384 for thin instruments).")
d(m + "OVERSAMPLE_RATIO", 3.0, "float", "Point sampling: candidates = TRAIN_NUM_POINTS × this.")
d(m + "IMPORTANCE_SAMPLE_RATIO", 0.75, "float", "Point sampling: fraction of points taken where the mask is most uncertain.")
d(m + "FIRST_SELECTED_QUERIES", 600, "int",
  "DI: encoder tokens kept by the first selection (best class score; boxes from their masks per INITIALIZE_BOX_TYPE); the token-interaction layers refine them and the second selection keeps NUM_OBJECT_QUERIES of them; must be >= NUM_OBJECT_QUERIES (800 for trays).")
d(m + "NUM_GUIDING_TOKENS", 50, "int",
  "BATO: after decoder layer 0 this many best-scoring queries (never denoising queries) guide an update of every encoder token (the memory of layers >= 1) and of the mask features (masks from layer 1 on); 0 = BATO off; needs DEC_LAYERS >= 2 (100 for trays).")
d(m + "TI_LAYERS", 2, "int",
  "DI: token-interaction layers between the two selections (self-attention with box positions, FFN, box refinement; each layer's box delta is applied once, the reference code adds it twice); 0 = the second selection takes the first's best (3 for trays).")
d(m + "TI_LOSS_WEIGHT", 1.0, "float",
  "DI: multiplier of the class and box losses on each token-interaction layer's outputs (loss_{ce,bbox,giou}_ti{i} = usual weight × this; own Hungarian matching on class and box costs); only when DEEP_SUPERVISION is on; 0 = off.")
d(m + "TEST.INSTANCE_ON", True, "bool", "Instance segmentation output; only True (the only task).")
d(m + "TEST.SEMANTIC_ON", False, "bool", "Semantic output: not supported; must stay False.", choices=[False])
d(m + "TEST.PANOPTIC_ON", False, "bool", "Panoptic output: not supported; must stay False.", choices=[False])
d(m + "TEST.OBJECT_MASK_THRESHOLD", 0.25, "float", "Only 0.25 (kept for MaskDINO instance configs; panoptic inference is not supported).")
d(m + "TEST.OVERLAP_THRESHOLD", 0.8, "float",
  "Occlusion handling: a detection whose mask IoU with a higher-scored detection is >= this is dropped (1.0 = off; 0.6 for trays).")
d(m + "TEST.TEST_FOUCUS_ON_BOX", False, "bool", "Only False (kept for MaskDINO configs: scores come from classes and masks).")


_LEVELS = ["res2", "res3", "res4", "res5"]
_DEFAULT_ENC_IN = ["res3", "res4", "res5"]


def encoder_in_features(cfg) -> list[str]:
    """Backbone levels entering the deformable encoder, as NUM_FEATURE_LEVELS and
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES say together (see ``check_feature_levels``)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    n = head.NUM_FEATURE_LEVELS
    given = list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)
    if cfg.get("MODEL.MaskDINO.ARCHITECTURE") == "official":  # official code: NUM_FEATURE_LEVELS has no effect
        return given
    if given == _DEFAULT_ENC_IN and n != len(given) and 1 <= n <= 4:
        return _LEVELS[4 - n:]
    return given


def check_feature_levels(cfg) -> None:
    """NUM_FEATURE_LEVELS must agree with the encoder's input features and TOTAL_NUM_FEATURE_LEVELS."""
    from surgdino.errors import ConfigError

    head = cfg.MODEL.SEM_SEG_HEAD
    p = "MODEL.SEM_SEG_HEAD."
    n = head.NUM_FEATURE_LEVELS
    if not 1 <= n <= 4:
        raise ConfigError(f"{p}NUM_FEATURE_LEVELS = {n} must be 1..4 (the last N of res2..res5)")
    feats = encoder_in_features(cfg)
    if len(feats) != n and cfg.get("MODEL.MaskDINO.ARCHITECTURE") == "official":
        logger.info("%sNUM_FEATURE_LEVELS = %d has no effect with the official architecture (as in MaskDINO's code): "
                    "the encoder reads DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = %s", p, n, feats)
    elif len(feats) != n:
        raise ConfigError(
            f"{p}NUM_FEATURE_LEVELS = {n} disagrees with {p}DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = {feats}; "
            f"set NUM_FEATURE_LEVELS to {len(feats)}, or the features to {_LEVELS[4 - n:]} (or leave them at "
            f"their default to derive them from NUM_FEATURE_LEVELS)")
    bad = [f for f in feats if f not in head.IN_FEATURES]
    if bad:
        raise ConfigError(f"{p}DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES has {bad}, not in {p}IN_FEATURES = "
                          f"{list(head.IN_FEATURES)}; add them there or remove them")
    if head.TOTAL_NUM_FEATURE_LEVELS < n:
        raise ConfigError(f"{p}TOTAL_NUM_FEATURE_LEVELS = {head.TOTAL_NUM_FEATURE_LEVELS} must be >= "
                          f"NUM_FEATURE_LEVELS = {n} (extra levels are added by stride-2 convs, never removed)")
    md = cfg.MODEL.MaskDINO
    if not md.TWO_STAGE:
        raise ConfigError("MODEL.MaskDINO.TWO_STAGE = False is not supported (queries are selected from the "
                          "encoder); set it to True")
    if md.HIDDEN_DIM != head.CONVS_DIM:
        raise ConfigError(f"MODEL.MaskDINO.HIDDEN_DIM = {md.HIDDEN_DIM} must equal {p}CONVS_DIM = "
                          f"{head.CONVS_DIM} (the decoder reads the encoder's tokens); set both to one value")
    if md.HIDDEN_DIM % md.NHEADS or head.CONVS_DIM % head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS:
        raise ConfigError(f"MODEL.MaskDINO.HIDDEN_DIM = {md.HIDDEN_DIM} must be divisible by MODEL.MaskDINO.NHEADS "
                          f"and by {p}DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS")


# keys MaskDINO configs carry that select nothing here: each accepts its one supported value
_ONE_VALUE = {
    h + "NAME": ("MaskDINOHead", "the head is the pixel decoder + MaskDINO decoder"),
    h + "IGNORE_VALUE": (255, "instance segmentation has no ignored label"),
    m + "NO_OBJECT_WEIGHT": (0.1, "the focal class loss has no no-object class"),
    m + "ENC_LAYERS": (0, "encoder layers are MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"),
    m + "PRE_NORM": (False, "the decoder layers are post-norm"),
    m + "ENFORCE_INPUT_PROJ": (False, "the decoder reads the encoder's tokens without a projection"),
    m + "PRED_CONV": (False, "mask embeddings come from an MLP"),
    m + "EVAL_FLAG": (1, "there is one evaluation mode"),
    m + "TEST.INSTANCE_ON": (True, "instance segmentation is the only task"),
    m + "TEST.OBJECT_MASK_THRESHOLD": (0.25, "it is a panoptic-inference threshold; panoptic is not supported"),
    m + "TEST.TEST_FOUCUS_ON_BOX": (False, "scores come from classes and masks"),
}


# one-value keys that official configs set otherwise without effect on instance results (accepted there)
_NO_EFFECT_OFFICIALLY = (m + "TEST.OBJECT_MASK_THRESHOLD",)


def check_one_value_keys(cfg) -> None:
    """Keys kept for MaskDINO configs that select nothing: another value than the supported one is an error."""
    from surgdino.errors import ConfigError

    official = cfg.get("MODEL.MaskDINO.ARCHITECTURE") == "official"
    for key, (value, why) in _ONE_VALUE.items():
        got = cfg.get(key)
        if got != value and official and key in _NO_EFFECT_OFFICIALLY:
            logger.info("%s = %r has no effect on instance segmentation, in MaskDINO's code as here (%s)", key, got, why)
        elif got != value:
            raise ConfigError(f"{key} = {got!r} is not supported: only {value!r} ({why}); remove the key or set "
                              f"it to {value!r}")


def _register() -> None:
    from surgdino.config.validate import register_check

    register_check(check_feature_levels)
    register_check(check_one_value_keys)


_register()
