"""Costs: FLOPs and parameters, and the latency loop timed against a scripted clock."""
import pytest
import torch
from torch import nn

from pipeline.measure import profiling
from pipeline.measure.profiling import count_flops, count_params, measure_latency, summarize, time_calls


def test_flops_of_a_conv_are_twice_its_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 output channels x 16x16 positions x (3 x 3 x 3) multiply-adds, 2 FLOPs each
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 8 * 16 * 16 * 27
    assert count_params(conv) == 8 * 27


class ScriptedClock:
    """perf_counter() that advances by the next scripted step (seconds) after each timed call."""

    def __init__(self, steps):
        self.now, self.steps = 0.0, list(steps)

    def __call__(self):
        return self.now

    def call(self):
        self.now += self.steps.pop(0)


def test_time_calls_times_each_call_after_the_warm_up(monkeypatch):
    clock = ScriptedClock([9.0, 0.010, 0.030, 0.020, 0.040])  # the first step is the warm-up call
    monkeypatch.setattr(profiling.time, "perf_counter", clock)
    times = time_calls(clock.call, warmup=1, runs=4)
    assert times == pytest.approx([10.0, 30.0, 20.0, 40.0])
    assert summarize(times) == {"median_ms": pytest.approx(25.0), "p90_ms": pytest.approx(40.0), "runs": 4}


def test_time_calls_stops_at_its_time_budget_but_keeps_the_minimum(monkeypatch):
    clock = ScriptedClock([1.0] * 10)
    monkeypatch.setattr(profiling.time, "perf_counter", clock)
    assert len(time_calls(clock.call, warmup=0, runs=10, max_seconds=0.5, min_runs=3)) == 3


@pytest.mark.parametrize("fn", ["pipeline.measure.profiling.time_calls", "pipeline.measure.profiling.latency_times",
                                "pipeline.measure.profiling.time_onnx", "pipeline.measure.profiling.measure_onnx_latency"])
def test_timing_counts_have_no_default_of_their_own(fn):
    """warmup and runs live in the config (evaluate.latency_*, prune.timing_*) alone: no second default here."""
    import importlib
    import inspect

    module, _, name = fn.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    assert params["warmup"].default is inspect.Parameter.empty and params["runs"].default is inspect.Parameter.empty


def test_latency_reports_median_threads_and_device_and_restores_threads():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = torch.get_num_threads()
    result = measure_latency(model, (1, 3, 32, 32), warmup=1, runs=5, threads=1)
    assert result["latency_p90_ms"] >= result["latency_ms"]
    assert result["latency_threads"] == 1 and result["latency_runs"] == 5
    assert result["latency_device"] == profiling.cpu_name()
    assert torch.get_num_threads() == before


def test_machine_peak_is_the_best_of_every_runtime_and_shape_and_restores_the_threads():
    import torch

    from pipeline.measure.peak import machine_peak

    before = torch.get_num_threads()
    shapes = ((8, 8, 32), (16, 8, 16))
    peak = machine_peak(torch.device("cpu"), threads=1, runtimes=("torch", "onnxruntime"), shapes=shapes,
                        warmup_s=0.01, measure_s=0.05)
    assert peak["peak_torch_gflops"] > 0 and peak["peak_onnxruntime_gflops"] > 0
    assert peak["peak_gflops"] == max(peak["peak_torch_gflops"], peak["peak_onnxruntime_gflops"])
    runtime, where = peak["peak_form"].split(" ")
    assert peak[f"peak_{runtime}_gflops"] == peak["peak_gflops"] and where in ("8->8@32²", "16->8@16²")
    assert torch.get_num_threads() == before
    # bf16: a runtime without bf16 kernels (ONNX Runtime) is left out, never counted with fp32 figures
    low = machine_peak(torch.device("cpu"), threads=1, runtimes=("onnxruntime", "torch"), precision="bf16",
                       shapes=shapes[:1], warmup_s=0.01, measure_s=0.02)
    assert "peak_onnxruntime_gflops" not in low and low["peak_gflops"] == low["peak_torch_gflops"]
