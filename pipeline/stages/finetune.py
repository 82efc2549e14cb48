"""Fine-tune the pruned network with its own settings (finetune.epochs=0: keep it as it is)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace

from models.io import load_model, save_model
from pipeline.profiling import thread_count
from pipeline.state import Context, RunState, seed_everything
from pipeline.training import Recipe, fit, write_history

log = logging.getLogger(__name__)


def run(ctx: Context, state: RunState) -> RunState:
    cfg, data = ctx.cfg, ctx.data
    if not state.pruned:
        raise RuntimeError("finetune needs a pruned model: add prune to stages or set baseline=<a run folder that pruned>")
    if cfg.finetune.epochs == 0 and cfg.finetune.steps is None:
        log.info("finetune.epochs=0: the pruned network is the final one")
        return replace(state, final=state.pruned)
    seed_everything(cfg.seed)
    model = load_model(state.pruned)
    folder = ctx.stage_dir("final")
    checkpoint = folder / "checkpoint"  # in the run folder: a resumed job (pipeline/journal.py) continues it
    if ctx.device.type == "cpu":  # fit runs with finetune.threads (a tag, as train.threads)
        ctx.tracker.set_tags({"medprune.finetune_threads": thread_count(cfg.finetune.threads)})
    history, best_dice = fit(
        model, data.dataset("train", augment=True), data.dataset("val"), cfg.finetune, Recipe.from_config(cfg), ctx.device, cfg.seed,
        log_metrics=ctx.tracker.log_metrics, desc="finetune", checkpoint=checkpoint,
    )
    save_model(model.cpu(), cfg.model, data.in_channels, data.num_classes, folder / "model")
    write_history(history, folder / "history.csv")
    shutil.rmtree(checkpoint, ignore_errors=True)
    ctx.tracker.log_metrics({"finetune/best_val_dice": best_dice})
    ctx.tracker.log_artifact(folder / "model", "final_model")
    return replace(state, final=str(folder / "model"))
