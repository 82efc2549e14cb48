"""The one training loop, used by the train and fine-tune stages (and between iterative prune steps).

The optimizer, the lr scheduler and the loss come from their config groups (`Recipe`); the learning
rate, weight decay and length from the phase (`train` or `finetune`). The weights with the best
validation Dice are kept. `precision` (fp32 | bf16 | fp16) is the autocast type of the forward and loss
(pipeline/precision.py): bf16 on CUDA and on CPUs with native bf16, fp16 with a gradient scaler on CUDA.
"""
from __future__ import annotations

import copy
import math
import inspect
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from data.files import read_csv, write_csv
from data.loader import make_loader
from pipeline.checkpoint import Checkpoint, epoch_seed
from pipeline.measure.casewise import split_metrics
from pipeline.measure.profiling import cpu_threads
from pipeline.precision import autocast_dtype
from pipeline.state import seed_everything

log = logging.getLogger(__name__)

# Scheduler arguments that are a phase's length: filled with the phase's epoch count when the
# scheduler's config leaves them out (cosine's T_max, poly's and constant's total_iters).
LENGTH_ARGS = ("T_max", "total_iters")
# Scheduler keys that are a fraction of the phase's schedule length instead of an argument of the scheduler
# (fraction key -> the argument it becomes): StepLR's step_size = round(step_fraction x the schedule's length),
# computed here like T_max, so fine-tuning steps at its own schedule's fraction, not at train.epochs'.
LENGTH_FRACTIONS = {"step_fraction": "step_size"}


def scheduler_fractions(node) -> tuple[dict, dict[str, float]]:
    """A scheduler config split into (its config without LENGTH_FRACTIONS keys, {argument: fraction});
    ValueError naming the key when a fraction is not in (0, 1] or its scheduler has no such argument."""
    from omegaconf import OmegaConf

    settings = dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node)
    fractions = {}
    for key, arg in LENGTH_FRACTIONS.items():
        if key not in settings:
            continue
        value = settings.pop(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"scheduler.{key}={value!r} is out of range: expected > 0 and <= 1 (a fraction of the phase's schedule)")
        if arg in settings:
            raise ValueError(f"scheduler.{key} and scheduler.{arg} are both set: expected one of them")
        fractions[arg] = float(value)
    return settings, fractions


@dataclass
class Recipe:
    """How to train: a partial optimizer (given params, lr, weight_decay), a partial lr scheduler (given the
    optimizer and, where it takes one, the phase's length) and the loss module."""

    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler]
    loss: nn.Module
    fractions: dict[str, float] = field(default_factory=dict)  # scheduler argument -> fraction of the schedule's length

    @classmethod
    def from_config(cls, cfg) -> "Recipe":
        scheduler, fractions = scheduler_fractions(cfg.scheduler)
        return cls(instantiate(cfg.optimizer), instantiate(scheduler), instantiate(cfg.loss), fractions)

    def build(self, model: nn.Module, settings, epochs: Optional[int] = None,
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """`epochs`: the phase's length when it is not `settings.epochs` (a budget given in steps).

        The schedule runs over `settings.schedule_epochs` epochs where the phase sets it (fine-tuning; null: the
        phase's own length) and starts at its epoch `settings.schedule_start`: learning-rate rewinding replays
        the training schedule (its length, from its start or a later epoch) whatever the phase's budget."""
        optimizer = self.optimizer(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        target = getattr(self.scheduler, "func", self.scheduler)
        given = getattr(self.scheduler, "keywords", {})
        params = inspect.signature(target).parameters
        epochs = int(settings.epochs if epochs is None else epochs)
        span = getattr(settings, "schedule_epochs", None)
        length = {name: int(span or epochs) for name in LENGTH_ARGS if name in params and name not in given}
        length.update({arg: max(1, int(round(fraction * int(span or epochs)))) for arg, fraction in self.fractions.items()})
        scheduler = self.scheduler(optimizer, **length)
        start = int(getattr(settings, "schedule_start", 0) or 0)
        if start:
            with warnings.catch_warnings():  # stepping a schedule before any optimiser step is the point here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start):
                    scheduler.step()
        return optimizer, scheduler


@dataclass
class Fitted:
    """What a training phase did: its per-epoch history (epochs 1..N), the kept weights' validation Dice and epoch
    (0: the starting weights), and the images its optimiser steps saw (the phase's budget)."""

    history: list[dict[str, float]]
    best_dice: float
    kept_epoch: int
    images: int


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    settings,
    recipe: Recipe,
    device: torch.device,
    seed: int,
    log_metrics: Optional[Callable[[dict[str, float], int], None]] = None,
    desc: str = "train",
    checkpoint: Optional[Path] = None,
    distiller=None,
    penalty=None,
) -> Fitted:
    """Trains in place and leaves the weights `settings.keep` picks in `model`: the best validation Dice with the
    starting weights (epoch 0) a candidate (`best`), without them (`best_trained`), or the last epoch's (`last`).

    Every RNG is reseeded from (seed, epoch) when an epoch starts. With `checkpoint` (a folder), the
    training state is saved every `settings.checkpoint_every` epochs and, if the folder already holds a
    checkpoint, training continues after it: an interrupted run resumed gives the same weights as one
    that ran through (pipeline/checkpoint.py). The caller removes the folder once it has the result.

    On CPU, torch runs `settings.threads` threads meanwhile (null: all cores): on a shared machine fewer
    threads can be much faster (a step took 6.3 s with two contended threads, 1.3 s with one).

    `distiller` (pipeline/distillation.py): adds its distillation terms to the loss; its adapter, if any,
    trains with the model. The history gains `distill_loss` and `teacher_s` (the teacher's time).

    `penalty` (pipeline/sparsity.py): its `loss(model)` is added to every step's loss (a sparsity penalty), and its
    `after_epoch()` runs after every epoch.

    Returns the history, the kept weights' validation Dice and epoch, and the images seen (`Fitted`)."""
    args = (model, train_set, val_set, settings, recipe, device, seed, log_metrics, desc, checkpoint, distiller, penalty)
    if device.type != "cpu":
        return _fit(*args)
    with cpu_threads(settings.threads) as threads:
        log.info("%s on %d CPU thread%s", desc, threads, "" if threads == 1 else "s")
        return _fit(*args)


def budget(settings, batches_per_epoch: int, desc: str = "finetune") -> tuple[int, Optional[int]]:
    """(epochs, optimiser steps or None): `steps` (fine-tuning only; null: use `epochs`) is the budget when
    set, run as ceil(steps / batches per epoch) epochs, the last one cut at the step count."""
    steps = getattr(settings, "steps", None)
    if steps is None:
        return int(settings.epochs), None
    epochs = math.ceil(int(steps) / max(batches_per_epoch, 1))
    log.info("%s.steps=%d: %d epoch(s) of %d optimiser steps (%s.epochs is not used)", desc, steps, epochs,
             batches_per_epoch, desc)
    return epochs, int(steps)


def _fit(model, train_set, val_set, settings, recipe, device, seed, log_metrics, desc, checkpoint, distiller=None,
         penalty=None):
    model.to(device)
    history: list[dict[str, float]] = []
    if settings.epochs == 0 and getattr(settings, "steps", None) is None:
        return Fitted(history, float("nan"), 0, 0)
    keep = str(getattr(settings, "keep", "best"))
    train_loader = make_loader(train_set, settings.batch_size, True, settings.num_workers, seed, device)
    val_loader = make_loader(val_set, settings.batch_size, False, settings.num_workers, seed, device)
    epochs, max_steps = budget(settings, len(train_loader), desc)
    adapter = distiller.adapter if distiller is not None and distiller.adapter is not None else nn.Identity()
    optimizer, scheduler = recipe.build(nn.ModuleList([model, adapter]), settings, epochs)  # adapter: no params if none
    loss_fn = recipe.loss.to(device)
    dtype = autocast_dtype(settings.precision, device, f"{desc}.precision")
    if dtype is not None:
        log.info("%s in %s autocast on %s", desc, settings.precision, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)  # fp16 gradients underflow without it
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    saver = Checkpoint(checkpoint, settings.checkpoint_every) if checkpoint is not None else None
    resumed = saver.load() if saver is not None else None
    if resumed is not None:
        done, parts = resumed
        model.load_state_dict(parts["model"])
        if "adapter" in parts:
            adapter.load_state_dict(parts["adapter"])
        optimizer.load_state_dict(parts["optimizer"])
        scheduler.load_state_dict(parts["scheduler"])
        scaler.load_state_dict(parts["scaler"])
        history, best_dice, best_state = parts["history"], parts["best_dice"], parts["best_state"]
        kept = int(parts.get("kept_epoch", 0))
        log.info("%s: resuming after epoch %d of %d from the checkpoint in %s", desc, done, epochs, saver.folder)
    else:
        done, kept = 0, 0
        start_dice = split_metrics(model, val_loader, device)["dice"]
        # keep=best: the starting weights are a candidate too, so a phase never ends worse (on validation) than it
        # began; the other rules take the trained epochs only
        best_dice = start_dice if keep == "best" else -math.inf
        best_state = copy.deepcopy(model.state_dict())
        if log_metrics:
            log_metrics({f"{desc}/val_dice": start_dice}, 0)

    for epoch in range(done + 1, epochs + 1):
        seed_everything(epoch_seed(seed, epoch))  # dropout and anything else on the global RNGs
        train_loader.generator.manual_seed(epoch_seed(seed, epoch))  # shuffling, and the workers' seeds
        getattr(train_set, "reseed", lambda s: None)(epoch_seed(seed, epoch))  # augmentation in this process
        model.train()
        total, seen, distilled = 0.0, 0, 0.0
        teacher_before, epoch_start = (distiller.teacher_seconds if distiller else 0.0), time.perf_counter()
        # A bar on a terminal only; in a log file (SLURM, `make run > log`) the per-epoch log line is the record.
        bar = tqdm(train_loader, desc=f"{desc} {epoch}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True,
                   disable=None)
        for batch, (images, masks) in enumerate(bar):
            if max_steps is not None and (epoch - 1) * len(train_loader) + batch >= max_steps:
                break  # the step budget ends inside this (last) epoch
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images).float()
                loss = loss_fn(logits, masks)
                if distiller is not None:
                    term = distiller.loss(images, logits)
                    loss = loss + term
                    distilled += float(term.detach()) * images.shape[0]
            if settings.bn_l1 > 0:  # network slimming: sparse BatchNorm scales make bn_scale scores decisive
                loss = loss + settings.bn_l1 * sum(m.weight.abs().sum() for m in bn_layers)
            if penalty is not None:  # group lasso / growing regularisation over the pruning groups
                loss = loss + penalty.loss(model)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * images.shape[0]
            seen += images.shape[0]
            bar.set_postfix(loss=f"{total / seen:.4f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if penalty is not None:
            penalty.after_epoch()
        val = split_metrics(model, val_loader, device)
        row = {"loss": total / max(seen, 1), "val_dice": val["dice"], "val_iou": val["iou"], "lr": lr, "images": seen}
        if distiller is not None:  # the distillation term (part of loss) and the teacher's share of the epoch
            teacher_s = distiller.teacher_seconds - teacher_before
            row.update(distill_loss=distilled / max(seen, 1), teacher_s=teacher_s,
                       teacher_fraction=teacher_s / max(time.perf_counter() - epoch_start, 1e-9))
        history.append(row)
        log.info("%s epoch %d/%d: loss %.4f, val Dice %.4f", desc, epoch, epochs, row["loss"], row["val_dice"])
        if log_metrics:
            log_metrics({f"{desc}/{k}": v for k, v in row.items() if k != "images"}, epoch)
        if val["dice"] > best_dice or keep == "last":
            best_dice, best_state, kept = val["dice"], copy.deepcopy(model.state_dict()), epoch
        if saver is not None and saver.due(epoch, epochs):
            saver.save(epoch, {
                "model": model.state_dict(), "adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
                "best_dice": best_dice, "best_state": best_state, "kept_epoch": kept,
            })
    model.load_state_dict(best_state)
    return Fitted(history, best_dice, kept, int(sum(row.get("images", 0) for row in history)))


def write_history(history: list[dict[str, float]], path: Path) -> None:
    write_csv([{"epoch": i + 1, **row} for i, row in enumerate(history)], path)


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [{k: float(v) for k, v in row.items()} for row in read_csv(path)]
