"""Exponential moving average (EMA) of the model's weights, for evaluation and the saved model.

``ModelEMA`` keeps float32 copies of every entry of the unwrapped model's state dict (parameters and
buffers; non-float buffers such as BatchNorm's ``num_batches_tracked`` are copied, not averaged) on the
model's device. After each optimizer step that was taken (skipped non-finite steps do not count; with
gradient accumulation once per iteration) ``update(model)`` moves each average towards the weights::

    d = min(decay, (1 + n) / (10 + n))        # n = updates already applied (0 at the first one)
    ema = d * ema + (1 - d) * weights

The ramp keeps early averages from being dominated by the random initialisation: the first update
keeps 10 % of the initial weights, the 90th 91/100 … until ``decay`` is reached. ``applied(model)``
swaps the averages into the model for evaluation and puts the training weights back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from surgdino.config.keys.engine import check_decay
from surgdino.engine.checkpointer import unwrap
from surgdino.errors import CheckpointError
from surgdino.log import get_logger

logger = get_logger(__name__)


def effective_decay(decay: float, n: int) -> float:
    """The decay of update number ``n`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


class ModelEMA:
    """Moving averages of a model's state dict (see the module docstring).

    ``model`` may be wrapped in DistributedDataParallel; every process keeps its own (identical) copy.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = check_decay(decay, "decay")
        self.updates = 0
        state = unwrap(model).state_dict()
        self.float_keys = [k for k, v in state.items() if v.is_floating_point()]
        self.other_keys = [k for k, v in state.items() if not v.is_floating_point()]
        self.state: dict[str, torch.Tensor] = {
            k: (v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.detach().clone())
            for k, v in state.items()
        }

    @classmethod
    def maybe_build(cls, cfg, model: nn.Module) -> ModelEMA | None:
        """``None`` unless ``MODEL_EMA.ENABLED``; ``MODEL_EMA.DECAY`` outside [0, 1) is a ConfigError."""
        decay = check_decay(cfg.MODEL_EMA.DECAY)
        if not cfg.MODEL_EMA.ENABLED:
            return None
        return cls(model, decay)

    # ------------------------------------------------------------------ averaging
    def _model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = unwrap(model).state_dict()
        if len(state) != len(self.state) or any(k not in state for k in self.float_keys):
            raise ValueError("ModelEMA.update: the model's state dict no longer matches the averaged one")
        return state

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights."""
        state = self._model_tensors(model)
        d = effective_decay(self.decay, self.updates)
        ema = [self.state[k] for k in self.float_keys]
        cur = [state[k] if state[k].dtype == torch.float32 else state[k].float() for k in self.float_keys]
        if ema:
            torch._foreach_lerp_(ema, cur, 1.0 - d)  # ema + (1 - d) (cur - ema) = d ema + (1 - d) cur
        for k in self.other_keys:
            self.state[k].copy_(state[k])
        self.updates += 1

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the EMA weights; its own weights are restored exactly after."""
        state = self._model_tensors(model)
        keys = list(state)
        dst = [state[k] for k in keys]
        backup = [t.clone() for t in dst]
        with torch.no_grad():
            torch._foreach_copy_(dst, [self.state[k] for k in keys])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(dst, backup)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"model": averaged state dict, "updates": n, "decay": d}``; ``"model"`` is named like the
        model's own state dict, so ``load_weights`` reads it as weights."""
        return {"model": dict(self.state), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("model") if isinstance(state, dict) else None
        if not isinstance(weights, dict):
            raise CheckpointError("EMA state has no 'model' entry (expected ModelEMA.state_dict())")
        missing = sorted(set(self.state) - set(weights))
        unexpected = sorted(set(weights) - set(self.state))
        if missing or unexpected:
            raise CheckpointError(f"EMA state does not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in weights.items():
                if v.shape != self.state[k].shape:
                    raise CheckpointError(f"EMA state {k}: shape {tuple(v.shape)} vs model {tuple(self.state[k].shape)}")
                self.state[k].copy_(v)
        self.updates = int(state.get("updates", 0))
        if "decay" in state and float(state["decay"]) != self.decay:
            logger.info("EMA decay %.6g from the config (the checkpoint used %.6g)", self.decay, float(state["decay"]))

    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s current weights (update count 0)."""
        state = self._model_tensors(model)
        with torch.no_grad():
            for k, v in state.items():
                self.state[k].copy_(v)
        self.updates = 0
