"""SurgDINO: DINO-family transformers for surgical instruments, in pure PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):  # ``from surgdino import Predictor`` loads torch only when used
    if name == "Predictor":
        from surgdino.deploy.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'surgdino' has no attribute {name!r}")
