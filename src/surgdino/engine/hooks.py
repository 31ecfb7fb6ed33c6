"""Training hooks: timing, LR schedule, weight average (EMA), periodic checkpoints, evaluation, the best model,
writers, plots, and a checkpoint on SIGINT/SIGTERM. Hooks with state (the best value so far, the metrics
not yet written) keep it over ``--resume`` through ``state_dict``/``load_state_dict``."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from surgdino import comm
from surgdino.engine.checkpointer import Checkpointer
from surgdino.engine.trainer import HookBase, any_rank
from surgdino.errors import SurgDinoError
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
    """Step time and the learning rate of each step (the largest over groups: the non-backbone one); at the
    end the seconds per iteration of training alone (evaluation and checkpoints excluded)."""

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._stepping = 0.0

    def before_step(self) -> None:
        self._t = time.perf_counter()
        lr = max(g["lr"] for g in self.trainer.optimizer.param_groups)
        self.trainer.storage.put_scalar("lr", lr)

    def after_step(self) -> None:  # registered first: runs before the other hooks' after_step
        dt = time.perf_counter() - self._t
        self._stepping += dt
        self.trainer.storage.put_scalar("time", dt)

    def after_train(self) -> None:
        done = self.trainer.iter - self.trainer.start_iter
        total = time.perf_counter() - self._start
        if done > 0:
            logger.info("trained %d iterations in %.1f s: %.3f s/it training (evaluation, checkpoints and "
                        "writing %.1f s more)", done, total, self._stepping / done, total - self._stepping)


class LRScheduler(HookBase):
    """Steps the learning-rate schedule after every iteration (taken or skipped). Register it before the
    checkpoint hooks: a checkpoint holds the schedule of the next iteration."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def after_step(self) -> None:
        self.scheduler.step()


class EMAHook(HookBase):
    """Moves the weight average (``ModelEMA``) towards the weights after each step that was taken (skipped
    non-finite steps do not count; with accumulation once per iteration). Its state is saved as ``"ema"``
    by the ``Checkpointer``."""

    def __init__(self, ema: Any):
        self.ema = ema

    def after_step(self) -> None:
        if self.trainer.stepped:
            self.ema.update(self.trainer.model)


class PeriodicCheckpointer(HookBase):
    """``model_{iter:07d}.pth`` every ``period`` completed iterations and ``model_final.pth`` at the end."""

    def __init__(self, checkpointer: Checkpointer, period: int, max_iter: int,
                 extra: Callable[[], dict[str, Any]] | None = None):
        self.checkpointer = checkpointer
        self.period = period
        self.max_iter = max_iter
        self.extra = extra or (lambda: {})
        self.last_saved = -1

    def save(self, done: int, name: str | None = None) -> str | None:
        path = self.checkpointer.save(name or f"model_{done:07d}", iteration=done, **self.extra())
        self.last_saved = done
        return path

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.max_iter:
            self.save(done)
        if done == self.max_iter:
            self.save(done, "model_final")


class TrainingInterrupted(SurgDinoError):
    """SIGINT/SIGTERM stopped training after a checkpoint of the current iteration was saved."""


class InterruptCheckpointer(HookBase):
    """On SIGINT (Ctrl-C) or SIGTERM (what schedulers send) finish the current iteration, save
    ``model_{iter:07d}.pth`` and stop with ``TrainingInterrupted`` (continue with ``--resume``).

    Register it last, so the iteration's other hooks (metrics, periodic checkpoint) ran. The handlers are
    installed for the training only (main thread); a second Ctrl-C stops at once. All processes agree
    on stopping (a collective per step when distributed).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, periodic: PeriodicCheckpointer):
        self.periodic = periodic
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum
        self._restore()  # a second signal acts as without this hook
        logger.warning("%s received: stopping after iteration %d with a checkpoint (again to stop at once)",
                       signal.Signals(signum).name, self.trainer.iter + 1)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def before_train(self) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handler)

    def after_step(self) -> None:
        if not any_rank(self.received is not None):
            return
        done = self.trainer.iter + 1
        path = None
        if self.periodic.last_saved != done:
            path = self.periodic.save(done)
        else:
            path = self.periodic.checkpointer.last_checkpoint()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        raise TrainingInterrupted(f"stopped by {name} after iteration {done}: saved {path}; continue with the "
                                  "same command and --resume")

    def after_train(self) -> None:
        self._restore()


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
            logger.info("%s = %.3f at iteration %d; the best stays %.3f (iteration %s)", self.metric, value, done,
                        self.best, self.best_iter)
            return False
        self.best, self.best_iter = value, done
        if self.checkpointer is not None:
            self.checkpointer.save("model_best", iteration=done, update_last=False, best_metric=self.metric,
                                   best_value=value)
        logger.info("best %s = %.3f at iteration %d", self.metric, value, done)
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
        logger.info("best %s so far: %.3f at iteration %s (model_best.pth)", self.metric, self.best, self.best_iter)


class PeriodicWriter(HookBase):
    """Every ``period`` iterations (and the last): mean scalars since the previous write to the writers;
    the console progress bar advances every step. The scalars not yet written are part of its state, so a
    resumed run writes the same lines as an uninterrupted one whatever the checkpoint period."""

    def __init__(self, writers: list[Any], period: int = 20, console: Any = None):
        self.writers = writers
        self.period = period
        self.console = console
        self._since = 0
        self._pending: dict[str, Any] | None = None

    def before_train(self) -> None:
        self._since = self.trainer.start_iter
        if self._pending is not None:
            self._since = int(self._pending["since"])
            self.trainer.storage.restore_history(self._pending["history"])
            self._pending = None
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

    def state_dict(self) -> dict[str, Any]:
        return {"since": self._since, "history": self.trainer.storage.history_since(self._since)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

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
    """Draw training curves with ``surgdino.visualize``; logs and returns ``[]`` when unavailable. Files are
    drawn into a temp folder and moved in whole (``inference.draw_into``): never a 0-byte PNG."""
    if not os.path.isfile(metrics_path):
        return []
    try:
        from surgdino.visualize import plot_training_curves
    except ImportError as e:
        logger.info("training curves not drawn: %s", e)
        return []
    from surgdino.engine.inference import draw_into

    return draw_into(out_dir, lambda tmp: plot_training_curves(metrics_path, tmp))


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
