"""``surgdino demo``: generate small synthetic trays, train a small DI-MaskDINO on the CPU, evaluate,
draw predictions on validation images and print a summary."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from typing import Any

import torch

from surgdino.config import Config, load_config
from surgdino.config.core import merge_opts
from surgdino.config.validate import validate
from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)

DEMO_CONFIG = "configs/demo/dimaskdino_atto_trays.yaml"
# The demo's trays: few classes and instruments at a small size, so a CPU reaches mask AP50 >= 0.5.
# 20 cm of tray in a 256 px window: instruments at 12.8 px/cm, the pixel scale of the 512 px default trays
# (shafts several pixels wide) on a window small enough to train on a CPU in minutes
DEMO_DATA = {"num_train": 300, "num_val": 30, "num_classes": 5, "image_size": 256,
             "instances_per_image": (3, 6), "field_cm": 20.0, "seed": 0}
QUICK_DATA = {"num_train": 6, "num_val": 4, "num_classes": 5, "image_size": 96,
              "instances_per_image": (2, 4), "seed": 0}
# --quick: a smoke test of every step (data, training, checkpoint, evaluation, drawing), not of learning
QUICK_OPTS = {"SOLVER.MAX_ITER": 3, "SOLVER.STEPS": [], "SOLVER.WARMUP_ITERS": 0, "SOLVER.CHECKPOINT_PERIOD": 2,
              "SOLVER.IMS_PER_BATCH": 2, "SOLVER.LOG_PERIOD": 1, "TEST.EVAL_PERIOD": 0,
              "MODEL.MaskDINO.TRAIN_NUM_POINTS": 256, "INPUT.MIN_SIZE_TRAIN": [96],
              "INPUT.MAX_SIZE_TRAIN": 96, "INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 96}
# the demo saves often (an interrupted demo continues with `surgdino demo --resume`) and keeps one periodic file
DEMO_CHECKPOINTS = {"SOLVER.CHECKPOINT_PERIOD": 100, "SOLVER.MAX_TO_KEEP": 1}
NUM_DRAWN = 6
# scores are class probability x mask score: a short CPU run's best detections score 0.2-0.5
DRAW_SCORE_THRESHOLD = 0.2


def demo_config_path() -> str:
    """The demo YAML shipped inside the package."""
    return str(resources.files("surgdino") / DEMO_CONFIG)


def demo_dataset_paths(root: str, params: dict[str, Any]) -> dict[str, str]:
    """Where the demo trays for ``params`` live: ``root/trays_<params hash>/`` (json and image paths)."""
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), f"trays_{key}")
    return {
        "folder": folder,
        "train_json": os.path.join(folder, "annotations", "instances_train.json"),
        "val_json": os.path.join(folder, "annotations", "instances_val.json"),
        "train_dir": os.path.join(folder, "train"),
        "val_dir": os.path.join(folder, "val"),
    }


def ensure_demo_dataset(root: str, params: dict[str, Any]) -> dict[str, str]:
    """Generate the demo trays under ``root/<params hash>`` unless there; returns json/image paths."""
    paths = demo_dataset_paths(root, params)
    folder = paths["folder"]
    if os.path.isfile(paths["train_json"]) and os.path.isfile(paths["val_json"]):
        return paths
    from surgdino.data.synthetic import generate_synthetic_dataset

    os.makedirs(os.path.dirname(folder), exist_ok=True)
    logger.info("generating the demo dataset in %s (%s)", folder, params)
    tmp = tempfile.mkdtemp(prefix=".tmp_trays_", dir=os.path.dirname(folder))
    try:
        generate_synthetic_dataset(tmp, **params)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return paths


def demo_config(output: str, paths: dict[str, str], *, quick: bool = False, opts: list[str] | None = None,
                num_classes: int = 5) -> Config:
    """Packaged demo YAML ← demo datasets and output ← (--quick) ← user ``KEY VALUE`` overrides."""
    cfg = load_config(demo_config_path())
    cfg = cfg.merge({
        "OUTPUT_DIR": output,
        "DATASETS.REGISTER": [
            {"name": "demo_trays_train", "json_file": paths["train_json"], "image_root": paths["train_dir"]},
            {"name": "demo_trays_val", "json_file": paths["val_json"], "image_root": paths["val_dir"]},
        ],
        "DATASETS.TRAIN": ["demo_trays_train"],
        "DATASETS.TEST": ["demo_trays_val"],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": num_classes,
        **DEMO_CHECKPOINTS,
    }, source="demo")
    if quick:
        cfg = cfg.merge(QUICK_OPTS, source="demo --quick")
    cfg = merge_opts(cfg, opts)
    validate(cfg)
    return cfg


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_demo(output: str = "./output/demo", data_root: str | None = None, *, quick: bool = False,
             opts: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The whole demo; returns ``{"results", "seconds", "output"}`` (``results``: the final evaluation).

    ``resume`` continues an interrupted demo in ``output`` (checkpoints every 100 iterations and on
    Ctrl-C/SIGTERM); ``overwrite`` starts over where a demo ran before."""
    from surgdino.engine.output_dir import check_output_dir
    from surgdino.engine.predictor import Predictor, list_images, predict_files
    from surgdino.engine.run import run_train
    from surgdino.evaluation.coco_evaluator import format_metrics

    t0 = time.perf_counter()
    params = QUICK_DATA if quick else DEMO_DATA
    root = data_root or os.path.join("~", ".cache", "surgdino", "demo_trays")
    # the config (overrides, MODEL.WEIGHTS) is checked before minutes go into generating data
    cfg = demo_config(output, demo_dataset_paths(root, params), quick=quick, opts=opts,
                      num_classes=params["num_classes"])
    if cfg.MODEL.WEIGHTS and not os.path.isfile(os.path.expanduser(cfg.MODEL.WEIGHTS)):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}; give an existing .pth/.pkl path "
                          "or leave it out to train from scratch")
    if not overwrite:  # refuse before minutes go into generating data
        check_output_dir(cfg.OUTPUT_DIR, resume=resume, overwrite=False, command="demo", output_flag="--output")
    paths = ensure_demo_dataset(root, params)
    data_s = time.perf_counter() - t0
    results = run_train(cfg, resume=resume, overwrite=overwrite, show=False, command="demo",
                        output_flag="--output") or {}
    train_s = time.perf_counter() - t0 - data_s

    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    pcfg = cfg.merge({"MODEL.WEIGHTS": final})
    drawn_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    images = list_images(paths["val_dir"])[:NUM_DRAWN]
    predict_files(Predictor(pcfg), images, drawn_dir, score_threshold=DRAW_SCORE_THRESHOLD)
    seconds = time.perf_counter() - t0

    out = os.path.abspath(cfg.OUTPUT_DIR)
    segm, bbox = results.get("segm") or {}, results.get("bbox") or {}
    model = "DI-MaskDINO" if cfg.MODEL.MaskDINO.TRANSFORMER_DECODER_NAME == "DIMaskDINODecoder" else "MaskDINO"
    lo, hi = params["instances_per_image"]
    print("\n" + "=" * 72)
    print(f"SurgDINO demo: {model} (ConvNeXt-atto) trained from scratch for {cfg.SOLVER.MAX_ITER} iterations on "
          f"{params['num_train']} synthetic trays ({params['num_classes']} classes, {lo}-{hi} instruments, "
          f"{params['image_size']} px)")
    print(f"time: {_duration(seconds)} in all (data {_duration(data_s)}, training and evaluation "
          f"{_duration(train_s)}, drawing {_duration(seconds - data_s - train_s)}), "
          f"{torch.get_num_threads()} CPU threads")
    if results:
        print(format_metrics(results))
    if segm:
        print(f"on {params['num_val']} validation trays (AP in %): mask AP {segm.get('AP', float('nan')):.1f}, "
              f"mask AP50 {segm.get('AP50', float('nan')):.1f}, box AP {bbox.get('AP', float('nan')):.1f}, "
              f"box AP50 {bbox.get('AP50', float('nan')):.1f}")
    print(f"outputs in {out}:")
    print("  model_final.pth, config.yaml, log.txt, metrics.jsonl, TensorBoard events, *.png training curves")
    print(f"  inference/{cfg.DATASETS.TEST[0]}/  results.json, per_class_ap.txt, per_class_ap.png")
    print(f"  predictions/  {len(images)} validation images drawn (score >= {DRAW_SCORE_THRESHOLD}) "
          "and coco_results.json")
    print(f"dataset in {paths['folder']}")
    print("=" * 72)
    return {"results": results, "seconds": seconds, "output": out}
