"""What a network costs: parameters, FLOPs/MACs (torch's FlopCounterMode), latency.

FlopCounterMode counts the matrix work (convolutions, transposed convolutions, matmuls) at 2 FLOPs per
multiply-add; elementwise ops (BatchNorm, ReLU, pooling) are not counted, as in the papers' tables.
MACs = FLOPs / 2.

Latency: batch 1, `warmup` untimed runs, then the median (and p90) of `runs` timed runs, in inference
mode with a fixed thread count on CPU (recorded), or with CUDA events on a GPU. The same timing loop
(`time_calls`) serves torch modules and ONNX Runtime sessions (pipeline.inference), so their numbers
compare. `machine_info` describes where a number was taken (CPU model, threads, versions, load).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
    fn: Callable[[], object], warmup: int = 5, runs: int = 30, max_seconds: float | None = None, min_runs: int = 3
) -> list[float]:
    """Milliseconds of each of `runs` timed calls of `fn` after `warmup` untimed ones (wall clock).

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


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Fixes torch's intra-op thread count (None: all cores) and restores it after."""
    previous = torch.get_num_threads()
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def latency_times(
    model: nn.Module,
    input_shape: tuple[int, ...],
    warmup: int = 5,
    runs: int = 30,
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
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
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
