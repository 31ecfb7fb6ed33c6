"""Training engine: trainer core + hooks, checkpoints, optimizer and schedule, launch, writers, predictor.

Names are imported on first use (PEP 562), so the command line builds its parser without torch
(``launch``: import it from ``surgdino.engine.launch``, the submodule of that name).
"""
from __future__ import annotations

from surgdino.lazy import lazy_exports

_EXPORTS = {
    "Checkpointer": "surgdino.engine.checkpointer",
    "load_weights": "surgdino.engine.checkpointer",
    "Trainer": "surgdino.engine.defaults",
    "default_setup": "surgdino.engine.defaults",
    "eval_only": "surgdino.engine.run",
    "train_main": "surgdino.engine.run",
    "evaluate": "surgdino.engine.inference",
    "inference_on_dataset": "surgdino.engine.inference",
    "EvalHook": "surgdino.engine.hooks",
    "PeriodicCheckpointer": "surgdino.engine.hooks",
    "PeriodicWriter": "surgdino.engine.hooks",
    "build_lr_scheduler": "surgdino.engine.optimizer",
    "build_optimizer": "surgdino.engine.optimizer",
    "get_param_groups": "surgdino.engine.optimizer",
    "HookBase": "surgdino.engine.trainer",
    "NonFiniteLossError": "surgdino.engine.trainer",
    "SimpleTrainer": "surgdino.engine.trainer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
