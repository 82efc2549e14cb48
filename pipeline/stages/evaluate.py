"""Test-split quality and cost of the baseline, the pruned and the final network, side by side.

Latency is measured on the network as it is deployed (docs/PERFORMANCE.md): BatchNorm folded into
the convolutions and, where `evaluate.channels_last`, NHWC memory layout (`latency_ms`); the network as
trained (`latency_eager_ms`) when that differs; and the exported ONNX model (BatchNorm folded) under
ONNX Runtime on CPU (`onnx_latency_ms`, with `onnx_max_abs_diff` against the torch output). The final
network's ONNX file is kept in the evaluate folder (`final.onnx`) and logged; the others' are not.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from models.io import load_model, model_size_mb
from pipeline import inference, mlflow_model, plots
from pipeline.profiling import count_flops, count_params, cpu_name, device_name, measure_latency
from pipeline.metrics import binarize, dice_iou
from pipeline.pruning import prunable_layers
from pipeline.report import LABELS, results_table
from pipeline.state import Context, RunState
from pipeline.training import evaluate as test_metrics
from pipeline.training import make_loader, read_history

log = logging.getLogger(__name__)

ROWS = ("baseline", "pruned", "final")
# Results that describe how a measurement was taken (counts, flags, thread counts): MLflow params
# (`final.latency_threads`), not metrics, so the compare view shows the measurements themselves.
DESCRIPTIVE = ("latency_threads", "latency_bn_folded", "latency_channels_last", "channels_aligned8", "test_images",
               "test_cases")
FINAL_ONNX = "final.onnx"

def cost(ctx: Context, model: torch.nn.Module, onnx_path: Optional[Path]) -> dict[str, float]:
    """Latency of the deployed form, of the eager network (if different) and of the ONNX export."""
    e = ctx.cfg.evaluate
    shape = ctx.input_shape
    fold, channels_last = bool(e.fold_bn), bool(e.channels_last)
    folded = inference.prepare_for_inference(model, shape, fold_bn=fold, channels_last=False)
    prepared = inference.with_channels_last(folded) if channels_last else folded
    deployed = measure_latency(prepared.model.to(ctx.device), shape, warmup=e.latency_warmup, runs=e.latency_runs, threads=e.latency_threads,
                               channels_last=prepared.channels_last)
    out: dict[str, float] = {
        "latency_ms": deployed["latency_ms"],
        "latency_p90_ms": deployed["latency_p90_ms"],
        "latency_threads": deployed["latency_threads"],
        "latency_bn_folded": prepared.folded_bn,
        "latency_channels_last": int(prepared.channels_last),
    }
    if (prepared.folded_bn or prepared.channels_last) and e.latency_eager:
        eager = measure_latency(model, shape, warmup=e.latency_warmup, runs=e.latency_runs, threads=e.latency_threads)
        out["latency_eager_ms"] = eager["latency_ms"]
        out["latency_eager_p90_ms"] = eager["latency_p90_ms"]
    if onnx_path is not None:
        try:
            inference.export_onnx(folded.model.cpu(), onnx_path, shape, opset=int(e.onnx_opset), dynamo=bool(e.onnx_dynamo))
            session = inference.onnx_session(onnx_path, e.latency_threads)
            ort = inference.measure_onnx_latency(session, shape, e.latency_warmup, e.latency_runs)
            out.update({
                "onnx_latency_ms": ort["latency_ms"],
                "onnx_latency_p90_ms": ort["latency_p90_ms"],
                "onnx_max_abs_diff": inference.onnx_max_abs_diff(model.cpu().eval(), session, shape),
                "onnx_size_mb": onnx_path.stat().st_size / 1e6,
            })
        except Exception as err:  # an exporter gap must not cost the run its quality numbers
            log.warning("ONNX export / ONNX Runtime timing failed (%s: %s); no onnx_* metrics", type(err).__name__, err)
        finally:
            model.to(ctx.device)
    return out


def aligned_fraction(model: torch.nn.Module, multiple: int = 8) -> float:
    """Fraction of the prunable layers whose output channel count is a multiple of `multiple`."""
    counts = [m.out_channels for m in prunable_layers(model).values()]
    return sum(c % multiple == 0 for c in counts) / len(counts) if counts else 1.0


def measure(ctx: Context, model_dir: str, onnx_path: Optional[Path] = None) -> dict[str, float]:
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
    latency = cost(ctx, model, onnx_path)
    aligned = aligned_fraction(model)
    if aligned < 1:
        log.info("%.0f%% of the prunable layers of %s have channel counts that are multiples of 8; CPU and GPU "
                 "convolution kernels run fastest on such counts (prune.round_to=8, docs/PERFORMANCE.md)",
                 100 * aligned, model_dir)
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
        "channels_aligned8": aligned,
        **latency,
    }, device_name(ctx.device)


def run(ctx: Context, state: RunState) -> RunState:
    sources = {"baseline": state.baseline, "pruned": state.pruned, "final": state.final}
    if not any(sources.values()):
        raise RuntimeError("evaluate has no model: run train/prune first or set baseline=<run id or path>")
    results: dict[str, dict] = {}
    device_names = set()
    folder = ctx.stage_dir("evaluate")
    onnx = bool(ctx.cfg.evaluate.onnx)
    scratch = tempfile.TemporaryDirectory(prefix="medprune-onnx-")
    try:
        for row in ROWS:
            path = sources[row]
            if not path:
                continue
            if row == "final" and path == sources["pruned"] and "pruned" in results:
                results[row] = dict(results["pruned"])  # no fine-tuning: the same network
                continue
            # only the final network's ONNX file is kept (and logged with the evaluate folder)
            onnx_path = None
            if onnx:
                onnx_path = folder / FINAL_ONNX if path == sources["final"] else Path(scratch.name) / f"{row}.onnx"
            log.info("Evaluating the %s network on the test split", row)
            results[row], device_name = measure(ctx, path, onnx_path)
            device_names.add(device_name)
    finally:
        scratch.cleanup()
    flat = {f"{row}/{k}": v for row, metrics in results.items() for k, v in metrics.items()}
    # Measurements are metrics; counts and flags that describe how they were taken are params.
    ctx.tracker.log_metrics({k: v for k, v in flat.items() if k.rsplit("/", 1)[1] not in DESCRIPTIVE})
    ctx.tracker.log_params({k.replace("/", "."): v for k, v in flat.items() if k.rsplit("/", 1)[1] in DESCRIPTIVE})
    tags = {"medprune.latency_device": ", ".join(sorted(device_names)),
            "medprune.latency_form": _form(ctx)}
    if onnx:
        tags["medprune.onnx_latency_device"] = f"{cpu_name()} (ONNX Runtime CPU)"
    ctx.tracker.set_tags(tags)

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
    _log_models(ctx, state, sources, flat)
    return replace(state, metrics={**state.metrics, **flat})


def _log_models(ctx: Context, state: RunState, sources: dict, metrics: dict) -> None:
    """The final network (and the baseline, in the run that trained it) as MLflow models; the final one
    registered when `tracking.register_as` names a model (pipeline/mlflow_model.py)."""
    if not ctx.cfg.tracking.log_models:
        return
    example = ctx.data.dataset("test")[0][0].unsqueeze(0)
    threshold = ctx.cfg.evaluate.threshold
    logged = {}
    for row, artifact in (("final", "final_mlflow_model"), ("baseline", "baseline_mlflow_model")):
        if not sources[row] or (row == "baseline" and state.baseline_run_id != ctx.tracker.run_id):
            continue
        logged[row] = mlflow_model.log_model(ctx.tracker, load_model(sources[row]), threshold, example, artifact)
    if ctx.cfg.tracking.register_as and "final" in logged:
        headline = {k: v for k, v in metrics.items() if k.startswith("final/") and k.rsplit("/", 1)[1] in
                    ("dice", "iou", "params_m", "flops_g", "latency_ms")}
        version = mlflow_model.register(ctx.tracker.client, ctx.cfg.tracking.register_as, ctx.tracker.run_id,
                                        "final_mlflow_model", headline)
        ctx.tracker.set_tags({"medprune.registered_model": f"{ctx.cfg.tracking.register_as}/{version}"})


def _form(ctx: Context) -> str:
    parts = [p for p, on in (("bn-folded", ctx.cfg.evaluate.fold_bn), ("channels-last", ctx.cfg.evaluate.channels_last)) if on]
    return "+".join(parts) or "eager"


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
