"""Evaluation hooks: periodic evaluation (with the EMA weights swapped in), the best model and its record
over ``--resume``, and drawings of training predictions; each keeps the training RNG streams untouched."""

from __future__ import annotations

import contextlib
import math
import random
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
    """Evaluate every ``period`` iterations and at the end; ``on_results(done, flat results)`` gets each
    evaluation (e.g. ``BestCheckpointer.update``, the metric writers).

    ``eval_function()`` returns the evaluation results (rank 0; other ranks may get ``{}``). It runs
    with the training RNG streams preserved, so evaluating does not change what training does next.
    With an ``ema`` (``ModelEMA``) it runs with the EMA weights swapped into the trainer's model (the
    training weights are restored after), so the best model is chosen by the EMA's results.
    """

    def __init__(self, period: int, eval_function: Callable[[], dict[str, Any]], *,
                 on_results: Callable[[int, dict[str, float]], None] | None = None, ema: Any = None):
        self.period = period
        self.eval_function = eval_function
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

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done == self.trainer.max_iter or (self.period > 0 and done % self.period == 0):
            self._do_eval(done)


class BestCheckpointer(HookBase):
    """Keeps ``model_best.pth``: the checkpoint of the evaluation with the best ``metric`` so far.

    It listens to the evaluation (``EvalHook(on_results=best.update)``) and is registered as a hook so its
    record (best value and iteration) is saved in every checkpoint and restored by ``--resume``: after a
    resume a worse evaluation does not replace ``model_best.pth``.
    """

    def __init__(self, checkpointer: Checkpointer | None, metric: str = "segm/AP", mode: str = "max"):
        self.checkpointer = checkpointer
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.best_iter: int | None = None

    def update(self, done: int, flat: dict[str, float]) -> bool:
        """Save ``model_best`` if ``flat[metric]`` beats the record; True when it did."""
        value = flat.get(self.metric)
        if value is None:
            if flat:
                logger.warning("TEST.BEST_METRIC %s not among the results %s", self.metric, sorted(flat))
            return False
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if not better:
            logger.info("%s (%%) = %.3f at iteration %d; the best stays %.3f (iteration %s)", self.metric, value, done,
                        self.best, self.best_iter)
            return False
        self.best, self.best_iter = value, done
        if self.checkpointer is not None:
            self.checkpointer.save("model_best", iteration=done, update_last=False, best_metric=self.metric,
                                   best_value=value)
        logger.info("best %s (%%) = %.3f at iteration %d", self.metric, value, done)
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {"metric": self.metric, "mode": self.mode, "best": float(self.best), "iteration": self.best_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            logger.info("best-model record of %s (%s) not used: TEST.BEST_METRIC is now %s (%s)",
                        state.get("metric"), state.get("mode"), self.metric, self.mode)
            return
        self.best, self.best_iter = float(state["best"]), state.get("iteration")
        logger.info("best %s (%%) so far: %.3f at iteration %s (model_best.pth)", self.metric, self.best, self.best_iter)


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
