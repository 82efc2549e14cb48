"""Train the baseline, or reuse the one already trained with the same key."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace

from models import build_model
from models.io import save_model
from pipeline import baseline as baselines
from pipeline.state import Context, RunState, seed_everything
from pipeline.tracking import file_lock
from pipeline.training import fit, write_history

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    cfg = ctx.cfg
    key = baselines.baseline_key(cfg)
    target = baselines.cache_dir(ctx.outputs, key)
    with file_lock(target.parent / f"{key}.lock"):
        meta = baselines.cached(ctx.outputs, key)
        if meta is not None:
            log.info("Reusing baseline %s (trained by MLflow run %s): %s", key, meta["run_id"], target)
            reused = True
        else:
            log.info("Training baseline %s", key)
            meta = _train(ctx, key, target)
            reused = False
    ctx.tracker.set_tags(
        {"medprune.baseline_key": key, "medprune.baseline_run_id": meta["run_id"], "medprune.baseline_reused": str(reused).lower()}
    )
    ctx.tracker.log_metrics({"baseline/val_dice": meta["best_val_dice"]})
    if not reused:
        ctx.tracker.log_artifact(target, "baseline")
    return replace(state, baseline=str(target), baseline_key=key, baseline_run_id=meta["run_id"])


def _train(ctx: Context, key: str, target) -> dict:
    cfg, data = ctx.cfg, ctx.data
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    history, best_dice = fit(
        model, data.dataset("train", augment=True), data.dataset("val"), cfg.train, ctx.device, cfg.seed,
        log_metrics=ctx.tracker.log_metrics, desc="train",
    )
    tmp = target.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model.cpu(), cfg.model, data.in_channels, data.num_classes, tmp)
    write_history(history, tmp / "history.csv")
    meta = {
        "key": key,
        "run_id": ctx.tracker.run_id,
        "epochs": len(history),
        "best_val_dice": best_dice,
    }
    (tmp / baselines.BASELINE_META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)  # a half-written folder from a killed job
    os.replace(tmp, target)
    return meta
