"""Evaluation during and after training: run a model over ``DATASETS.TEST`` into the COCO evaluator and
save the results beside the run (``results.json``, ``per_class_ap.txt``, ``per_class_ap.png``), each file
written whole or not at all (a full disk never leaves a 0-byte file)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgdino import comm
from surgdino.config import Config
from surgdino.engine.checkpointer import atomic_write, unwrap
from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)


def inference_on_dataset(model: nn.Module, data_loader, evaluator, *, desc: str = "eval") -> dict[str, Any]:
    """Run ``model`` in eval mode over ``data_loader`` feeding ``evaluator``; its results (rank 0)."""
    from tqdm import tqdm

    evaluator.reset()
    was_training = model.training
    model.eval()
    try:
        total = len(data_loader)
    except TypeError:
        total = None
    with torch.no_grad():
        for inputs in tqdm(data_loader, total=total, desc=desc, disable=not comm.is_main_process(),
                           dynamic_ncols=True, leave=False):
            evaluator.process(inputs, model(inputs))
    model.train(was_training)
    return evaluator.evaluate() or {}


def _eval_model(cfg: Config, model: nn.Module) -> nn.Module:
    if not cfg.TEST.AUG.ENABLED:
        return model
    from surgdino.evaluation.tta import InstanceTTA

    logger.info("test-time augmentation: sizes %s, max %d, flip %s", list(cfg.TEST.AUG.MIN_SIZES),
                cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP)
    return InstanceTTA(**InstanceTTA.from_config(cfg, model))


def evaluate(cfg: Config, model: nn.Module) -> dict[str, Any]:
    """COCO evaluation of ``model`` on each of ``DATASETS.TEST``: the first dataset's metrics at top level,
    others under their names; files under ``OUTPUT_DIR/inference/<name>``."""
    from surgdino.data.loader import build_test_loader
    from surgdino.evaluation import COCOEvaluator

    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty; name the evaluation datasets, e.g. DATASETS.TEST "
                          "\"['synthetic_trays_val']\"")
    model = unwrap(model)
    eval_model = _eval_model(cfg, model)
    out: dict[str, Any] = {}
    for i, name in enumerate(cfg.DATASETS.TEST):
        folder = os.path.join(cfg.OUTPUT_DIR, "inference", name)
        loader = build_test_loader(cfg, name)
        evaluator = COCOEvaluator(**COCOEvaluator.from_config(cfg, name, output_dir=folder if comm.is_main_process() else None))
        results = inference_on_dataset(eval_model, loader, evaluator, desc=f"eval {name}")
        if comm.is_main_process() and results:
            save_eval_results(results, folder)
        if i == 0:
            out.update(results)
        else:
            out[name] = results
    return out


def save_drawing(draw: Callable[[str], Any], path: str) -> bool:
    """``draw(tmp_path)`` (e.g. a matplotlib ``savefig``), then rename to ``path``; an empty or failed
    drawing leaves no file (a warning, never an exception: drawing must not lose a run)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        draw(tmp)
        if os.path.getsize(tmp) == 0:
            raise OSError("the drawing is empty")
        os.replace(tmp, path)
        return True
    except Exception as e:
        logger.warning("%s not drawn: %s: %s", os.path.basename(path), type(e).__name__, e)
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def draw_into(folder: str, draw: Callable[[str], Any]) -> list[str]:
    """``draw(tmp_folder)`` writes files into a fresh temp folder; the non-empty ones move into ``folder``
    (each rename atomic). Returns the paths moved; a failure is a warning and leaves no partial file."""
    tmp = os.path.join(folder, f".drawing.tmp{os.getpid()}")
    moved: list[str] = []
    try:
        os.makedirs(tmp, exist_ok=True)
        draw(tmp)
        for name in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, name)
            if os.path.isfile(src) and os.path.getsize(src) > 0:
                os.replace(src, os.path.join(folder, name))
                moved.append(os.path.join(folder, name))
    except Exception as e:
        logger.warning("drawings in %s not made: %s: %s", folder, type(e).__name__, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return moved


def save_eval_results(results: dict[str, Any], folder: str) -> None:
    """``results.json``, ``per_class_ap.txt`` (the printed table) and ``per_class_ap.png``."""
    from surgdino.evaluation.coco_evaluator import format_metrics, metrics_to_json

    os.makedirs(folder, exist_ok=True)
    text = json.dumps(metrics_to_json(results), indent=1)
    atomic_write(os.path.join(folder, "results.json"), lambda f: f.write(text), mode="w")
    table = format_metrics(results) + "\n"
    atomic_write(os.path.join(folder, "per_class_ap.txt"), lambda f: f.write(table), mode="w")
    per_class = (results.get("per_class") or {}).get("segm") or (results.get("per_class") or {}).get("bbox")
    if per_class:
        from surgdino.visualize import plot_per_class_ap

        save_drawing(lambda p: plot_per_class_ap(per_class, p), os.path.join(folder, "per_class_ap.png"))
