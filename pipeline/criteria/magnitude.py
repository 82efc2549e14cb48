"""Weight-magnitude criteria: the Lp norm of each output filter (data-free)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.criteria import Criterion, ScoringContext


def filter_norms(layer: nn.Module, p: int) -> torch.Tensor:
    """Lp norm of each output filter; ConvTranspose weights are (in, out, kh, kw), so transpose first."""
    w = layer.weight.detach()
    if getattr(layer, "transposed", False):
        w = w.transpose(0, 1)
    return torch.linalg.vector_norm(w.flatten(1).float(), ord=p, dim=1).cpu()


class MagnitudeCriterion(Criterion):
    def __init__(self, name: str = "l1", p: int = 1):
        if p not in (1, 2):
            raise ValueError(f"criterion.p={p}: expected 1 or 2")
        self.name, self.p = name, p

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        return {name: filter_norms(layer, self.p) for name, layer in layers.items()}
