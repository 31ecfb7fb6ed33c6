"""Training engine: trainer core + hooks, checkpoints, optimizer and schedule, launch, writers, predictor."""

from surgdino.engine.checkpointer import Checkpointer, load_weights
from surgdino.engine.defaults import Trainer, default_setup
from surgdino.engine.hooks import EvalHook, PeriodicCheckpointer, PeriodicWriter
from surgdino.engine.inference import evaluate, inference_on_dataset
from surgdino.engine.launch import launch
from surgdino.engine.optimizer import build_lr_scheduler, build_optimizer, get_param_groups
from surgdino.engine.run import eval_only, train_main
from surgdino.engine.trainer import HookBase, NonFiniteLossError, SimpleTrainer

__all__ = [
    "Checkpointer", "EvalHook", "HookBase", "NonFiniteLossError", "PeriodicCheckpointer", "PeriodicWriter",
    "SimpleTrainer", "Trainer", "build_lr_scheduler", "build_optimizer", "default_setup", "eval_only",
    "evaluate", "get_param_groups", "inference_on_dataset", "launch", "load_weights", "train_main",
]
