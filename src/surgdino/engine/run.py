"""What ``surgdino train`` and ``surgdino demo`` run: guard and lock the output folder, start the
processes, and in each one train (``train_main``) or evaluate (``eval_only``).

``--eval-only`` never writes into the training run's files: its config, log and results go to a new
subfolder ``OUTPUT_DIR/eval_<weights>_<time>/``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from surgdino import comm
from surgdino.config import Config, save_config
from surgdino.engine.checkpointer import load_weights, remove_stale_temp_files
from surgdino.engine.defaults import (
    Trainer,
    check_inputs,
    default_setup,
    register_datasets,
    resolve_device,
    seed_all,
)
from surgdino.engine.launch import launch, under_torchrun
from surgdino.engine.output_dir import OutputLock, check_output_dir
from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)


def eval_output_dir(cfg: Config) -> str:
    """``OUTPUT_DIR/eval_<weights file stem>_<YYYYmmdd-HHMMSS>``: beside, never over, a training run."""
    stem = os.path.splitext(os.path.basename(cfg.MODEL.WEIGHTS or "weights"))[0] or "weights"
    base = os.path.join(cfg.OUTPUT_DIR, f"eval_{stem}_{time.strftime('%Y%m%d-%H%M%S')}")
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}_{n}"
    return out


def print_results(results: dict[str, Any]) -> None:
    """The AP and per-class tables, once, on rank 0."""
    if comm.is_main_process() and results:
        from surgdino.evaluation.coco_evaluator import format_metrics

        print(format_metrics(results))


def eval_only(cfg: Config, *, show: bool = True) -> dict[str, Any]:
    """``--eval-only``: build the model, load ``MODEL.WEIGHTS`` (required) and evaluate."""
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs weights: add MODEL.WEIGHTS path/to/model_final.pth")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}")
    device = resolve_device(cfg)
    seed_all(max(cfg.SEED, 0))
    model = Trainer.build_model(cfg).to(device)
    load_weights(model, cfg.MODEL.WEIGHTS)
    results = Trainer.test(cfg, model)
    if show:
        print_results(results)
    return results


_eval_only = eval_only  # train_main's argument of the same name hides the function


def train_main(cfg: Config, resume: bool = False, eval_only: bool = False, show: bool = True) -> dict[str, Any]:
    """What every process runs: set up the output folder, then train or evaluate; ``show`` prints the final
    tables (once)."""
    default_setup(cfg, tag="eval" if eval_only else "train", save=not resume)
    register_datasets(cfg)
    if eval_only:
        return _eval_only(cfg, show=show)
    trainer = Trainer(cfg, resume=resume)
    if resume and comm.is_main_process():  # the checkpoint fits this config: now it is the run's config
        save_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    results = trainer.train()
    if comm.is_main_process():
        out = os.path.abspath(cfg.OUTPUT_DIR)
        print(f"training done in {trainer.train_seconds:.0f} s; checkpoints, metrics.jsonl, plots in {out}")
        if show:
            print_results(results)
    return results


def run_train(cfg: Config, *, resume: bool = False, eval_only: bool = False, overwrite: bool = False,
              num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "auto",
              show: bool = True, command: str = "train", output_flag: str = "OUTPUT_DIR") -> dict[str, Any] | None:
    """Check the inputs, guard and lock ``OUTPUT_DIR`` (a fresh run never replaces one; see ``output_dir``),
    remove partial files of a killed write, then ``launch`` ``train_main`` in every process."""
    device = resolve_device(cfg)
    torchrun = under_torchrun()
    if not torchrun:
        check_inputs(cfg, train=not eval_only)  # fail here, before processes start
    if eval_only:
        cfg = cfg.merge({"OUTPUT_DIR": eval_output_dir(cfg)}, source="--eval-only")
        logger.info("--eval-only: results in %s", cfg.OUTPUT_DIR)
    leader = not torchrun or os.environ.get("RANK", "0") == "0"
    lock = OutputLock(cfg.OUTPUT_DIR) if leader and not eval_only else None
    if lock is not None:
        check_output_dir(cfg.OUTPUT_DIR, resume=resume, overwrite=overwrite, command=command,
                         output_flag=output_flag)
        lock.acquire()
    try:
        if lock is not None:
            remove_stale_temp_files(cfg.OUTPUT_DIR)
        return launch(train_main, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                      dist_url=dist_url, device=device.type, args=(cfg, resume, eval_only, show))
    finally:
        if lock is not None:
            lock.release()
