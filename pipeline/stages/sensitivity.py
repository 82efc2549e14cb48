"""Sensitivity analysis: prune each layer alone, measure the Dice drop, derive per-layer rates.

Each in-scope prunable layer (with its dependency group) is pruned alone at each of
`sensitivity.ratios`, without fine-tuning, and the validation Dice and FLOPs are measured. Per-layer
rates are then chosen greedily: starting from nothing pruned, repeatedly take the step (one layer to
its next ratio) with the least predicted Dice loss per FLOP saved, until the predicted FLOPs meet
`sensitivity.target_flops`; because savings of neighbouring layers overlap, the real pruned network is
then measured and steps continue until it meets the budget too. The rates are written as a
ready-to-use prune config (`sensitivity/prune_rates.yaml`) and used by the following prune stage.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from itertools import islice

import torch
import yaml

from data.files import write_csv
from models.io import load_model
from pipeline import plots
from pipeline.inference import windowed
from pipeline.measure.metrics import SegmentationMeter
from pipeline.measure.profiling import count_flops
from pipeline.pruning import in_scope, prunable_layers, prune
from pipeline.scoring import compute as compute_scores
from pipeline.state import Context, RunState
from data.loader import make_loader

log = logging.getLogger(__name__)


class Greedy:
    """Walks each layer up its ratio ladder, cheapest predicted Dice loss per FLOP saved first."""

    def __init__(self, table: dict[str, dict[float, tuple[float, float]]], order: list[str]):
        self.table, self.order = table, order
        self.level = {layer: -1 for layer in order}  # index into the sorted ratios; -1 = not pruned

    def _at(self, layer: str, level: int) -> tuple[float, float]:
        if level < 0:
            return 0.0, 0.0
        ratio = sorted(self.table[layer])[level]
        drop, saved = self.table[layer][ratio]
        return max(drop, 0.0), saved

    def rates(self) -> dict[str, float]:
        return {l: sorted(self.table[l])[i] for l, i in self.level.items() if i >= 0}

    def predicted(self) -> tuple[float, float]:
        """(predicted Dice loss, predicted fraction of FLOPs saved), assuming layers add up."""
        parts = [self._at(l, i) for l, i in self.level.items()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def step(self) -> bool:
        best, best_cost = None, None
        for layer in self.order:
            i = self.level[layer]
            if i + 1 >= len(self.table[layer]):
                continue
            loss0, saved0 = self._at(layer, i)
            loss1, saved1 = self._at(layer, i + 1)
            gain = saved1 - saved0
            if gain <= 0:
                continue
            cost = max(loss1 - loss0, 0.0) / gain
            if best_cost is None or cost < best_cost:
                best, best_cost = layer, cost
        if best is None:
            return False
        self.level[best] += 1
        return True


def run(ctx: Context, state: RunState) -> RunState:
    cfg = ctx.cfg
    if not state.baseline:
        raise RuntimeError("sensitivity needs a baseline model: add train to stages or set baseline=<run id or path>")
    s, p = cfg.sensitivity, cfg.prune
    scope = str(p.scope)
    model = load_model(state.to_prune).to(ctx.device).eval()
    scores, _ = compute_scores(ctx, model)
    model.cpu()
    loader = make_loader(ctx.data.dataset("val"), cfg.evaluate.batch_size, False, 0, cfg.seed, ctx.device)
    batches = list(islice(loader, s.max_batches) if s.max_batches else loader)
    x = ctx.example_input()
    flops = lambda m: count_flops(m, ctx.input_shape)  # noqa: E731
    base_dice, base_flops = _dice(model, batches, ctx.device, loader.dataset), flops(model)
    layers = [n for n in prunable_layers(model) if in_scope(n, scope)]
    ratios = sorted(float(r) for r in s.ratios)

    rows, table = [], {}
    for layer in layers:
        table[layer] = {}
        for ratio in ratios:
            pruned = prune(model, scores, x, 0.0, scope, p.round_to, round_to_high_res=p.round_to_high_res, layer_ratios={layer: ratio}).model
            dice, kept = _dice(pruned, batches, ctx.device, loader.dataset), flops(pruned) / base_flops
            table[layer][ratio] = (base_dice - dice, 1 - kept)
            rows.append({"layer": layer, "ratio": ratio, "dice": dice, "dice_drop": base_dice - dice, "flops_kept": kept})
        log.info("sensitivity %s: Dice drop %s", layer, ", ".join(f"{r:g}:{table[layer][r][0]:+.3f}" for r in ratios))

    greedy = Greedy(table, layers)
    while 1 - greedy.predicted()[1] > s.target_flops and greedy.step():
        pass
    while True:  # savings of neighbouring layers overlap: check the real network, go on if needed
        result = prune(model, scores, x, 0.0, scope, p.round_to, round_to_high_res=p.round_to_high_res, layer_ratios=greedy.rates()) if greedy.rates() else None
        kept = flops(result.model) / base_flops if result else 1.0
        if kept <= s.target_flops:
            break
        if not greedy.step():
            raise RuntimeError(
                f"sensitivity.target_flops={s.target_flops}: even the highest ratios {ratios[-1]} in every "
                f"layer keep {kept:.3f} of the FLOPs; add higher sensitivity.ratios or widen prune.scope"
            )
    rates = greedy.rates()
    predicted_loss, _ = greedy.predicted()

    folder = ctx.stage_dir("sensitivity")
    write_csv(rows, folder / "sensitivity.csv")
    plots.sensitivity_heatmap(rows, layers, ratios, folder / "sensitivity.png")
    config = {"schedule": "per_layer", "ratio": 0.0, "scope": scope, "round_to": p.round_to,
              "round_to_high_res": p.round_to_high_res, "layer_ratios": rates}
    rates_file = folder / "prune_rates.yaml"
    rates_file.write_text(
        f"# Derived by the sensitivity stage: keeps {kept:.3f} of the FLOPs (target {s.target_flops}),\n"
        f"# predicted validation Dice loss {predicted_loss:.4f}. Use with: prune=per_layer and these keys.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    ctx.tracker.log_results({
        "sensitivity/base_val_dice": base_dice, "sensitivity/flops_kept": kept,
        "sensitivity/predicted_dice_loss": predicted_loss, "sensitivity/layers_pruned": len(rates),
    })
    ctx.tracker.log_artifact(folder, "sensitivity")
    log.info("Sensitivity: %d of %d layers get a rate; FLOPs kept %.3f (target %.3f)", len(rates), len(layers), kept, s.target_flops)
    return replace(state, layer_ratios=str(rates_file))


@torch.no_grad()
def _dice(model, batches, device, dataset) -> float:
    """Validation Dice over `batches` of `dataset` (3D: whole volumes, window by window)."""
    model = model.to(device).eval()
    infer = windowed(model, dataset)
    meter = SegmentationMeter()
    for images, masks in batches:
        meter.update(infer(images.to(device)), masks.to(device))
    model.cpu()
    return meter.compute()["dice"]
