"""SurgDINO: DINO-family transformers for surgical instruments, in pure PyTorch."""

__version__ = "0.1.0"
