"""Training hooks: timing, LR schedule, weight average (EMA), periodic checkpoints, writers, plots, and a
checkpoint on SIGINT/SIGTERM; the evaluation hooks (evaluation, best model, drawings) live in
``eval_hooks`` and are re-exported here. Hooks with state (the best value so far, the metrics not yet
written) keep it over ``--resume`` through ``state_dict``/``load_state_dict``."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from surgdino import comm
from surgdino.engine.checkpointer import Checkpointer
from surgdino.engine.eval_hooks import (  # noqa: F401  (re-exported: hooks.EvalHook, ...)
    BestCheckpointer,
    EvalHook,
    VisualizationHook,
    flatten_results,
    preserved_rng,
)
from surgdino.engine.trainer import HookBase, any_rank
from surgdino.errors import SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)


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


@contextlib.contextmanager
def signals_ignored(names: tuple[str, ...] = ("SIGINT", "SIGTERM")):
    """SIGINT/SIGTERM ignored within the block (main thread only): processes started here (data-loading
    workers) inherit that, so a Ctrl-C to the whole process group reaches only the trainer, which saves a
    checkpoint and stops, instead of killing the workers mid-batch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
