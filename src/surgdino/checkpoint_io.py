"""Reading weight files without running code, and finding the weights inside them.

Every file a user hands in (``MODEL.WEIGHTS``, ``--resume`` checkpoints, ``convert --source``) is read
here: ``torch.load(weights_only=True)`` with an explicit allow-list of what our own checkpoints hold
besides tensors (numpy arrays, dtypes and scalars, from RNG states); detectron2 ``.pkl`` files go
through ``RestrictedUnpickler``, which admits only numpy arrays, dtypes, scalars and plain containers.
There is no fallback to a plain unpickler. A file that would need anything else is refused with one
line naming the file and the object (``UnsafeCheckpointError``).

``unwrap_state_dict`` is the one way to take the model weights out of a checkpoint's wrappers; the
``WEIGHT_CONVERTERS`` list is filled by backbones on import (e.g. ConvNeXt turns official/timm weights
into ``backbone.*`` names), so the engine converts weights without importing any backbone.
This module sits at the bottom of the package's layers (it imports only ``errors`` and ``log``).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from surgdino.errors import CheckpointError
from surgdino.log import get_logger

logger = get_logger(__name__)


class UnsafeCheckpointError(CheckpointError):
    """A file that would execute code or build arbitrary Python objects when loaded."""


_NUMPY_CORE = "numpy._core." if hasattr(np, "_core") else "numpy.core."


def _numpy_globals() -> list[Any]:
    """numpy's array reconstruction, ndarray, dtype (and its per-type classes) and scalars."""
    out: list[Any] = [np.ndarray, np.dtype]
    m = __import__(_NUMPY_CORE + "multiarray", fromlist=["_reconstruct"])
    n = __import__(_NUMPY_CORE + "numeric", fromlist=["_frombuffer"])
    out += [m._reconstruct, m.scalar, n._frombuffer]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


SAFE_GLOBALS = _numpy_globals()

# (module, name) pairs the detectron2 .pkl unpickler accepts; numpy's module moved in numpy 2
_PKL_ALLOWED = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2 (numpy array data)
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
}


def _storage_from_bytes(data: bytes) -> Any:
    """A tensor storage as ``pickle.dump(tensor)`` writes it (``torch.save`` bytes inside), read weights-only
    (torch's own ``_load_from_bytes`` would allow any object)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# torch tensors pickled with plain pickle (MaskDINO's convert-pretrained-swin-model-to-d2.py writes such .pkl)
_PKL_TORCH = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
              ("torch.storage", "_load_from_bytes"): _storage_from_bytes}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars, plain containers and plainly pickled torch tensors (their
    storages read weights-only); any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PKL_TORCH:
            return _PKL_TORCH[(module, name)]
        if (module, name) in _PKL_ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            if module == "__builtin__":
                module = "builtins"
            elif module.startswith(("numpy.core.", "numpy._core.")):
                module = _NUMPY_CORE + module.rsplit(".", 1)[1]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")


def _refused(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused for safety: it holds the Python object {what}, which loading would run (only tensors, numpy "
        "arrays and plain containers are loaded); if you trust the file, re-save just its weights with "
        "torch.save(model.state_dict(), path)")


def load_pickle_file(path: str) -> Any:
    """A detectron2-style ``.pkl`` through ``RestrictedUnpickler`` (latin1: Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise _refused(path, found.group(1)) from None
        raise CheckpointError(_unreadable(path, e)) from None
    except OSError:
        raise
    except Exception as e:  # truncated stream, garbage bytes
        raise CheckpointError(_unreadable(path, e)) from None


def _unreadable(path: str, e: BaseException) -> str:
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return (f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first}); the file is corrupt or "
            "truncated — use another checkpoint")


def _disallowed(path: str, error: BaseException) -> str | None:
    """The global a weights-only load refused, or None when the failure was something else."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        if found:
            return found[0]
    except Exception:  # not a zip checkpoint: read the name from the message
        pass
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    return m.group(1) if m else None


def load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True)`` to CPU with ``SAFE_GLOBALS``; a plain pickle (a ``.pkl`` under
    another name) is read by ``RestrictedUnpickler``. Unsafe → ``UnsafeCheckpointError``; unreadable →
    ``CheckpointError``."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": refused or read below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = _disallowed(path, e)
        if what is not None:
            raise _refused(path, what) from None
        if not zipfile.is_zipfile(path):
            return load_pickle_file(path)
        raise CheckpointError(_unreadable(path, e)) from None
    except OSError:
        raise
    except Exception as e:  # truncated zip, wrong format
        if not zipfile.is_zipfile(path) and _looks_like_pickle(path):
            return load_pickle_file(path)
        raise CheckpointError(_unreadable(path, e)) from None


def _looks_like_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]")


def load_file(path: str) -> Any:
    """Any weight file: ``.pkl`` by ``load_pickle_file``, everything else by ``load_torch_file``."""
    if path.endswith(".pkl"):
        return load_pickle_file(path)
    return load_torch_file(path)


# ---------------------------------------------------------------- finding the weights

_WRAPPERS = ("model_ema", "model", "state_dict", "model_state")


def unwrap_state_dict(obj: Mapping[str, Any], keys: tuple[str, ...] = _WRAPPERS) -> dict[str, Any]:
    """The weights inside ``{"model"|"state_dict"|...: weights}`` wrappers (up to 3 deep, ``keys`` in order of
    preference), with DDP's ``module.`` prefix removed."""
    state: Mapping[str, Any] = obj
    for _ in range(3):
        for key in keys:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner:
                state = inner
                break
        else:
            break
    arrays = [k for k, v in state.items() if hasattr(v, "shape")]
    if arrays and all(isinstance(k, str) and k.startswith("module.") for k in arrays):
        state = {(k[len("module."):] if k in arrays else k): v for k, v in state.items()}
    return dict(state)


def as_tensor(v: Any) -> torch.Tensor | None:
    """A tensor for a tensor or numeric numpy array; None for anything else."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray) and v.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(v))
    return None


def shape_mismatches(state: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple, tuple]]:
    """``(name, shape in state, shape in own)`` for each tensor of ``state`` whose name ``own`` has with
    another shape, in ``state``'s order (names only one side has are not mismatches)."""
    return [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]


Converter = Callable[[dict[str, Any]], "dict[str, torch.Tensor] | None"]
WEIGHT_CONVERTERS: list[Converter] = []


def register_weight_converter(fn: Converter) -> Converter:
    """Add ``fn(unwrapped state) → full-model state dict or None`` (None: not this converter's format).
    Backbones register theirs on import; ``convert_weights`` tries them in order."""
    if fn not in WEIGHT_CONVERTERS:
        WEIGHT_CONVERTERS.append(fn)
    return fn


def convert_weights(obj: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The first registered converter's result for the unwrapped state ``obj``, or None when none
    recognises it."""
    for fn in WEIGHT_CONVERTERS:
        out = fn(obj)
        if out is not None:
            return out
    return None
