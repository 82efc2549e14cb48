"""Test-split quality and cost of the baseline, the pruned and the final network, side by side.

Quality is per case (`score_quality`, pipeline/measure/casewise.py, docs/EVALUATION.md): Dice, IoU, HD95, surface
Dice and ISIC's thresholded Jaccard per image or volume in evaluate/cases_<network>.csv, their means as the
network's metrics, and a flag for a network that collapsed to all foreground or all background.

Latency is measured on the network as it is deployed (docs/PERFORMANCE.md): BatchNorm folded into
the convolutions and, where `evaluate.channels_last`, NHWC memory layout (`latency_ms`); the network as
trained (`latency_eager_ms`) when that differs; and, for each of `evaluate.runtimes`, the folded network
deployed in that runtime (pipeline/measure/runtimes.py): the exported ONNX model under ONNX Runtime on CPU
(`onnx_latency_ms`), OpenVINO on CPU (`openvino_latency_ms`), torch.compile / inductor
(`compile_latency_ms`), each with its largest deviation from the eager output (`<form>_max_abs_diff`).
The final network's ONNX file is kept in the evaluate folder (`final.onnx`) and logged; the others' are not.
After the quantize stage, the int8 network (`quantized`, and `quantized_dynamic`) is a row of its own, run
by ONNX Runtime: its Dice / IoU on the test split, the size of its file, its ONNX Runtime latency timed in
the same pass as the float networks', and how far its probabilities stray from the final float network's
(`prob_max_abs_diff`, `prob_mean_abs_diff`, and `label_flip_fraction`: the test pixels whose label changes).
`evaluate.precision=bf16` (or fp16 on CUDA) adds each form in that type (`latency_bf16_ms`, ...) where the
machine runs it natively, and the test-split Dice / IoU of the torch form in that type (`dice_bf16`), so
the accuracy it costs is beside the time it saves. `fastest_form` / `fastest_ms` name the fastest form
per precision and network, and `*_peak_fraction` its share of the machine's peak in that type.
Quality comes first for every network; then every form of every network is timed in one interleaved
pass until each is stable (`cost`); a form that did not settle is warned about, tagged
(`medprune.latency_unsettled`) and starred in the results table.
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
from data.files import write_csv
from pipeline import inference, mlflow_model, plots, precision
from pipeline.measure import casewise, runtimes
from pipeline.quantization import quantized_files
from pipeline.measure.profiling import (InterleavedTimes, count_flops, count_params, cpu_name, cpu_threads, device_name,
                                forward_call, machine_peak, thread_count, time_interleaved)
from pipeline.measure.metrics import CaseRules, binarize, dice_iou
from pipeline.pruning import prunable_layers
from pipeline.report import LABELS, results_table
from pipeline.state import Context, RunState
from pipeline.training import evaluate as test_metrics
from pipeline.training import make_loader, read_history

log = logging.getLogger(__name__)

ROWS = ("baseline", "pruned", "final")
QUANTIZED_ROWS = ("quantized", "quantized_dynamic")  # int8 ONNX files of the quantize stage (ONNX Runtime only)
# Results that describe how a measurement was taken (counts, flags, thread counts): MLflow params
# (`final.latency_threads`), not metrics, so the compare view shows the measurements themselves.
DESCRIPTIVE = ("latency_threads", "latency_bn_folded", "latency_channels_last", "channels_aligned8", "test_images",
               "test_cases", "cases_ignored_empty", "collapsed", "windows_per_volume", "kept_start")
FINAL_ONNX = "final.onnx"

# The timed forms of a network, as the prefixes of their results: latency_ms (as deployed in torch),
# latency_eager_ms (as trained), one per runtime of evaluate.runtimes (onnx_latency_ms, ...), and the same
# with a _bf16 / _fp16 suffix for evaluate.precision; each with _p90_ms, _cv (metrics) and _runs, _settled
# (how the timing went: params, `final.latency_settled`).
RUNTIME_FORMS = runtimes.RUNTIME_FORMS
REDUCED = ("bf16", "fp16")
FORMS = ("latency_eager", *(f + s for f in RUNTIME_FORMS.values() for s in ("", *(f"_{p}" for p in REDUCED))))
# 3D data: the deployed torch form and the ONNX Runtime session over a whole test volume, window by window
# (volume_latency_ms, onnx_volume_latency_ms)
FORMS += ("volume_latency", "onnx_volume_latency")
DESCRIPTIVE += tuple(f"{form}_{what}" for form in FORMS for what in ("runs", "settled"))
DESCRIPTIVE += tuple(f"fastest{s}_form" for s in ("", *(f"_{p}" for p in REDUCED)))


def reduced_precision(ctx: Context) -> Optional[str]:
    """evaluate.precision when it is not fp32 and this device runs it natively; else None (with a notice)."""
    wanted = str(ctx.cfg.evaluate.precision)
    if wanted == "fp32":
        return None
    reason = precision.supported(wanted, ctx.device)
    if reason:
        log.warning("evaluate.precision=%s: no %s forms are measured: %s", wanted, wanted, reason)
        return None
    return wanted


def cost(ctx: Context, models: dict[str, torch.nn.Module], onnx_paths: dict[str, Optional[Path]],
         reduced: Optional[str] = None, onnx_only: Optional[dict[str, Path]] = None) -> tuple[dict[str, dict], InterleavedTimes]:
    """Latency of every network (by row) in every form, timed in one interleaved pass per runtime (profiling.
    time_interleaved): the deployed form, the eager network (if different), each runtime of
    `evaluate.runtimes` (ONNX Runtime where `onnx_paths` names a file for the row), and each of those in
    `reduced` (`reduced_precision`: evaluate.precision where the device runs it natively); `onnx_only`
    {row: ONNX file} adds networks that exist only as ONNX (the int8 rows) to ONNX Runtime's pass. Timing the
    networks one after another let a busy spell of a shared machine land on one of them (two networks of
    one shape at 258 and 2559 ms)."""
    with tempfile.TemporaryDirectory(prefix="medprune-runtimes-") as work:  # exported graphs OpenVINO reads
        return _cost(ctx, models, onnx_paths, reduced, Path(work), onnx_only or {})


def _cost(ctx: Context, models: dict[str, torch.nn.Module], onnx_paths: dict[str, Optional[Path]],
          reduced: Optional[str], work: Path, onnx_only: dict[str, Path]) -> tuple[dict[str, dict], InterleavedTimes]:
    e = ctx.cfg.evaluate
    shape = ctx.input_shape
    extra = [str(r) for r in e.runtimes]
    fns, out = {}, {}
    volume, window = reference_volume(ctx)
    for row, path in onnx_only.items():
        out[row] = {"latency_threads": thread_count(e.threads)}
        fns[f"{row}/onnx_latency"] = inference.onnx_call(inference.onnx_session(path, e.threads, spinning=False), shape)
    for row, model in models.items():
        folded = inference.prepare_for_inference(model, shape, fold_bn=bool(e.fold_bn), channels_last=False)
        prepared = inference.with_channels_last(folded) if e.channels_last else folded
        out[row] = {
            "latency_threads": thread_count(e.threads) if ctx.device.type == "cpu" else 0,
            "latency_bn_folded": prepared.folded_bn,
            "latency_channels_last": int(prepared.channels_last),
        }
        fns[f"{row}/latency"] = forward_call(prepared.model.to(ctx.device), shape, prepared.channels_last)
        if volume is not None:
            fns[f"{row}/volume_latency"] = volume_call(prepared.model, volume, window)
        if (prepared.folded_bn or prepared.channels_last) and e.latency_eager:
            fns[f"{row}/latency_eager"] = forward_call(model, shape)
        onnx_path = onnx_paths.get(row)
        if onnx_path is not None:
            try:  # export_onnx exports a CPU copy: the deployed form stays on its device
                inference.export_onnx(folded.model, onnx_path, shape, opset=int(e.onnx_opset), dynamo=bool(e.onnx_dynamo))
                session = inference.onnx_session(onnx_path, e.threads, spinning=False)  # sessions timed in turn
                out[row]["onnx_max_abs_diff"] = inference.onnx_max_abs_diff(model.cpu().eval(), session, shape)
                out[row]["onnx_size_mb"] = onnx_path.stat().st_size / 1e6
                fns[f"{row}/onnx_latency"] = inference.onnx_call(session, shape)
                if volume is not None:
                    fns[f"{row}/onnx_volume_latency"] = volume_call(inference.OnnxModule(session), volume, window)
            except Exception as err:  # an exporter gap must not cost the run its quality numbers
                log.warning("ONNX export / ONNX Runtime session of the %s network failed (%s: %s); no onnx_* metrics",
                            row, type(err).__name__, err)
            finally:
                model.to(ctx.device)
        wanted = [(r, "fp32") for r in extra if r != "onnxruntime"]  # ONNX Runtime: above, its file kept
        if reduced:
            wanted += [(r, reduced) for r in ("torch", *extra) if runtimes.supports(r, reduced, ctx.device)]
        for runtime, dtype in wanted:
            form = RUNTIME_FORMS[runtime] + ("" if dtype == "fp32" else f"_{dtype}")
            try:
                deployed = runtimes.deploy(folded.model, shape, runtime, dtype, threads=e.threads,
                                           channels_last=bool(e.channels_last), reference=model,
                                           work_dir=work / f"{row}-{runtime}-{dtype}")
            except Exception as err:  # a runtime that cannot take this network costs only its own numbers
                log.warning("%s (%s) of the %s network failed (%s: %s); no %s_* metrics", runtime, dtype, row,
                            type(err).__name__, err, form)
                continue
            if deployed.note:
                log.warning("%s (%s): %s", runtime, dtype, deployed.note)
            out[row][f"{form}_max_abs_diff"] = deployed.max_abs_diff
            fns[f"{row}/{form}"] = deployed.call
    # One pass per runtime: ONNX Runtime's worker threads spin for a while after each run, and torch's OpenMP
    # threads after each parallel region; interleaved with each other on a 2-core machine they slowed every
    # torch form 2-3x (the default job's 5.6 / 2.7 / 2.6 ms read 13.6 / 6.6 / 6.7 ms, CV up to 0.98). The
    # networks are still interleaved within each runtime, which is what their comparison needs; torch.compile
    # runs on torch's own threads, so it shares torch's pass.
    def runtime_of(name: str) -> str:
        form = name.split("/")[1]
        if form.startswith("onnx_"):
            return "onnxruntime"
        return next((r for r, f in RUNTIME_FORMS.items() if r in ("onnxruntime", "openvino") and form.startswith(f)), "torch")

    passes: dict[str, dict] = {}
    for name, fn in fns.items():
        passes.setdefault(runtime_of(name), {})[name] = fn
    log.info("Timing %d forms of %d networks, interleaved per runtime (evaluate.latency_*)", len(fns), len(models))
    results, names = [], []
    with cpu_threads(e.threads):
        for runtime, group in passes.items():
            names.append(runtime)
            results.append(time_interleaved(
                group, warmup=int(e.latency_warmup), runs=int(e.latency_runs), max_runs=int(e.latency_max_runs),
                target_cv=float(e.latency_target_cv), max_seconds=float(e.latency_max_seconds)))
    timed = InterleavedTimes(
        timings={k: v for r in results for k, v in r.timings.items()}, rounds=sum(r.rounds for r in results),
        seconds=sum(r.seconds for r in results), stopped_by=", ".join(f"{n}: {r.stopped_by}" for n, r in zip(names, results)),
        load_before=results[0].load_before, load_after=results[-1].load_after)
    for name, t in timed.timings.items():
        row, form = name.split("/")
        out[row].update({f"{form}_ms": t.median_ms, f"{form}_p90_ms": t.p90_ms, f"{form}_cv": t.cv,
                         f"{form}_runs": t.runs, f"{form}_settled": int(t.settled)})
    load = "/".join("?" if v is None else f"{v:.2f}" for v in (timed.load_before, timed.load_after))
    log.info("Latency: %d rounds in %.1f s, stopped by %s; 1-minute load average %s (before/after)",
             timed.rounds, timed.seconds, timed.stopped_by, load)
    return out, timed


def reference_volume(ctx: Context) -> tuple[Optional[torch.Tensor], object]:
    """3D data: the first test volume (batch 1, on the device) and the window it is tiled with, what the per-volume
    latency and FLOPs are of; (None, None) for 2D data."""
    if getattr(getattr(ctx, "data", None), "dims", 2) != 3:
        return None, None
    dataset = ctx.data.dataset("test")
    return dataset[0][0].unsqueeze(0).to(ctx.device), dataset.window


def volume_call(model: torch.nn.Module, volume: torch.Tensor, window):
    """One sliding-window inference of `model` over `volume`, as a callable to time."""
    infer = inference.SlidingWindow(model.eval(), window)

    def call():
        with torch.inference_mode():
            return infer(volume)

    return call


def fastest(result: dict, peaks: dict[str, float]) -> dict:
    """Per precision, the fastest deployed form of one network: its runtime (`fastest_form`), latency and
    share of the machine's peak in that precision (`fastest_peak_fraction`; bf16 against the bf16 peak)."""
    out = {}
    for dtype, peak in peaks.items():
        suffix = "" if dtype == "fp32" else f"_{dtype}"
        timed = {runtime: result[f"{form}{suffix}_ms"] for runtime, form in RUNTIME_FORMS.items()
                 if f"{form}{suffix}_ms" in result}
        if not timed:
            continue
        runtime = min(timed, key=timed.get)
        out[f"fastest{suffix}_form"] = runtime
        out[f"fastest{suffix}_ms"] = timed[runtime]
        out[f"fastest{suffix}_peak_fraction"] = result["flops_g"] / (timed[runtime] / 1e3) / peak
    return out


def aligned_fraction(model: torch.nn.Module, multiple: int = 8) -> float:
    """Fraction of the prunable layers whose output channel count is a multiple of `multiple`."""
    counts = [m.out_channels for m in prunable_layers(model).values()]
    return sum(c % multiple == 0 for c in counts) / len(counts) if counts else 1.0


def score_quality(ctx: Context, model: torch.nn.Module, row: str, export: bool = True, warn: bool = True) -> dict:
    """Per-case metrics of `model` on the test split, written to evaluate/cases_<row>.csv (pipeline/measure/casewise.py),
    and their means; a network that collapsed to all foreground / all background is flagged."""
    e = ctx.cfg.evaluate
    folder = ctx.stage_dir("evaluate")
    dataset = ctx.data.dataset("test")
    rules = CaseRules(ignore_empty=bool(e.ignore_empty), nsd_tolerance=float(e.nsd_tolerance),
                      jaccard_threshold=e.jaccard_threshold)
    results = casewise.score_cases(
        model, dataset, ctx.device, e.batch_size, e.threshold, rules, names=getattr(ctx.data, "regions", None),
        spacing_of=getattr(ctx.data, "case_spacing", None), export=int(e.export_masks) if export else 0,
        export_dir=folder / "masks" / row,
        originals=(lambda i: ctx.data.original_mask("test", i)) if e.original_resolution else None,
    )
    write_csv(results.rows, folder / f"cases_{row}.csv")
    out = casewise.headline(results, volumetric=getattr(dataset, "cases", None) is not None)
    collapsed = casewise.collapse(results, float(e.collapse_tolerance), float(e.collapse_margin))
    out["collapsed"] = collapsed or "no"
    if collapsed and warn:
        log.warning("The %s network COLLAPSED: it %s (%.1f%% of the test pixels foreground, truth %.1f%%); "
                    "its Dice is not a segmentation result", row, casewise.describe_collapse(collapsed),
                    100 * results.pred_foreground_fraction, 100 * results.true_foreground_fraction)
    return out


def measure(ctx: Context, model_dir: str, row: str = "final", reduced: Optional[str] = None,
            windows: Optional[int] = None) -> dict[str, float]:
    """Quality (also in the `reduced` precision, when given) and size of one network; with `windows` (3D data: the
    windows that tile the reference volume), its FLOPs per volume too."""
    e = ctx.cfg.evaluate
    model = load_model(model_dir).to(ctx.device).eval()
    quality = score_quality(ctx, model, row)
    extra = {}
    for split in e.extra_splits:
        split_loader = make_loader(ctx.data.dataset(split), e.batch_size, False, 0, ctx.cfg.seed, ctx.device)
        m = test_metrics(model, split_loader, ctx.device, e.threshold)
        extra.update({f"{split}_dice": m["dice"], f"{split}_iou": m["iou"]})
    if reduced:  # the torch deployed form in that type, on the same test split: what the precision costs
        deployed = runtimes.deploy(inference.prepare_for_inference(model, ctx.input_shape, fold_bn=bool(e.fold_bn)).model,
                                   ctx.input_shape, "torch", reduced, channels_last=bool(e.channels_last))
        low = score_quality(ctx, runtimes.AsModule(deployed), f"{row}_{reduced}", export=False,
                            warn=quality["collapsed"] == "no")  # the fp32 pass has warned already
        extra.update({f"dice_{reduced}": low["dice"], f"iou_{reduced}": low["iou"]})
        log.info("%s network in %s: Dice %.4f (fp32 %.4f, %+.2f points)", row, reduced, low["dice"], quality["dice"],
                 100 * (low["dice"] - quality["dice"]))
    flops = count_flops(model, ctx.input_shape)
    if windows is not None:  # 3D: FLOPs above are per window (patch); a whole volume runs that many windows
        extra.update(windows_per_volume=windows, volume_flops_g=windows * flops / 1e9)
    aligned = aligned_fraction(model)
    if aligned < 1:
        log.info("%.0f%% of the prunable layers of %s have channel counts that are multiples of 8; CPU and GPU "
                 "convolution kernels run fastest on such counts (prune.round_to=8, docs/PERFORMANCE.md)",
                 100 * aligned, model_dir)
    return {
        **quality,
        **extra,
        "params_m": count_params(model) / 1e6,
        "flops_g": flops / 1e9,
        "macs_g": flops / 2e9,
        "size_mb": model_size_mb(model_dir),
        "channels_aligned8": aligned,
    }, device_name(ctx.device)


@torch.no_grad()
def probability_deviation(ctx: Context, quantized: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """How far `quantized`'s probabilities stray from `reference`'s on the test split: the largest and the mean
    absolute difference, and the fraction of pixels whose thresholded label differs."""
    e = ctx.cfg.evaluate
    loader = make_loader(ctx.data.dataset("test"), e.batch_size, False, 0, ctx.cfg.seed, ctx.device)
    largest, total, flips, count = 0.0, 0.0, 0, 0
    quantized, reference = inference.windowed(quantized, loader.dataset), inference.windowed(reference.eval(), loader.dataset)
    for images, _ in loader:
        images = images.to(ctx.device)
        p = torch.sigmoid(quantized(images).float())
        q = torch.sigmoid(reference(images).float())
        diff = (p - q).abs()
        largest = max(largest, float(diff.max()))
        total += float(diff.sum())
        flips += int(((p > e.threshold) != (q > e.threshold)).sum())
        count += diff.numel()
    return {"prob_max_abs_diff": largest, "prob_mean_abs_diff": total / max(count, 1),
            "label_flip_fraction": flips / max(count, 1)}


def measure_quantized(ctx: Context, path: Path, row: str, reference: torch.nn.Module, reference_row: str,
                      reference_results: dict) -> dict[str, float]:
    """Quality of an int8 ONNX network under ONNX Runtime, its file's size and its deviation from the float
    network it was made from (parameters and FLOPs are that network's: the same operations, in int8)."""
    session = inference.onnx_session(path, ctx.cfg.evaluate.threads)
    module = inference.OnnxModule(session)
    quality = score_quality(ctx, module, row)
    deviation = probability_deviation(ctx, module, reference)
    log.info("%s network (int8): Dice %.4f (%s %.4f, %+.2f points); probabilities within %.4f of the float network "
             "(mean %.5f), %.3f%% of the test pixels change label", row, quality["dice"], reference_row,
             reference_results["dice"], 100 * (quality["dice"] - reference_results["dice"]), deviation["prob_max_abs_diff"],
             deviation["prob_mean_abs_diff"], 100 * deviation["label_flip_fraction"])
    return {**quality, **deviation, "size_mb": path.stat().st_size / 1e6,
            **{k: reference_results[k] for k in ("params_m", "flops_g", "macs_g")}}


def run(ctx: Context, state: RunState) -> RunState:
    """The whole stage (quality passes and timing) with `evaluate.threads` CPU threads."""
    with cpu_threads(ctx.cfg.evaluate.threads):
        return _run(ctx, state)


def _run(ctx: Context, state: RunState) -> RunState:
    sources = {"baseline": state.baseline, "pruned": state.pruned, "final": state.final}
    if not any(sources.values()):
        raise RuntimeError("evaluate has no model: run train/prune first or set baseline=<run id or path>")
    results: dict[str, dict] = {}
    device_names = set()
    folder = ctx.stage_dir("evaluate")
    onnx = "onnxruntime" in [str(r) for r in ctx.cfg.evaluate.runtimes]
    reduced = reduced_precision(ctx)  # decided (and any notice given) once for the stage
    volume, window = reference_volume(ctx)  # 3D: the windows per volume are the same for every network
    windows = None if volume is None else inference.window_count(tuple(volume.shape), window)
    scratch = tempfile.TemporaryDirectory(prefix="medprune-onnx-")
    models: dict[str, torch.nn.Module] = {}
    onnx_paths: dict[str, Optional[Path]] = {}
    try:
        for row in ROWS:
            path = sources[row]
            if not path:
                continue
            if row == "final" and path == sources["pruned"] and "pruned" in results:
                continue  # no fine-tuning: the same network, measured and timed once (copied below)
            # only the final network's ONNX file is kept (and logged with the evaluate folder)
            onnx_paths[row] = None
            if onnx:
                onnx_paths[row] = folder / FINAL_ONNX if path == sources["final"] else Path(scratch.name) / f"{row}.onnx"
            log.info("Evaluating the %s network on the test split", row)
            results[row], device_name = measure(ctx, path, row, reduced, windows)
            device_names.add(device_name)
            models[row] = load_model(path).to(ctx.device).eval()
        quantized = quantized_files(state.quantized) if state.quantized else {}
        if quantized:  # made from the last network of the chain (quantize stage), compared with it
            reference_row = next(r for r in ("final", "pruned", "baseline") if r in models)
            for row, path in quantized.items():
                log.info("Evaluating the %s network (int8, ONNX Runtime) on the test split", row)
                results[row] = measure_quantized(ctx, path, row, models[reference_row], reference_row, results[reference_row])
        # then one timing pass over every form of every network, after all the quality passes
        latency, timed = cost(ctx, models, onnx_paths, reduced, quantized)
    finally:
        scratch.cleanup()
    for row, values in latency.items():
        results[row].update(values)
    peak = machine_peak(ctx.device, ctx.cfg.evaluate.threads)
    peaks = {"fp32": peak["peak_gflops"]}
    if reduced:
        low = machine_peak(ctx.device, ctx.cfg.evaluate.threads, dtype=precision.DTYPES[reduced])
        peak.update({k.replace("peak_", f"peak_{reduced}_"): v for k, v in low.items()})
        peaks[reduced] = low["peak_gflops"]
    for row, r in results.items():  # how much of the machine each network uses, as deployed
        if row in QUANTIZED_ROWS:
            continue  # int8: the float peaks are no yardstick for it
        if r.get("latency_ms"):
            r["achieved_gflops"] = r["flops_g"] / (r["latency_ms"] / 1e3)
            r["peak_fraction"] = r["achieved_gflops"] / peak["peak_gflops"]
        r.update(fastest(r, peaks))
    log.info("Machine peak at %s thread(s): %.1f GFLOP/s matmul, %.1f GFLOP/s convolution; the networks reach %s",
             ctx.cfg.evaluate.threads or "all", peak["peak_matmul_gflops"], peak["peak_conv_gflops"],
             ", ".join(f"{row} {100 * r['peak_fraction']:.0f}%" for row, r in results.items() if "peak_fraction" in r))
    if "final" not in models and sources["final"] and sources["final"] == sources["pruned"]:
        results["final"] = dict(results["pruned"])
    for row, images in state.budget_images().items():  # what each network's training cost, in images seen
        if row in results:
            results[row]["budget_images"] = images
    for row, dice in state.val_dice.items():  # the validation Dice its weights were kept on: what recipes are chosen by
        if row in results:
            results[row]["val_dice"] = dice
    if state.kept_start and "final" in results:
        results["final"]["kept_start"] = "yes"
    unsettled = {f"{row}/{form}_ms": f"CV {r[f'{form}_cv']:.2f}, {r[f'{form}_runs']} runs"
                 for row, r in results.items() for form in FORMS if r.get(f"{form}_settled") == 0}
    if unsettled:
        e = ctx.cfg.evaluate
        log.warning("Latency did NOT settle for %s: the CV of the last %d runs stayed above evaluate.latency_target_cv=%g "
                    "(or the window never filled) within %d runs / %g s; 1-minute load average %s before, %s after. "
                    "These figures are not reliable: time again on a quieter machine, or raise "
                    "evaluate.latency_max_runs / latency_max_seconds", ", ".join(f"{k} ({v})" for k, v in unsettled.items()),
                    e.latency_runs, e.latency_target_cv, e.latency_max_runs, e.latency_max_seconds, timed.load_before,
                    timed.load_after)
    load = {f"evaluate/load_average_{when}": v for when, v in (("before", timed.load_before), ("after", timed.load_after))
            if v is not None}
    ctx.tracker.log_metrics({**load, **{f"evaluate/{k}": v for k, v in peak.items()}})  # metrics, not evaluate.* params:
    # those are settings, alike in a report row
    flat = {f"{row}/{k}": v for row, metrics in results.items() for k, v in metrics.items()}
    # Measurements are metrics; counts and flags that describe how they were taken are params.
    ctx.tracker.log_metrics({k: v for k, v in flat.items() if k.rsplit("/", 1)[1] not in DESCRIPTIVE})
    ctx.tracker.log_params({k.replace("/", "."): v for k, v in flat.items() if k.rsplit("/", 1)[1] in DESCRIPTIVE})
    tags = {"medprune.latency_device": ", ".join(sorted(device_names)),
            "medprune.latency_form": _form(ctx)}
    collapsed = {row: r["collapsed"] for row, r in results.items() if r.get("collapsed", "no") != "no"}
    if collapsed:
        tags["medprune.collapsed"] = ", ".join(f"{row}: {how}" for row, how in collapsed.items())
    if onnx:
        tags["medprune.onnx_latency_device"] = f"{cpu_name()} (ONNX Runtime CPU)"
    if ctx.device.type == "cpu":  # what the CPU offers for fast inference (bf16, int8), beside the figures
        capabilities = precision.cpu_capabilities()
        log.info("CPU: %s, kernels %s, flags %s, bf16 %s", cpu_name(), capabilities["cpu_capability"],
                 capabilities["cpu_flags"], capabilities["cpu_bf16"])
        tags.update({f"medprune.{k}": v for k, v in capabilities.items()})
    if unsettled:
        tags["medprune.latency_unsettled"] = ",".join(unsettled)
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
    # an input the logged network takes as it is: a test image (2D), a training patch (3D: a window's size)
    example = ctx.data.dataset("train" if getattr(ctx.data, "dims", 2) == 3 else "test")[0][0].unsqueeze(0)
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
    items = [dataset[i] for i in range(n)]
    volumes = getattr(dataset, "window", None) is not None
    # volumes: each shown by its axial slice with the most true foreground (the 3D network still sees the volume)
    picks = [int(mask.flatten(2).sum((0, 2)).argmax()) if volumes else None for _, mask in items]
    images = torch.stack([image[:, z] if volumes else image for (image, _), z in zip(items, picks)])
    masks = torch.stack([mask[:, z] if volumes else mask for (_, mask), z in zip(items, picks)])
    predictions = {}
    for row, model_dir in model_dirs.items():
        model = load_model(model_dir).to(ctx.device).eval()
        if volumes:
            infer = inference.windowed(model, dataset)
            logits = torch.cat([infer(image.unsqueeze(0).to(ctx.device))[:, :, z].cpu() for (image, _), z in zip(items, picks)])
        else:
            logits = model(images.to(ctx.device)).cpu()
        pred = binarize(logits, ctx.cfg.evaluate.threshold)
        dice, _ = dice_iou(pred, masks > 0.5)
        predictions[LABELS.get(row, row)] = (pred, dice)
    plots.masks_before_after(images, masks, predictions, path)
