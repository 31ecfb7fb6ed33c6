"""Every config key, declared by section. Importing this package fills the schema."""

from surgdino.config.keys import data, engine, grounding, maskdino, surgeryclip  # noqa: F401
