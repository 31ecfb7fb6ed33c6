"""AdamW/SGD with per-group decay and backbone LR multiplier; warmup + multistep/cosine by iteration."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from surgdino.log import get_logger

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
# Parameter names that are embeddings even when they are plain nn.Parameters.
_EMBED_WORDS = ("pos_embed", "position_embedding", "level_embed", "query_embed", "query_feat",
                "cls_token", "rel_pos", "absolute_pos_embed", "relative_position_bias_table")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def get_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    weight_decay_bias: float = 0.0,
    backbone_multiplier: float = 1.0,
) -> list[dict[str, Any]]:
    """One group per (lr, weight decay) pair: norms, embeddings and biases get their own decay and the
    parameters under a ``backbone`` module get ``base_lr * backbone_multiplier``; those under a module with an
    ``lr_multiplier`` attribute (e.g. a text encoder) are also multiplied by the innermost one."""
    mults = {n: float(m.lr_multiplier) for n, m in model.named_modules() if hasattr(m, "lr_multiplier")}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _is_norm(module):
                wd = weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(w in full for w in _EMBED_WORDS):
                wd = weight_decay_embed
            elif p_name == "bias" or p.ndim <= 1:
                wd = weight_decay_bias
            else:
                wd = weight_decay
            lr = base_lr * backbone_multiplier if "backbone" in full.split(".") else base_lr
            owners = [n for n in mults if not n or mod_name == n or mod_name.startswith(n + ".")]
            lr *= mults[max(owners, key=len)] if owners else 1.0
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``SOLVER.OPTIMIZER`` over :func:`get_param_groups`."""
    s = cfg.SOLVER
    groups = get_param_groups(
        model, base_lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_embed=s.WEIGHT_DECAY_EMBED, weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        backbone_multiplier=s.BACKBONE_MULTIPLIER,
    )
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM)
    return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY)


class WarmupSchedule:
    """LR factor at an iteration: warmup (linear or constant) then multistep or cosine decay.

    A plain picklable object so ``LambdaLR.state_dict`` stores it with the checkpoint.
    """

    def __init__(self, *, max_iter: int, steps: list[int] | tuple[int, ...] = (), gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_factor: float = 1.0, warmup_method: str = "linear",
                 name: str = "WarmupMultiStepLR"):
        self.max_iter = max_iter
        self.steps = sorted(steps)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method
        self.name = name

    def __call__(self, it: int) -> float:
        if self.name == "WarmupCosineLR":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / max(self.max_iter, 1)))
        else:
            factor = self.gamma ** sum(1 for s in self.steps if it >= s)
        if it < self.warmup_iters:
            if self.warmup_method == "constant":
                warm = self.warmup_factor
            else:
                alpha = it / self.warmup_iters
                warm = self.warmup_factor * (1 - alpha) + alpha
            factor *= warm
        return factor


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule from ``SOLVER.*``; stepped once after each optimizer step."""
    s = cfg.SOLVER
    steps = [x for x in s.STEPS if x <= s.MAX_ITER]
    if len(steps) != len(s.STEPS):
        get_logger(__name__).warning("SOLVER.STEPS %s beyond MAX_ITER %d are ignored", s.STEPS, s.MAX_ITER)
    sched = WarmupSchedule(max_iter=s.MAX_ITER, steps=steps, gamma=s.GAMMA, warmup_iters=s.WARMUP_ITERS,
                           warmup_factor=s.WARMUP_FACTOR, warmup_method=s.WARMUP_METHOD,
                           name=s.LR_SCHEDULER_NAME)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, sched)


def scale_config(cfg, world_size: int):
    """Rescale batch, LR and schedule (linear scaling rule); returns ``cfg`` unchanged if not asked.

    ``SOLVER.REFERENCE_WORLD_SIZE`` > 0: the batch was tuned for that many processes; IMS_PER_BATCH
    becomes IMS_PER_BATCH × world / reference. ``SOLVER.REFERENCE_IMS_PER_BATCH`` > 0: the LR and
    schedule were tuned for that batch. In both cases BASE_LR scales with the batch and MAX_ITER,
    STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD scale inversely.
    """
    s = cfg.SOLVER
    batch, ref = s.IMS_PER_BATCH, 0
    if s.REFERENCE_WORLD_SIZE > 0 and s.REFERENCE_WORLD_SIZE != world_size:
        ref = batch
        batch = max(1, round(batch * world_size / s.REFERENCE_WORLD_SIZE))
    elif s.REFERENCE_IMS_PER_BATCH > 0 and s.REFERENCE_IMS_PER_BATCH != batch:
        ref = s.REFERENCE_IMS_PER_BATCH
    if not ref or ref == batch:
        return cfg
    k = batch / ref
    out = cfg.merge({
        "SOLVER.IMS_PER_BATCH": batch,
        "SOLVER.BASE_LR": s.BASE_LR * k,
        "SOLVER.MAX_ITER": max(1, round(s.MAX_ITER / k)),
        "SOLVER.STEPS": [max(1, round(x / k)) for x in s.STEPS],
        "SOLVER.WARMUP_ITERS": round(s.WARMUP_ITERS / k),
        "SOLVER.CHECKPOINT_PERIOD": max(1, round(s.CHECKPOINT_PERIOD / k)),
        "TEST.EVAL_PERIOD": round(cfg.TEST.EVAL_PERIOD / k),
    }, source="batch rescaling")
    get_logger(__name__).info(
        "rescaled for batch %d (reference %d): BASE_LR %.3g, MAX_ITER %d, STEPS %s",
        batch, ref, out.SOLVER.BASE_LR, out.SOLVER.MAX_ITER, out.SOLVER.STEPS,
    )
    return out
