"""Remove channels structurally from the baseline, by the saved scores and the prune schedule.

Each schedule has its own config and function (pipeline/schedules.py). What was finally applied, and where
the rates came from (the config, the sensitivity stage, a search), is written to `pruned/rates.json`,
logged, and tagged (`medprune.rates_source`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from data.files import atomic_write, write_csv
from models.io import load_model, save_model
from pipeline import plots, scoring
from pipeline.criteria.magnitude import filter_norms
from pipeline.measure.profiling import count_flops, count_params
from pipeline.measure.quality import aligned_fraction
from pipeline.pruning import in_scope, prunable_layers
from pipeline.schedules import SCHEDULES, Inputs
from pipeline.state import MODEL_ARTIFACTS, Context, RunState, seed_everything
from pipeline.training import Recipe, fit, write_history

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    cfg, data = ctx.cfg, ctx.data
    if not state.baseline:
        raise RuntimeError("prune needs a baseline model: add train to stages or set baseline=<run id or path>")
    model = load_model(state.to_prune)  # the sparse-trained baseline, if any
    scores_dir = state.scores
    if scores_dir:
        scores, criterion = scoring.load(scores_dir)
        if criterion != cfg.criterion.name:
            raise RuntimeError(f"the scores in {scores_dir} were made by {criterion}, but criterion.name={cfg.criterion.name}")
    else:
        log.info("No scores in the state: scoring with %s first", cfg.criterion.name)
        scores, criterion = scoring.compute(ctx, model)
        scores_dir = ctx.stage_dir("scores")
        scoring.save(scores, criterion, scores_dir)
    p = cfg.prune
    scope, schedule = str(p.scope), str(p.schedule)
    if not any(in_scope(n, scope) for n in prunable_layers(model)):
        raise RuntimeError(f"prune.scope={scope} matches no prunable layer of this model")

    derived = None
    if state.layer_ratios:
        derived = (state.layer_ratios, yaml.safe_load(Path(state.layer_ratios).read_text())["layer_ratios"])
    folder = ctx.stage_dir("pruned")
    between: list[int] = []  # images seen by the fine-tuning between iterative steps
    inputs = Inputs(
        model=model, scores=scores, example=ctx.example_input(), flops=lambda m: count_flops(m, ctx.input_shape),
        rescore=lambda m: scoring.compute(ctx, m)[0],
        between_steps=lambda m, step: between.append(_finetune_between(ctx, m, step)),
        derived_rates=derived, folder=folder,
    )
    result, applied, metrics = SCHEDULES[schedule].apply(p, inputs)
    applied = {"schedule": schedule, "scope": scope, "round_to": p.round_to,
               "round_to_high_res": p.round_to_high_res, **applied,
               "removed_per_layer": {r["layer"]: round(r["removed"], 4) for r in result.channels}}

    save_model(result.model, cfg.model, data.in_channels, data.num_classes, folder / "model")
    table = write_csv(result.channels, folder / "channels.csv")
    rates_file = atomic_write(folder / "rates.json", json.dumps(applied, indent=2) + "\n")
    ctx.tracker.set_tags({"medprune.rates_source": applied["source"]})
    log.info("Applied prune.schedule=%s, rates from %s (pruned/rates.json)", schedule, applied["source"])
    plot = plots.channels_before_after(result.channels, folder / "channels.png", f"{cfg.criterion.name}, {schedule}, scope {scope}")
    names = list(prunable_layers(model))
    after_layers = prunable_layers(result.model)
    norms = plots.norms_before_after(
        names,
        [float(filter_norms(prunable_layers(model)[n], 1).mean()) for n in names],
        [float(filter_norms(after_layers[n], 1).mean()) for n in names],
        folder / "l1_norms.png", "L1",
    )
    before, after = count_params(model), count_params(result.model)
    metrics["prune/params_kept"] = after / before
    metrics["prune/channels_kept"] = sum(r["after"] for r in result.channels) / sum(r["before"] for r in result.channels)
    metrics["prune/shortfall_layers"] = len(result.shortfall)
    if result.shortfall:  # removed less than asked, beyond what rounding explains: said once, and the run marked
        shown = ", ".join(f"{r['layer']} ({r['before']} -> {r['after']}, at most {r['allowed']} asked)" for r in result.shortfall[:4])
        more = f" and {len(result.shortfall) - 4} more" if len(result.shortfall) > 4 else ""
        note = (f"{len(result.shortfall)} layer(s) kept more channels than prune.schedule={schedule} asks, beyond what "
                f"rounding explains: {shown}{more} (pruned/channels.csv)")
        log.warning("%s", note)
        ctx.tracker.set_tags({"medprune.prune_shortfall": note[:5000]})
    ctx.tracker.log_results(metrics)
    for path in (table, plot, norms, rates_file, *(folder / name for name in applied.get("files", []))):
        ctx.tracker.log_artifact(path, "pruning")
    ctx.tracker.log_artifact(folder / "model", MODEL_ARTIFACTS["pruned"])
    log.info("Pruned %s -> %s parameters (%.1f%% kept)", f"{before:,}", f"{after:,}", 100 * after / before)
    aligned = aligned_fraction(result.model)
    if p.round_to is None and aligned < 1 and max(r["before"] for r in result.channels) >= 64:  # not a tiny network
        log.info("Exact rates (prune.round_to=null) left %.0f%% of the prunable layers at multiples of 8 channels; CPU "
                 "and GPU convolution kernels run fastest on such counts (prune.round_to=8, docs/PERFORMANCE.md)",
                 100 * aligned)
    budget = {**state.budget, "between_steps": sum(between)} if between else dict(state.budget)
    return replace(state, scores=str(scores_dir), pruned=str(folder / "model"), budget=budget)


def _finetune_between(ctx: Context, model, step: int) -> int:
    """Iterative schedule: fine-tune `epochs_between` epochs (the recovery's settings: recovery=rewind rewinds
    between steps too) between prune steps; returns the images it saw."""
    epochs = ctx.cfg.prune.epochs_between
    if epochs == 0:
        return 0
    seed_everything(ctx.cfg.seed + step)
    settings = OmegaConf.merge(ctx.cfg.finetune, {"epochs": epochs, "steps": None})  # epochs_between is the budget
    fitted = fit(
        model, ctx.data.dataset("train", augment=True), ctx.data.dataset("val"), settings, Recipe.from_config(ctx.cfg),
        ctx.device, ctx.cfg.seed, log_metrics=ctx.tracker.log_curve, desc=f"prune_step{step}",
    )
    history = ctx.stage_dir("pruned") / f"step{step}_history.csv"  # its curve (not an MLflow metric)
    write_history(fitted.history, history)
    ctx.tracker.log_artifact(history, "pruning")
    model.cpu().eval()
    return fitted.images
