"""Importance criteria: each gives one score per output channel of every prunable layer.

A criterion is built from `conf/criterion/<name>.yaml` (`_target_` + its keys) and returns
`{layer name: 1-D tensor of scores}`. Scores are persisted by the score stage and reduced over
torch-pruning's dependency groups by `pipeline.pruning` (coupled layers share one score), so a new
criterion is one class here and one YAML, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn


@dataclass
class ScoringContext:
    """What a criterion may use: data-driven criteria read calibration batches from `batches`."""

    device: torch.device
    batches: Optional[Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]] = None


class Criterion:
    name: str = "criterion"

    def score(self, model: nn.Module, layers: dict[str, nn.Module], ctx: ScoringContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError
