"""The machine's peak: the yardstick a network's achieved GFLOP/s is read against (`% peak`).

A yardstick must bound what it measures, so the peak is the best that any runtime the networks are timed in
reaches on the layers the networks are made of: 3x3 convolutions with bias and ReLU (a folded
convolution-BatchNorm-ReLU), at the levels of a UNet at 256x256 (64 channels at 256², 128 at 128², ... 1024 at
16², the same FLOPs each), each shape run in each runtime, after a warm-up, for long enough that the clock
settles, and the best run of all counted. The levels' decoder convolutions (twice the channels in, after the
skip concatenation) are in the set too: they run a little faster than the encoder's. A network is a sequence
of such layers plus work that is not counted (pooling, concatenation, up-sampling), so it cannot run faster
than its fastest layer does alone. (A dilated convolution on a small map is the exception: most of its counted
taps fall in the zero padding, which the runtimes skip; docs/PERFORMANCE.md, the yardstick.)

What this replaced did not hold: one float32 matmul (1024³) and one 64 -> 64 convolution at 128² in torch. On a
2-core Intel Xeon (AVX-512 VNNI) that read 108 and 161 GFLOP/s while the unpruned classic UNet ran at 199-250
GFLOP/s: the wide, low-resolution layers run faster than a 64-channel one, and ONNX Runtime and OpenVINO run
convolutions faster than torch does there. FLOPs are counted as direct convolution (2 per multiply-add), as
for the networks, so a library that does a 3x3 convolution in fewer operations raises the yardstick and the
networks alike.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pipeline.measure.profiling import count_flops, cpu_threads, time_calls

log = logging.getLogger(__name__)

# (channels in, channels out, side): the levels of a UNet at 256x256, encoder (c -> c, 4.8 GFLOP each) and decoder
# (2c -> c, 9.7 GFLOP each)
SHAPES: tuple[tuple[int, int, int], ...] = tuple((k * c, c, 256 * 64 // c)
                                                 for c in (64, 128, 256, 512, 1024) for k in (1, 2))


def _layer(channels_in: int, channels_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU()).eval()


def _best_seconds(call, warmup_s: float, measure_s: float, device: torch.device) -> float:
    """The fastest of the calls made over `measure_s` (at least 3), after calling for `warmup_s` (the clock ramps
    up, the runtime allocates its buffers)."""
    def synced():
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    endless = 10**9  # the time budgets stop the loops
    time_calls(synced, warmup=1, runs=endless, max_seconds=warmup_s, min_runs=1)
    return min(time_calls(synced, warmup=0, runs=endless, max_seconds=measure_s, min_runs=3)) / 1e3


_MEASURED: dict[tuple, dict[str, object]] = {}  # one measurement per process and setting: the jobs of a sweep share it


def machine_peak(device: torch.device, threads: int | None = None, runtimes: Sequence[str] = ("torch",),
                 precision: str = "fp32", shapes: Sequence[tuple[int, int, int]] | None = None,
                 warmup_s: float = 0.2, measure_s: float = 0.4) -> dict[str, object]:
    """The best GFLOP/s of `shapes` (channels in, channels out, side; default SHAPES) in each of `runtimes`
    (pipeline.measure.runtimes names) at `threads` and `precision`. A runtime that has no kernels for
    `precision` on `device`, or cannot take the layer, is left out (logged). On CUDA only torch runs on the
    device: the yardstick is torch's there.

    Returns peak_gflops (the yardstick), peak_form ("<runtime> <in>-><out>@<side>²", where it was reached) and
    peak_<runtime>_gflops for each runtime measured. About (warmup_s + measure_s) per shape and runtime, plus the
    graph runtimes' export and compilation: ~10 s per runtime at the defaults, once per process and setting (the
    jobs a sweep runs in one process share the measurement)."""
    if device.type == "cuda":
        runtimes = ("torch",)
    shapes = tuple(SHAPES if shapes is None else shapes)
    key = (str(device), threads, tuple(runtimes), precision, shapes, warmup_s, measure_s)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(device, threads, runtimes, precision, shapes, warmup_s, measure_s)
    return dict(_MEASURED[key])


def _measure(device, threads, runtimes, precision, shapes, warmup_s, measure_s) -> dict[str, object]:
    from pipeline.measure.runtimes import REGISTRY, deploy

    best: dict[str, tuple[float, str]] = {}
    with tempfile.TemporaryDirectory(prefix="medprune-peak-") as work, cpu_threads(threads):
        for runtime in runtimes:
            if runtime not in REGISTRY or not REGISTRY[runtime].supports(precision, device):
                log.info("machine peak: %s has no %s kernels on %s; not measured", runtime, precision, device.type)
                continue
            for channels, out_channels, side in shapes:
                shape = (1, channels, side, side)
                layer = _layer(channels, out_channels).to(device)
                flops = count_flops(layer, shape)
                try:
                    deployed = deploy(layer, shape, runtime, precision, threads=threads,
                                      work_dir=Path(work) / f"{runtime}-{channels}-{out_channels}-{side}")
                except Exception as err:  # noqa: BLE001  (a runtime that cannot take it: the others still bound)
                    log.warning("machine peak: %s could not run a %d-channel convolution (%s: %s)",
                                runtime, channels, type(err).__name__, err)
                    continue
                with torch.inference_mode():
                    gflops = flops / _best_seconds(deployed.call, warmup_s, measure_s, device) / 1e9
                if gflops > best.get(runtime, (0.0, ""))[0]:
                    best[runtime] = (gflops, f"{runtime} {channels}->{out_channels}@{side}²")
    if not best:
        raise RuntimeError(f"no runtime of {', '.join(runtimes)} could measure the machine's {precision} peak")
    top = max(best.values())
    return {"peak_gflops": top[0], "peak_form": top[1],
            **{f"peak_{runtime}_gflops": value for runtime, (value, _) in best.items()}}
