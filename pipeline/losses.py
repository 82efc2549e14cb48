"""Loss combinations for conf/loss. The losses themselves are segmentation_models_pytorch's
(`smp.losses`); smp has no way to add two of them, so `WeightedSum` does that and nothing else."""
from __future__ import annotations

from typing import Sequence

import models  # noqa: F401  (torchvision compatibility before smp is imported by a loss config)
import torch
from torch import nn


class WeightedSum(nn.Module):
    """sum_i weights[i] * terms[i](logits, target)."""

    def __init__(self, terms: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(terms) != len(weights) or not terms:
            raise ValueError(f"loss: {len(terms)} terms and {len(weights)} weights: expected one weight per term")
        self.terms = nn.ModuleList(terms)
        self.weights = [float(w) for w in weights]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * term(logits, target) for w, term in zip(self.weights, self.terms))
