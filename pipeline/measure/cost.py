"""What networks cost to run: every deployed form of every network timed in one interleaved pass per
thread pool, the fastest form per precision, and each network's share of the machine's peak.

The forms of a network (docs/PERFORMANCE.md): the network as trained (`latency_eager`, when deploying
changes it) and one form per runtime of pipeline/measure/runtimes.py REGISTRY that is asked for (torch,
the BatchNorm-folded module in channels_last, is always there), in fp32 and in the reduced precision when
the device runs it natively; on 3D data also whole test volumes window by window. Each form's results are
named by its runtime's prefix: <form>_ms (median), _p90_ms, _cv, _max_abs_diff (against the eager fp32
network), and, describing how the timing went, _runs and _settled.

Timing the networks one after another let a busy spell of a shared machine land on one of them (two
networks of one shape at 258 and 2559 ms); interleaved, every network sees the same machine.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline import inference
from pipeline.measure.peak import machine_peak
from pipeline.measure.profiling import InterleavedTimes, cpu_threads, forward_call, thread_count, time_interleaved
from pipeline.measure.runtimes import REGISTRY, Export, deploy, openvino_graph
from pipeline.precision import REDUCED

log = logging.getLogger(__name__)

EAGER = "latency_eager"  # the network as trained, the reference every deployed form is compared with
# Every timed form's result prefix, derived from the registry: what a results table, the unsettled check and
# the params-not-metrics split (<form>_runs, <form>_settled) read.
FORMS = (EAGER, *(r.form(p) for r in REGISTRY.values() for p in ("fp32", *REDUCED)),
         *(r.volume_prefix for r in REGISTRY.values() if r.volume_prefix))
TIMING_PASSES = tuple(dict.fromkeys(r.timing_pass for r in REGISTRY.values()))  # torch's own pass first


@dataclass(frozen=True)
class Volume:
    """3D data: the reference test volume (batch 1, on the device) and the sliding window that tiles it."""

    image: torch.Tensor
    window: object


def volume_call(model: torch.nn.Module, volume: Volume) -> Callable[[], object]:
    """One sliding-window inference of `model` over the volume, as a callable to time."""
    infer = inference.SlidingWindow(model.eval(), volume.window)

    def call():
        with torch.inference_mode():
            return infer(volume.image)

    return call


def time_networks(settings, models: dict[str, torch.nn.Module], input_shape: tuple[int, ...], device: torch.device,
                  reduced: Optional[str] = None, volume: Optional[Volume] = None,
                  keep_graphs: Optional[dict[str, Path]] = None,
                  graph_only: Optional[dict[str, Path]] = None, repeat: int = 1) -> tuple[dict[str, dict], InterleavedTimes]:
    """Latency of every network (by name) in every form, per network a dict of results.

    `settings`: the evaluate block (fold_bn, channels_last, latency_eager, runtimes, onnx_opset, onnx_dynamo,
    threads and the latency_* timing settings). `reduced`: a precision the device runs natively (or None).
    `keep_graphs` {network: path}: where the ONNX graph that ONNX Runtime ran is kept (the final network's
    final.onnx). `graph_only` {network: ONNX file}: networks that exist only as ONNX (the int8 rows), timed
    in ONNX Runtime's pass, and in OpenVINO's when evaluate.runtimes has it. A runtime that cannot take a
    network costs only that form's results (a warning).
    `repeat`: calls per timing (the figures are per call): a round over many networks otherwise runs each one
    with caches its predecessors filled (a search's front, pipeline/front.py)."""
    import tempfile

    e = settings
    export = Export(opset=int(e.onnx_opset), dynamo=bool(e.onnx_dynamo))
    wanted = [("torch", "fp32"), *((str(r), "fp32") for r in e.runtimes)]
    if reduced:
        wanted += [(r, reduced) for r in ("torch", *(str(r) for r in e.runtimes)) if REGISTRY[r].supports(reduced, device)]
    fns: dict[str, tuple[str, Callable]] = {}  # "<network>/<form>" -> (timing pass, call)
    out: dict[str, dict] = {}
    for name, path in (graph_only or {}).items():
        out[name] = {"latency_threads": thread_count(e.threads)}
        session = inference.onnx_session(path, e.threads, spinning=False)
        fns[f"{name}/{REGISTRY['onnxruntime'].form()}"] = ("onnxruntime", inference.onnx_call(session, input_shape))
        if "openvino" in [str(r) for r in e.runtimes]:  # the same int8 file compiled by OpenVINO
            try:
                graph = openvino_graph(path, input_shape, "fp32", e.threads)
                fns[f"{name}/{REGISTRY['openvino'].form()}"] = ("openvino", graph.call)
            except Exception as err:  # noqa: BLE001  (a graph OpenVINO cannot take costs only that form)
                log.warning("OpenVINO could not compile the %s network (%s: %s); no openvino_latency results", name,
                            type(err).__name__, err)
    with tempfile.TemporaryDirectory(prefix="medprune-runtimes-") as work:  # the exported graphs the runtimes read
        for name, model in models.items():
            folded = inference.prepare_for_inference(model, input_shape, fold_bn=bool(e.fold_bn), channels_last=False)
            deployed_cl = bool(e.channels_last) and len(input_shape) == 4  # volumes stay NCDHW (runtimes._build_torch)
            out[name] = {"latency_threads": thread_count(e.threads) if device.type == "cpu" else 0,
                         "latency_bn_folded": folded.folded_bn, "latency_channels_last": int(deployed_cl)}
            if (folded.folded_bn or deployed_cl) and e.latency_eager:
                fns[f"{name}/{EAGER}"] = ("torch", forward_call(model, input_shape))
            for runtime, precision in wanted:
                spec = REGISTRY[runtime]
                form = spec.form(precision)
                try:
                    deployed = deploy(folded.model, input_shape, runtime, precision, threads=e.threads,
                                      channels_last=bool(e.channels_last), reference=model, export=export,
                                      work_dir=Path(work) / f"{name}-{runtime}-{precision}")
                except Exception as err:  # an exporter gap or a runtime that cannot take this network
                    log.warning("%s (%s) of the %s network failed (%s: %s); no %s_* results", spec.label, precision, name,
                                type(err).__name__, err, form)
                    continue
                if deployed.note:
                    log.warning("%s (%s): %s", spec.label, precision, deployed.note)
                out[name][f"{form}_max_abs_diff"] = deployed.max_abs_diff
                if spec.file_result and deployed.file is not None:
                    out[name][spec.file_result] = deployed.file.stat().st_size / 1e6
                    if name in (keep_graphs or {}):
                        shutil.copyfile(deployed.file, keep_graphs[name])
                fns[f"{name}/{form}"] = (spec.timing_pass, deployed.call)
                if volume is not None and spec.volume_prefix and precision == "fp32":
                    fns[f"{name}/{spec.volume_prefix}"] = (spec.timing_pass, volume_call(deployed.as_module(), volume))
        if repeat > 1:
            fns = {k: (p, _repeated(fn, repeat)) for k, (p, fn) in fns.items()}
        timed = _time_per_pass(e, fns)
    for key, t in timed.timings.items():
        name, form = key.split("/")
        out[name].update({f"{form}_ms": t.median_ms / repeat, f"{form}_p90_ms": t.p90_ms / repeat, f"{form}_cv": t.cv,
                          f"{form}_runs": t.runs, f"{form}_settled": int(t.settled)})
    load = "/".join("?" if v is None else f"{v:.2f}" for v in (timed.load_before, timed.load_after))
    log.info("Latency: %d rounds in %.1f s, stopped by %s; 1-minute load average %s (before/after)",
             timed.rounds, timed.seconds, timed.stopped_by, load)
    return out, timed


def _repeated(fn: Callable, times: int) -> Callable[[], object]:
    def call():
        for _ in range(times):
            out = fn()
        return out
    return call


def _time_per_pass(e, fns: dict[str, tuple[str, Callable]]) -> InterleavedTimes:
    """One interleaved pass per thread pool (Runtime.timing_pass), the networks interleaved within each: ONNX
    Runtime's worker threads spin for a while after each run, and torch's OpenMP threads after each parallel
    region; interleaved with each other on a 2-core machine they slowed every torch form 2-3x (the default
    job's 5.6 / 2.7 / 2.6 ms read 13.6 / 6.6 / 6.7 ms, CV up to 0.98)."""
    passes = {p: {k: fn for k, (q, fn) in fns.items() if q == p} for p in TIMING_PASSES}
    passes = {p: group for p, group in passes.items() if group}
    log.info("Timing %d forms, interleaved per runtime (evaluate.latency_*)", len(fns))
    results = []
    budget = float(e.latency_max_seconds)  # for all the passes: what is left is shared by the passes still to run
    with cpu_threads(e.threads):
        for i, group in enumerate(passes.values()):
            left = max(budget - sum(r.seconds for r in results), 0.0) / (len(passes) - i)
            results.append(time_interleaved(
                group, warmup=int(e.latency_warmup), runs=int(e.latency_runs), max_runs=int(e.latency_max_runs),
                target_cv=float(e.latency_target_cv), max_seconds=left))
    return InterleavedTimes(
        timings={k: v for r in results for k, v in r.timings.items()}, rounds=sum(r.rounds for r in results),
        seconds=sum(r.seconds for r in results), stopped_by=", ".join(f"{p}: {r.stopped_by}" for p, r in zip(passes, results)),
        load_before=results[0].load_before if results else None, load_after=results[-1].load_after if results else None)


def fastest(result: dict, peaks: dict[str, Optional[float]]) -> dict:
    """Per precision, the fastest deployed form of one network: its runtime (`fastest_form`), latency and, where
    the peak was measured, its share of the machine's peak in that precision (`fastest_peak_fraction`; bf16
    against the bf16 peak)."""
    out = {}
    for precision, peak in peaks.items():
        suffix = "" if precision == "fp32" else f"_{precision}"
        timed = {name: result[f"{r.form(precision)}_ms"] for name, r in REGISTRY.items() if f"{r.form(precision)}_ms" in result}
        if not timed:
            continue
        runtime = min(timed, key=timed.get)
        out[f"fastest{suffix}_form"] = runtime
        out[f"fastest{suffix}_ms"] = timed[runtime]
        if peak:
            out[f"fastest{suffix}_peak_fraction"] = result["flops_g"] / (timed[runtime] / 1e3) / peak
    return out


def machine_use(results: dict[str, dict], device: torch.device, threads: Optional[int], reduced: Optional[str],
                runtimes: Optional[tuple[str, ...]], skip: tuple[str, ...] = ()) -> dict[str, object]:
    """Each network's fastest forms and, when `runtimes` names the runtimes the networks were timed in, the
    machine's peak in them (fp32, and `reduced`; pipeline/measure/peak.py) and in each network's results the
    GFLOP/s its deployed form reaches and its share of the peak. `skip`'s networks (int8: no float yardstick)
    are left alone. Returns the peak measurements (peak_*; {} without `runtimes`)."""
    peak: dict[str, object] = {}
    peaks: dict[str, Optional[float]] = {"fp32": None, **({reduced: None} if reduced else {})}
    if runtimes:
        peak = machine_peak(device, threads, runtimes)
        peaks["fp32"] = peak["peak_gflops"]
        if reduced:
            low = machine_peak(device, threads, runtimes, precision=reduced)
            peak.update({k.replace("peak_", f"peak_{reduced}_", 1): v for k, v in low.items()})
            peaks[reduced] = low["peak_gflops"]
    for name, r in results.items():
        if name in skip:
            continue
        if r.get("latency_ms") and peaks["fp32"]:
            r["achieved_gflops"] = r["flops_g"] / (r["latency_ms"] / 1e3)
            r["peak_fraction"] = r["achieved_gflops"] / peaks["fp32"]
        r.update(fastest(r, peaks))
    if peak:
        log.info("Machine peak at %s thread(s): %.1f GFLOP/s (%s); the networks reach %s", threads or "all",
                 peak["peak_gflops"], peak["peak_form"],
                 ", ".join(f"{name} {100 * r['peak_fraction']:.0f}%" for name, r in results.items() if "peak_fraction" in r))
        above = [f"{name} {key} {100 * r[key]:.0f}%" for name, r in results.items() for key in r
                 if key.endswith("peak_fraction") and r[key] > 1.0]
        if above:  # a yardstick that the measured thing exceeds (the peak was timed in a busy spell)
            log.warning("Above the machine's peak: %s; the peak was measured once in this process and may have been "
                        "timed in a busy spell: read these shares as unreliable", ", ".join(above))
    return peak


def unsettled(results: dict[str, dict]) -> dict[str, str]:
    """"<network>/<form>_ms" -> how far it was from settling, for every form whose timing did not settle."""
    return {f"{name}/{form}_ms": f"CV {r[f'{form}_cv']:.2f}, {r[f'{form}_runs']} runs"
            for name, r in results.items() for form in FORMS if r.get(f"{form}_settled") == 0}
