"""The default training setup: output folder, seeds, device, model + optimizer + data + hooks, evaluation.

``Trainer(cfg, resume=...)`` builds everything in the order that makes a resumed run repeat an
uninterrupted one: model → weights or checkpoint → data iterator at the checkpoint's position →
RNG states. With ``MODEL_EMA.ENABLED`` a moving average of the weights (``ModelEMA``) is kept, saved
in every checkpoint and used by evaluation during training. ``evaluate(cfg, model)`` runs
``DATASETS.TEST`` through the COCO evaluator.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from surgdino import comm
from surgdino.config import Config, save_config
from surgdino.device import resolve_device as _resolve_device
from surgdino.engine import hooks as H
from surgdino.engine.checkpointer import Checkpointer, load_weights, set_rng_state, unwrap
from surgdino.engine.ema import ModelEMA
from surgdino.engine.inference import evaluate
from surgdino.engine.optimizer import build_lr_scheduler, build_optimizer, scale_config
from surgdino.engine.trainer import SimpleTrainer
from surgdino.engine.writers import ConsoleWriter, JSONWriter, TensorboardWriter
from surgdino.errors import ConfigError, DataError
from surgdino.log import get_logger

logger = get_logger(__name__)


def resolve_device(cfg: Config) -> torch.device:
    """``MODEL.DEVICE`` through ``surgdino.device.resolve_device`` (a missing device is a ConfigError)."""
    return _resolve_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_setup(cfg: Config, *, tag: str = "train", save: bool = True) -> None:
    """Create ``OUTPUT_DIR``, log to ``log.txt`` there (rank 0), save the merged ``config.yaml`` (unless
    ``save`` is False: a resumed run saves it once its checkpoint has loaded)."""
    out = cfg.OUTPUT_DIR
    root = get_logger()
    if comm.is_main_process():
        from surgdino.data.paths import make_output_dir

        make_output_dir(out, "OUTPUT_DIR")  # an existing file there: one clear line
        log_path = os.path.abspath(os.path.join(out, "log.txt"))
        for h in [h for h in root.handlers if getattr(h, "_surgdino_output", False)]:
            root.removeHandler(h)  # a previous run in this process logged elsewhere
            h.close()
        fh = logging.FileHandler(log_path)
        fh.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
        fh._surgdino_output = True
        root.addHandler(fh)
        if save:
            save_config(cfg, os.path.join(out, "config.yaml"))
        files = "config.yaml, log.txt, metrics.jsonl, checkpoints" if tag == "train" else "config.yaml, log.txt, inference/"
        logger.info("%s: output in %s (%s)", tag, os.path.abspath(out), files)
    else:
        root.setLevel(logging.WARNING)
    logger.info("rank %d/%d, torch %s", comm.get_rank(), comm.get_world_size(), torch.__version__)
    if cfg.CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True


def pick_seed(cfg: Config) -> int:
    """``SEED`` or, if -1, a random one shared by all ranks (logged so a run can be repeated)."""
    seed = cfg.SEED
    if seed < 0:
        seed = comm.all_gather(int.from_bytes(os.urandom(4), "little") % 2**31)[0]
        logger.info("SEED -1: using seed %d (set SEED %d to repeat this run)", seed, seed)
    return seed


def register_datasets(cfg: Config) -> None:
    from surgdino.data.catalog import register_datasets_from_config

    register_datasets_from_config(cfg)


def _metadata(cfg: Config):
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        return None
    from surgdino.data.catalog import MetadataCatalog

    return MetadataCatalog.get(names[0])


def thing_classes(cfg: Config) -> list[str]:
    """Class names of ``DATASETS.TEST[0]`` (or ``TRAIN[0]``), in contiguous order; [] if unknown."""
    try:
        return list(_metadata(cfg).thing_classes)
    except (AttributeError, KeyError):
        return []


def dataset_id_map(cfg: Config) -> dict[int, int]:
    """``thing_dataset_id_to_contiguous_id`` of the same dataset; {} if unknown."""
    try:
        return {int(k): int(v) for k, v in (_metadata(cfg).thing_dataset_id_to_contiguous_id or {}).items()}
    except (AttributeError, KeyError):
        return {}


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    if device.type != "cuda":
        logger.info("SOLVER.AMP.ENABLED ignored on %s: mixed precision runs only on CUDA "
                    "(bfloat16 autocast is ~10x slower than float32 on CPU)", device.type)
        return None
    return torch.bfloat16 if cfg.SOLVER.AMP.PRECISION == "bfloat16" else torch.float16


def _truncate_metrics(path: str, last_iter: int) -> None:
    """On resume drop metric lines written after the checkpoint (they will be written again)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line).get("iter", 0)) <= last_iter:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class Trainer:
    """Builds model, optimizer, schedule, data and hooks from a config; ``train()`` runs them.

    Override the ``build_*`` classmethods to change one part (tests replace the data loader).
    """

    def __init__(self, cfg: Config, *, resume: bool = False):
        cfg = scale_config(cfg, comm.get_world_size())
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.seed = pick_seed(cfg)
        world = comm.get_world_size()
        s = cfg.SOLVER
        if s.IMS_PER_BATCH % (world * s.ACCUMULATION_STEPS):
            raise ConfigError(f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} must be divisible by processes ({world}) "
                              f"× SOLVER.ACCUMULATION_STEPS ({s.ACCUMULATION_STEPS})")
        self.thing_classes = thing_classes(cfg)
        self.id_map = dataset_id_map(cfg)

        seed_all(self.seed)  # same initial weights on every rank
        model = self.build_model(cfg).to(self.device)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        amp_dtype = _amp_dtype(cfg, self.device)
        self.ema = ModelEMA.maybe_build(cfg, model)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler,
                                         max_to_keep=s.MAX_TO_KEEP, ema=self.ema)
        self.checkpointer.extra_state = lambda: {"hooks": self.trainer.hook_states()}
        self.start_iter = 0
        rng = None
        ckpt = self.checkpointer.resume() if resume else None
        if ckpt is not None:
            self.start_iter = int(ckpt["iteration"])
            self.seed = int(ckpt.get("seed", self.seed))
            rng = ckpt.get("rng")
        elif cfg.MODEL.WEIGHTS:
            load_weights(model, cfg.MODEL.WEIGHTS)
            if self.ema is not None:
                self.ema.reset(model)  # the average starts from the loaded weights

        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                        find_unused_parameters=cfg.MODEL.DDP_FIND_UNUSED_PARAMETERS)
        data = self.build_train_loader(cfg, seed=self.seed, start_iter=self.start_iter)
        clip = cfg.SOLVER.CLIP_GRADIENTS
        self.scheduler = scheduler
        self.trainer = SimpleTrainer(
            model, data, optimizer, accumulation_steps=s.ACCUMULATION_STEPS,
            clip_type=clip.CLIP_TYPE if clip.ENABLED else None, clip_value=clip.CLIP_VALUE,
            norm_type=clip.NORM_TYPE, amp_dtype=amp_dtype, max_nonfinite_steps=s.MAX_NONFINITE_STEPS,
        )
        self.checkpointer.scaler = self.trainer.scaler
        if ckpt is not None and self.trainer.scaler is not None and "scaler" in ckpt:
            self.trainer.scaler.load_state_dict(ckpt["scaler"])
        with H.signals_ignored():  # loader workers ignore Ctrl-C/SIGTERM: the trainer saves and stops
            _ = self.trainer.data_iter  # create the iterator before the RNG streams are set
        if rng:
            set_rng_state(rng[comm.get_rank() % len(rng)])
        else:
            seed_all(self.seed + comm.get_rank())  # per-rank streams for training randomness
        self.trainer.register_hooks(self.build_hooks())
        if ckpt is not None:
            self.trainer.load_hook_states(ckpt.get("hooks"))

    # ------------------------------------------------------------------ parts
    @classmethod
    def build_model(cls, cfg: Config) -> nn.Module:
        from surgdino.modeling import build_model

        model = build_model(cfg)
        if hasattr(model, "set_class_names") and not model.class_names:  # text-prompted models: the dataset's classes
            model.set_class_names(thing_classes(cfg))
        return model

    @classmethod
    def build_train_loader(cls, cfg: Config, *, seed: int, start_iter: int):
        """Infinite iterator of per-process micro-batches (lists of dicts), ``ACCUMULATION_STEPS`` per
        iteration, continuing after ``start_iter`` iterations."""
        from surgdino.data.loader import build_train_loader

        if not cfg.DATASETS.TRAIN:
            raise ConfigError("DATASETS.TRAIN is empty; name the training datasets (e.g. DATASETS.TRAIN "
                              "\"['synthetic_trays_train']\") or declare them under DATASETS.REGISTER")
        return build_train_loader(cfg, seed=seed, start_iter=start_iter * cfg.SOLVER.ACCUMULATION_STEPS)

    def _extra(self) -> dict[str, Any]:
        return {"seed": self.seed, "thing_classes": self.thing_classes,
                "thing_dataset_id_to_contiguous_id": self.id_map, "config": self.cfg.dump()}

    def build_hooks(self) -> list[H.HookBase]:
        """In order: timer, schedule, EMA, evaluation + best model, writers, periodic checkpoint (after the
        iteration's evaluation and metrics, so a checkpoint holds them), plots, checkpoint on a signal."""
        cfg = self.cfg
        out = cfg.OUTPUT_DIR
        metrics_path = os.path.join(out, "metrics.jsonl")
        writers: list[Any] = []
        console = None
        if comm.is_main_process():
            os.makedirs(out, exist_ok=True)
            if self.start_iter > 0:
                _truncate_metrics(metrics_path, self.start_iter)
            writers = [JSONWriter(metrics_path), TensorboardWriter(out)]
            console = ConsoleWriter(self.start_iter, cfg.SOLVER.MAX_ITER)
        writer = H.PeriodicWriter(writers, cfg.SOLVER.LOG_PERIOD, console)
        plot = H.PlotHook(metrics_path, out)
        periodic = H.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.MAX_ITER,
                                          self._extra)
        hooks: list[H.HookBase] = [H.IterationTimer(), H.LRScheduler(self.scheduler)]
        if self.ema is not None:
            hooks.append(H.EMAHook(self.ema))
        if cfg.DATASETS.TEST:
            best = H.BestCheckpointer(self.checkpointer, cfg.TEST.BEST_METRIC, cfg.TEST.BEST_MODE)

            def on_results(done: int, flat: dict[str, float]) -> None:
                best.update(done, flat)
                writer.write_results(done, flat)
                if done < cfg.SOLVER.MAX_ITER:  # the final curves are drawn after training
                    plot.plot()

            hooks += [H.EvalHook(cfg.TEST.EVAL_PERIOD, lambda: self.test(cfg, unwrap(self.trainer.model)),
                                 on_results=on_results, ema=self.ema), best]
        if cfg.VIS_PERIOD > 0:
            hooks.append(H.VisualizationHook(cfg.VIS_PERIOD, out, self.thing_classes))
        hooks += [writer, periodic, plot, H.InterruptCheckpointer(periodic)]
        return hooks

    # ------------------------------------------------------------------ run
    def train(self) -> dict[str, Any]:
        """Train to ``SOLVER.MAX_ITER``; returns the last evaluation results (rank 0)."""
        t0 = time.perf_counter()
        self.trainer.train(self.start_iter, self.cfg.SOLVER.MAX_ITER)
        self.train_seconds = time.perf_counter() - t0
        for h in self.trainer._hooks:
            if isinstance(h, H.EvalHook):
                return h.last_results
        return {}

    @classmethod
    def test(cls, cfg: Config, model: nn.Module) -> dict[str, Any]:
        """Evaluate on each of ``DATASETS.TEST``; the first dataset's metrics at top level, others under
        their names. Saves results, the per-class AP table and plot under ``OUTPUT_DIR/inference/<name>``."""
        return evaluate(cfg, model)


def check_inputs(cfg: Config, *, train: bool) -> None:
    """Fail early (before spawning processes) on missing weights or empty/unknown datasets."""
    if not train and not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs weights: add MODEL.WEIGHTS path/to/model_final.pth")
    if cfg.MODEL.WEIGHTS and not os.path.isfile(os.path.expanduser(cfg.MODEL.WEIGHTS)):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}; give an existing .pth path "
                          "or MODEL.WEIGHTS \"\" to start from scratch")
    register_datasets(cfg)
    from surgdino.data.catalog import DatasetCatalog

    names = list(cfg.DATASETS.TRAIN) if train else list(cfg.DATASETS.TEST)
    if not names:
        key = "DATASETS.TRAIN" if train else "DATASETS.TEST"
        raise ConfigError(f"{key} is empty; name a dataset declared under DATASETS.REGISTER or 'synthetic_trays_*'")
    for name in names + (list(cfg.DATASETS.TEST) if train else []):
        if not DatasetCatalog.get(name):
            raise DataError(f"dataset {name!r} has no images; check its json_file and image_root")
    from surgdino.data.checks import check_datasets

    check_datasets(cfg, train=train)  # class counts vs NUM_CLASSES (errors), queries vs instances (warnings)
