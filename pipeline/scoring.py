"""Channel scores: computed with the configured criterion, saved and loaded checksummed.

Shared by the score, prune and sensitivity stages (stages never import each other).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.files import atomic_write, write_csv
from models.io import load_tensors, read_json, save_tensors
from pipeline.criteria import ScoringContext, build_criterion
from pipeline.pruning import prunable_layers
from pipeline.state import Context
from data.loader import make_loader


def compute(ctx: Context, model) -> tuple[dict[str, torch.Tensor], str]:
    """Scores of `model`'s prunable layers under the configured criterion; data-driven criteria read the
    training split and use the configured training loss."""
    criterion = build_criterion(ctx.cfg.criterion, ctx.cfg.seed)  # the job's seed, where the criterion takes one
    cfg = ctx.cfg

    def batches():
        loader = make_loader(ctx.data.dataset("train"), cfg.train.batch_size, False, 0, cfg.seed, ctx.device)
        for images, masks in loader:
            yield images.to(ctx.device), masks.to(ctx.device)

    model = model.to(ctx.device).eval()
    scoring = ScoringContext(device=ctx.device, batches=batches, loss=instantiate(cfg.loss))
    scores = criterion.score(model, prunable_layers(model), scoring)
    return {k: v.detach().float().cpu().contiguous() for k, v in scores.items()}, criterion.name


def save(scores: dict[str, torch.Tensor], criterion: str, folder: Path) -> list[dict]:
    """scores.safetensors + scores.json (criterion, sha256) + layer_stats.csv; returns the stats rows."""
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
