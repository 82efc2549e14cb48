"""Inference preparation: BatchNorm folding is exact and never folds a shared output, channels_last
and ONNX Runtime give the torch output back, and the evaluate stage reports every latency."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models  # noqa: F401  (torchvision compatibility)
from helpers import conf, model_from_conf
from models.unet import UNet
from pipeline import inference
from pipeline.criteria.magnitude import MagnitudeCriterion
from pipeline.measure import profiling
from pipeline.measure.profiling import measure_latency, summarize, time_calls
from pipeline.pruning import prunable_layers, prune


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def small_unet(width=8, depth=2) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(UNet(3, 1, width=width, depth=depth))


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_folding_a_unet_removes_every_batchnorm_and_keeps_the_output():
    model = small_unet()
    before = bn_count(model)
    folded, n = inference.fold_batchnorm(model, X[:1])
    assert n == before and bn_count(folded) == 0
    with torch.no_grad():
        assert torch.allclose(folded(X), model(X), atol=1e-5)
    assert bn_count(model) == before  # the original is left alone


def test_a_pruned_unet_and_an_smp_unetplusplus_fold_exactly():
    model = small_unet(width=8, depth=3)
    scores = MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)
    pruned = prune(model, scores, X[:1], 0.5, round_to=2).model.eval()
    torch.manual_seed(0)
    upp = randomize_batchnorm(model_from_conf("smp_unetplusplus", encoder_name="resnet18", encoder_depth=3,
                                              decoder_channels=[16, 8, 4]))
    for net in (pruned, upp):
        folded, n = inference.fold_batchnorm(net, X[:1])
        assert n == bn_count(net) and n > 0
        with torch.no_grad():
            ref = net(X)
            assert (folded(X) - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


class SharedOutput(nn.Module):
    """The conv's output is read by the BatchNorm *and* by the residual add: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv called twice (weights shared): its two outputs need different treatments."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class TransposedAndSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.block(self.up_bn(self.up(x)))


@pytest.mark.parametrize("cls, expected", [(SharedOutput, 0), (SharedConv, 0), (TransposedAndSequential, 2)])
def test_only_batchnorms_that_alone_read_a_conv_output_are_folded(cls, expected):
    torch.manual_seed(0)
    model = randomize_batchnorm(cls())
    folded, n = inference.fold_batchnorm(model, X[:1])
    assert n == expected
    with torch.no_grad():
        assert torch.allclose(folded(X), model(X), atol=1e-5)


def test_prepared_channels_last_network_matches_and_reports_its_form():
    model = small_unet()
    prepared = inference.prepare_for_inference(model, (1, 3, 32, 32), fold_bn=True, channels_last=True)
    assert prepared.channels_last and prepared.folded_bn == bn_count(model)
    conv = prepared.model.encoder[0].conv[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = prepared.input(X)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(prepared.model(x), model(X), atol=1e-5)
    again = inference.with_channels_last(inference.prepare_for_inference(model, (1, 3, 32, 32), channels_last=False))
    assert again.channels_last


def test_a_3d_network_is_prepared_in_channels_last_3d_and_matches():
    from models.unet3d import UNet3D

    torch.manual_seed(0)
    model = UNet3D(2, 3, width=4, depth=2, norm="instance", res_block=False).eval()
    volume = torch.randn(2, 2, 16, 16, 16)
    prepared = inference.prepare_for_inference(model, (2, 2, 16, 16, 16), channels_last=True)
    conv = next(m for m in prepared.model.modules() if isinstance(m, nn.Conv3d))
    assert prepared.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert prepared.input(volume).is_contiguous(memory_format=torch.channels_last_3d)
    again = inference.with_channels_last(inference.prepare_for_inference(model, (2, 2, 16, 16, 16), channels_last=False))
    assert next(m for m in again.model.modules() if isinstance(m, nn.Conv3d)).weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert torch.allclose(prepared.model(prepared.input(volume)), model(volume), atol=1e-5)


def test_onnx_export_runs_in_onnx_runtime_with_a_dynamic_batch(tmp_path):
    model = small_unet()
    folded = inference.prepare_for_inference(model, (1, 3, 32, 32)).model
    path = inference.export_onnx(folded, tmp_path / "m.onnx", (1, 3, 32, 32))
    session = inference.onnx_session(path, threads=1)
    assert inference.session_threads(session) == 1
    assert inference.onnx_max_abs_diff(model, session, (1, 3, 32, 32)) < 1e-4  # against the unfolded original
    out = inference.onnx_run(session, X)  # batch 2 through a graph exported at batch 1
    with torch.no_grad():
        np.testing.assert_allclose(out, model(X).numpy(), atol=1e-4)
    result = profiling.measure_onnx_latency(session, (1, 3, 32, 32), warmup=1, runs=3)
    assert result["latency_ms"] > 0 and result["latency_p90_ms"] >= result["latency_ms"] and result["latency_runs"] == 3
    # a batch run that gives the session's memory arena back computes the same (the bench's throughput runs)
    np.testing.assert_array_equal(inference.onnx_call(session, (4, 3, 32, 32), shrink_arena=True)()[0],
                                  inference.onnx_call(session, (4, 3, 32, 32))()[0])
    assert len(profiling.time_onnx(session, (4, 3, 32, 32), warmup=0, runs=2, shrink_arena=True)) == 2


def test_timing_helpers_stop_at_the_time_budget_and_time_channels_last_inputs():
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=2, runs=50, max_seconds=0.0)
    assert len(times) == 3 and len(calls) == 5  # 2 warm-up + the 3 kept runs
    stats = summarize([5.0, 1.0, 3.0])
    assert stats["median_ms"] == 3.0 and stats["p90_ms"] == 5.0 and stats["runs"] == 3
    model = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    r = measure_latency(model, (1, 3, 16, 16), warmup=1, runs=3, threads=1, channels_last=True)
    assert r["latency_ms"] > 0 and r["latency_threads"] == 1


def _settings(**evaluate):
    values = dict(latency_warmup=1, latency_runs=3, latency_max_runs=5, latency_max_seconds=5.0, threads=1)
    return OmegaConf.create(conf("evaluate", "default", **{**values, **evaluate}))


def _time(settings, networks, reduced=None, **kw):
    from pipeline.measure import cost

    return cost.time_networks(settings, networks, (1, 3, 32, 32), torch.device("cpu"), reduced, **kw)


def _reduced(settings):
    from pipeline.stages import evaluate

    return evaluate.reduced_precision(SimpleNamespace(cfg=OmegaConf.create({"evaluate": settings}), device=torch.device("cpu")))


def test_evaluate_reports_deployed_eager_and_onnx_latency_of_every_network_interleaved_per_runtime(tmp_path, monkeypatch):
    from pipeline.measure import cost

    passes = []
    interleave = cost.time_interleaved
    monkeypatch.setattr(cost, "time_interleaved", lambda fns, **kw: passes.append(sorted(fns)) or interleave(fns, **kw))
    model, pruned = small_unet(), small_unet()
    out, timed = _time(_settings(), {"baseline": copy.deepcopy(model), "final": pruned},
                       keep_graphs={"final": tmp_path / "final.onnx"})
    assert sorted(timed.timings) == ["baseline/latency", "baseline/latency_eager", "baseline/onnx_latency",
                                     "final/latency", "final/latency_eager", "final/onnx_latency"]
    # torch forms in one pass, ONNX Runtime sessions in another: their idle threads spin and slow the other
    assert passes == [["baseline/latency", "baseline/latency_eager", "final/latency", "final/latency_eager"],
                      ["baseline/onnx_latency", "final/onnx_latency"]]
    torch_runs = {t.runs for name, t in timed.timings.items() if not name.endswith("onnx_latency")}
    assert len(torch_runs) == 1  # round-robin: every form of a pass timed as often
    for key in ("latency_ms", "latency_p90_ms", "latency_cv", "latency_max_abs_diff", "latency_eager_ms", "onnx_latency_ms",
                "onnx_latency_p90_ms", "onnx_latency_cv", "onnx_latency_max_abs_diff", "onnx_size_mb"):
        assert out["final"][key] >= 0, key
    assert out["final"]["latency_settled"] in (0, 1) and 3 <= out["final"]["latency_runs"] <= 5
    assert out["final"]["latency_bn_folded"] == bn_count(model) and out["final"]["latency_threads"] == 1
    assert out["final"]["onnx_latency_max_abs_diff"] < 1e-4 and out["final"]["latency_max_abs_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["final.onnx"]  # only the graph asked for is kept

    plain, _ = _time(_settings(fold_bn=False, channels_last=False, runtimes=[]), {"final": copy.deepcopy(model)})
    assert "latency_eager_ms" not in plain["final"] and "onnx_latency_ms" not in plain["final"]  # eager is deployed here
    assert plain["final"]["latency_bn_folded"] == 0 and plain["final"]["latency_channels_last"] == 0


def test_evaluate_times_openvino_and_bf16_forms_in_their_own_passes_and_names_the_fastest(monkeypatch):
    from pipeline import precision
    from pipeline.measure import cost

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # bf16 native, as on this EPYC
    passes = []
    interleave = cost.time_interleaved
    monkeypatch.setattr(cost, "time_interleaved", lambda fns, **kw: passes.append(sorted(fns)) or interleave(fns, **kw))
    model = small_unet()
    settings = _settings(runtimes=["openvino"], precision="bf16", latency_eager=False)
    out, _ = _time(settings, {"final": model}, _reduced(settings))
    # torch's forms (fp32 and bf16) share a pass; OpenVINO's thread pool gets its own
    assert passes == [["final/latency", "final/latency_bf16"], ["final/openvino_latency", "final/openvino_latency_bf16"]]
    final = out["final"]
    assert final["openvino_latency_max_abs_diff"] < 1e-4 < final["latency_bf16_max_abs_diff"] < 0.1
    assert final["openvino_latency_bf16_max_abs_diff"] > 1e-4  # really bf16
    final["flops_g"] = 1.0
    best = cost.fastest(final, {"fp32": 100.0, "bf16": 200.0})
    fp32 = {"torch": final["latency_ms"], "openvino": final["openvino_latency_ms"]}
    assert best["fastest_form"] == min(fp32, key=fp32.get) and best["fastest_ms"] == min(fp32.values())
    assert best["fastest_bf16_form"] in ("torch", "openvino")
    assert best["fastest_bf16_peak_fraction"] == pytest.approx(1.0 / (best["fastest_bf16_ms"] / 1e3) / 200.0)


def test_reduced_precision_forms_are_skipped_with_a_notice_where_the_cpu_would_emulate_them(monkeypatch, caplog):
    from pipeline import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level("WARNING"):
        settings = _settings(runtimes=[], precision="bf16")
        out, timed = _time(settings, {"final": small_unet()}, _reduced(settings))
    assert not any("bf16" in name for name in timed.timings)
    assert "evaluate.precision=bf16: no bf16 forms are measured: this CPU has no native bf16" in caplog.text


def test_evaluate_keeps_its_numbers_when_the_export_fails(tmp_path, monkeypatch, caplog):
    from pipeline import inference

    def broken(*args, **kwargs):
        raise RuntimeError("exporter gap")

    monkeypatch.setattr(inference, "export_onnx", broken)
    out, _ = _time(_settings(), {"final": small_unet()}, keep_graphs={"final": tmp_path / "final.onnx"})
    assert "latency_ms" in out["final"] and "onnx_latency_ms" not in out["final"]
    assert "exporter gap" in caplog.text and not (tmp_path / "final.onnx").exists()


def test_every_registered_runtime_names_its_results_and_the_config_offers_the_optional_ones():
    """The registry is the one home of a runtime: the config's enum, the result names and the bench's variants
    follow from it."""
    from pipeline.config import Runtime as RuntimeChoice
    from pipeline.measure import cost, runtimes

    assert [r.value for r in RuntimeChoice] == list(runtimes.OPTIONAL) and "torch" not in runtimes.OPTIONAL
    prefixes = [r.prefix for r in runtimes.REGISTRY.values()]
    assert len(set(prefixes)) == len(prefixes) and all(p.endswith("latency") for p in prefixes)
    for r in runtimes.REGISTRY.values():
        assert r.form() in cost.FORMS and r.form("bf16") in cost.FORMS and r.timing_pass in cost.TIMING_PASSES
