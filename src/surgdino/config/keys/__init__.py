"""Every config key, declared by section. Importing this package fills the schema."""

from surgdino.config.keys import data, engine, grounding, maskdino, resnet, surgeryclip, swin  # noqa: F401
