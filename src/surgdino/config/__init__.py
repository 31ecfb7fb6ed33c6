"""Typed configuration: ``load_config(file, opts)`` → frozen ``Config``; every key declared in ``keys/``."""

from surgdino.config.core import Config, Key, closest_key, default_config, load_config, save_config, schema

__all__ = ["Config", "Key", "closest_key", "default_config", "load_config", "save_config", "schema"]
