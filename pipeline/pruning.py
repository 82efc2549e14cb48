"""Structural channel pruning on torch-pruning's dependency graph.

The dependency graph finds the layers coupled to each output channel (the next conv's input, the
BatchNorm, the decoder conv behind a skip concatenation, residual adds), so removing a channel keeps
the network consistent. We only decide *which* channels go: saved per-layer scores (pipeline.criteria)
are reduced over each dependency group by `ScoreTableImportance`, and the schedule sets how many.
Out-of-scope layers, the segmentation head and any layer a model lists in `unprunable_modules()` are
passed as ignored layers, so the output keeps one channel per class. Images and volumes alike (2D and 3D
convolutions); a model must not run in-place ops on a view, such as an in-place activation after
InstanceNorm, whose autograd nodes the graph cannot follow (see models/unet3d.py).

One function, `prune`, covers the schedules: a uniform ratio, per-layer ratios by name pattern, a
global ranking across layers (capped per layer), and iterative steps (re-scored, with a callback for
fine-tuning between steps). `ratio_for_flops` searches the ratio that meets a FLOPs budget.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch_pruning as tp
from torch import nn

log = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)
HEAD = "segmentation_head"
# `round_to_high_res` covers the layers whose output stride is at most this: full, half and quarter
# resolution. Those levels hold few channels and most pixels, so a count that is not a multiple of the
# CPU kernels' 16-channel blocks wastes the most there (docs/PERFORMANCE.md: UNet++ at 60 %; stride <= 2
# left its 64x64 decoder nodes at 24 channels).
HIGH_RES_STRIDE = 4


def unprunable(model: nn.Module) -> set[nn.Module]:
    """Layers whose output channels must stay: the head, and what the model itself lists."""
    fixed = set(getattr(model, HEAD).modules()) if hasattr(model, HEAD) else set()
    hook = getattr(model, "unprunable_modules", None)
    if callable(hook):
        for module in hook():
            fixed.update(module.modules())
    return fixed


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv whose output channels may be removed: all but the head's and the model's unprunable ones."""
    fixed = unprunable(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and m not in fixed}


def ignored_layers(model: nn.Module, scope: str) -> list[nn.Module]:
    """torch-pruning's ignored layers for `scope`: the unprunable ones, those outside the scope, and the head."""
    fixed = unprunable(model)
    ignored = [m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and (m in fixed or not in_scope(n, scope))]
    return ignored + ([getattr(model, HEAD)] if hasattr(model, HEAD) else [])


def in_scope(name: str, scope: str) -> bool:
    """Models follow smp's naming (encoder / decoder / segmentation_head); `all` is both halves."""
    if scope == "all":
        return name.startswith(("encoder.", "decoder."))
    return name.startswith(scope + ".")


OUT_CHANNEL_FNS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)


class ScoreTableImportance(tp.importance.GroupMagnitudeImportance):
    """Group importance from saved per-layer scores: the mean over the group's coupled output layers.

    torch-pruning's own importances read weights at prune time; reading saved scores instead lets the
    score stage run once (possibly on data) and the prune stage replay it, and lets every criterion
    share torch-pruning's group reduction (`_reduce`, mean over coupled layers, aligned by root index).
    """

    def __init__(self, scores: dict[str, torch.Tensor], names: dict[nn.Module, str], normalizer: str | None = None):
        super().__init__(p=1, group_reduction="mean", normalizer=normalizer)
        self.scores, self.names = scores, names

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            name = self.names.get(dep.layer)
            if name is None or name not in self.scores:
                continue
            if dep.pruning_fn not in OUT_CHANNEL_FNS:
                continue
            layer_scores = self.scores[name].float()
            # Each layer's scores relative to its own mean: layers coupled by a concatenation or an
            # add compete on equal terms (a low-magnitude branch is not emptied wholesale).
            layer_scores = layer_scores / layer_scores.mean().clamp_min(1e-12)
            group_imp.append(layer_scores[idxs])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class RoundingPruner(tp.pruner.BasePruner):
    """torch-pruning's pruner whose channel rounding never empties a layer, with a wider quantum for the
    layers that carry most of the time.

    torch-pruning rounds the kept count down to a multiple of `round_to`; a layer that would keep fewer
    than `round_to` channels rounds to 0, which it then silently skips (the layer stays whole: a
    16-channel layer at ratio 0.6 and round_to=8 kept 16, not 8). Here such a layer keeps `round_to`
    channels, or all of them when it has no more than that (a tiny layer), and each case is recorded in
    `guarded` (layer module, channels before, kept by the ratio, kept) for the log and channels.csv.
    `quanta` {module: multiple} gives some layers a wider multiple (prune's `round_to_high_res`): such a
    layer keeps at least one multiple (a 32-channel layer keeping 12 keeps 16: an 8-channel convolution at
    high resolution runs at half the rate of a 16-channel one, so the 8 more channels cost little time);
    a layer with no more channels than that multiple is rounded to `round_to` as above. Layers whose count
    differs from plain `round_to` rounding are recorded in `widened`.
    The module being rounded is the last one whose channel count the pruner asked the graph for, just
    before it calls `_round_to` (torch-pruning 1.6, pinned; tests/test_pruning.py checks the records)."""

    def __init__(self, *args, quanta: Optional[Mapping[nn.Module, int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quanta = dict(quanta or {})
        self.guarded: list[tuple[nn.Module, int, int, int]] = []
        self.widened: list[tuple[nn.Module, int, int, int]] = []
        self._asked: Optional[nn.Module] = None
        graph = self.DG
        for fn_name in ("get_out_channels", "get_in_channels"):
            original = getattr(graph, fn_name)

            def asked(module_or_node, _original=original):
                self._asked = getattr(module_or_node, "module", module_or_node)
                return _original(module_or_node)

            setattr(graph, fn_name, asked)

    def _round_to(self, n_pruned, current_channels, round_to):
        keep = current_channels - n_pruned
        wide = self.quanta.get(self._asked, round_to)
        if wide != round_to and current_channels > wide:
            rounded = max(keep - keep % wide, wide)
            if rounded != keep - keep % round_to:
                self.widened.append((self._asked, current_channels, keep, rounded))
            return current_channels - rounded
        rounded = keep - keep % round_to
        if rounded == 0:
            rounded = min(round_to, current_channels)
            self.guarded.append((self._asked, current_channels, keep, rounded))
        return current_channels - rounded


def high_resolution_layers(model: nn.Module, example_inputs: torch.Tensor) -> set[nn.Module]:
    """The prunable layers whose output is at full, half or quarter the input's resolution (output stride
    <= HIGH_RES_STRIDE): in an encoder-decoder they carry most of the FLOPs in few channels, so their
    channel counts decide the speed.
    The stride is read along the last spatial axis, the same for images and volumes (square / cubic
    strides, as in every model here)."""
    size = example_inputs.shape[-1]
    found: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, _i, out: found.add(m) if HIGH_RES_STRIDE * out.shape[-1] >= size else None)
             for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


@dataclass
class PruneResult:
    model: nn.Module
    channels: list[dict]  # one row per prunable layer: name, before, after, removed, rounding
    # when the scope kept more channels than its ratios and the rounding allow (layers coupled to a layer asked
    # for less, or left whole by torch-pruning): each layer over its share, with before, after and allowed (the
    # most the ratio and rounding keep); empty otherwise
    shortfall: list[dict]

    def removed_nothing(self) -> bool:
        return all(row["after"] == row["before"] for row in self.channels)


def allowed_channels(before: int, ratio: float, quantum: int) -> int:
    """The most channels a layer of `before` may keep at `ratio`: torch-pruning keeps int(before * (1 - ratio)),
    the rounding takes that down to a multiple of `quantum` but never below one quantum (nor above `before`),
    and a layer is never emptied."""
    return max(int(before * (1 - ratio)), min(quantum, before), 1)


def out_channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in prunable_layers(model).items()}


def match_layer_ratios(layer_names: list[str], patterns: Mapping[str, float]) -> dict[str, float]:
    """Per-layer ratios from glob patterns over layer names; the first matching pattern wins.

    A pattern that matches no prunable layer is an error (a typo would otherwise prune nothing)."""
    ratios: dict[str, float] = {}
    for pattern, ratio in patterns.items():
        hits = [n for n in layer_names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"prune.layer_ratios pattern {pattern!r} matches no prunable layer; layers are named like "
                f"{', '.join(layer_names[:4])}, ..."
            )
        if not 0 <= float(ratio) < 1:
            raise ValueError(f"prune.layer_ratios[{pattern!r}]={ratio}: expected 0 <= ratio < 1")
        for n in hits:
            ratios.setdefault(n, float(ratio))
    return ratios


def prune(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    example_inputs: torch.Tensor,
    ratio: float,
    scope: str = "all",
    round_to: int | None = None,
    *,
    round_to_high_res: int | None = None,
    layer_ratios: Optional[Mapping[str, float]] = None,
    global_ranking: bool = False,
    max_layer_ratio: float = 1.0,
    steps: int = 1,
    rescore: Optional[Callable[[nn.Module], dict[str, torch.Tensor]]] = None,
    between_steps: Optional[Callable[[nn.Module, int], None]] = None,
) -> PruneResult:
    """Removes output channels from a copy of `model` (the original is kept).

    ratio: fraction removed from every in-scope layer group (uniform), or overall (global ranking).
    round_to: keep every pruned layer's count a multiple of this (None: exact rates, no rounding at all);
    round_to_high_res: ... and a multiple of this, at least one, for layers at output stride <=
        HIGH_RES_STRIDE (`high_resolution_layers`) that have more channels than this.
    layer_ratios: {glob pattern: ratio}; matched layers use their ratio, the others `ratio`.
    global_ranking: rank all groups together (scores normalised by their group mean) and remove the
        lowest `ratio` of all channels, at most `max_layer_ratio` of any layer (see `global_layer_ratios`).
    steps > 1: reach the ratios in equal steps; before each later step the pruned model is re-scored
        with `rescore` and `between_steps(model, step)` may fine-tune it.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    model = copy.deepcopy(model).eval()
    before = out_channels(model)
    layers = prunable_layers(model)
    missing = [n for n in layers if in_scope(n, scope) and n not in scores]
    if missing:
        raise ValueError(f"no scores for layers {missing[:5]}{'...' if len(missing) > 5 else ''}: the scores do not match this model")
    names = {m: n for n, m in model.named_modules()}
    in_scope_names = [n for n in layers if in_scope(n, scope)]
    ignored = ignored_layers(model, scope)
    per_layer = match_layer_ratios(in_scope_names, layer_ratios) if layer_ratios else {}
    if global_ranking:
        per_layer = global_layer_ratios(model, scores, names, example_inputs, ratio, max_layer_ratio, ignored)
        ratio = 0.0
    importance = ScoreTableImportance(scores, names)
    quanta = {}
    if round_to and round_to_high_res and round_to_high_res != round_to:
        quanta = {m: round_to_high_res for m in high_resolution_layers(model, example_inputs)}
    pruner = RoundingPruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=ratio,
        pruning_ratio_dict={layers[n]: r for n, r in per_layer.items()} or None,
        iterative_steps=steps,
        ignored_layers=ignored,
        # exact rates are multiples of 1: the same guard then keeps one channel where the ratio keeps none
        # (torch-pruning would leave such a layer whole: ratio 0.999 removed nothing)
        round_to=round_to or 1,
        quanta=quanta,
    )
    for step in range(1, steps + 1):
        if step > 1:
            if between_steps is not None:
                between_steps(model, step - 1)
            if rescore is not None:
                importance.scores = rescore(model)
        pruner.step()  # at ratio 0 this removes nothing (tested), so one path serves every ratio
    after = out_channels(model)
    rounding = _rounding_notes(pruner, names, round_to, round_to_high_res)
    quantum = {n: quanta.get(layers[n], round_to or 1) if before[n] > quanta.get(layers[n], round_to or 1) else round_to or 1
               for n in in_scope_names}
    allowed = {n: allowed_channels(before[n], per_layer.get(n, ratio), quantum[n]) for n in in_scope_names}
    # A shortfall is counted over the scope: layers coupled by a concatenation are pruned as one group (the
    # channels of its least important member go first), which moves channels between them but not in total.
    shortfall = [{"layer": n, "before": before[n], "after": after[n], "allowed": allowed[n]}
                 for n in in_scope_names if after[n] > allowed[n]]
    if sum(after[n] for n in in_scope_names) <= sum(allowed.values()):
        shortfall = []
    for row in shortfall:
        rounding[row["layer"]] = (f"kept {row['after']}: the ratio and rounding keep at most {row['allowed']} (coupled to a "
                                  f"layer asked for less, or not prunable)")
    rows = [
        {"layer": n, "scope": "encoder" if n.startswith("encoder.") else "decoder" if n.startswith("decoder.") else "other",
         "before": before[n], "after": after[n], "removed": 1 - after[n] / before[n], "rounding": rounding.get(n, "")}
        for n in before
    ]
    return PruneResult(model=model, channels=rows, shortfall=shortfall)


def _rounding_notes(pruner: RoundingPruner, names: dict[nn.Module, str], round_to: Optional[int],
                    round_to_high_res: Optional[int]) -> dict[str, str]:
    """{layer: what the rounding did beyond rounding down to `round_to`}, logged once: high-resolution
    layers rounded to `round_to_high_res`, layers raised to `round_to` channels instead of emptied, and
    tiny layers (no more than `round_to` channels) left whole."""
    notes, widened, raised, whole = {}, {}, [], []
    for module, current, keep, kept in pruner.widened:  # the last step's rounding (iterative schedules)
        name = names.get(module, "?")
        notes[name] = f"kept {kept} (the ratio keeps {keep}): round_to_high_res={round_to_high_res} at output stride <= {HIGH_RES_STRIDE}"
        widened[name] = f"{name} ({keep} -> {kept})"
    for module, current, keep, kept in pruner.guarded:
        name = names.get(module, "?")
        if kept == current:
            notes[name] = f"kept whole: {current} <= round_to"
            whole.append(name)
        else:
            notes[name] = f"raised to {kept}: the ratio keeps {keep}, which rounds to 0"
            raised.append(f"{name} ({keep} -> {kept})")
    if widened:
        log.info("prune.round_to_high_res=%s: %d layer(s) at output stride <= %s keep a multiple of %s channels: %s",
                 round_to_high_res, len(widened), HIGH_RES_STRIDE, round_to_high_res, ", ".join(widened.values()))
    if raised and round_to:
        log.info("prune.round_to=%s: %d layer(s) keep %s channels where the ratio's count rounds down to 0: %s",
                 round_to, len(raised), round_to, ", ".join(raised))
    elif raised:
        log.info("exact rates (prune.round_to=null): %d layer(s) keep 1 channel where the ratio keeps none: %s",
                 len(raised), ", ".join(raised))
    if whole and round_to:
        log.info("prune.round_to=%s: %d tiny layer(s) with at most %s channels are left whole: %s",
                 round_to, len(whole), round_to, ", ".join(whole))
    return notes


def global_layer_ratios(model, scores, names, example_inputs, ratio, max_layer_ratio, ignored) -> dict[str, float]:
    """One ranking across dependency groups -> the ratio of each group's root layer.

    Scores are divided by their group's mean so layers of different scale compete fairly; the lowest
    `ratio` of all channels go, but never more than `max_layer_ratio` of one layer (torch-pruning's
    own global mode can overshoot that cap in a one-shot step, so the cap is applied here and the
    ratios are handed to the per-layer path)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    importance = ScoreTableImportance(scores, names, normalizer="mean")
    roots, values = [], []
    for group in graph.get_all_groups(ignored_layers=list(ignored), root_module_types=list(PRUNABLE_TYPES)):
        imp = importance(group)
        if imp is not None:
            roots.append(names[group[0].dep.target.module])
            values.append(imp)
    if not values:
        return {}
    every = torch.cat(values)
    n_remove = int(every.numel() * ratio)
    if n_remove == 0:
        return {}
    threshold = torch.kthvalue(every, n_remove).values
    out = {}
    for root, imp in zip(roots, values):
        count = min(int((imp <= threshold).sum()), int(max_layer_ratio * imp.numel()))
        if count > 0:  # torch-pruning keeps int(C * (1 - r)): r = (count - 0.5) / C removes exactly `count`
            out[root] = (count - 0.5) / imp.numel()
    return out


def ratio_for_flops(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    example_inputs: torch.Tensor,
    target: float,
    flops: Callable[[nn.Module], int],
    tolerance: float = 0.005,
    **plan,
) -> tuple[float, PruneResult]:
    """The smallest ratio whose pruned network keeps at most `target` of the FLOPs (bisection).

    FLOPs fall monotonically with the ratio for a fixed plan, so bisection finds it; the search stops
    below the ratio that would empty the narrowest layer (torch-pruning then skips that layer).
    Returns the ratio and its pruned network."""
    base = flops(model)
    scope = plan.get("scope", "all")
    narrowest = min(m.out_channels for n, m in prunable_layers(model).items() if in_scope(n, scope))
    top = min(0.95, 1 - 1 / narrowest - 1e-6)
    high_result = prune(model, scores, example_inputs, top, **plan)
    if flops(high_result.model) > target * base:
        raise ValueError(
            f"prune.target_flops={target}: even ratio {top:.3f} keeps {flops(high_result.model) / base:.3f} of the "
            "FLOPs (layers outside the scope, the head and the per-layer cap stay)"
        )
    low, high, best = 0.0, top, high_result
    while high - low > tolerance:
        mid = (low + high) / 2
        result = prune(model, scores, example_inputs, mid, **plan)
        if flops(result.model) <= target * base:
            high, best = mid, result
        else:
            low = mid
    log.info("ratio %.3f keeps %.3f of the FLOPs (target %.3f)", high, flops(best.model) / base, target)
    return high, best
