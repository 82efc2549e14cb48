"""Train the baseline on with a sparsity-inducing penalty (pipeline/sparsity.py) before it is scored and pruned.

The sparse network depends on the baseline, the sparsity settings, the pruning scope (whose groups the penalty
falls on) and the seed, not on the ratio: it is cached under `outputs/sparse/<key>/` (verified before reuse, a
lock per key, checkpoints in `outputs/sparse/.<key>.checkpoint/`, as the baseline is), so a sweep over ratios
trains it once. The score and prune stages then work on it; the evaluate stage's baseline row stays the dense
baseline. Its images count in the pruned and final networks' budgets.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from data.files import atomic_folder, atomic_write, file_lock
from models.io import load_model, save_model
from pipeline.baseline import verified_entry
from pipeline import sparsity
from pipeline.state import Context, RunState, seed_everything
from pipeline.training import Recipe, fit, write_history

log = logging.getLogger(__name__)

META = "sparse.json"


def sparse_key(ctx: Context, state: RunState) -> str:
    settings = OmegaConf.to_container(ctx.cfg.sparsity, resolve=True, enum_to_str=True)
    parts = {"baseline": state.baseline_key or str(state.baseline), "sparsity": settings,
             "scope": str(ctx.cfg.prune.scope), "seed": int(ctx.cfg.seed)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def run(ctx: Context, state: RunState) -> RunState:
    s = ctx.cfg.sparsity
    if not state.baseline:
        raise RuntimeError("sparsify needs a baseline model: add train to stages or set baseline=<run id or path>")
    key = sparse_key(ctx, state)
    target = Path(ctx.outputs) / "sparse" / key
    with file_lock(target.parent / f"{key}.lock"):
        meta = verified_entry(target, META, "sparse network")
        if meta is not None:
            log.info("Reusing the sparse network %s (sparsity.method=%s, trained by MLflow run %s)", key, s.method, meta["run_id"])
        else:
            meta = _train(ctx, state, key, target)
    ctx.tracker.log_results({"sparsify/near_zero_channels": meta["near_zero_channels"]})
    ctx.tracker.set_tags({"medprune.sparse_key": key})
    return replace(state, sparse=str(target), budget={**state.budget, "sparse": meta["images"]})


def _train(ctx: Context, state: RunState, key: str, target: Path) -> dict:
    cfg, data, s = ctx.cfg, ctx.data, ctx.cfg.sparsity
    seed_everything(cfg.seed)
    model = load_model(state.baseline)
    before = sparsity.near_zero_fraction(model, str(cfg.prune.scope))
    method = str(s.method)
    # the training loop's settings, with the phase's own length, rate and penalty; its last epoch is kept (the
    # penalty's whole effect), not the best on validation
    settings = OmegaConf.merge(cfg.train, {"epochs": s.epochs, "lr": s.lr, "keep": "last",
                                           "bn_l1": float(s.strength) if method == "bn_l1" else float(cfg.train.bn_l1)})
    penalty = sparsity.penalty(model, method, float(s.strength), float(s.growth), ctx.example_input(),
                               str(cfg.prune.scope))
    log.info("Sparse training: %s (strength %g%s) for %d epochs at lr %g", method, s.strength,
             f", growth {s.growth:g}" if method == "growing_reg" else "", s.epochs, s.lr)
    checkpoint = target.parent / f".{key}.checkpoint"
    fitted = fit(model, data.dataset("train", augment=True), data.dataset("val"), settings, Recipe.from_config(cfg), ctx.device,
                 cfg.seed, log_metrics=ctx.tracker.log_curve, desc="sparsify", checkpoint=checkpoint,
                 penalty=penalty)
    after = sparsity.near_zero_fraction(model.cpu(), str(cfg.prune.scope))
    log.info("Sparse training: %.1f%% of the in-scope channels near zero (below 1%% of their layer's largest norm), "
             "%.1f%% before; validation Dice %.4f", 100 * after, 100 * before, fitted.best_dice)
    meta = {"key": key, "run_id": ctx.tracker.run_id, "method": method, "images": fitted.images,
            "near_zero_channels": after, "val_dice": fitted.best_dice}
    with atomic_folder(target) as tmp:
        save_model(model, cfg.model, data.in_channels, data.num_classes, tmp)
        write_history(fitted.history, tmp / "history.csv")
        atomic_write(tmp / META, json.dumps(meta, indent=2))
    shutil.rmtree(checkpoint, ignore_errors=True)
    ctx.tracker.log_artifact(target, "sparse")
    return meta
