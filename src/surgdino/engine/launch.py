"""Start one process per device (``--num-gpus``/``--num-machines``) or join a torchrun job.

gloo on CPU, nccl on CUDA. Under ``torchrun`` the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) is read and no process is spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from surgdino.errors import ConfigError, SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)


def find_free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """True when started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"


def _bind_device(device: str, local_rank: int) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def launch(main_func: Callable[..., Any], num_gpus_per_machine: int = 1, *, num_machines: int = 1,
           machine_rank: int = 0, dist_url: str = "auto", device: str = "cpu", args: tuple = ()) -> Any:
    """Run ``main_func(*args)`` in every process of the job; returns its result in a single process.

    ``num_gpus_per_machine`` processes are started on this machine (on CPU too: useful for tests);
    ``dist_url`` ``auto`` picks a free loopback port (single machine only).
    """
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if world > 1 and not dist.is_initialized():
            _bind_device(device, local_rank)
            dist.init_process_group(_backend(device), init_method="env://", world_size=world, rank=rank,
                                    timeout=timedelta(minutes=30))
            logger.info("torchrun process %d/%d (local %d), backend %s", rank, world, local_rank,
                        dist.get_backend())
        try:
            return main_func(*args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    if num_gpus_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--num-gpus {num_gpus_per_machine} --num-machines {num_machines} --machine-rank "
                          f"{machine_rank}: need num-gpus >= 1, num-machines >= 1, 0 <= machine-rank < num-machines")
    world = num_gpus_per_machine * num_machines
    if world == 1:
        return main_func(*args)
    if device.startswith("cuda") and torch.cuda.device_count() < num_gpus_per_machine:
        raise ConfigError(f"--num-gpus {num_gpus_per_machine} but this machine has {torch.cuda.device_count()} "
                          "CUDA devices; lower --num-gpus or set MODEL.DEVICE cpu")
    if dist_url == "auto":
        if num_machines > 1:
            raise ConfigError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    logger.info("starting %d processes (%d per machine), %s", world, num_gpus_per_machine, dist_url)
    context = mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn", join=False,
                                 args=(main_func, world, num_gpus_per_machine, machine_rank, dist_url, device, args))
    previous = _forward_signals(context)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == 2:
            raise SurgDinoError(f"process {e.error_index} stopped with the error printed above") from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return None


def _forward_signals(context: Any) -> dict[int, Any]:
    """While the workers run, SIGTERM to this launcher goes on to each of them (they save a checkpoint and
    stop); SIGINT is ignored here: a terminal's Ctrl-C reaches the workers directly."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum, frame) -> None:
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    return {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}


def _worker(local_rank: int, main_func: Callable[..., Any], world: int, per_machine: int, machine_rank: int,
            dist_url: str, device: str, args: tuple) -> None:
    rank = machine_rank * per_machine + local_rank
    _bind_device(device, local_rank)
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    dist.init_process_group(_backend(device), init_method=dist_url, world_size=world, rank=rank,
                            timeout=timedelta(minutes=30))
    try:
        main_func(*args)
    except SurgDinoError as e:
        print(f"surgdino (process {rank}): error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist.destroy_process_group()
