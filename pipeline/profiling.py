"""What a network costs: parameters, FLOPs/MACs (torch's FlopCounterMode), latency.

FlopCounterMode counts the matrix work (convolutions, transposed convolutions, matmuls) at 2 FLOPs per
multiply-add; elementwise ops (BatchNorm, ReLU, pooling) are not counted, as in the papers' tables.
MACs = FLOPs / 2.

Latency: batch 1, `warmup` untimed runs, then the median (and p90) of `runs` timed runs, in inference
mode with a fixed thread count on CPU (recorded), or with CUDA events on a GPU.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

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


@torch.inference_mode()
def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], warmup: int = 5, runs: int = 30, threads: int | None = None
) -> dict[str, float | int | str]:
    """Median/p90 latency in ms; the thread count is fixed for the measurement and restored after."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.randn(input_shape, device=device)
    previous_threads = torch.get_num_threads()
    threads = threads or os.cpu_count() or 1
    times: list[float] = []
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
        else:
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(previous_threads)
    times.sort()
    return {
        "latency_ms": statistics.median(times),
        "latency_p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "latency_threads": threads if device.type == "cpu" else 0,
        "latency_runs": runs,
        "latency_device": device_name(device),
    }
