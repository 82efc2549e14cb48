"""Structural pruning really removes channels and keeps the network consistent."""
from __future__ import annotations

import pytest
import torch

import models  # noqa: F401  (torchvision compatibility)
from models.unet import UNet
from pipeline.criteria.magnitude import MagnitudeCriterion, filter_norms
from pipeline.measure.profiling import count_flops, count_params
from pipeline.pruning import in_scope, prunable_layers, prune
from helpers import model_from_conf, training_loss


def l1_scores(model):
    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


def small_unet(width=8, depth=3, classes=1):
    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=classes, width=width, depth=depth).eval()


X = torch.randn(1, 3, 64, 64)


def test_head_is_not_prunable_and_scores_cover_every_other_conv():
    model = small_unet()
    layers = prunable_layers(model)
    assert not any(n.startswith("segmentation_head") for n in layers)
    assert set(l1_scores(model)) == set(layers)


def test_l1_and_l2_are_filter_norms():
    conv = torch.nn.Conv2d(2, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]]).view(3, 2, 1, 1))
    assert filter_norms(conv, 1).tolist() == [3.0, 7.0, 0.0]
    assert filter_norms(conv, 2).tolist() == pytest.approx([5 ** 0.5, 5.0, 0.0])
    up = torch.nn.ConvTranspose2d(3, 2, 2)  # weight (in, out, k, k): scores are per *output* channel
    assert filter_norms(up, 1).shape == (2,)


def test_ratio_zero_gives_the_identical_network():
    model = small_unet()
    result = prune(model, l1_scores(model), X, ratio=0.0)
    assert all(r["before"] == r["after"] for r in result.channels)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), result.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(model(X), result.model(X))


def test_half_pruning_removes_half_the_channels_of_every_layer_and_keeps_the_head():
    model = small_unet(classes=2)
    result = prune(model, l1_scores(model), X, ratio=0.5)
    for row in result.channels:
        assert row["after"] == row["before"] // 2, row
    assert result.model.segmentation_head.out_channels == 2
    out = result.model(X)
    assert out.shape == (1, 2, 64, 64)
    assert count_params(result.model) < 0.3 * count_params(model)


def test_the_lowest_scored_channels_go():
    model = small_unet()
    scores = l1_scores(model)
    first = next(iter(prunable_layers(model)))  # the input conv: its input channels never change
    n = scores[first].numel()
    # Make the first layer's ranking unmistakable: channel i scores i (its coupled layers are unscored).
    scores = {k: (torch.arange(v.numel(), dtype=torch.float) if k == first else v) for k, v in scores.items()}
    kept_weights = dict(model.named_modules())[first].weight[n // 2 :]
    result = prune(model, scores, X, ratio=0.5)
    assert torch.equal(dict(result.model.named_modules())[first].weight, kept_weights)


@pytest.mark.parametrize("scope", ["encoder", "decoder"])
def test_scope_limits_which_layers_lose_channels(scope):
    model = small_unet()
    result = prune(model, l1_scores(model), X, ratio=0.5, scope=scope)
    for row in result.channels:
        if in_scope(row["layer"], scope):
            assert row["after"] < row["before"], row
        else:
            assert row["after"] == row["before"], row
    assert result.model(X).shape == (1, 1, 64, 64)


def test_round_to_keeps_channel_multiples():
    model = small_unet(width=12)
    result = prune(model, l1_scores(model), X, ratio=0.3, round_to=4)
    for row in result.channels:
        assert row["after"] % 4 == 0, row
        assert row["after"] < row["before"] or row["before"] % 4 == 0


def test_rounding_never_empties_a_layer_and_says_which_it_guarded(caplog):
    # width 8, depth 2: layers of 8, 16 and 32 channels. At 0.6 with round_to=8 the exact counts are 3, 6
    # and 12: torch-pruning's own rounding takes 3 and 6 down to 0 and then silently leaves those layers whole.
    model = small_unet(width=8, depth=2)
    with caplog.at_level("INFO", logger="pipeline.pruning"):
        result = prune(model, l1_scores(model), X, ratio=0.6, round_to=8)
    rows = {r["layer"]: r for r in result.channels}
    for row in rows.values():
        assert row["after"] > 0 and (row["after"] % 8 == 0 or row["after"] == row["before"]), row
    assert rows["encoder.1.conv.0"]["before"] == 16 and rows["encoder.1.conv.0"]["after"] == 8
    assert rows["encoder.1.conv.0"]["rounding"].startswith("raised to 8: the ratio keeps 6")
    assert rows["encoder.2.conv.0"]["after"] == 8 and rows["encoder.2.conv.0"]["rounding"] == ""  # 12 -> 8, plain rounding
    assert rows["encoder.0.conv.0"]["after"] == 8 and rows["encoder.0.conv.0"]["rounding"] == "kept whole: 8 <= round_to"
    assert "encoder.1.conv.0 (6 -> 8)" in caplog.text and "left whole: " in caplog.text
    assert result.model(X).shape == (1, 1, 64, 64)


def test_high_resolution_layers_round_to_the_wider_multiple_and_say_so(caplog):
    # width 12, depth 3 at 64 px: 12-, 24- and 48-channel layers at output stride 1, 2 and 4, 96 at stride 8.
    # At 0.5 the 24-channel layers keep 12: a multiple of 4, but rounded to 8 at high resolution.
    model = small_unet(width=12, depth=3)
    with caplog.at_level("INFO", logger="pipeline.pruning"):
        result = prune(model, l1_scores(model), X, ratio=0.5, round_to=4, round_to_high_res=8)
    rows = {r["layer"]: r for r in result.channels}
    assert rows["encoder.1.conv.0"]["after"] == 8 and rows["decoder.1.conv.3"]["after"] == 8
    assert rows["encoder.1.conv.0"]["rounding"] == "kept 8 (the ratio keeps 12): round_to_high_res=8 at output stride <= 4"
    assert rows["encoder.2.conv.0"]["after"] == 24 and rows["encoder.2.conv.0"]["rounding"] == ""  # 24: already a multiple of 8
    assert rows["encoder.3.conv.0"]["after"] == 48 and rows["encoder.3.conv.0"]["rounding"] == ""  # stride 8: round_to
    assert "prune.round_to_high_res=8: " in caplog.text and "encoder.1.conv.0 (12 -> 8)" in caplog.text
    assert result.model(X).shape == (1, 1, 64, 64)


def test_high_resolution_layers_keep_one_wide_multiple_and_low_resolution_keeps_round_to():
    # width 8, depth 3 at 0.6: the 16-channel layers at stride 2 keep 6, which 8 rounds to 0: they keep one
    # multiple of 8, as do the 32-channel ones at stride 4 (12: 8, where round_to=4 alone keeps 12); the
    # 8-channel layers at stride 1 have no more than 8: round_to=4 and its guard (3 -> 4)
    model = small_unet(width=8, depth=3)
    rows = {r["layer"]: r for r in prune(model, l1_scores(model), X, ratio=0.6, round_to=4, round_to_high_res=8).channels}
    assert rows["encoder.1.conv.0"]["after"] == 8 and rows["encoder.1.conv.0"]["rounding"].startswith("kept 8 (the ratio keeps 6)")
    assert rows["encoder.2.conv.0"]["after"] == 8 and rows["encoder.2.conv.0"]["rounding"].startswith("kept 8 (the ratio keeps 12)")
    assert rows["encoder.0.conv.0"]["after"] == 4 and rows["encoder.0.conv.0"]["rounding"].startswith("raised to 4")
    deeper = {r["layer"]: r for r in prune(model, l1_scores(model), X, ratio=0.55, round_to=4, round_to_high_res=8).channels}
    assert deeper["encoder.3.conv.0"]["before"] == 64 and deeper["encoder.3.conv.0"]["after"] == 28  # stride 8: a multiple of 4
    same = prune(model, l1_scores(model), X, ratio=0.6, round_to=4, round_to_high_res=4).channels
    assert [r["after"] for r in same] == [r["after"] for r in prune(model, l1_scores(model), X, ratio=0.6, round_to=4).channels]
    exact = prune(model, l1_scores(model), X, ratio=0.6, round_to=None, round_to_high_res=8).channels
    assert [r["after"] for r in exact] == [r["after"] for r in prune(model, l1_scores(model), X, ratio=0.6).channels]


def test_exact_rates_never_empty_a_layer_either():
    # at 0.999 torch-pruning's own count keeps int(C * 0.001) = 0 channels of every layer, and then left every
    # layer whole: a "pruned" network as large as the baseline. Exact rates keep one channel there instead.
    model = small_unet(width=8, depth=2)
    result = prune(model, l1_scores(model), X, ratio=0.999, round_to=None)
    assert {r["after"] for r in result.channels} == {1} and not result.shortfall and not result.removed_nothing()
    assert result.channels[0]["rounding"] == "raised to 1: the ratio keeps 0, which rounds to 0"
    assert count_params(result.model) < 0.01 * count_params(model) and result.model(X).shape == (1, 1, 64, 64)


def test_what_the_scope_keeps_beyond_its_ratio_and_rounding_is_reported():
    # per-layer ratios that conflict inside a coupled group (a residual add in the ResNet encoder): the group takes
    # one ratio, so the scope keeps more channels than the config asks, and the layers over their share are named
    model = model_from_conf("smp_unet", encoder_depth=3, decoder_channels=[32, 16, 8]).eval()
    scores = l1_scores(model)
    asked = {"encoder.layer1.0.conv2": 0.9, "encoder.layer1.1.conv2": 0.0, "encoder.layer1.2.conv2": 0.0, "encoder.conv1": 0.0}
    result = prune(model, scores, X, ratio=0.0, layer_ratios=asked)
    assert result.shortfall, result.channels
    assert {r["layer"] for r in result.shortfall} <= set(asked) and all(r["after"] > r["allowed"] for r in result.shortfall)
    assert "coupled to a layer asked for less" in {r["layer"]: r for r in result.channels}[result.shortfall[0]["layer"]]["rounding"]


@pytest.mark.parametrize("name", ["unet", "unet_small", "attention_unet", "custom_unet", "smp_unet", "smp_unetplusplus",
                                  "deeplabv3plus"])
@pytest.mark.parametrize("round_to, high_res", [(8, 16), (None, None)])
def test_every_model_removes_what_its_ratio_asks(name, round_to, high_res):
    model = model_from_conf(name).eval()
    result = prune(model, l1_scores(model), X, ratio=0.6, round_to=round_to, round_to_high_res=high_res)
    assert not result.shortfall, result.shortfall


def test_exact_rates_have_no_rounding_notes():
    model = small_unet(width=8, depth=2)
    result = prune(model, l1_scores(model), X, ratio=0.6, round_to=None)
    assert {r["after"] for r in result.channels if r["before"] == 16} == {6}
    assert all(r["rounding"] == "" for r in result.channels)


def test_pruned_network_trains():
    model = small_unet()
    pruned = prune(model, l1_scores(model), X, ratio=0.5).model.train()
    opt = torch.optim.Adam(pruned.parameters(), lr=1e-2)
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = training_loss()(pruned(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_default_classic_unet_at_half_keeps_at_most_30_percent_of_flops():
    torch.manual_seed(0)
    model = model_from_conf("unet").eval()  # width 64, depth 4: ~31 M parameters
    shape = (1, 3, 128, 128)
    result = prune(model, l1_scores(model), torch.randn(shape), ratio=0.5)
    before, after = count_flops(model, shape), count_flops(result.model, shape)
    assert after <= 0.30 * before, (before, after)
    assert result.model(torch.randn(shape)).shape == (1, 1, 128, 128)


def test_smp_unet_with_resnet_encoder_prunes_across_residuals_and_skips():

    model = model_from_conf("smp_unet", encoder_name="resnet18").eval()
    result = prune(model, l1_scores(model), X, ratio=0.5)
    assert count_params(result.model) < 0.35 * count_params(model)
    assert result.model(X).shape == (1, 1, 64, 64)
    assert result.model.segmentation_head[0].out_channels == 1
