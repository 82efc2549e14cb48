"""Prune schedules: the resulting channel counts, not only that they run."""
from __future__ import annotations

import fnmatch

import pytest
import torch
from omegaconf import OmegaConf

import models  # noqa: F401  (torchvision compatibility)
from models.unet import UNet
from pipeline.criteria.magnitude import MagnitudeCriterion
from pipeline.paths import CONF_DIR
from pipeline.measure.profiling import count_flops
from pipeline.pruning import match_layer_ratios, prunable_layers, prune, ratio_for_flops
from pipeline.stages.sensitivity import Greedy

X = torch.randn(1, 3, 64, 64)


def unet(width=8, depth=3):
    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=1, width=width, depth=depth).eval()


def l1(model):
    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


def kept(channels: int, ratio: float) -> int:
    """torch-pruning keeps int(C * (1 - ratio)) channels of a layer pruned alone."""
    return int(channels * (1 - ratio))


def counts(result):
    return {r["layer"]: (r["before"], r["after"]) for r in result.channels}


def test_per_layer_patterns_set_each_matched_layer_and_leave_the_rest():
    model = unet()
    result = prune(model, l1(model), X, 0.0, layer_ratios={"encoder.3.*": 0.5, "decoder.0.*": 0.25})
    for layer, (before, after) in counts(result).items():
        if layer.startswith("encoder.3."):
            assert after == kept(before, 0.5), layer
        elif layer.startswith("decoder.0."):
            assert after == kept(before, 0.25), layer
        else:
            assert after == before, layer
    assert result.model(X).shape == (1, 1, 64, 64)


def test_first_matching_pattern_wins_and_a_pattern_matching_nothing_is_an_error():
    names = ["encoder.0.conv.0", "encoder.0.conv.3", "decoder.0.up"]
    assert match_layer_ratios(names, {"encoder.0.conv.0": 0.1, "encoder.*": 0.3}) == {
        "encoder.0.conv.0": 0.1, "encoder.0.conv.3": 0.3}
    with pytest.raises(ValueError, match="down4"):
        match_layer_ratios(names, {"down4.*": 0.5})


def test_custom003_preset_gives_the_lung_study_rates_on_the_classic_unet():
    preset = OmegaConf.load(CONF_DIR / "prune" / "custom003.yaml")
    patterns = dict(preset.layer_ratios)
    model = unet(width=16, depth=4)
    result = prune(model, l1(model), X, preset.ratio, layer_ratios=patterns)
    expected_rates = {
        "encoder.0.conv.0": 0.1, "encoder.0.conv.3": 0.1, "encoder.1.conv.0": 0.2, "encoder.1.conv.3": 0.2,
        "encoder.2.conv.0": 0.2, "encoder.2.conv.3": 0.3, "encoder.3.conv.0": 0.3, "encoder.3.conv.3": 0.3,
        "encoder.4.conv.0": 0.4, "encoder.4.conv.3": 0.5,
    }
    for layer, (before, after) in counts(result).items():
        rate = expected_rates.get(layer) or next(r for p, r in patterns.items() if fnmatch.fnmatchcase(layer, p))
        assert after == kept(before, rate), (layer, before, after, rate)
    assert {r for layer, r in expected_rates.items()} == {0.1, 0.2, 0.3, 0.4, 0.5}


def test_global_ranking_removes_the_overall_ratio_unevenly_within_the_cap():
    model = unet(width=8)
    torch.manual_seed(1)
    scores = {k: torch.rand(v.numel()) * (1 + i) for i, (k, v) in enumerate(l1(model).items())}
    result = prune(model, scores, X, 0.4, global_ranking=True, max_layer_ratio=0.6)
    before = sum(r["before"] for r in result.channels)
    after = sum(r["after"] for r in result.channels)
    assert after / before == pytest.approx(0.6, abs=0.06)
    removed = [r["removed"] for r in result.channels]
    assert max(removed) <= 0.6 + 1e-9
    assert len({round(x, 3) for x in removed}) > 2  # not a uniform ratio
    assert result.model(X).shape == (1, 1, 64, 64)


def test_iterative_reaches_the_uniform_counts_rescoring_and_finetuning_between_steps():
    model = unet(width=8)
    calls = []

    def rescore(m):
        calls.append("rescore")
        return l1(m)

    def between(m, step):
        calls.append(f"finetune{step}")

    result = prune(model, l1(model), X, 0.5, steps=3, rescore=rescore, between_steps=between)
    assert calls == ["finetune1", "rescore", "finetune2", "rescore"]
    for layer, (before, after) in counts(result).items():
        assert after == kept(before, 0.5), layer


def test_budget_finds_the_smallest_ratio_that_meets_the_flops_target():
    model = unet(width=16)
    scores = l1(model)
    flops = lambda m: count_flops(m, (1, 3, 64, 64))  # noqa: E731
    base = flops(model)
    ratio, result = ratio_for_flops(model, scores, X, 0.3, flops)
    assert flops(result.model) <= 0.3 * base
    assert flops(prune(model, scores, X, ratio - 0.03).model) > 0.3 * base  # a little less is not enough
    with pytest.raises(ValueError, match="target_flops"):
        ratio_for_flops(model, scores, X, 0.3, flops, scope="decoder", round_to=None)


def test_round_to_applies_to_every_schedule():
    model = unet(width=12)
    result = prune(model, l1(model), X, 0.0, round_to=4, layer_ratios={"encoder.*": 0.3})
    for layer, (before, after) in counts(result).items():
        assert after % 4 == 0, layer
        if layer.startswith("encoder."):
            assert after < before


def test_greedy_spends_the_budget_on_the_least_sensitive_layers_first():
    table = {  # layer -> ratio -> (Dice drop, FLOPs saved)
        "a": {0.5: (0.20, 0.2), 0.8: (0.40, 0.3)},
        "b": {0.5: (0.01, 0.2), 0.8: (0.02, 0.3)},
    }
    greedy = Greedy(table, ["a", "b"])
    assert greedy.step() and greedy.rates() == {"b": 0.5}
    assert greedy.step() and greedy.rates() == {"b": 0.8}
    assert greedy.step() and greedy.rates() == {"a": 0.5, "b": 0.8}
    assert greedy.step() and not greedy.step()
    loss, saved = greedy.predicted()
    assert loss == pytest.approx(0.42) and saved == pytest.approx(0.6)
