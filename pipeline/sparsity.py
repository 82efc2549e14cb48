"""Sparsity-inducing training before pruning: penalties that drive the channels pruning will remove towards zero.

The sparsify stage (pipeline/stages/sparsify.py) trains the baseline on for `sparsity.epochs` epochs with one of:

- `group_norm`: group lasso on torch-pruning's dependency groups (the channels removed together: a conv's filters,
  its BatchNorm's scales, the next layers' input slices, residual partners): `strength` x the sum over channels of
  the L2 norm of all their weights, weighted from 1 to 16 as a channel's norm falls below its group's strongest
  (torch-pruning's GroupNormPruner weighting, "DepGraph", Fang et al., CVPR 2023), so the weakest shrink fastest;
- `growing_reg`: growing regularisation (Wang et al., ICLR 2021): an L2 penalty per channel whose coefficient starts
  at `strength` and grows after every epoch by `growth` x the channel's unimportance in its group (0 for the
  strongest, 1 for the weakest, torch-pruning's GrowingRegPruner rule);
- `bn_l1`: network slimming (Liu et al., ICCV 2017): `strength` x the L1 norm of the BatchNorm scales added to the
  loss (the training loop's `bn_l1`), for `criterion=bn_scale`.

The groups come from torch-pruning's dependency graph, over the layers pruning may touch (`pruning.ignored_layers`
of `prune.scope`: not the head, not out-of-scope layers). The penalty itself is computed here, as a loss term that
autograd differentiates, rather than by torch-pruning's `GroupNormPruner.regularize` / `GrowingRegPruner.regularize`:
those index a transposed convolution's input channels on its output axis (an IndexError on every UNet decoder's
up-convolution, torch-pruning 1.6) and the growing one adds its BatchNorm term to a copy of the gradient.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from pipeline.pruning import PRUNABLE_TYPES, ignored_layers
from pipeline.enums import ConfigEnum


class SparsityMethod(ConfigEnum):
    none = "none"
    group_norm = "group_norm"
    growing_reg = "growing_reg"
    bn_l1 = "bn_l1"


OUT_FNS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels,
           tp.prune_batchnorm_out_channels)
IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
GAMMA = 16.0  # the weakest channel of a group is penalised this many times as hard as the strongest (group_norm)


def _slices(group) -> list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]:
    """(weight, axis, indices, root channel of each index) for every layer of a dependency group whose weights
    belong to the group's channels."""
    out = []
    for item in group:
        dep, idxs, root = item.dep, item.idxs, item.root_idxs
        layer, fn = dep.target.module, dep.handler
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight is None:
            continue
        transposed = bool(getattr(layer, "transposed", False))
        if fn in OUT_FNS:
            axis = 1 if transposed else 0
        elif fn in IN_FNS and getattr(layer, "groups", 1) == 1:
            axis = 0 if transposed else 1
        else:
            continue
        out.append((weight, axis, torch.as_tensor([int(i) for i in idxs]), torch.as_tensor([int(r) for r in root])))
    return out


class GroupPenalty:
    """The group_norm and growing_reg penalties over a model's pruning groups (module docstring): `loss(model)` is
    the term added to the training loss; `after_epoch()` grows the growing coefficients."""

    def __init__(self, model: nn.Module, example: torch.Tensor, scope: str, method: str, strength: float, growth: float):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        groups = graph.get_all_groups(ignored_layers=ignored_layers(model, scope), root_module_types=list(PRUNABLE_TYPES))
        self.groups = [(parts, len(group[0].idxs)) for group in groups if (parts := _slices(group))]
        self.method, self.strength, self.growth = method, float(strength), float(growth)
        self.coefficients = [torch.full((n,), self.strength) for _, n in self.groups]  # growing_reg's, per channel

    def _norms_sq(self, parts, n: int) -> torch.Tensor:
        """The squared L2 norm of each of the group's `n` channels, over every layer's slice of it."""
        total = None
        for weight, axis, idxs, root in parts:
            piece = weight.index_select(axis, idxs.to(weight.device)).float()
            per = piece.pow(2).movedim(axis, 0).reshape(piece.shape[axis], -1).sum(1)
            part = torch.zeros(n, device=weight.device).index_add(0, root.to(weight.device), per)
            total = part if total is None else total + part
        return total

    def loss(self, model: nn.Module) -> torch.Tensor:
        terms = []
        for (parts, n), coefficient in zip(self.groups, self.coefficients):
            sq = self._norms_sq(parts, n)
            if self.method == "group_norm":
                norms = (sq + 1e-12).sqrt()
                with torch.no_grad():
                    spread = (norms.max() - norms) / (norms.max() - norms.min()).clamp_min(1e-12)
                    weights = GAMMA ** spread
                terms.append(self.strength * (weights * norms).sum())
            else:
                terms.append((coefficient.to(sq.device) * sq).sum() / 2)
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def after_epoch(self) -> None:
        if self.method != "growing_reg":
            return
        for i, (parts, n) in enumerate(self.groups):
            norms = self._norms_sq(parts, n).sqrt().cpu()
            unimportance = (norms.max() - norms) / (norms.max() - norms.min()).clamp_min(1e-12)
            self.coefficients[i] = self.coefficients[i] + self.growth * unimportance


def penalty(model: nn.Module, method: str, strength: float, growth: float, example: torch.Tensor,
            scope: str) -> GroupPenalty | None:
    """The group penalty of `method` over `model`'s pruning groups in `scope`; None for the methods that work
    through the training loop's own loss term (bn_l1) or do nothing (none)."""
    if method in ("none", "bn_l1"):
        return None
    if method not in ("group_norm", "growing_reg"):
        raise ValueError(f"sparsity.method={method!r}: expected one of {', '.join(m.value for m in SparsityMethod)}")
    return GroupPenalty(model, example, scope, method, strength, growth)


@torch.no_grad()
def near_zero_fraction(model: nn.Module, scope: str, relative: float = 0.01) -> float:
    """Fraction of the in-scope prunable filters whose L2 norm is below `relative` x the largest of their layer:
    how far a penalty has emptied channels (0 for a dense network)."""
    from pipeline.pruning import in_scope, prunable_layers

    small = total = 0
    for name, layer in prunable_layers(model).items():
        if not in_scope(name, scope):
            continue
        w = layer.weight.detach()
        if getattr(layer, "transposed", False):
            w = w.transpose(0, 1)
        norms = torch.linalg.vector_norm(w.flatten(1).float(), dim=1)
        small += int((norms < relative * norms.max().clamp_min(1e-12)).sum())
        total += norms.numel()
    return small / max(total, 1)
