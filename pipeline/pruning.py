"""Structural channel pruning on torch-pruning's dependency graph.

The dependency graph finds the layers coupled to each output channel (the next conv's input, the
BatchNorm, the decoder conv behind a skip concatenation, residual adds), so removing a channel keeps
the network consistent. We only decide *which* channels go: saved per-layer scores (pipeline.criteria)
are reduced over each dependency group by `ScoreTableImportance`, and the schedule sets how many.
Out-of-scope layers and the segmentation head are passed as ignored layers, so the output keeps
one channel per class.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE_TYPES = (nn.Conv2d, nn.ConvTranspose2d)
HEAD = "segmentation_head"


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv whose output channels may be removed: all but the segmentation head's."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and not (name == HEAD or name.startswith(HEAD + "."))
    }


def in_scope(name: str, scope: str) -> bool:
    """Models follow smp's naming (encoder / decoder / segmentation_head); `all` is both halves."""
    if scope == "all":
        return name.startswith(("encoder.", "decoder."))
    return name.startswith(scope + ".")


class ScoreTableImportance(tp.importance.GroupMagnitudeImportance):
    """Group importance from saved per-layer scores: the mean over the group's coupled output layers.

    torch-pruning's own importances read weights at prune time; reading saved scores instead lets the
    score stage run once (possibly on data) and the prune stage replay it, and lets every criterion
    share torch-pruning's group reduction (`_reduce`, mean over coupled layers, aligned by root index).
    """

    def __init__(self, scores: dict[str, torch.Tensor], names: dict[nn.Module, str]):
        super().__init__(p=1, group_reduction="mean", normalizer=None)
        self.scores, self.names = scores, names

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            name = self.names.get(dep.layer)
            if name is None or name not in self.scores:
                continue
            if dep.pruning_fn not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            group_imp.append(self.scores[name][idxs].float())
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._reduce(group_imp, group_idxs)


@dataclass
class PruneResult:
    model: nn.Module
    channels: list[dict]  # one row per prunable layer: name, before, after


def out_channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in prunable_layers(model).items()}


def prune(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    example_inputs: torch.Tensor,
    ratio: float,
    scope: str = "all",
    round_to: int | None = None,
) -> PruneResult:
    """Removes `ratio` of the output channels of every in-scope layer group (a pruned copy; `model` is kept)."""
    model = copy.deepcopy(model).eval()
    before = out_channels(model)
    layers = prunable_layers(model)
    missing = [n for n, _ in layers.items() if in_scope(n, scope) and n not in scores]
    if missing:
        raise ValueError(f"no scores for layers {missing[:5]}{'...' if len(missing) > 5 else ''}: the scores do not match this model")
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and not in_scope(n, scope)]
    ignored += [m for n, m in model.named_modules() if n == HEAD]
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=ScoreTableImportance(scores, names),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()  # at ratio 0 this removes nothing (tested), so one path serves every ratio
    after = out_channels(model)
    rows = [
        {"layer": n, "scope": "encoder" if n.startswith("encoder.") else "decoder" if n.startswith("decoder.") else "other",
         "before": before[n], "after": after[n], "removed": 1 - after[n] / before[n]}
        for n in before
    ]
    return PruneResult(model=model, channels=rows)
