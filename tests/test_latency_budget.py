"""prune=latency_budget: the table predicts the real pruned network, the search stops where the measured
network meets the target, the rates it writes are a prune=per_layer config, and bad targets fail in one line.

Timing is injected: a timer where a convolution or a network takes its FLOPs in time (deterministic, and
exactly what the table's bilinear model can represent), or one where networks take longer than the table
says (to exercise the correction); one test runs the real, interleaved timer on a small network."""
from __future__ import annotations

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from torch import nn

import models  # noqa: F401  (torchvision compatibility)
from models.unet import UNet
from pipeline.config import ConfigError, validate, validate_prune
from pipeline.criteria.magnitude import MagnitudeCriterion
from pipeline.latency_budget import TOLERANCE, LatencyBudget, LatencyBudgetError, ladder
from pipeline.measure.profiling import count_flops
from pipeline.pruning import prunable_layers
from pipeline.schedules import SCHEDULES, Inputs
from tests.helpers import compose_config

CPU = torch.device("cpu")


def unet(width=8, depth=3):
    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=1, width=width, depth=depth).eval()


def l1(model):
    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


def flops_ms(probe) -> float:
    """1 ms per MFLOP: a convolution's time is then bilinear in its channels, as the table assumes."""
    return count_flops(probe.module, tuple(probe.input.shape)) / 1e6


def flops_timer(probes):
    return {name: flops_ms(p) for name, p in probes.items()}


def is_network(probe) -> bool:
    return not isinstance(probe.module, (nn.Conv2d, nn.ConvTranspose2d))


def budget(model, size=64, **plan):
    plan = {"scope": "all", "round_to": None, "round_to_high_res": None, "max_layer_ratio": 0.9, **plan}
    return LatencyBudget(model, l1(model), torch.randn(1, 3, size, size), device=CPU, **plan)


def test_ladder_keeps_multiples_of_the_quantum_within_the_cap_and_leaves_tiny_layers_whole():
    assert ladder(64, 16, 0.9) == [64, 48, 32, 16]
    assert ladder(64, 8, 0.5) == [64, 56, 48, 40, 32]
    assert ladder(8, 8, 0.9) == [8]  # no multiple of 8 below 8 that keeps any: prune leaves it whole
    assert ladder(10, 1, 0.9)[-1] == 1 and len(ladder(160, 1, 0.9)) == 16  # every 1/16 of the channels, then the cap


def test_the_search_stops_at_the_first_state_on_the_path_that_meets_the_target():
    model = unet()
    b = budget(model)
    target = 0.5 * flops_ms(b.base)
    found = b.search(target, flops_timer)
    assert found.measured_ms <= target
    assert found.measured_ms == pytest.approx(found.predicted_ms, rel=1e-6)  # the table predicts the real network
    assert found.measured_ms == pytest.approx(flops_ms(b.base.__class__(found.result.model, b.base.input)), rel=1e-6)
    before = b.walk.levels(found.step - 1, len(b.units))  # one step less pruning misses the target
    assert flops_ms(b.base.__class__(b.pruned(before).model, b.base.input)) > target
    assert found.result.model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_planned_channel_counts_are_what_prune_keeps_with_high_resolution_rounding():
    model = unet(width=16, depth=3)
    b = budget(model, round_to=8, round_to_high_res=16)
    kept = {u.root: u.kept for u in b.units}
    assert kept["encoder.0.conv.0"] == [16, 8]  # full resolution, no more than 16 channels: round_to
    assert kept["encoder.2.conv.0"] == [64, 48, 32, 16]  # output stride 4: multiples of 16
    assert kept["encoder.3.conv.0"] == [128, 120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16]  # 8 deeper, >= 10 %
    for levels in ([len(u.kept) - 1 for u in b.units], [i % len(u.kept) for i, u in enumerate(b.units)]):
        after = {r["layer"]: r["after"] for r in b.pruned(levels).channels}
        assert {u.root: after[u.root] for u in b.units} == {u.root: u.kept[level] for u, level in zip(b.units, levels)}


@pytest.mark.parametrize("power", [0.5, 2.0])
def test_measured_networks_correct_a_table_that_is_off(power):
    """Networks do not take the sum of their convolutions' times: a power of it, so the straight line through
    the unpruned and the narrowest network misses (above the target at 0.5, below at 2.0, where two timed
    networks in a row land on one side), and the timed networks bring the search within tolerance."""
    model = unet()
    b = budget(model)
    base = flops_ms(b.base)

    def timer(probes):
        return {n: base * (flops_ms(p) / base) ** power if is_network(p) else flops_ms(p) for n, p in probes.items()}

    target = 0.5 * base
    found = b.search(target, timer)
    assert len(found.trials) >= 2 and abs(found.trials[0].measured_ms / target - 1) > TOLERANCE  # the first guess missed
    assert abs(found.measured_ms / target - 1) <= TOLERANCE


def test_a_target_out_of_reach_or_above_the_unpruned_latency_fails_in_one_line():
    model = unet()
    b = budget(model)
    base = flops_ms(b.base)
    with pytest.raises(LatencyBudgetError, match=r"prune\.target_ms=.* is out of reach: .*prune\.max_layer_ratio=0\.9") as err:
        b.search(0.001 * base, flops_timer)
    assert "\n" not in str(err.value)
    with pytest.raises(LatencyBudgetError, match=r"prune\.target_ms=.*already runs in .* nothing needs pruning"):
        b.search(2 * base, flops_timer)


def _inputs(model, folder=None):
    return Inputs(model=model, scores=l1(model), example=torch.randn(1, 3, 64, 64), flops=lambda m: 0,
                  rescore=lambda m: {}, between_steps=lambda m, step: None, folder=folder)


def test_the_written_rates_are_a_per_layer_config_that_gives_the_same_network(tmp_path):
    model = unet()
    b = budget(model)
    found = b.search(0.5 * flops_ms(b.base), flops_timer)
    files = b.write(found, tmp_path, "1 thread")
    assert {f.name for f in files} == {"latency_table.csv", "latency_search.csv", "prune_rates.yaml"}
    written = yaml.safe_load((tmp_path / "prune_rates.yaml").read_text())
    assert written["layer_ratios"] == found.rates
    overrides = [f"prune.{k}={'null' if v is None else v}" for k, v in written.items() if k != "layer_ratios"]
    overrides.append("++prune.layer_ratios={" + ",".join(f"{k}:{v}" for k, v in written["layer_ratios"].items()) + "}")
    p = compose_config("prune=per_layer", *overrides).prune  # as on the command line
    validate_prune(p, ["prune"])
    again, _, _ = SCHEDULES["per_layer"].apply(p, _inputs(model))
    assert [r["after"] for r in again.channels] == [r["after"] for r in found.result.channels]
    table = (tmp_path / "latency_table.csv").read_text().splitlines()
    assert table[0].startswith("layer,in_channels,out_channels,height,width") and len(table) > len(b.convs)


def test_latency_budget_composes_and_its_keys_are_checked():
    validate(compose_config("prune=latency_budget"))
    with pytest.raises(ConfigError, match=r"prune\.target_ms=0"):
        validate(compose_config("prune=latency_budget", "prune.target_ms=0"))
    with pytest.raises(ConfigError, match=r"prune\.max_layer_ratio=0"):
        validate(compose_config("prune=latency_budget", "prune.max_layer_ratio=0"))
    with pytest.raises(ConfigError, match=r"prune\.timing_runs"):
        validate(compose_config("prune=latency_budget", "prune.timing_runs=1"))
    with pytest.raises(ConfigError, match=r"prune\.threads"):
        validate(compose_config("prune=latency_budget", "prune.threads=0"))
    with pytest.raises(ConfigCompositionException):
        compose_config("prune=latency_budget", "prune.device=tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"prune\.device=cuda"):
            validate(compose_config("prune=latency_budget", "prune.device=cuda"))


def test_the_schedule_runs_end_to_end_with_the_real_timer(tmp_path):
    """Real, interleaved timing on a small network (what it finds is not checked: the machine is shared)."""
    from pipeline.latency_budget import deployed_probe, interleaved_timer

    model = unet(width=32, depth=2)
    unpruned = interleaved_timer(CPU, 1, 1, 3, 5.0)({"unpruned": deployed_probe(model, (1, 3, 64, 64), CPU)})["unpruned"]
    p = compose_config("prune=latency_budget", f"prune.target_ms={0.5 * unpruned}", "prune.threads=1",
                       "prune.timing_warmup=1", "prune.timing_runs=3", "prune.timing_max_seconds=5").prune
    validate_prune(p, ["prune"])
    result, applied, metrics = SCHEDULES["latency_budget"].apply(p, _inputs(model, tmp_path))
    assert set(metrics) == {"prune/target_ms", "prune/predicted_ms", "prune/measured_ms", "prune/unpruned_ms"}
    assert all(v > 0 for v in metrics.values())
    assert applied["layer_ratios"] and applied["source"].startswith("latency search for prune.target_ms=")
    assert sorted(applied["files"]) == ["latency_search.csv", "latency_table.csv", "prune_rates.yaml"]
    assert all((tmp_path / name).stat().st_size > 0 for name in applied["files"])
    assert result.model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
