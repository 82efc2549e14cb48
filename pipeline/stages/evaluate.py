"""Test-split quality and cost of the baseline, the pruned and the final network, side by side."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from models.io import load_model, model_size_mb
from pipeline import plots
from pipeline.profiling import count_flops, count_params, measure_latency
from pipeline.metrics import binarize, dice_iou
from pipeline.report import LABELS, results_table
from pipeline.state import Context, RunState
from pipeline.training import evaluate as test_metrics
from pipeline.training import make_loader, read_history

log = logging.getLogger(__name__)

ROWS = ("baseline", "pruned", "final")


def measure(ctx: Context, model_dir: str) -> dict[str, float]:
    e = ctx.cfg.evaluate
    model = load_model(model_dir).to(ctx.device).eval()
    loader = make_loader(ctx.data.dataset("test"), e.batch_size, False, 0, ctx.cfg.seed, ctx.device)
    quality = test_metrics(model, loader, ctx.device, e.threshold)
    extra = {}
    for split in e.extra_splits:
        split_loader = make_loader(ctx.data.dataset(split), e.batch_size, False, 0, ctx.cfg.seed, ctx.device)
        m = test_metrics(model, split_loader, ctx.device, e.threshold)
        extra.update({f"{split}_dice": m["dice"], f"{split}_iou": m["iou"]})
    flops = count_flops(model, ctx.input_shape)
    latency = measure_latency(model, ctx.input_shape, e.latency_warmup, e.latency_runs, e.latency_threads)
    volume = {"dice_3d": quality["dice_3d"], "test_cases": quality["cases"]} if "dice_3d" in quality else {}
    return {
        **volume,
        **extra,
        "dice": quality["dice"],
        "iou": quality["iou"],
        "test_images": quality["images"],
        "params_m": count_params(model) / 1e6,
        "flops_g": flops / 1e9,
        "macs_g": flops / 2e9,
        "size_mb": model_size_mb(model_dir),
        "latency_ms": latency["latency_ms"],
        "latency_p90_ms": latency["latency_p90_ms"],
        "latency_threads": latency["latency_threads"],
    }, latency["latency_device"]


def run(ctx: Context, state: RunState) -> RunState:
    sources = {"baseline": state.baseline, "pruned": state.pruned, "final": state.final}
    if not any(sources.values()):
        raise RuntimeError("evaluate has no model: run train/prune first or set baseline=<run id or path>")
    results: dict[str, dict] = {}
    device_names = set()
    for row in ROWS:
        path = sources[row]
        if not path:
            continue
        if row == "final" and path == sources["pruned"] and "pruned" in results:
            results[row] = dict(results["pruned"])  # no fine-tuning: the same network
            continue
        log.info("Evaluating the %s network on the test split", row)
        results[row], device_name = measure(ctx, path)
        device_names.add(device_name)
    flat = {f"{row}/{k}": v for row, metrics in results.items() for k, v in metrics.items()}
    ctx.tracker.log_metrics(flat)
    ctx.tracker.set_tags({"medprune.latency_device": ", ".join(sorted(device_names))})

    folder = ctx.stage_dir("evaluate")
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (folder / "results.md").write_text(table + "\n")
    # the baseline folder holds its training history; a fine-tuned model folder has it one level up
    histories = {"train": read_history(Path(state.baseline) / "history.csv") if state.baseline else [],
                 "finetune": read_history(Path(state.final).parent / "history.csv") if state.final else []}
    histories = {k: v for k, v in histories.items() if v}
    if histories:
        plots.curves(histories, folder / "curves.png")
    if ctx.cfg.evaluate.mask_examples > 0:
        _mask_plot(ctx, {row: sources[row] for row in ("baseline", "final") if sources[row]}, folder / "masks.png")
    ctx.tracker.log_artifact(folder, "evaluate")
    return replace(state, metrics={**state.metrics, **flat})



@torch.no_grad()
def _mask_plot(ctx: Context, model_dirs: dict[str, str], path: Path) -> None:
    """The first test images, their true masks and each network's prediction with its Dice."""
    dataset = ctx.data.dataset("test")
    n = min(ctx.cfg.evaluate.mask_examples, len(dataset))
    images, masks = zip(*(dataset[i] for i in range(n)))
    images, masks = torch.stack(images), torch.stack(masks)
    predictions = {}
    for row, model_dir in model_dirs.items():
        model = load_model(model_dir).to(ctx.device).eval()
        logits = model(images.to(ctx.device)).cpu()
        pred = binarize(logits, ctx.cfg.evaluate.threshold)
        dice, _ = dice_iou(pred, masks > 0.5)
        predictions[LABELS.get(row, row)] = (pred, dice)
    plots.masks_before_after(images, masks, predictions, path)
