"""The benchmark suite runs end to end (tiny sizes) and writes its table and JSON; no timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the bench's rows run training and pruning

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("medprune_bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_bench_writes_every_row(tmp_path):
    bench = load_bench()
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "bench.md").read_text()
    assert len(list(tmp_path.glob("bench-*.json"))) == 1 and len(list(tmp_path.glob("bench-*.md"))) == 1

    machine = results["machine"]
    for key in ("cpu", "cpu_count", "torch", "onnxruntime", "device", "load_average"):
        assert key in machine, key
    assert results["threads"] == 1

    speed = results["speed"]
    s = bench.quick_settings()
    expected_networks = sum(1 + (len(s.ratios) - 1) for _ in s.round_to) * len(s.nets)
    assert len(speed["networks"]) == expected_networks
    variants = {(r["model"], r["variant"]) for r in speed["latency"]}
    assert ("unet", "folded+cl") in variants and ("unet", "onnxruntime") in variants and ("unetplusplus", "eager") in variants
    for r in speed["latency"]:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"]
        if r["ratio"] == 0:
            assert abs(r["speedup"] - 1) < 1e-9 and abs(r["efficiency"] - 1) < 1e-9
        else:
            assert r["flops_reduction"] > 1
    assert any("throughput_ips" in r for r in speed["latency"])
    assert speed["export"] and all(e["max_abs_diff"] < 1e-4 and e["folded_bn"] > 0 for e in speed["export"])
    from pipeline.precision import cpu_bf16_native

    assert ("unet", "openvino") in variants and (("unet", "openvino bf16") in variants) == cpu_bf16_native()
    for r in speed["latency"]:  # every runtime form is checked against the eager output
        if r["variant"] in bench.RUNTIME_VARIANTS:
            assert r["max_abs_diff"] < (0.5 if "bf16" in r["variant"] else 1e-4), r  # outputs reach ~3.5 here
    fastest = bench.fastest_forms(results)
    assert {(r["model"], r["ratio"]) for r in fastest} == {(n["model"], n["ratio"]) for n in speed["networks"]}
    assert all(r["fp32"]["variant"] in bench.DEPLOYED_VARIANTS and 0 < r["fp32"]["peak_share"] for r in fastest)
    assert "### Fastest form per network" in table
    # int8: the quantize stage's file in ONNX Runtime and in OpenVINO, against eager fp32 and its own unpruned int8
    assert {("unet", bench.INT8), ("unet", bench.OV_INT8)} <= variants and "### int8" in table
    relabel = lambda rows: [{**r, "round_to": bench.DEFAULT_ROUND_TO if r["round_to"] == "4/8" else r["round_to"]} for r in rows]  # noqa: E731
    as_default = {**results, "speed": {**speed, "latency": relabel(speed["latency"]), "networks": relabel(speed["networks"]),
                                       "bf16_pair": None}}  # the quick run's 4/8 plays the default rounding
    int8 = next(t for t in bench.targets(as_default) if "fastest int8 form" in t["target"])
    best = min((r for r in as_default["speed"]["latency"] if r["model"] == "unet" and r["variant"] in bench.INT8_VARIANTS
                and r["round_to"] == bench.DEFAULT_ROUND_TO and r["ratio"] == max(s.ratios)), key=lambda r: r["median_ms"])
    assert int8["met"] == (best["speedup_vs_eager"] >= 15) and best["variant"] in int8["value"]
    # the yardstick: the best of the runtimes the forms run in, and the target that it bounds every form
    peak = results["peak"]
    assert {f"peak_{r}_gflops" for r in bench.PEAK_RUNTIMES} <= set(peak)
    assert peak["peak_gflops"] == max(peak[f"peak_{r}_gflops"] for r in bench.PEAK_RUNTIMES)
    assert "Machine peak at 1 threads" in table and peak["peak_form"] in table
    bound = next(t for t in results["targets"] if t["target"].startswith("the yardstick bounds every form"))
    shares = bench.peak_shares(results)
    assert shares and len(shares) == sum(bench._peak_for(results, r["variant"]) is not None for r in speed["latency"])
    assert bound["met"] == (max(r["share"] for r in shares) <= 1.0)

    tr = results["training"]
    assert (tr["step_bf16_ips"] is not None) == cpu_bf16_native()
    assert tr["fit_ips"] > 0 and tr["bare_ips"] > 0 and tr["loader_ips"] > 0 and tr["decode_per_item_ips"] > 0
    pr = results["pruning"]
    assert pr["l1_total_s"] > 0 and pr["criterion_available"] and pr["criterion_score_s"] > 0
    vo = results["volumes"]
    assert vo["available"] and not vo["first_cache_hit"] and vo["second_cache_hit"]
    assert results["cuda"]["available"] is False  # CPU-only test machine (the row says why)

    for heading in ("## 1. Pruned-network speed", "## 2. ONNX export", "## 3. Training throughput", "## 4. Pruning cost",
                    "## 5. Volume preparation", "## 6. CUDA", "## 3D: UNet3D per volume", "## Targets"):
        assert heading in table, heading
    assert {t["target"].split(":")[0] for t in results["targets"]}


def test_rows_can_be_chosen_and_unknown_rows_fail(tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--rows", "pruning", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert "pruning" in results and "speed" not in results and "training" not in results
    try:
        bench.main(["--quick", "--rows", "speedy", "--out", str(tmp_path)])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unknown speedy" in capsys.readouterr().err


def test_the_3d_row_times_the_unet3d_per_volume_in_every_form(tmp_path):
    bench = load_bench()
    assert bench.main(["--quick", "--rows", "volume3d", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results) >= {"volume3d"} and "speed" not in results
    v3 = results["volume3d"]
    s = bench.quick_settings()
    assert v3["shape"] == list(s.volume3d_shape) and v3["patch"] == s.volume3d_patch and v3["windows"] > 1
    assert not v3["errors"], v3["errors"]
    nets = v3["networks"]
    assert [(n["ratio"], n["round_to"]) for n in nets] == [(0.0, None), (0.6, bench.DEFAULT_ROUND_TO), (0.6, None)]
    assert nets[2]["params_m"] < nets[0]["params_m"] and nets[2]["flops_patch_g"] < nets[0]["flops_patch_g"]
    for n in nets:
        assert abs(n["flops_volume_g"] - v3["windows"] * n["flops_patch_g"]) < 1e-9
        assert set(n["max_abs_diff"]) == {"onnxruntime", "openvino"} and max(n["max_abs_diff"].values()) < 1e-4
        assert n["fastest"]["form"] in bench.VOLUME3D_FORMS
    assert {(r["form"], r["network"]) for r in v3["latency"]} == {(f, i) for f in bench.VOLUME3D_FORMS for i in range(3)}
    for r in v3["latency"]:
        assert r["volume_ms"] > 0 and r["runs"] == s.volume3d_rounds
        if r["ratio"] == 0:
            assert r["speedup"] == r["efficiency"] == 1
        else:
            assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_reduction"])
    assert nets[0]["fastest"]["speedup"] == 1 and nets[0]["fastest"]["volume_ms"] == min(r["volume_ms"] for r in v3["latency"] if r["network"] == 0)
    table = (tmp_path / "bench.md").read_text()
    assert "## 3D: UNet3D per volume" in table and "| channels_last | 0.6 | 8/16 |" in table and "| openvino | 0 | - |" in table
    target = next(t for t in results["targets"] if t["target"].startswith("unet3d (width 4"))
    assert not target["met"]  # width 4 < 16, whatever the speed


def test_the_bench_checks_the_default_rounding():
    from omegaconf import OmegaConf

    shared = OmegaConf.load(ROOT / "conf" / "shared" / "prune.yaml")
    bench = load_bench()
    assert bench.DEFAULT_ROUND_TO == f"{shared.round_to}/{shared.round_to_high_res}"
    assert bench.rounding_plan(bench.DEFAULT_ROUND_TO) == {"round_to": 8, "round_to_high_res": 16}


def test_round_to_chooses_the_roundings_of_every_model(tmp_path):
    bench = load_bench()
    assert bench.main(["--quick", "--rows", "speed", "--models", "unet", "--round-to", "none,4,4/8", "--out", str(tmp_path),
                       "--threads", "1"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {n["round_to"] for n in results["speed"]["networks"]} == {None, 4, "4/8"}
    assert "| unet | 4/8 | 0.5 |" in (tmp_path / "bench.md").read_text()


def test_a_malformed_rounding_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--quick", "--round-to", "8/x"])
    assert "--round-to 8/x: expected" in capsys.readouterr().err


class FixedRunner:
    """A runner whose every call takes the next of `ms` (cycled): the pair's arithmetic without timing."""

    def __init__(self, *ms):
        self.ms, self.calls = list(ms), 0

    def times(self, batch, warmup, runs):
        out = [self.ms[(self.calls + i) % len(self.ms)] for i in range(runs)]
        self.calls += runs
        return out


def test_the_bf16_target_is_timed_as_a_pair_and_met_only_when_its_tenth_percentile_clears_20x():
    bench = load_bench()
    default = bench.DEFAULT_ROUND_TO
    # eager: a warm-up call, then a timed one, per round; bf16: a warm-up, then three timed calls (their median)
    base = bench.Entry({"ratio": 0.0}, None, {"eager": FixedRunner(200.0, 210.0, 190.0, 230.0)})
    pruned = bench.Entry({"ratio": 0.6}, None, {"openvino bf16": FixedRunner(10.0, 9.0, 10.0, 11.0), "folded+cl bf16": FixedRunner(30.0),
                                                "openvino": FixedRunner(20.0)})
    pruned.latency = {"openvino bf16": [10.0, 10.5], "folded+cl bf16": [30.0], "openvino": [20.0]}
    s = bench.quick_settings()
    s.pair_rounds = 4
    pair = bench._bf16_pair(s, [base, pruned], [(default, 0.0, 0), (default, 0.6, 1)])
    assert pair["variant"] == "openvino bf16" and pair["ratio"] == 0.6 and pair["rounds"] == 4  # the fastest bf16 form
    assert pair["ratio_median"] == pytest.approx(20.5) and pair["ratio_p10"] == 19.0 and pair["ratio_p90"] == 23.0
    assert bench._bf16_pair(s, [base, pruned], [(None, 0.0, 0), (None, 0.6, 1)]) is None  # no default-rounding network

    fastest_row = {"model": "unet", "round_to": default, "ratio": 0.6, "bf16": {"variant": "openvino bf16", "vs_eager_fp32": 21.0}}
    bench.fastest_forms = lambda results: [fastest_row]
    for p10, met in ((19.0, False), (20.0, True)):
        results = {"speed": {"latency": [], "bf16_pair": {**pair, "ratio_p10": p10}}}
        row = next(t for t in bench.targets(results) if "bf16" in t["target"])
        assert row["met"] is met and "timed as a pair" in row["value"] and "21.0x from the passes' medians" in row["value"]
