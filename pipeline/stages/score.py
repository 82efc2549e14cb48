"""Score every prunable output channel of the baseline with the configured criterion."""
from __future__ import annotations

import logging
from dataclasses import replace

from models.io import load_model
from pipeline import scoring
from pipeline.state import Context, RunState

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    if not state.baseline:
        raise RuntimeError("score needs a baseline model: add train to stages or set baseline=<run id or path>")
    scores, criterion = scoring.compute(ctx, load_model(state.to_prune))  # the sparse-trained baseline, if any
    folder = ctx.stage_dir("scores")
    rows = scoring.save(scores, criterion, folder)  # per-layer statistics: scores/layer_stats.csv
    ctx.tracker.log_artifact(folder, "scores")
    log.info("Scored %d layers with %s", len(rows), criterion)
    return replace(state, scores=str(folder))
