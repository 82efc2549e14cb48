"""Score every prunable output channel of the baseline with the configured criterion."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.files import atomic_write
from models.io import load_model, load_tensors, read_json, save_tensors
from pipeline.criteria import ScoringContext
from pipeline.pruning import prunable_layers
from pipeline.report import write_csv
from pipeline.state import Context, RunState
from pipeline.training import make_loader

log = logging.getLogger(__name__)


def compute(ctx: Context, model) -> tuple[dict[str, torch.Tensor], str]:
    """Scores of `model` under the configured criterion (also used by prune when score did not run)."""
    criterion = instantiate(ctx.cfg.criterion)
    cfg = ctx.cfg

    def batches():
        loader = make_loader(ctx.data.dataset("train"), cfg.train.batch_size, False, 0, cfg.seed, ctx.device)
        for images, masks in loader:
            yield images.to(ctx.device), masks.to(ctx.device)

    model = model.to(ctx.device).eval()
    scores = criterion.score(model, prunable_layers(model), ScoringContext(device=ctx.device, batches=batches))
    return {k: v.detach().float().cpu().contiguous() for k, v in scores.items()}, criterion.name


def save(scores: dict[str, torch.Tensor], criterion: str, folder: Path) -> list[dict]:
    digest = save_tensors(scores, folder / "scores.safetensors")
    atomic_write(folder / "scores.json", json.dumps({"criterion": criterion, "layers": len(scores), "sha256": digest}, indent=2))
    rows = [
        {"layer": name, "channels": s.numel(), "mean": float(s.mean()), "std": float(s.std()) if s.numel() > 1 else 0.0,
         "min": float(s.min()), "max": float(s.max())}
        for name, s in scores.items()
    ]
    write_csv(rows, folder / "layer_stats.csv")
    return rows


def load(folder: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    folder = Path(folder)
    meta = read_json(folder / "scores.json", "scores file")
    return load_tensors(folder / "scores.safetensors", meta.get("sha256"), "scores file"), meta.get("criterion")


def run(ctx: Context, state: RunState) -> RunState:
    if not state.baseline:
        raise RuntimeError("score needs a baseline model: add train to stages or set baseline=<run id or path>")
    model = load_model(state.baseline)
    scores, criterion = compute(ctx, model)
    folder = ctx.stage_dir("scores")
    rows = save(scores, criterion, folder)
    ctx.tracker.log_metrics({f"score/{r['layer']}": r["mean"] for r in rows})
    ctx.tracker.log_artifact(folder, "scores")
    log.info("Scored %d layers with %s", len(rows), criterion)
    return replace(state, scores=str(folder))
