"""Nothing lost in ``OUTPUT_DIR``: a second training never silently replaces a finished or running one.

``check_output_dir`` refuses to start a new run in a folder that holds one (checkpoints,
``metrics.jsonl``) unless it is resumed (``--resume``) or explicitly started over (``--overwrite``, which
removes the previous run's checkpoints, metrics and event files first). ``OutputLock`` keeps two processes
from training into one folder at once; the lock of a process that no longer runs (a crash, SIGKILL) is
taken over with a log line.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time

from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".surgdino.lock"
# the files of a training run that --overwrite removes (log.txt is appended to, config.yaml rewritten)
RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.jsonl", "events.out.tfevents.*")


def run_files(out: str) -> list[str]:
    """The previous run's files in ``out`` (checkpoints, ``last_checkpoint``, metrics, TensorBoard events)."""
    found: list[str] = []
    for pattern in RUN_FILES:
        found += glob.glob(os.path.join(glob.escape(out), pattern))
    return sorted(p for p in found if os.path.isfile(p) and not (p.endswith("metrics.jsonl") and
                                                                 os.path.getsize(p) == 0))


def check_output_dir(out: str, *, resume: bool, overwrite: bool, command: str = "train",
                     output_flag: str = "OUTPUT_DIR") -> None:
    """Refuse a fresh run where one exists (see the module docstring); ``--overwrite`` clears it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{output_flag} {out} is a file, not a folder; give a folder for the run's outputs")
    if resume and overwrite:
        raise ConfigError(f"{command}: --resume continues the run in {out}, --overwrite deletes it; give one")
    files = run_files(out) if os.path.isdir(out) else []
    if resume or not files:
        return
    if overwrite:
        for p in files:
            os.remove(p)
        logger.info("--overwrite: removed %d file(s) of the previous run in %s", len(files), out)
        return
    finished = os.path.isfile(os.path.join(out, "model_final.pth"))
    kind = "a finished training run" if finished else "an unfinished training run"
    names = ", ".join(sorted({os.path.basename(p) for p in files})[:4])
    raise ConfigError(f"{out} holds {kind} ({names}); continue it with `surgdino {command} ... --resume`"
                      f"{' (with a larger SOLVER.MAX_ITER)' if finished else ''}, start over with --overwrite "
                      f"(deletes its checkpoints and metrics), or set another {output_flag}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``OUTPUT_DIR/.surgdino.lock`` while a run writes there (a context manager)."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_NAME)
        self._held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (holder.get("host") != me["host"] or _alive(holder["pid"])):
                    where = f"process {holder['pid']} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                    raise ConfigError(
                        f"{self.out} is in use by another training run ({where}); wait for it to finish or set "
                        f"another OUTPUT_DIR (if no such run is going on, delete {self.path})") from None
                what = f"process {holder['pid']}, no longer running" if holder else "unreadable"
                logger.info("taking over the stale lock %s (%s)", self.path, what)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise ConfigError(f"{self.path}: could not take the lock; another run may be starting in {self.out}")

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
