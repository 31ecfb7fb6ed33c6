"""Training hooks: timing and LR, periodic checkpoints, periodic evaluation with the best model, writers, plots."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from surgdino import comm
from surgdino.engine.checkpointer import Checkpointer
from surgdino.engine.trainer import HookBase
from surgdino.log import get_logger

logger = get_logger(__name__)


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. evaluation) without changing the torch/numpy/python RNG streams of training."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


class IterationTimer(HookBase):
    """Step time and the learning rate of each step (the largest over groups: the non-backbone one)."""

    def before_train(self) -> None:
        self._start = time.perf_counter()

    def before_step(self) -> None:
        self._t = time.perf_counter()
        lr = max(g["lr"] for g in self.trainer.optimizer.param_groups)
        self.trainer.storage.put_scalar("lr", lr)

    def after_step(self) -> None:
        self.trainer.storage.put_scalar("time", time.perf_counter() - self._t)

    def after_train(self) -> None:
        done = self.trainer.iter - self.trainer.start_iter
        total = time.perf_counter() - self._start
        if done > 0:
            logger.info("trained %d iterations in %.1f s (%.3f s/it)", done, total, total / done)


class PeriodicCheckpointer(HookBase):
    """``model_{iter:07d}.pth`` every ``period`` completed iterations and ``model_final.pth`` at the end."""

    def __init__(self, checkpointer: Checkpointer, period: int, max_iter: int,
                 extra: Callable[[], dict[str, Any]] | None = None):
        self.checkpointer = checkpointer
        self.period = period
        self.max_iter = max_iter
        self.extra = extra or (lambda: {})

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.max_iter:
            self.checkpointer.save(f"model_{done:07d}", iteration=done, **self.extra())
        if done == self.max_iter:
            self.checkpointer.save("model_final", iteration=done, **self.extra())


def flatten_results(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"segm": {"AP": 50}}`` → ``{"segm/AP": 50}``; non-numeric leaves and per-class tables dropped."""
    out: dict[str, float] = {}
    for k, v in results.items():
        if k == "per_class":
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_results(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


class EvalHook(HookBase):
    """Evaluate every ``period`` iterations and at the end; keep the best model as ``model_best.pth``.

    ``eval_function()`` returns the evaluation results (rank 0; other ranks may get ``{}``). It runs
    with the training RNG streams preserved, so evaluating does not change what training does next.
    With an ``ema`` (``ModelEMA``) it runs with the EMA weights swapped into the trainer's model (the
    training weights are restored after), so the best model is chosen by the EMA's results;
    ``model_best.pth`` holds both (``"model"`` and ``"ema"``).
    """

    def __init__(self, period: int, eval_function: Callable[[], dict[str, Any]], *,
                 checkpointer: Checkpointer | None = None, best_metric: str = "segm/AP", mode: str = "max",
                 on_results: Callable[[int, dict[str, float]], None] | None = None, ema: Any = None):
        self.period = period
        self.eval_function = eval_function
        self.checkpointer = checkpointer
        self.best_metric = best_metric
        self.mode = mode
        self.best: float | None = None
        self.on_results = on_results
        self.last_results: dict[str, Any] = {}
        self.ema = ema
        self._ema_logged = False

    def _weights(self):
        if self.ema is None:
            return contextlib.nullcontext()
        if not self._ema_logged:
            logger.info("evaluating with the EMA weights (MODEL_EMA.ENABLED, %d updates so far); "
                        "checkpoints keep the training weights too", self.ema.updates)
            self._ema_logged = True
        return self.ema.applied(self.trainer.model)

    def _do_eval(self, done: int) -> None:
        with preserved_rng(), self._weights():
            results = self.eval_function()
        self.trainer.model.train()
        self.last_results = results or {}
        flat = comm.all_gather(flatten_results(self.last_results))[0]
        if self.on_results is not None:
            self.on_results(done, flat)
        value = flat.get(self.best_metric)
        if value is None:
            if flat:
                logger.warning("TEST.BEST_METRIC %s not among the results %s", self.best_metric, sorted(flat))
            return
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            if self.checkpointer is not None:
                self.checkpointer.save("model_best", iteration=done, update_last=False,
                                       best_metric=self.best_metric, best_value=value)
            logger.info("best %s = %.3f at iteration %d", self.best_metric, value, done)

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done == self.trainer.max_iter or (self.period > 0 and done % self.period == 0):
            self._do_eval(done)


class PeriodicWriter(HookBase):
    """Every ``period`` iterations (and the last): mean scalars since the previous write to the writers;
    the console progress bar advances every step."""

    def __init__(self, writers: list[Any], period: int = 20, console: Any = None):
        self.writers = writers
        self.period = period
        self.console = console
        self._since = 0

    def before_train(self) -> None:
        self._since = self.trainer.start_iter
        if self.console is not None:
            self.console.start()

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.console is not None:
            loss = self.trainer.storage.latest().get("total_loss")
            self.console.step(1, {"loss": f"{loss[1]:.3f}"} if loss else None)
        if done % self.period == 0 or done == self.trainer.max_iter:
            self.write(done)

    def write(self, done: int) -> None:
        scalars = self.trainer.storage.mean_since(self._since)
        self._since = self.trainer.iter + 1
        if not scalars or not comm.is_main_process():
            return
        for w in self.writers + ([self.console] if self.console is not None else []):
            w.write(done, scalars)

    def write_results(self, done: int, flat: dict[str, float]) -> None:
        """Evaluation metrics (``segm/AP`` …) to the file writers at iteration ``done``."""
        if comm.is_main_process() and flat:
            for w in self.writers:
                w.write(done, flat)

    def after_train(self) -> None:
        for w in self.writers:
            w.close()
        if self.console is not None:
            self.console.close()


class PlotHook(HookBase):
    """PNG plots of loss terms and AP over iterations from ``metrics.jsonl`` (rank 0, at the end)."""

    def __init__(self, metrics_path: str, out_dir: str):
        self.metrics_path = metrics_path
        self.out_dir = out_dir
        self._drawn: tuple[int, int] | None = None  # (size, mtime) of the metrics file last drawn

    def plot(self) -> None:
        """Draw unless ``metrics.jsonl`` is unchanged since the last drawing (matplotlib takes seconds)."""
        if not comm.is_main_process():
            return
        try:
            st = os.stat(self.metrics_path)
        except OSError:
            return
        sig = (st.st_size, st.st_mtime_ns)
        if sig != self._drawn:
            plot_metrics(self.metrics_path, self.out_dir)
            self._drawn = sig

    def after_train(self) -> None:
        self.plot()


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Draw training curves with ``surgdino.visualize``; logs and returns ``[]`` when unavailable."""
    if not os.path.isfile(metrics_path):
        return []
    try:
        from surgdino.visualize import plot_training_curves
    except ImportError as e:
        logger.info("training curves not drawn: %s", e)
        return []
    try:
        paths = plot_training_curves(metrics_path, out_dir)
    except Exception as e:  # a plotting failure must not lose a finished training run
        logger.warning("training curves not drawn: %s: %s", type(e).__name__, e)
        return []
    return list(paths or [])


class VisualizationHook(HookBase):
    """Every ``period`` iterations draw the model's predictions on the first image of the current
    training batch beside its ground truth, into TensorBoard (``VIS_PERIOD``; rank 0)."""

    def __init__(self, period: int, log_dir: str, class_names: list[str] | None = None,
                 score_threshold: float = 0.3):
        self.period = period
        self.log_dir = log_dir
        self.class_names = class_names or None
        self.score_threshold = score_threshold
        self._writer = None

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        batch = getattr(self.trainer, "last_batch", None)
        if self.period <= 0 or done % self.period or not batch or not comm.is_main_process():
            return
        from surgdino.engine.checkpointer import unwrap
        from surgdino.visualize import draw_instances

        sample = batch[0]
        h, w = sample["image"].shape[-2:]
        model = unwrap(self.trainer.model)
        with preserved_rng(), torch.no_grad():
            model.eval()
            try:
                pred = model([{**sample, "height": h, "width": w}])[0]
            finally:
                model.train()
        image = sample["image"].permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
        keep = pred["scores"].detach().cpu() >= self.score_threshold
        drawn = draw_instances(image, pred["boxes"].detach().cpu()[keep], pred["masks"].detach().cpu()[keep],
                               pred["labels"].detach().cpu()[keep], self.class_names,
                               pred["scores"].detach().cpu()[keep])
        inst = sample.get("instances") or {}
        gt = draw_instances(image, inst.get("boxes", torch.zeros(0, 4)), inst.get("masks"),
                            inst.get("classes", torch.zeros(0, dtype=torch.int64)), self.class_names)
        both = np.concatenate([gt, drawn], axis=1)  # [H, 2W, 3]: ground truth | predictions
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        self._writer.add_image("train/gt_vs_pred", both, done, dataformats="HWC")
        self._writer.flush()

    def after_train(self) -> None:
        if self._writer is not None:
            self._writer.close()
