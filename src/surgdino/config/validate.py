"""Cross-key checks run after merging (conflicting keys are errors that say the fix)."""

from __future__ import annotations

from surgdino.config.core import Config
from surgdino.errors import ConfigError


def validate(cfg: Config) -> None:
    s = cfg.SOLVER
    if s.STEPS and any(b <= a for a, b in zip(s.STEPS, s.STEPS[1:])):
        raise ConfigError(f"SOLVER.STEPS = {s.STEPS} must be increasing")
    if s.IMS_PER_BATCH < 1:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} must be >= 1")
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE in ("absolute", "absolute_range") and len(cfg.INPUT.CROP.SIZE) != 2:
        raise ConfigError(f"INPUT.CROP.SIZE = {cfg.INPUT.CROP.SIZE} must hold two numbers")
    for hook in _EXTRA_CHECKS:
        hook(cfg)


_EXTRA_CHECKS: list = []


def register_check(fn):
    """Modules add cross-key checks of their own section (e.g. the pixel decoder's feature levels)."""
    _EXTRA_CHECKS.append(fn)
    return fn
