"""Weight-magnitude criteria: the Lp norm of each output filter (data-free).

This is torch-pruning's magnitude importance restricted to a layer's own filters
(`GroupMagnitudeImportance(p, normalizer=None, group_reduction="first")`, its "standard L1-norm of the
first layer in a group"; for p = 2 the norm, i.e. the square root of its sum of squares, as the
lightweight-UNet study defines L2). It is computed here from the weight directly rather than through
that class because a score must exist for every prunable layer before any graph is traced (the score
stage saves them; the prune stage reduces them per group with torch-pruning's own reduction,
`pipeline.pruning.ScoreTableImportance`), and torch-pruning's class returns nothing for depthwise
convolutions (DeepLabV3+'s separable ASPP). tests/test_criteria.py checks that both give the same
numbers wherever torch-pruning's applies.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.criteria import Criterion, ScoringContext


def filter_norms(layer: nn.Module, p: int) -> torch.Tensor:
    """Lp norm of each output filter; ConvTranspose weights are (in, out, *kernel), so transpose first."""
    w = layer.weight.detach()
    if getattr(layer, "transposed", False):
        w = w.transpose(0, 1)
    return torch.linalg.vector_norm(w.flatten(1).float(), ord=p, dim=1).cpu()


class MagnitudeCriterion(Criterion):
    def __init__(self, *, name: str, p: int):
        if p not in (1, 2):
            raise ValueError(f"criterion.p={p}: expected 1 or 2")
        self.name, self.p = name, p

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        return {name: filter_norms(layer, self.p) for name, layer in layers.items()}
