"""Recover the pruned network: fine-tuning, learning-rate rewinding or the scratch control, by the finetune settings.

`recovery=finetune` fine-tunes at a tenth of the training rate; `recovery=rewind` (the default) replays the training
schedule (Renda et al., ICLR 2020); `recovery=scratch` trains the pruned architecture from a fresh initialisation
(the control: what pruning itself buys). The recipes are conf/recovery/*.yaml: settings of this one loop.
Distillation from the baseline (`finetune.distill`) goes with any of them. `finetune.epochs=0` keeps the pruned
network as it is. The stage says when the weights it keeps are its starting weights (a warning, the tag
`medprune.recovery_kept_start`, the results table), and counts the images it saw (the run's budget,
RunState.budget_images)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from typing import Optional

import torch

from models.io import load_model, save_model
from pipeline.distillation import Distiller
from pipeline.measure.profiling import thread_count
from pipeline.state import MODEL_ARTIFACTS, Context, RunState, seed_everything
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
    ctx.tracker.log_results({"finetune/teacher_mb": distiller.teacher_mb})
    return distiller


def run(ctx: Context, state: RunState) -> RunState:
    cfg, data = ctx.cfg, ctx.data
    if not state.pruned:
        raise RuntimeError("finetune needs a pruned model: add prune to stages or set baseline=<a run folder that pruned>")
    if cfg.finetune.epochs == 0 and cfg.finetune.steps is None:
        log.info("finetune.epochs=0: the pruned network is the final one")
        return replace(state, final=state.pruned, budget={**state.budget, "recovery": 0})
    seed_everything(cfg.seed)
    model = load_model(state.pruned)
    scratch = str(cfg.finetune.init) == "random"
    if scratch:
        reinitialize(model, cfg.seed)
        log.info("finetune.init=random: the pruned architecture re-initialised (the scratch control)")
    folder = ctx.stage_dir("final")
    checkpoint = folder / "checkpoint"  # in the run folder: a resumed job (pipeline/journal.py) continues it
    if ctx.device.type == "cpu":  # fit runs with finetune.threads (a tag, as train.threads)
        ctx.tracker.set_tags({"medprune.finetune_threads": thread_count(cfg.finetune.threads)})
    distiller = _distiller(ctx, state, model)
    try:
        fitted = fit(
            model, data.dataset("train", augment=True), data.dataset("val"), cfg.finetune, Recipe.from_config(cfg), ctx.device,
            cfg.seed, log_metrics=ctx.tracker.log_curve, desc="finetune", checkpoint=checkpoint, distiller=distiller,
        )
    finally:
        if distiller is not None:
            distiller.close()
    save_model(model.cpu(), cfg.model, data.in_channels, data.num_classes, folder / "model")
    write_history(fitted.history, folder / "history.csv")
    shutil.rmtree(checkpoint, ignore_errors=True)
    ctx.tracker.log_results({"finetune/best_val_dice": fitted.best_dice, "finetune/kept_epoch": fitted.kept_epoch})
    kept_start = fitted.kept_epoch == 0 and bool(fitted.history)
    if kept_start:
        log.warning("Recovery kept its starting weights: no epoch of %d beat the pruned network's validation Dice "
                    "(%.4f) under finetune.keep=%s, so the final network IS the pruned one (finetune.keep=best_trained "
                    "or last keeps a trained epoch)", len(fitted.history), fitted.best_dice, cfg.finetune.keep)
        ctx.tracker.set_tags({"medprune.recovery_kept_start": "true"})
    if distiller is not None:
        ctx.tracker.log_results({"finetune/teacher_total_s": distiller.teacher_seconds})
    ctx.tracker.log_artifact(folder / "model", MODEL_ARTIFACTS["final"])
    budget = {**state.budget, "recovery": fitted.images, **({"teacher": fitted.images} if distiller is not None else {}),
              **({"from_scratch": 1} if scratch else {})}
    return replace(state, final=str(folder / "model"), budget=budget, kept_start=kept_start,
                   val_dice={**state.val_dice, "final": fitted.best_dice})


def reinitialize(model: torch.nn.Module, seed: int) -> None:
    """Every layer's own initialisation again (`reset_parameters`: PyTorch's defaults, BatchNorm statistics
    reset), seeded: the pruned architecture as if it had been built at this size."""
    torch.manual_seed(seed)
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
