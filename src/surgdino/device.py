"""Device resolution, one implementation for every command: ``auto`` → cuda if available, else cpu.

A device that was asked for and is not there (``cuda`` without CUDA, ``cuda:7`` on a 2-GPU machine, a
typo) is a ``ConfigError`` naming the setting: the toolkit never silently falls back to the CPU.
"""

from __future__ import annotations

import resource

import torch

from surgdino.errors import ConfigError


def resolve_device(name: str | torch.device | None, key: str = "MODEL.DEVICE") -> torch.device:
    """The ``torch.device`` for ``name`` (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); ``key``
    names the setting in errors (``MODEL.DEVICE``, ``--device``)."""
    text = "auto" if name is None else str(name).strip()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key} = {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} = {text} but no CUDA device is available; set {key} cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= count:
            raise ConfigError(f"{key} = {text} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key} = {text} but MPS is not available; set {key} cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key} = {text!r}: {device.type} devices are not supported; use auto, cpu or cuda")
    return device


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far in MiB and what it measures: CUDA's peak allocation, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "peak CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"  # kB on Linux
