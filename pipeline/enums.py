"""`ConfigEnum`, the type of a config key's closed set of values.

A module of its own with no heavy imports, so that the modules declaring such sets (pipeline.config,
schedules, precision, sparsity, distillation, quantization) import it without importing each other."""
from __future__ import annotations

from enum import Enum


class ConfigEnum(str, Enum):
    """A config key's closed set of values (pipeline.config.Stage, schedules.Scope): prints as the YAML writes it."""

    def __str__(self) -> str:  # "encoder", not "Scope.encoder", on every Python version
        return self.value
