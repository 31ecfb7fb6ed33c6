"""Metric storage and writers: console (tqdm bar with ETA and it/s), ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from typing import Any

from surgdino.errors import SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)


class EventStorage:
    """Scalars per iteration: the trainer and hooks ``put_scalar``; writers read the recent window."""

    def __init__(self, start_iter: int = 0, window: int = 1000):
        self.iter = start_iter
        self.window = window
        self._history: dict[str, deque[tuple[int, float]]] = defaultdict(lambda: deque(maxlen=window))
        self._latest: dict[str, tuple[int, float]] = {}

    def put_scalar(self, name: str, value: float, smooth: bool = True) -> None:
        value = float(value)
        self._latest[name] = (self.iter, value)
        if smooth:
            self._history[name].append((self.iter, value))

    def put_scalars(self, **values: float) -> None:
        for k, v in values.items():
            self.put_scalar(k, v)

    def latest(self) -> dict[str, tuple[int, float]]:
        return dict(self._latest)

    def median(self, name: str) -> float:
        vals = sorted(v for _, v in self._history[name])
        return vals[len(vals) // 2] if vals else float("nan")

    def history_since(self, since: int) -> dict[str, list[tuple[int, float]]]:
        """The smoothed scalars of iterations ``since ..`` now, per name (a writer's unwritten window)."""
        out = {name: [(it, v) for it, v in hist if it >= since] for name, hist in self._history.items()}
        return {k: v for k, v in out.items() if v}

    def restore_history(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """Put back a ``history_since`` (from a checkpoint) before the values of the iterations that follow."""
        for name, items in history.items():
            hist = self._history[name]
            older = list(hist)
            hist.clear()
            hist.extend([(int(it), float(v)) for it, v in items] + older)

    def mean_since(self, since: int) -> dict[str, float]:
        """Mean of each scalar over the iterations ``since ..`` now (within the window)."""
        out = {}
        for name, hist in self._history.items():
            vals = [v for it, v in hist if it >= since]
            if vals:
                out[name] = sum(vals) / len(vals)
        return out


class JSONWriter:
    """Appends one JSON line of scalars per write to ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        try:
            self._f.write(json.dumps({"iter": iteration, **scalars}, sort_keys=True) + "\n")
            self._f.flush()
        except OSError as e:  # a full disk: one line, the checkpoints so far are intact
            raise SurgDinoError(f"cannot write {self.path}: {e.strerror or e}; free space or use another "
                                "OUTPUT_DIR, then continue with --resume") from None

    def close(self) -> None:
        self._f.close()


class TensorboardWriter:
    """Scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir)

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, iteration)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


_MAIN_TERM = re.compile(r"^loss_[a-z]+$")  # the final layer's terms: no _0.._N, _dn, _interm suffix


def main_loss_terms(scalars: dict[str, float], limit: int = 8) -> list[str]:
    """The names the console shows: ``total_loss``, then the final layer's loss terms (``loss_ce``,
    ``loss_mask`` …, not the auxiliary ``loss_ce_3``/``_dn``/``_interm`` ones) up to ``limit``."""
    names = ["total_loss"] if "total_loss" in scalars else []
    return names + sorted(k for k in scalars if _MAIN_TERM.match(k))[: limit - len(names)]


class ConsoleWriter:
    """A tqdm progress bar (ETA, it/s) updated every step, plus a log line with the total and main loss
    terms every write (all terms go to ``metrics.jsonl`` and TensorBoard)."""

    def __init__(self, start_iter: int, max_iter: int, enable_bar: bool = True):
        self.start_iter = start_iter
        self.max_iter = max_iter
        self.enable_bar = enable_bar
        self._bar = None

    def start(self) -> None:
        """Show the progress bar (called when training starts)."""
        if self.enable_bar and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_iter, initial=self.start_iter, desc="train", unit="it",
                             dynamic_ncols=True, leave=True)

    def step(self, n: int = 1, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        losses = "  ".join(f"{k}: {scalars[k]:.4g}" for k in main_loss_terms(scalars))
        lr = scalars.get("lr")
        eta = ""
        if self._bar is not None:
            rate = self._bar.format_dict.get("rate")
            if rate:
                eta = f"  eta: {_fmt_time((self.max_iter - iteration) / rate)}  {rate:.2f} it/s"
        msg = f"iter: {iteration}/{self.max_iter}  {losses}" + (f"  lr: {lr:.3g}" if lr is not None else "") + eta
        if self._bar is not None:
            self._bar.write(f"[{get_logger().name}] {msg}")
            _file_only(msg)
        else:
            logger.info(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _file_only(msg: str) -> None:
    """Log ``msg`` to file handlers only (the console already shows it above the bar)."""
    import logging

    root = get_logger()
    record = root.makeRecord(root.name, logging.INFO, __file__, 0, msg, None, None)
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
