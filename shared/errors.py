"""The error type for configurations and checkpoints we cannot serve (its own module so the
config modules can share it without importing each other)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user gave (or a checkpoint holds) that we cannot serve."""
