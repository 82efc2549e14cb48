"""What a network costs: parameters, FLOPs/MACs (torch's FlopCounterMode), latency.

FlopCounterMode counts the matrix work (convolutions, transposed convolutions, matmuls) at 2 FLOPs per
multiply-add; elementwise ops (BatchNorm, ReLU, pooling) are not counted, as in the papers' tables.
MACs = FLOPs / 2.

Latency: batch 1, `warmup` untimed runs, then the median (and p90) of `runs` timed runs, in inference
mode with a fixed thread count on CPU (recorded), or with CUDA events on a GPU. The same timing loop
(`time_calls`) serves torch modules and ONNX Runtime sessions (pipeline.inference), so their numbers
compare. `machine_info` describes where a number was taken (CPU model, threads, versions, load).

`time_interleaved` is what the evaluate stage uses: every form of every network timed round-robin in
one pass, until each one's latest timings are stable (or a run / time budget is spent), so a busy spell
of a shared machine hits all of them alike and a number taken in one is flagged (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline import inference


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one input of `input_shape` (including the batch dimension)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def time_calls(
    fn: Callable[[], object], warmup: int, runs: int, max_seconds: float | None = None, min_runs: int = 3
) -> list[float]:
    """Milliseconds of each of `runs` timed calls of `fn` after `warmup` untimed ones (wall clock).

    `warmup` and `runs` have no default here: the configured values (evaluate.latency_*, prune.timing_*,
    scripts/bench.py's settings) are their one home, so a caller always passes them.

    `max_seconds`: stop early once the timed calls have taken that long (at least `min_runs` runs are
    kept), so one timing budget fits a 30 ms and a 3 s network alike."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and len(times) >= min_runs and time.perf_counter() - start >= max_seconds:
            break
    return times


def summarize(times_ms: list[float]) -> dict[str, float | int]:
    """Median and p90 (nearest rank) of per-run milliseconds."""
    times = sorted(times_ms)
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "runs": len(times),
    }


def thread_count(threads: int | None) -> int:
    """The thread count a `threads` setting means (None: all cores)."""
    return int(threads or os.cpu_count() or 1)


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Fixes torch's intra-op thread count (None: all cores) and restores it after."""
    previous = torch.get_num_threads()
    threads = thread_count(threads)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def latency_times(
    model: nn.Module,
    input_shape: tuple[int, ...],
    warmup: int,
    runs: int,
    threads: int | None = None,
    channels_last: bool = False,
    max_seconds: float | None = None,
    min_runs: int = 3,
) -> list[float]:
    """Per-run milliseconds of `model` on a random input (CUDA events on a GPU, wall clock on CPU with
    the thread count fixed for the measurement and restored after).

    `channels_last`: the input is given in NHWC memory layout (for a model converted with
    `.to(memory_format=torch.channels_last)`, see pipeline.inference.prepare_for_inference)."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.randn(input_shape, device=device)
    if channels_last and x.dim() in inference.CHANNELS_LAST:
        x = x.contiguous(memory_format=inference.CHANNELS_LAST[x.dim()])
    if device.type == "cuda":
        return _cuda_times(lambda: model(x), device, warmup, runs)
    with cpu_threads(threads):
        return time_calls(lambda: model(x), warmup, runs, max_seconds, min_runs)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], **timing) -> dict[str, float | int | str]:
    """Median/p90 latency in ms, with the thread count and device used; `timing` as `latency_times`."""
    device = next(model.parameters()).device
    stats = summarize(latency_times(model, input_shape, **timing))
    return {
        "latency_ms": stats["median_ms"],
        "latency_p90_ms": stats["p90_ms"],
        "latency_threads": int(timing.get("threads") or os.cpu_count() or 1) if device.type == "cpu" else 0,
        "latency_runs": stats["runs"],
        "latency_device": device_name(device),
    }


def _cuda_times(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Per-run milliseconds from CUDA events (the GPU's own clock, no host-side launch noise)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return times


# Fewest timed runs per callable before the time budget (max_seconds) may stop a timing pass.
MIN_RUNS = 3


@dataclass
class Timing:
    """One callable's latency over its window (its last `runs` timings) in an interleaved pass."""

    median_ms: float
    p90_ms: float
    cv: float  # stdev / mean of the window
    runs: int  # timed calls made in all (the statistics are over the window)
    settled: bool  # the window was full and its cv <= target_cv


@dataclass
class InterleavedTimes:
    """What `time_interleaved` found, per callable, and how the pass went."""

    timings: dict[str, Timing]
    rounds: int
    seconds: float  # timed rounds only (warm-up excluded), by the clock given
    stopped_by: str  # "settled", "max_runs" or "max_seconds"
    load_before: float | None  # 1-minute load average before the warm-up and after the last round
    load_after: float | None

    def unsettled(self) -> list[str]:
        return [name for name, t in self.timings.items() if not t.settled]


def coefficient_of_variation(times: list[float]) -> float:
    mean = statistics.fmean(times)
    spread = statistics.stdev(times) if len(times) > 1 else 0.0
    return spread / mean if mean > 0 else (0.0 if spread == 0 else math.inf)


def round_order(names: list[str], round_index: int) -> list[str]:
    """The calling order of one round: rotated by one each round, and reversed every other cycle of
    rotations, so no callable always runs right after the same other one (caches, clocks, turbo)."""
    n = len(names)
    k = round_index % n if n else 0
    order = names[k:] + names[:k]
    return order[::-1] if (round_index // max(n, 1)) % 2 else order


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, runs: int, max_runs: int, target_cv: float,
    max_seconds: float, clock: Callable[[], float] = time.perf_counter,
) -> InterleavedTimes:
    """Times several callables round-robin until their latest timings are stable.

    `warmup` untimed rounds, then timed rounds: each calls every fn once (`round_order`), timing each
    call by `clock` (wall clock: a fn that runs on a GPU must synchronise before it returns). The pass
    stops after the first round where every fn has at least `runs` timings and the coefficient of
    variation (stdev / mean) of each fn's latest `runs` timings (its window) is <= `target_cv`; else
    after `max_runs` rounds, or once `max_seconds` of timed rounds have passed and every fn has at
    least min(runs, MIN_RUNS) timings. Median, p90 and cv come from each fn's final window; a fn is
    `settled` when that window was full and within `target_cv`. One pass for all of them (rather than
    one after another) makes a busy spell of a shared machine slow all of them alike instead of one."""
    if runs < 2:
        raise ValueError(f"runs={runs}: a coefficient of variation needs a window of at least 2 timings")
    names = list(fns)
    load_before = _load_1min()
    for round_index in range(warmup):
        for name in round_order(names, round_index):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds, stopped_by, start = 0, "max_runs", clock()
    while names and rounds < max_runs:
        for name in round_order(names, rounds):
            t0 = clock()
            fns[name]()
            times[name].append((clock() - t0) * 1e3)
        rounds += 1
        if rounds >= runs and all(coefficient_of_variation(t[-runs:]) <= target_cv for t in times.values()):
            stopped_by = "settled"
            break
        if clock() - start >= max_seconds and rounds >= min(runs, MIN_RUNS):
            stopped_by = "max_seconds"
            break
    seconds = clock() - start
    timings = {}
    for name, t in times.items():
        window = t[-runs:]
        stats, cv = summarize(window), coefficient_of_variation(window)
        timings[name] = Timing(stats["median_ms"], stats["p90_ms"], cv, len(t), len(window) >= runs and cv <= target_cv)
    return InterleavedTimes(timings, rounds, seconds, stopped_by, load_before, _load_1min())


def forward_call(model: nn.Module, input_shape: tuple[int, ...], channels_last: bool = False) -> Callable[[], object]:
    """One batch-`input_shape` inference of `model` on a fixed random input, as a callable to time; on a
    GPU it waits for the kernels to finish, so a wall clock around it times the work, not the launch."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.randn(input_shape, device=device)
    if channels_last and x.dim() in inference.CHANNELS_LAST:
        x = x.contiguous(memory_format=inference.CHANNELS_LAST[x.dim()])

    def call():
        with torch.inference_mode():
            out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def _load_1min() -> float | None:
    load = load_average()
    return load[0] if load else None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover (not on this platform)
        return None


def machine_info(device: torch.device | None = None) -> dict[str, object]:
    """Where a measurement was taken: CPU model, cores, torch threads, versions, device, load."""
    import onnxruntime

    device = device or torch.device("cpu")
    info: dict[str, object] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "device_type": device.type,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def time_onnx(
    session, input_shape: tuple[int, ...], warmup: int, runs: int, max_seconds: Optional[float] = None, min_runs: int = 3,
    shrink_arena: bool = False,
) -> list[float]:
    """Per-run milliseconds of an ONNX Runtime `session` on a random input of `input_shape` (see time_calls)."""
    return time_calls(inference.onnx_call(session, input_shape, shrink_arena), warmup, runs, max_seconds, min_runs)


def measure_onnx_latency(
    session_or_path, input_shape: tuple[int, ...], warmup: int, runs: int, threads: Optional[int] = None
) -> dict[str, float | int]:
    """Median/p90 ONNX Runtime latency (ms) of a session, or of the model at a path (a session with
    `threads` intra-op threads is made for it)."""
    session = session_or_path
    if isinstance(session_or_path, (str, Path)):
        session = inference.onnx_session(session_or_path, threads)
    stats = summarize(time_onnx(session, input_shape, warmup, runs))
    return {"latency_ms": stats["median_ms"], "latency_p90_ms": stats["p90_ms"], "latency_runs": stats["runs"],
            "latency_threads": inference.session_threads(session)}
