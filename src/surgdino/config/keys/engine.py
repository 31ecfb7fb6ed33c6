"""Keys of the training engine, solver, evaluation and the generic model keys."""

from surgdino.config.core import declare as d
from surgdino.errors import ConfigError

d("OUTPUT_DIR", "./output", "str", "Folder for config.yaml, logs, metrics, checkpoints, evaluation results and plots.")
d("SEED", -1, "int", "Random seed for weights, data order and augmentation; -1 picks one and logs it.")
d("CUDNN_BENCHMARK", False, "bool", "Let cuDNN pick the fastest kernels (input sizes must be stable).")
d("VIS_PERIOD", 0, "int", "Every this many iterations draw training predictions to TensorBoard; 0 = never.")
d("VERSION", 2, "int", "Config format version (detectron2 compatibility; unused).")

d("MODEL.META_ARCHITECTURE", "MaskDINO", "str", "Meta-architecture from the registry: MaskDINO (DI-MaskDINO is chosen by the decoder name).")
d("MODEL.WEIGHTS", "", "str", "Weights to initialise from (weights only; shape mismatches are skipped with a log line).")
d("MODEL.DEVICE", "auto", "str", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
d("MODEL.DDP_FIND_UNUSED_PARAMETERS", True, "bool",
  "DistributedDataParallel looks for parameters without gradient each step (needed when a branch, e.g. denoising, is skipped; off is faster).")
d("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "list[float]", "Per-channel mean of RGB pixels in 0..255, subtracted before the backbone.")
d("MODEL.PIXEL_STD", [58.395, 57.12, 57.375], "list[float]", "Per-channel std of RGB pixels in 0..255, divided before the backbone.")
d("MODEL.MASK_ON", True, "bool", "Predict instance masks (always on for MaskDINO; kept for detectron2 configs).")

d("SOLVER.OPTIMIZER", "ADAMW", "str", "Optimizer: ADAMW or SGD.", choices=["ADAMW", "SGD"])
d("SOLVER.IMS_PER_BATCH", 16, "int", "Images per optimizer step over all processes (accumulated if ACCUMULATION_STEPS > 1).")
d("SOLVER.ACCUMULATION_STEPS", 1, "int", "Split each batch into this many forward/backward passes before one optimizer step.")
d("SOLVER.BASE_LR", 1e-4, "float", "Learning rate after warmup.")
d("SOLVER.MOMENTUM", 0.9, "float", "SGD momentum.")
d("SOLVER.BETAS", [0.9, 0.999], "list[float]", "AdamW betas.")
d("SOLVER.WEIGHT_DECAY", 0.05, "float", "Weight decay of weights (not norms, embeddings or biases).")
d("SOLVER.WEIGHT_DECAY_NORM", 0.0, "float", "Weight decay of normalisation layers' parameters.")
d("SOLVER.WEIGHT_DECAY_EMBED", 0.0, "float", "Weight decay of embeddings (query, level, position).")
d("SOLVER.WEIGHT_DECAY_BIAS", 0.0, "float", "Weight decay of biases.")
d("SOLVER.BACKBONE_MULTIPLIER", 0.1, "float", "Backbone learning rate = BASE_LR × this.")
d("SOLVER.MAX_ITER", 90000, "int", "Total optimizer steps.")
d("SOLVER.STEPS", [], "list[int]", "Iterations at which the learning rate is multiplied by GAMMA.")
d("SOLVER.GAMMA", 0.1, "float", "Learning-rate factor at each of STEPS.")
d("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "str", "Schedule: WarmupMultiStepLR or WarmupCosineLR.",
  choices=["WarmupMultiStepLR", "WarmupCosineLR"])
d("SOLVER.WARMUP_ITERS", 10, "int", "Iterations of learning-rate warmup.")
d("SOLVER.WARMUP_FACTOR", 1.0, "float", "Learning rate at iteration 0 = BASE_LR × this (1.0 = no warmup).")
d("SOLVER.WARMUP_METHOD", "linear", "str", "Warmup shape.", choices=["linear", "constant"])
d("SOLVER.REFERENCE_WORLD_SIZE", 0, "int", "If > 0, rescale IMS_PER_BATCH, BASE_LR, MAX_ITER and STEPS from this many GPUs to the actual number (detectron2's auto-scaling).")
d("SOLVER.REFERENCE_IMS_PER_BATCH", 0, "int", "If > 0 and IMS_PER_BATCH differs, BASE_LR scales by IMS_PER_BATCH / this and MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD, EVAL_PERIOD inversely.")
d("SOLVER.LOG_PERIOD", 20, "int", "Write metrics (console, metrics.jsonl, TensorBoard) every this many iterations.")
d("SOLVER.CHECKPOINT_PERIOD", 5000, "int", "Save model_{iter:07d}.pth every this many iterations.")
d("SOLVER.MAX_TO_KEEP", 0, "int", "Keep only the newest this many periodic checkpoints; 0 keeps all.")
d("SOLVER.MAX_NONFINITE_STEPS", 5, "int", "Stop with an error after this many consecutive steps with a non-finite loss (each one is skipped).")
d("SOLVER.CLIP_GRADIENTS.ENABLED", True, "bool", "Clip gradients before each step.")
d("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", "str", "norm, value (per parameter) or full_model (one norm over all).",
  choices=["full_model", "norm", "value"])
d("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01, "float", "Maximum gradient norm or value.")
d("SOLVER.CLIP_GRADIENTS.NORM_TYPE", 2.0, "float", "p of the gradient norm.")
d("SOLVER.AMP.ENABLED", False, "bool", "Mixed precision on CUDA (turned off on CPU with a log line: bf16 is ~10x slower there).")
d("SOLVER.AMP.PRECISION", "float16", "str", "Autocast dtype on CUDA.", choices=["float16", "bfloat16"])

d("TEST.EVAL_PERIOD", 0, "int", "Evaluate on DATASETS.TEST every this many iterations (and keep the best model); 0 = only at the end.")
d("TEST.BEST_METRIC", "segm/AP", "str", "Metric (task/name in the evaluation results) that decides which periodic evaluation wrote model_best.pth.")
d("TEST.BEST_MODE", "max", "str", "Whether a higher or lower BEST_METRIC is better.", choices=["max", "min"])
d("TEST.DETECTIONS_PER_IMAGE", 100, "int", "Maximum detections kept per image (top-k over query×class pairs); dense trays want 300.")
d("TEST.SCORE_THRESHOLD", 0.0, "float", "Drop detections scoring below this.")
d("TEST.ONE_LABEL_PER_QUERY", False, "bool", "Keep only each query's best class (no duplicate masks with other labels).")
d("TEST.KEEP_EMPTY_MASKS", False, "bool",
  "Keep detections whose mask is empty (score 0 by construction); by default they are dropped from results and drawings.")
d("TEST.MAX_DETS", [1, 10, 100], "list[int]", "maxDets of COCO evaluation (the last one gives AP); dense trays want [1, 10, 300].")
d("TEST.AUG.ENABLED", False, "bool", "Test-time augmentation for instance segmentation: several scales and flips, merged.")
d("TEST.AUG.MIN_SIZES", [400, 500, 600, 700, 800, 900, 1000, 1100, 1200], "list[int]", "Shortest-edge sizes of test-time augmentation.")
d("TEST.AUG.MAX_SIZE", 4000, "int", "Longest edge cap of test-time augmentation.")
d("TEST.AUG.FLIP", True, "bool", "Also run each scale horizontally flipped.")
d("TEST.AUG.MERGE_IOU", 0.7, "float", "TTA: detections of one class whose masks overlap by this IoU are merged (mask-vote).")

d("MODEL_EMA.ENABLED", False, "bool",
  "Keep an exponential moving average (EMA) of the weights: evaluation during training, model selection and "
  "eval-only/predict use it; checkpoints hold it as 'ema' beside the training weights ('model').")
d("MODEL_EMA.DECAY", 0.999, "float",
  "EMA decay in [0, 1); the decay at update n (0-based) is min(DECAY, (1 + n) / (10 + n)), a ramp so early "
  "averages are not dominated by the random initialisation. Averages over about 1 / (1 - DECAY) steps.")


def check_decay(decay: float, key: str = "MODEL_EMA.DECAY") -> float:
    """``decay`` if in [0, 1), else a ConfigError naming ``key`` (used by the config check and ``ModelEMA``)."""
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"{key} = {decay} must be in [0, 1) (e.g. 0.999; closer to 1 averages over more "
                          "steps, about 1 / (1 - DECAY))")
    return float(decay)


def _check_ema(cfg) -> None:
    check_decay(cfg.MODEL_EMA.DECAY)


def _register() -> None:
    from surgdino.config.validate import register_check

    register_check(_check_ema)


_register()
