"""Weight-magnitude criteria: the Lp norm of each output filter (data-free).

The score is torch-pruning's own magnitude importance, `GroupMagnitudeImportance(p, normalizer=None,
group_reduction="first")` (its "standard L1-norm of the first layer in a group"), taken on the
dependency group each layer roots: sum over the filter of |w|^p. For p = 2 medprune reports the norm (its
square root), as the lightweight-UNet study defines L2, so that layers keep the same relative scale as
with L1 when pipeline.pruning averages a group's scores. `filter_norms` computes the same numbers
directly from a layer's weight (for plots and fallbacks; tests/test_criteria.py checks they agree).
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from pipeline.criteria import Criterion, ScoringContext, example_input, model_preserved


def filter_norms(layer: nn.Module, p: int) -> torch.Tensor:
    """Lp norm of each output filter; ConvTranspose weights are (in, out, kh, kw), so transpose first."""
    w = layer.weight.detach()
    if getattr(layer, "transposed", False):
        w = w.transpose(0, 1)
    return torch.linalg.vector_norm(w.flatten(1).float(), ord=p, dim=1).cpu()


class MagnitudeCriterion(Criterion):
    def __init__(self, *, name: str, p: int):
        if p not in (1, 2):
            raise ValueError(f"criterion.p={p}: expected 1 or 2")
        self.name, self.p = name, p

    def score(self, model, layers, ctx: ScoringContext):
        if not layers:
            return {}
        importance = tp.importance.GroupMagnitudeImportance(p=self.p, normalizer=None, group_reduction="first", bias=False)
        with model_preserved(model), torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input(model, ctx))
        scores = {}
        for name, layer in layers.items():
            group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))
            with torch.no_grad():
                value = importance(group).float().cpu()
            scores[name] = value.sqrt() if self.p == 2 else value
        return scores
