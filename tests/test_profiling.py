import torch
from torch import nn

from pipeline.profiling import count_flops, count_params, measure_latency


def test_flops_of_a_conv_are_twice_its_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 output channels x 16x16 positions x (3 x 3 x 3) multiply-adds, 2 FLOPs each
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 8 * 16 * 16 * 27
    assert count_params(conv) == 8 * 27


def test_latency_reports_median_threads_and_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = torch.get_num_threads()
    result = measure_latency(model, (1, 3, 32, 32), warmup=1, runs=5, threads=1)
    assert result["latency_ms"] > 0
    assert result["latency_p90_ms"] >= result["latency_ms"]
    assert result["latency_threads"] == 1 and result["latency_runs"] == 5
    assert result["latency_device"]
    assert torch.get_num_threads() == before
