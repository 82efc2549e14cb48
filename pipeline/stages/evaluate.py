"""The evaluate stage: the baseline, the pruned and the final network side by side, on the test split.

Orchestration only; the measurements are pipeline/measure's (docs/EVALUATION.md, docs/PERFORMANCE.md):
quality first for every network (`quality.network`: per-case metrics in evaluate/cases_<network>.csv, their
means, a collapse flag, size, parameters, FLOPs; the int8 networks of the quantize stage under ONNX
Runtime), then every deployed form of every network timed in one interleaved pass per runtime
(`cost.time_networks`: latency_ms as deployed, latency_eager_ms as trained, one form per runtime of
`evaluate.runtimes` and per `evaluate.precision`), then each network's share of the machine's peak and its
fastest form. The final network's ONNX graph is kept (final.onnx). Measurements are logged as results (the
run's results.json; those a user compares also as metrics: tracking.COMPARED), how they were taken (runs,
settled, threads, flags) as params; a form that did not settle is warned about,
tagged (`medprune.latency_unsettled`) and starred in the results table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from models.io import load_model
from pipeline import inference, mlflow_model, plots, precision
from pipeline.measure import cost, quality
from pipeline.measure.profiling import cpu_name, cpu_threads, device_name
from pipeline.quantization import quantized_files
from pipeline.report import LABELS, results_table
from pipeline.state import INT8_NETWORKS, NETWORKS, Context, RunState
from pipeline.tracking import is_compared
from pipeline.training import read_history

log = logging.getLogger(__name__)

FINAL_ONNX = "final.onnx"
# Results that say what was measured (thread counts, flags, counts, the collapse verdict): MLflow params
# (`final.latency_threads`), not metrics. How each timing went (runs, settled, which runtime was fastest:
# diagnostics) is a result like the others, in results.json: params that differ between a sweep's jobs are what
# the MLflow compare view opens on, and these would crowd out the swept settings.
DESCRIPTIVE = ("latency_threads", "latency_bn_folded", "latency_channels_last", "test_images", "test_cases",
               "cases_ignored_empty", "collapsed", "windows_per_volume", "kept_start")


def reduced_precision(ctx: Context) -> Optional[str]:
    """evaluate.precision when it is not fp32 and this device runs it natively; else None (with a notice)."""
    wanted = str(ctx.cfg.evaluate.precision)
    if wanted == precision.Precision.fp32.value:
        return None
    reason = precision.supported(wanted, ctx.device)
    if reason:
        log.warning("evaluate.precision=%s: no %s forms are measured: %s", wanted, wanted, reason)
        return None
    return wanted


def reference_volume(ctx: Context) -> Optional[cost.Volume]:
    """3D data: the first test volume (batch 1, on the device) and its window, what the per-volume latency and
    FLOPs are of; None for 2D data."""
    if ctx.data.dims != 3:
        return None
    dataset = ctx.data.dataset("test")
    return cost.Volume(dataset[0][0].unsqueeze(0).to(ctx.device), dataset.window)


def run(ctx: Context, state: RunState) -> RunState:
    """The whole stage (quality passes and timing) with `evaluate.threads` CPU threads."""
    with cpu_threads(ctx.cfg.evaluate.threads):
        return _run(ctx, state)


def _run(ctx: Context, state: RunState) -> RunState:
    e = ctx.cfg.evaluate
    sources = {name: getattr(state, name) for name in NETWORKS}
    if not any(sources.values()):
        raise RuntimeError("evaluate has no model: run train/prune first or set baseline=<run id or path>")
    folder = ctx.stage_dir("evaluate")
    split = quality.TestSplit(ctx.data, e, ctx.device, folder, int(ctx.cfg.seed))
    reduced = reduced_precision(ctx)  # decided (and any notice given) once for the stage
    volume = reference_volume(ctx)  # 3D: the windows per volume are the same for every network
    windows = None if volume is None else inference.window_count(tuple(volume.image.shape), volume.window)
    # no fine-tuning: the final network is the pruned one, measured and timed once (copied below)
    shared = sources["final"] and sources["final"] == sources["pruned"]
    measured = [name for name in NETWORKS if sources[name] and not (name == "final" and shared)]
    results: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}
    for name in measured:
        log.info("Evaluating the %s network on the test split", name)
        models[name] = load_model(sources[name]).to(ctx.device).eval()  # read (and its checksum verified) once
        results[name] = quality.network(split, models[name], sources[name], name, ctx.input_shape, reduced, windows)
    int8 = quantized_files(state.quantized) if state.quantized else {}
    if int8:  # made from the last network of the chain (quantize stage), compared with it
        reference = measured[-1]
        openvino = "openvino" in [str(r) for r in e.runtimes]  # the int8 file is also scored (and timed) there
        for name, path in int8.items():
            log.info("Evaluating the %s network (int8, ONNX Runtime%s) on the test split", name, " and OpenVINO" * openvino)
            results[name] = quality.int8_network(split, path, name, models[reference], reference, results[reference],
                                                 ctx.input_shape if openvino else None)
    # the final network's ONNX graph is kept (and logged with the evaluate folder); the others' are not
    kept = {name: folder / FINAL_ONNX for name in measured if sources["final"] and sources[name] == sources["final"]}
    latency, timed = cost.time_networks(e, models, ctx.input_shape, ctx.device, reduced, volume, keep_graphs=kept,
                                        graph_only=int8)
    for name, values in latency.items():
        results[name].update(values)
    peak = cost.machine_use(results, ctx.device, e.threads, reduced,
                            ("torch", *(str(r) for r in e.runtimes)) if e.machine_peak else None, skip=INT8_NETWORKS)
    if shared:
        results["final"] = dict(results["pruned"])
    _add_training_facts(results, state)
    unsettled = cost.unsettled(results)
    if unsettled:
        log.warning("Latency did NOT settle for %s: the CV of the last %d runs stayed above evaluate.latency_target_cv=%g "
                    "(or the window never filled) within %d runs / %g s; 1-minute load average %s before, %s after. "
                    "These figures are not reliable: time again on a quieter machine, or raise "
                    "evaluate.latency_max_runs / latency_max_seconds", ", ".join(f"{k} ({v})" for k, v in unsettled.items()),
                    e.latency_runs, e.latency_target_cv, e.latency_max_runs, e.latency_max_seconds, timed.load_before,
                    timed.load_after)
    flat = _log_results(ctx, state, results, peak, timed, unsettled)
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    (folder / "results.md").write_text(results_table(results) + "\n")
    _plots(split, state, {name: models[next(n for n in measured if sources[n] == sources[name])]
                          for name in ("baseline", "final") if sources[name]})
    ctx.tracker.log_artifact(folder, "evaluate")
    if ctx.cfg.tracking.log_models:  # 2D image files: preprocessing in the graph; else inputs as served (a 3D patch)
        example = ctx.data.dataset("train" if ctx.data.dims == 3 else "test")[0][0].unsqueeze(0)
        trained_here = {name: path for name, path in sources.items()
                        if path and (name != "baseline" or state.baseline_run_id == ctx.tracker.run_id)}
        mlflow_model.log_networks(ctx.tracker, trained_here, e.threshold, example, ctx.cfg.tracking.register_as, flat,
                                  image=ctx.data.image_input(), regions=ctx.data.regions, cases=folder)  # the model card's labels and intervals
    return replace(state, metrics={**state.metrics, **flat})


def _add_training_facts(results: dict[str, dict], state: RunState) -> None:
    """What each network's training cost (images seen), the validation Dice its weights were kept on (what
    recipes are chosen by), and whether the recovery kept its starting weights."""
    for name, images in state.budget_images().items():
        if name in results:
            results[name]["budget_images"] = images
    for name, dice in state.val_dice.items():
        if name in results:
            results[name]["val_dice"] = dice
    if state.kept_start and "final" in results:
        results["final"]["kept_start"] = "yes"


def baseline_trained_here(ctx: Context, state: RunState) -> bool:
    return state.baseline_run_id in (None, ctx.tracker.run_id)


def _log_results(ctx: Context, state: RunState, results: dict[str, dict], peak: dict, timed, unsettled: dict) -> dict:
    """Measurements as metrics (<network>/<result>), how they were taken as params (<network>.<result>), and
    tags naming the devices, the deployed form, collapsed networks, the CPU and unsettled latencies."""
    load = {f"evaluate/load_average_{when}": v for when, v in (("before", timed.load_before), ("after", timed.load_after))
            if v is not None}
    flat = {f"{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}
    measured = {k: v for k, v in flat.items() if k.rsplit("/", 1)[1] not in DESCRIPTIVE}
    # results (not evaluate.* params: those are settings, alike in a report row); the compared ones become metrics,
    # but a baseline's only in the run that trained it: a sweep's jobs then chart their own networks first
    here = baseline_trained_here(ctx, state)
    ctx.tracker.log_results({**load, **{f"evaluate/{k}": v for k, v in peak.items()}, **measured},
                            compared=lambda k: is_compared(k) and (here or not k.startswith("baseline/")))
    ctx.tracker.log_params({k.replace("/", "."): v for k, v in flat.items() if k.rsplit("/", 1)[1] in DESCRIPTIVE})
    e = ctx.cfg.evaluate
    form = "+".join(p for p, on in (("bn-folded", e.fold_bn), ("channels-last", e.channels_last)) if on) or "eager"
    tags = {"medprune.latency_device": device_name(ctx.device), "medprune.latency_form": form}
    collapsed = {name: r["collapsed"] for name, r in results.items() if r.get("collapsed", "no") != "no"}
    if collapsed:
        tags["medprune.collapsed"] = ", ".join(f"{name}: {how}" for name, how in collapsed.items())
    if "onnxruntime" in [str(r) for r in e.runtimes]:
        tags["medprune.onnx_latency_device"] = f"{cpu_name()} (ONNX Runtime CPU)"
    if ctx.device.type == "cpu":  # what the CPU offers for fast inference (bf16, int8), beside the figures
        capabilities = precision.cpu_capabilities()
        log.info("CPU: %s, kernels %s, flags %s, bf16 %s", cpu_name(), capabilities["cpu_capability"],
                 capabilities["cpu_flags"], capabilities["cpu_bf16"])
        tags.update({f"medprune.{k}": v for k, v in capabilities.items()})
    if unsettled:
        tags["medprune.latency_unsettled"] = ",".join(unsettled)
    ctx.tracker.set_tags(tags)
    return flat


def _plots(split: quality.TestSplit, state: RunState, networks: dict[str, torch.nn.Module]) -> None:
    """Training curves (the baseline folder holds its history; a fine-tuned model folder has it one level up)
    and the before/after masks of the first test images by `networks` (baseline, final)."""
    histories = {"train": read_history(Path(state.baseline) / "history.csv") if state.baseline else [],
                 "finetune": read_history(Path(state.final).parent / "history.csv") if state.final else []}
    histories = {k: v for k, v in histories.items() if v}
    if histories:
        plots.curves(histories, split.folder / "curves.png")
    if split.settings.mask_examples > 0:
        labelled = {LABELS[name]: model for name, model in networks.items()}
        plots.masks_before_after(*quality.examples(split, labelled, int(split.settings.mask_examples)), split.folder / "masks.png")
