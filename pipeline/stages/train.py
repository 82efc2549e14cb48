"""Train the baseline, or reuse the one already trained with the same key (verified before reuse): from this
machine's cache, or from the MLflow store in use (pipeline/baseline.py), and held by a run of that store.

Training checkpoints go to `outputs/baselines/.<key>.checkpoint/` under the key's lock, so any later
job with the same key (a rerun of a killed job, or another job of its sweep) continues the interrupted
training instead of starting it again; the folder is removed once the baseline is published.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

from data.files import atomic_folder, atomic_write, file_lock
from models import build_model
from models.io import save_model
from pipeline import baseline as baselines
from pipeline.measure.profiling import thread_count
from pipeline.state import MODEL_ARTIFACTS, Context, RunState, seed_everything
from pipeline.training import Recipe, fit, write_history

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    cfg, tracker = ctx.cfg, ctx.tracker
    key = baselines.baseline_key(cfg, ctx.data)
    target = baselines.cache_dir(ctx.outputs, key)
    with file_lock(target.parent / f"{key}.lock"):
        meta = baselines.cached(ctx.outputs, key)
        if meta is not None:
            holder = baselines.holder_on_store(target, meta, tracker.client, tracker.uri)
        else:
            holder = baselines.download_from_store(tracker.client, key, target)  # another machine's, on this store
            if holder:
                meta = baselines.cached(ctx.outputs, key)
                baselines.record_holder(target, tracker.uri, holder, fresh=True)
        reused = meta is not None
        if meta is None:
            log.info("Training baseline %s", key)
            meta = _train(ctx, key, target)
            holder = tracker.run_id
            baselines.record_holder(target, tracker.uri, holder, fresh=True)
        elif holder is None:  # trained for another store (this machine's own, another server): logged on this one
            log.info("Reusing baseline %s (trained by MLflow run %s on another store): logged on %s by this run", key,
                     meta["run_id"], tracker.uri)
            holder = tracker.run_id
            baselines.record_holder(target, tracker.uri, holder)
        else:
            log.info("Reusing baseline %s (held by MLflow run %s): %s", key, holder, target)
    tags = {"medprune.baseline_key": key, "medprune.baseline_run_id": holder, "medprune.baseline_reused": str(reused).lower()}
    if holder == tracker.run_id:  # this run holds the baseline on its store: the artifact others download
        tracker.log_artifact(target, MODEL_ARTIFACTS["baseline"])
        tags[baselines.HOLDER_TAG] = "true"
    tracker.set_tags(tags)
    tracker.log_results({"baseline/val_dice": meta["best_val_dice"]})
    budget = {**state.budget, "train": meta["images"]} if "images" in meta else dict(state.budget)
    return replace(state, baseline=str(target), baseline_key=key, baseline_run_id=holder, budget=budget,
                   val_dice={**state.val_dice, "baseline": meta["best_val_dice"]})


def _train(ctx: Context, key: str, target) -> dict:
    cfg, data = ctx.cfg, ctx.data
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    checkpoint = target.parent / f".{key}.checkpoint"
    # the thread count fit runs with: a tag, as a param the jobs that reuse this baseline would split report rows
    if ctx.device.type == "cpu":
        ctx.tracker.set_tags({"medprune.train_threads": thread_count(cfg.train.threads)})
    fitted = fit(
        model, data.dataset("train", augment=True), data.dataset("val"), cfg.train, Recipe.from_config(cfg), ctx.device, cfg.seed,
        log_metrics=ctx.tracker.log_curve, desc="train", checkpoint=checkpoint,
    )
    meta = {"key": key, "run_id": ctx.tracker.run_id, "epochs": len(fitted.history), "best_val_dice": fitted.best_dice,
            "kept_epoch": fitted.kept_epoch, "images": fitted.images}
    with atomic_folder(target) as tmp:  # the folder appears complete or not at all
        save_model(model.cpu(), cfg.model, data.in_channels, data.num_classes, tmp)
        write_history(fitted.history, tmp / "history.csv")
        atomic_write(tmp / baselines.BASELINE_META, json.dumps(meta, indent=2))
    shutil.rmtree(checkpoint, ignore_errors=True)
    return meta
