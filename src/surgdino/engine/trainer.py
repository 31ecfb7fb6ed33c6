"""The training loop: a tiny core (``SimpleTrainer.run_step``) with everything else in hooks.

``run_step`` is three small steps: ``forward_backward`` draws ``accumulation_steps`` micro-batches
(lists of per-image dicts) and runs forward/backward on each (DDP gradient sync only on the last);
``nonfinite_terms`` agrees across processes whether any loss was NaN/inf (then the step is skipped);
``optimizer_step`` clips gradients and steps the optimizer (with the AMP scaler). The learning-rate
schedule, the weight average (EMA), checkpoints, evaluation and writers are hooks
(``surgdino.engine.hooks``). A hook may hold state (``state_dict``/``load_state_dict``): checkpoints store
every hook's state and ``--resume`` gives it back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from surgdino import comm
from surgdino.engine.writers import EventStorage
from surgdino.errors import SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)


class NonFiniteLossError(SurgDinoError):
    """Training stopped: the loss was NaN/inf for too many steps in a row."""


class HookBase:
    """Called by the trainer around training and each step; ``self.trainer`` is set on registration.

    A hook with state to keep over ``--resume`` returns it from ``state_dict`` (plain values and
    tensors) and takes it back in ``load_state_dict`` (called after registration, before training).
    """

    trainer: TrainerBase

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainerBase:
    """Runs hooks around ``run_step`` for iterations ``start_iter .. max_iter - 1``."""

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.storage = EventStorage()

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        for h in hooks:
            if h is not None:
                h.trainer = self
                self._hooks.append(h)

    def _hook_keys(self) -> list[str]:
        """A stable name per hook: its class name, with ``#n`` for the second and later of a class."""
        seen: dict[str, int] = {}
        keys = []
        for h in self._hooks:
            name = type(h).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def hook_states(self) -> dict[str, dict[str, Any]]:
        """``{hook name: state}`` of the hooks that hold state (stored in checkpoints)."""
        out = {}
        for key, h in zip(self._hook_keys(), self._hooks):
            state = h.state_dict()
            if state:
                out[key] = state
        return out

    def load_hook_states(self, states: dict[str, dict[str, Any]] | None) -> None:
        """Give each registered hook its state from ``hook_states()`` of a checkpoint."""
        states = dict(states or {})
        for key, h in zip(self._hook_keys(), self._hooks):
            if key in states:
                h.load_state_dict(states.pop(key))
        if states:
            logger.info("checkpoint has state of hooks not used now (ignored): %s", ", ".join(sorted(states)))

    def train(self, start_iter: int, max_iter: int) -> None:
        logger.info("starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.storage = EventStorage(start_iter)
        try:
            for h in self._hooks:
                h.before_train()
            for self.iter in range(start_iter, max_iter):
                self.storage.iter = self.iter
                for h in self._hooks:
                    h.before_step()
                self.run_step()
                for h in self._hooks:
                    h.after_step()
            self.iter += 1
        finally:
            for h in self._hooks:
                h.after_train()

    def run_step(self) -> None:
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """One optimizer step per batch; gradient accumulation, clipping, AMP and non-finite skips.

    ``stepped`` tells the hooks whether the last ``run_step`` changed the weights (the EMA hook averages
    only then).
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[list[dict[str, Any]]],
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        clip_type: str | None = None,
        clip_value: float = 0.0,
        norm_type: float = 2.0,
        amp_dtype: torch.dtype | None = None,
        max_nonfinite_steps: int = 5,
    ):
        super().__init__()
        self.model = model
        self.data_loader = data_loader
        self._data_iter = None
        self.optimizer = optimizer
        self.accumulation_steps = max(1, accumulation_steps)
        self.clip_type = clip_type
        self.clip_value = clip_value
        self.norm_type = norm_type
        self.amp_dtype = amp_dtype
        device = next(model.parameters()).device
        self.device_type = device.type
        self.scaler = (torch.amp.GradScaler(self.device_type)
                       if amp_dtype is torch.float16 and self.device_type == "cuda" else None)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.stepped = False
        self.last_losses: dict[str, float] = {}
        self.last_batch: list[dict[str, Any]] = []

    @property
    def data_iter(self):
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        return self._data_iter

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def run_step(self) -> None:
        assert self.model.training, "model must be in train mode"
        self.optimizer.zero_grad(set_to_none=True)
        totals, local_bad, data_time, device = self.forward_backward()
        bad_terms = self.nonfinite_terms(local_bad, device)
        self.stepped = False
        if bad_terms:
            self._skip(bad_terms)
            return
        self.nonfinite_in_a_row = 0
        self.stepped = self.optimizer_step()
        self._log(totals, data_time)

    def forward_backward(self) -> tuple[dict[str, float], set[str], float, torch.device | None]:
        """Forward/backward over ``accumulation_steps`` micro-batches, each loss weighted 1/steps.

        Returns (loss terms summed over micro-batches, this process's non-finite terms, data time, device).
        Backward runs even on a non-finite loss (its gradients are discarded later): every DDP process must
        take part in the gradient all-reduce.
        """
        totals: dict[str, float] = {}
        local_bad: set[str] = set()
        data_time = 0.0
        weight = 1.0 / self.accumulation_steps
        device = None
        for i in range(self.accumulation_steps):
            t0 = time.perf_counter()
            chunk = next(self.data_iter)
            data_time += time.perf_counter() - t0
            self.last_batch = chunk
            last = i == self.accumulation_steps - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss_dict = self.model(chunk)
                losses = sum(loss_dict.values())
                device = losses.device
                local_bad.update(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
                loss = losses * weight
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * weight
        return totals, local_bad, data_time, device

    def nonfinite_terms(self, local_bad: set[str], device: torch.device | None) -> list[str]:
        """The loss terms non-finite on any process (collective when distributed); [] when all are finite."""
        if not any_rank(bool(local_bad), device):
            return []
        return sorted({t for terms in comm.all_gather(sorted(local_bad)) for t in terms}) or ["loss"]

    def optimizer_step(self) -> bool:
        """Unscale (AMP), clip, step; False when the AMP scaler skipped the step (inf gradients)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._clip()
        if self.scaler is None:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale drops when the step was skipped

    def _skip(self, bad_terms: list[str]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        logger.warning("iteration %d: non-finite %s; step skipped (%d in a row)", self.iter + 1,
                       ", ".join(bad_terms), self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad_terms)} non-finite for {self.nonfinite_in_a_row} steps in a row "
                f"(iteration {self.iter + 1}); lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, or turn "
                "SOLVER.AMP.ENABLED off"
            )

    def _clip(self) -> None:
        if not self.clip_type or self.clip_value <= 0:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_type == "full_model":
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_value, self.norm_type)
            self.storage.put_scalar("grad_norm", float(norm))
        elif self.clip_type == "norm":
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], self.clip_value, self.norm_type)
        else:
            torch.nn.utils.clip_grad_value_(params, self.clip_value)

    def _log(self, totals: dict[str, float], data_time: float) -> None:
        keys = sorted(totals)
        vals = torch.tensor([totals[k] for k in keys] + [data_time], dtype=torch.float64)
        if comm.get_world_size() > 1:
            vals = torch.stack([torch.as_tensor(v, dtype=torch.float64)
                                for v in comm.all_gather(vals)]).mean(0)
        reduced = dict(zip(keys, vals[:-1].tolist()))
        total = sum(v for k, v in reduced.items() if k.startswith("loss"))
        self.last_losses = {"total_loss": total, **reduced}
        self.storage.put_scalar("data_time", float(vals[-1]))
        self.storage.put_scalar("total_loss", total)
        for k, v in reduced.items():
            self.storage.put_scalar(k, v)
        if not math.isfinite(total):
            logger.warning("iteration %d: logged total loss is non-finite", self.iter + 1)


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True if ``flag`` is true on any process (collective when distributed)."""
    if comm.get_world_size() == 1:
        return flag
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
