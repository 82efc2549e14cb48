"""Remove channels structurally from the baseline, by the saved scores and the prune settings."""
from __future__ import annotations

import logging
from dataclasses import replace

from models.io import load_model, save_model
from pipeline import plots
from pipeline.profiling import count_params
from pipeline.report import write_csv
from pipeline.pruning import in_scope, prunable_layers, prune
from pipeline.stages import score as score_stage
from pipeline.state import Context, RunState

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    cfg, data = ctx.cfg, ctx.data
    if not state.baseline:
        raise RuntimeError("prune needs a baseline model: add train to stages or set baseline=<run id or path>")
    model = load_model(state.baseline)
    scores_dir = state.scores
    if scores_dir:
        scores, criterion = score_stage.load(scores_dir)
        if criterion != cfg.criterion.name:
            raise RuntimeError(f"the scores in {scores_dir} were made by {criterion}, but criterion.name={cfg.criterion.name}")
    else:
        log.info("No scores in the state: scoring with %s first", cfg.criterion.name)
        scores, criterion = score_stage.compute(ctx, model)
        scores_dir = ctx.stage_dir("scores")
        score_stage.save(scores, criterion, scores_dir)
    p = cfg.prune
    scope = p.scope.value if hasattr(p.scope, "value") else str(p.scope)
    if not any(in_scope(n, scope) for n in prunable_layers(model)):
        raise RuntimeError(f"prune.scope={scope} matches no prunable layer of this model")
    result = prune(model, scores, ctx.example_input(), p.ratio, scope, p.round_to)

    folder = ctx.stage_dir("pruned")
    save_model(result.model, cfg.model, data.in_channels, data.num_classes, folder / "model")
    table = write_csv(result.channels, folder / "channels.csv")
    plot = plots.channels_before_after(result.channels, folder / "channels.png", f"{cfg.criterion.name}, ratio {p.ratio}, scope {scope}")
    before, after = count_params(model), count_params(result.model)
    ctx.tracker.log_metrics({"prune/params_kept": after / before, "prune/channels_kept": sum(r["after"] for r in result.channels) / sum(r["before"] for r in result.channels)})
    for path in (table, plot):
        ctx.tracker.log_artifact(path, "pruning")
    ctx.tracker.log_artifact(folder / "model", "pruned_model")
    log.info("Pruned %s -> %s parameters (%.1f%% kept)", f"{before:,}", f"{after:,}", 100 * after / before)
    return replace(state, scores=str(scores_dir), pruned=str(folder / "model"))
