"""Checkpoints: one file holds model, optimizer, scheduler, iteration, RNG states, hook states and config.

Files are written atomically (temp file, then rename) and a ``last_checkpoint`` text file names the
newest one (fvcore's convention; a bare file name inside the output folder — anything else is refused).
``resume`` restores everything; ``load_weights`` loads model weights only, skipping missing, unexpected and
mismatched-shape tensors with a log line; besides our checkpoints it reads detectron2-style ``.pkl`` files
(``{"model": {name: numpy array}}``, as written by ``surgdino convert convnext --format d2``) and the weights
of a bare backbone (official ImageNet ConvNeXt, timm, ours), which the converters backbones register in
``surgdino.checkpoint_io`` turn into ``backbone.*``; a file with an ``"ema"`` entry (trained with
``MODEL_EMA.ENABLED``) gives its moving-average weights, the ones evaluation used. Every file is read by
``surgdino.checkpoint_io`` (weights only, never code); a corrupt or truncated file raises
``CheckpointError``; resuming falls back to the previous good checkpoint.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import re
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from surgdino import comm
from surgdino.checkpoint_io import (
    UnsafeCheckpointError,
    as_tensor,
    convert_weights,
    load_file,
    shape_mismatches,
    unwrap_state_dict,
)
from surgdino.errors import CheckpointError
from surgdino.log import get_logger

logger = get_logger(__name__)

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
TMP_SUFFIX = ".tmp"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def atomic_write(path: str, write: Callable[[IO[Any]], None], *, mode: str = "wb") -> None:
    """``write(f)`` into ``path.tmp<pid>``, fsync, then rename: a crash never leaves a half-written ``path``.

    A failed write (disk full, ...) removes the temp file, keeps the previous ``path`` and raises one
    ``CheckpointError`` line.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        kept = "the previous file is kept" if os.path.isfile(path) else "nothing was written"
        raise CheckpointError(f"cannot write {path}: {why} ({kept}); free space in "
                              f"{os.path.dirname(os.path.abspath(path))} or use another OUTPUT_DIR, then "
                              "continue with --resume") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the ``*.pth.tmp<pid>`` files a killed write left in ``folder`` (call while holding its lock)."""
    pattern = os.path.join(glob.escape(folder), f"*.pth{TMP_SUFFIX}*")
    removed = glob.glob(pattern) + glob.glob(os.path.join(glob.escape(folder), f"last_checkpoint{TMP_SUFFIX}*"))
    for path in removed:
        _remove_quietly(path)
    if removed:
        logger.info("removed %d partial file(s) of an interrupted write: %s", len(removed),
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint file (``torch.save`` or a detectron2 ``.pkl``) to CPU, weights only; ``CheckpointError``
    naming the file if missing, unreadable or unsafe (``checkpoint_io.UnsafeCheckpointError``)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it (e.g. model_final.pth)")
    if re.match(r"^[a-z][a-z0-9+]*://", path):  # detectron2://, https:// ... (official configs name such URLs)
        raise CheckpointError(f"MODEL.WEIGHTS {path} is a URL; SurgDINO downloads nothing: fetch the file yourself "
                              "and give its path (or MODEL.WEIGHTS '' to start from random weights)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}; check MODEL.WEIGHTS or the path given")
    try:
        obj = load_file(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _state_dict_of(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint, as tensors named like our full model.

    Wrappers and DDP's ``module.`` go (``checkpoint_io.unwrap_state_dict``); a backbone's own layouts
    (e.g. bare ConvNeXt weights) are converted by the converters registered in ``checkpoint_io``.
    """
    state = unwrap_state_dict(obj)
    converted = convert_weights(state)
    if converted is not None:
        return converted
    return {k: t for k, t in ((k, as_tensor(v)) for k, v in state.items()) if t is not None}


def load_weights(model: nn.Module, path: str, *, prefer_ema: bool = True) -> dict[str, Any]:
    """Weights only: copy tensors whose names and shapes match; log skipped and missing ones.

    A checkpoint with an ``"ema"`` entry (``MODEL_EMA.ENABLED``) gives its EMA weights, the ones that
    evaluation during training used, unless ``prefer_ema`` is False. Returns the checkpoint's other
    entries (e.g. ``thing_classes``).
    """
    obj = read_checkpoint(path)
    ema = obj.get("ema")
    if prefer_ema and isinstance(ema, dict) and isinstance(ema.get("model"), dict) and ema["model"]:
        logger.info("%s: loading its EMA weights ('ema', after %s updates), the weights evaluation used",
                    path, ema.get("updates", "?"))
        source = ema
    else:
        source = obj
    state = _state_dict_of(source)
    if not state:
        raise CheckpointError(f"{path}: no model weights found (expected a state dict or a 'model' entry)")
    model = unwrap(model)
    check = getattr(model, "check_weights_layout", None)  # a model may refuse a layout it would compute wrongly
    if callable(check):
        check(unwrap_state_dict(source), path)
    own = model.state_dict()
    wrong = shape_mismatches(state, own)
    mismatched = [f"{k}: checkpoint {theirs} vs model {ours}" for k, theirs, ours in wrong]
    skip = {k for k, _, _ in wrong}
    ok: dict[str, torch.Tensor] = {k: v for k, v in state.items() if k in own and k not in skip}
    if not ok:
        raise CheckpointError(
            f"{path}: none of its {len(state)} tensors match the model's parameter names; "
            "is it a checkpoint of this architecture (convert official weights with `surgdino convert`)?"
        )
    model.load_state_dict(ok, strict=False)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(ok))
    logger.info("loaded %d/%d tensors from %s", len(ok), len(own), path)
    if mismatched:  # one line: a 500-class model over an 80-class checkpoint skips only its class-sized tensors
        logger.info("skipped (shape mismatch, kept initialised) %s", "; ".join(mismatched))
    if missing:
        logger.info("not in checkpoint (kept initialised): %s",
                    _short([f"{k} {list(own[k].shape)}" for k in missing], n=50))
    if unexpected:
        logger.info("in checkpoint but not in the model (ignored): %s", _short(unexpected))
    return {k: v for k, v in obj.items() if k not in ("model", "optimizer", "scheduler", "scaler", "ema")}


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" … (+{len(names) - n})" if len(names) > n else "")


def get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            logger.warning("CUDA RNG state not restored (different number of devices)")


def read_last_checkpoint(pointer: str) -> str | None:
    """The bare file name in a ``last_checkpoint`` file; None (with a warning) when it is unreadable or not
    UTF-8; a path (absolute, with a folder or ``..``) is refused: it could point outside the output folder."""
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("%s: unreadable (%s); looking for the newest model_*.pth instead", pointer, type(e).__name__)
        return None
    if not name:
        return None
    if name in (".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{pointer}: names {name!r}, not a file name inside {os.path.dirname(pointer) or '.'}; "
                              "refused for safety (it may point outside OUTPUT_DIR); write the name of one of "
                              "the folder's model_*.pth files into it, or delete it")
    return name


class Checkpointer:
    """Saves and restores training state under ``save_dir``; only rank 0 writes files.

    With an ``ema`` (``ModelEMA``) every file also holds ``"ema"``, its state, and resuming restores it.
    """

    def __init__(self, model: nn.Module, save_dir: str, *, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, scaler: Any = None, max_to_keep: int = 0, ema: Any = None):
        self.model = model
        self.ema = ema
        self.save_dir = save_dir
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.max_to_keep = max_to_keep
        self.extra_state: Callable[[], dict[str, Any]] | None = None  # e.g. the trainer's hook states

    # ------------------------------------------------------------------ saving
    def save(self, name: str, *, update_last: bool = True, **extra: Any) -> str | None:
        """Write ``save_dir/name.pth`` with all state plus ``extra``; update ``last_checkpoint``.

        Collective: every rank must call it (RNG states are gathered to rank 0).
        """
        rng = comm.gather(get_rng_state())
        if not comm.is_main_process():
            return None
        data: dict[str, Any] = {"model": unwrap(self.model).state_dict(), "rng": rng,
                                **(self.extra_state() if self.extra_state is not None else {}), **extra}
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            data["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            data["ema"] = self.ema.state_dict()
        path = os.path.join(self.save_dir, f"{name}.pth")
        atomic_save(data, path)
        if update_last:
            self._write_last(os.path.basename(path))
        logger.info("saved checkpoint %s", path)
        self._prune()
        return path

    def _write_last(self, basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(basename), mode="w")

    def _prune(self) -> None:
        if self.max_to_keep <= 0:
            return
        periodic = self.periodic_checkpoints()
        for path in periodic[: -self.max_to_keep]:
            os.remove(path)

    # ------------------------------------------------------------------ finding
    def periodic_checkpoints(self) -> list[str]:
        """``model_NNNNNNN.pth`` files in iteration order."""
        if not os.path.isdir(self.save_dir):
            return []
        names = sorted(n for n in os.listdir(self.save_dir) if _PERIODIC.match(n))
        return [os.path.join(self.save_dir, n) for n in names]

    def last_checkpoint(self) -> str | None:
        """The file named by ``last_checkpoint`` (or the newest periodic one), if any."""
        pointer = os.path.join(self.save_dir, "last_checkpoint")
        if os.path.isfile(pointer):
            name = read_last_checkpoint(pointer)
            path = os.path.join(self.save_dir, name) if name else ""
            if name and os.path.isfile(path):
                return path
        periodic = self.periodic_checkpoints()
        return periodic[-1] if periodic else None

    def _candidates(self) -> list[str]:
        """Resume candidates, newest first: the pointer's file, ``model_final.pth``, then periodic ones by iteration."""
        out: list[str] = []
        last = self.last_checkpoint()
        if last:
            out.append(last)
        final = os.path.join(self.save_dir, "model_final.pth")
        if os.path.isfile(final) and final not in out:
            out.append(final)
        out += [p for p in reversed(self.periodic_checkpoints()) if p not in out]
        return out

    # ------------------------------------------------------------------ loading
    def resume(self) -> dict[str, Any]:
        """Restore full state from the newest readable checkpoint.

        A corrupt or truncated file is reported and the previous one is tried; no checkpoint at all, or none
        readable, is a ``CheckpointError`` (``--resume`` never silently starts over), and so is one whose
        tensors do not fit the model (a changed config).
        """
        candidates = self._candidates()
        if not candidates:
            raise CheckpointError(f"--resume: no checkpoint in {self.save_dir} (no last_checkpoint, model_final.pth "
                                  "or model_*.pth); check OUTPUT_DIR, or leave out --resume to start a new run")
        for path in candidates:
            try:
                obj = read_checkpoint(path)
                if "iteration" not in obj or "model" not in obj:
                    raise CheckpointError(f"{path}: not a training checkpoint (no iteration/model entries)")
            except UnsafeCheckpointError:
                raise  # a planted file: stop, do not quietly resume from an older one
            except CheckpointError as e:
                logger.warning("%s; trying the previous checkpoint", e)
                continue
            self._check_fits(obj, path)
            try:
                self._restore(obj)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:  # optimizer groups, schedule, ...
                raise CheckpointError(
                    f"--resume: {path} does not fit this run's optimizer/schedule ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160] if str(e) else ''}); resume with the run's own config "
                    f"({os.path.join(self.save_dir, 'config.yaml')}) or start a new OUTPUT_DIR") from None
            logger.info("resumed from %s at iteration %d", path, obj["iteration"])
            obj["path"] = path
            return obj
        raise CheckpointError(f"--resume: none of the {len(candidates)} checkpoint(s) in {self.save_dir} can be read "
                              "(see the warnings above); leave out --resume and set MODEL.WEIGHTS to a good file, "
                              "or start a new OUTPUT_DIR")

    def _check_fits(self, obj: dict[str, Any], path: str) -> None:
        """One clear error when the checkpoint's model does not match the configured one."""
        own = unwrap(self.model).state_dict()
        theirs = obj["model"]
        mismatched = [f"{k} {a} in the checkpoint vs {b} in the model" for k, a, b in shape_mismatches(theirs, own)]
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        if not (mismatched or missing or unexpected):
            return
        what = (f"{len(mismatched)} tensor shape(s) differ, e.g. {mismatched[0]}" if mismatched else
                f"{len(missing)} missing / {len(unexpected)} unexpected tensors, e.g. "
                f"{(missing or unexpected)[0]}")
        raise CheckpointError(
            f"--resume: {path} does not fit the configured model ({what}); resume with the run's own config "
            f"({os.path.join(self.save_dir, 'config.yaml')}) and the same overrides, or start a new OUTPUT_DIR "
            "with MODEL.WEIGHTS pointing at this file (weights only, mismatches skipped)")

    def restore_ema(self, obj: dict[str, Any]) -> None:
        """The EMA state of a training checkpoint; one without (trained with EMA off) restarts the average
        from the restored weights, with a log line."""
        if isinstance(obj.get("ema"), dict):
            self.ema.load_state_dict(obj["ema"])
        else:
            logger.info("the checkpoint has no EMA state (trained with MODEL_EMA.ENABLED off): the moving "
                        "average starts from the resumed weights")
            self.ema.reset(self.model)

    def _restore(self, obj: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(obj["model"])
        if self.optimizer is not None and "optimizer" in obj:
            self.optimizer.load_state_dict(obj["optimizer"])
        if self.scheduler is not None and "scheduler" in obj:
            state = dict(obj["scheduler"])
            if "lr_lambdas" in state:  # the schedule's shape comes from the current config (MAX_ITER may grow)
                state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
            self.scheduler.load_state_dict(state)
        if self.scaler is not None and "scaler" in obj:
            self.scaler.load_state_dict(obj["scaler"])
        if self.ema is not None:
            self.restore_ema(obj)
        rng = obj.get("rng")
        if rng:
            rank = comm.get_rank()
            if len(rng) != comm.get_world_size():
                logger.warning("checkpoint has RNG states of %d processes, running %d: ranks reuse them "
                               "modulo; data order and randomness will differ", len(rng), comm.get_world_size())
            set_rng_state(rng[rank % len(rng)])
