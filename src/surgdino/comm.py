"""torch.distributed helpers that also work in a single process (no process group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: Any, dst: int = 0) -> list[Any]:
    """Every rank's ``obj`` on ``dst`` (other ranks get ``[]``)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out if out is not None else []


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (a copy; the input is unchanged)."""
    if get_world_size() == 1:
        return t.clone()
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()


def reduce_dict(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of each scalar tensor over processes, for logging."""
    if get_world_size() == 1 or not values:
        return {k: v.detach() for k, v in values.items()}
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))
