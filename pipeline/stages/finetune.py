"""Fine-tune the pruned network with its own settings (finetune.epochs=0: keep it as it is)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from typing import Optional

from models.io import load_model, save_model
from pipeline.distillation import Distiller
from pipeline.profiling import thread_count
from pipeline.state import Context, RunState, seed_everything
from pipeline.training import Recipe, fit, write_history

log = logging.getLogger(__name__)


def _distiller(ctx: Context, state: RunState, student) -> Optional[Distiller]:
    """The baseline as teacher when finetune.distill.enabled (pipeline/distillation.py)."""
    d = ctx.cfg.finetune.distill
    if not d.enabled:
        return None
    if not state.baseline:
        raise RuntimeError("finetune.distill.enabled=true needs the unpruned baseline as teacher: add train to stages "
                           "or set baseline=<run id or path>")
    teacher = load_model(state.baseline).to(ctx.device)
    distiller = Distiller(teacher, student.to(ctx.device), ctx.example_input(), float(d.alpha), float(d.temperature),
                          str(d.loss), float(d.feature_weight))
    log.info("Distilling from the baseline (%.2f MB of weights, inference mode): alpha %g, %s at T=%g%s", distiller.teacher_mb,
             d.alpha, d.loss, d.temperature, f", decoder features x {d.feature_weight:g}" if d.feature_weight > 0 else "")
    ctx.tracker.log_metrics({"finetune/teacher_mb": distiller.teacher_mb})
    return distiller


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
    distiller = _distiller(ctx, state, model)
    try:
        history, best_dice = fit(
            model, data.dataset("train", augment=True), data.dataset("val"), cfg.finetune, Recipe.from_config(cfg), ctx.device,
            cfg.seed, log_metrics=ctx.tracker.log_metrics, desc="finetune", checkpoint=checkpoint, distiller=distiller,
        )
    finally:
        if distiller is not None:
            distiller.close()
    save_model(model.cpu(), cfg.model, data.in_channels, data.num_classes, folder / "model")
    write_history(history, folder / "history.csv")
    shutil.rmtree(checkpoint, ignore_errors=True)
    ctx.tracker.log_metrics({"finetune/best_val_dice": best_dice})
    if distiller is not None:
        ctx.tracker.log_metrics({"finetune/teacher_total_s": distiller.teacher_seconds})
    ctx.tracker.log_artifact(folder / "model", "final_model")
    return replace(state, final=str(folder / "model"))
