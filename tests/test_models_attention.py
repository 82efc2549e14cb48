"""Attention U-Net (and its lung-CT "custom UNet" config) and DeepLabV3+: build, prune, train, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models
from models.attention_unet import AttentionGate, AttentionUNet, ChannelBroadcast
from models.io import load_model, save_model
from models.unet import UNet
from pipeline.criteria.magnitude import MagnitudeCriterion
from pipeline.measure.profiling import count_flops, count_params
from pipeline.pruning import prunable_layers, prune
from helpers import kwargs_of, model_from_conf, training_loss

tp = pytest.importorskip("torch_pruning")

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SMALL = {"_target_": "models.attention_unet.AttentionUNet", "width": 8, "depth": 3, "dropout": 0.0, "batch_norm": True}
X = torch.randn(1, 3, 64, 64)




def small(classes: int = 2, **kw) -> AttentionUNet:
    torch.manual_seed(0)
    model = AttentionUNet(3, classes, **{"width": 8, "depth": 3, "dropout": 0.0, "batch_norm": True, **kw})
    _randomise_batch_norms(model)
    return model.eval()


def _randomise_batch_norms(model: nn.Module) -> None:
    """Fresh BNs are identities (1, 0, 0, 1): give them values so that a wrong channel would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def l1_scores(model):
    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


def descending_scores(model):
    """Channel i of every layer scores n - i: every group keeps exactly its first half at ratio 0.5."""
    return {n: torch.arange(m.out_channels, 0, -1, dtype=torch.float) for n, m in prunable_layers(model).items()}


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = training_loss()(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def assert_roundtrip(model: nn.Module, cfg: dict, in_channels: int, num_classes: int, directory, x) -> nn.Module:
    model.eval()
    with torch.no_grad():
        expected = model(x)
    save_model(model, OmegaConf.create(cfg), in_channels, num_classes, directory)
    loaded = load_model(directory).eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    return loaded


# --------------------------------------------------------------------------------------------------
# Attention U-Net: structure


@pytest.mark.parametrize("shape", [(1, 3, 70, 90), (2, 3, 64, 64), (1, 3, 33, 17)])
def test_any_input_size(shape):
    model = AttentionUNet(3, 2, width=4, depth=4, dropout=0.0, batch_norm=True).eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], 2, *shape[2:])


def test_layout_follows_the_unet_naming():
    model = AttentionUNet(1, 1, width=4, depth=3, dropout=0.0, batch_norm=True)
    assert isinstance(model.encoder, nn.ModuleList) and len(model.encoder) == 4
    assert isinstance(model.decoder, nn.ModuleList) and len(model.decoder) == 3
    for level in model.decoder:
        assert isinstance(level.up, nn.ConvTranspose2d)
        assert isinstance(level.gate, AttentionGate) and isinstance(level.conv, nn.Sequential)
    assert isinstance(model.segmentation_head, nn.Conv2d)
    # the deepest decoder level gates the 16-channel skip with the up-sampled 16-channel map, F_int = 8
    gate = model.decoder[0].gate
    assert (gate.w_g[0].in_channels, gate.w_x[0].in_channels, gate.w_x[0].out_channels) == (16, 16, 8)
    assert gate.psi[0].out_channels == 1 and isinstance(gate.psi[-1], nn.Sigmoid)
    assert model.unprunable_modules() == [level.gate.psi for level in model.decoder]


def test_gate_is_x_times_a_one_channel_mask_in_0_1():
    gate = AttentionGate(6, 4, 2).eval()
    g, x = torch.randn(2, 6, 5, 7), torch.randn(2, 4, 5, 7)
    psi = gate.attention(g, x)
    assert psi.shape == (2, 1, 5, 7) and bool(((psi >= 0) & (psi <= 1)).all())
    assert torch.equal(gate(g, x), x * psi)


def test_channel_broadcast_is_free():
    b = ChannelBroadcast(5)
    assert count_params(b) == 0 and b.weight.shape == (5, 1, 0, 0)
    psi = torch.rand(2, 1, 3, 3)
    out = b(psi)
    assert out.shape == (2, 5, 3, 3) and out.data_ptr() == psi.data_ptr()  # a view, no copy
    assert count_flops(b, (2, 1, 3, 3)) == 0


def test_param_count_is_the_classic_unet_plus_the_gates():
    # gate on a C-channel skip: W_g, W_x (C*F each, + BN 2F each), psi (F + BN 2), F = C / 2
    def gates(width, depth):
        return sum(2 * c * (c // 2) + 5 * (c // 2) + 2 for c in (width * 2**i for i in range(depth)))

    assert count_params(model_from_conf("attention_unet")) == count_params(model_from_conf("unet")) + gates(64, 4) == 31_388_201
    assert count_params(AttentionUNet(3, 1, width=4, depth=2, batch_norm=False, dropout=0.0)) > 0


def test_batch_norm_off_and_dropout_placement():
    model = AttentionUNet(3, 1, width=4, depth=4, dropout=0.2, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    dropped = [i for i, level in enumerate(model.encoder) if isinstance(level.conv[-1], nn.Dropout2d)]
    assert dropped == [3, 4]  # the two deepest encoder levels (4 = bottleneck)
    assert not any(isinstance(m, nn.Dropout2d) for m in model.decoder.modules())
    with pytest.raises(ValueError, match="dropout"):
        AttentionUNet(3, 1, **kwargs_of("model", "attention_unet", dropout=1.0))


def test_dropout_is_active_in_training_only():
    model = AttentionUNet(3, 1, width=4, depth=2, dropout=0.5, batch_norm=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


def test_classic_unet_layout_is_unchanged():
    # models/unet.py gained batch_norm / dropout options; the classic UNet must keep its layout and keys
    keys = list(UNet(3, 1, width=2, depth=1).state_dict())
    assert keys[:6] == [
        "encoder.0.conv.0.weight", "encoder.0.conv.1.weight", "encoder.0.conv.1.bias",
        "encoder.0.conv.1.running_mean", "encoder.0.conv.1.running_var", "encoder.0.conv.1.num_batches_tracked",
    ]
    assert "encoder.0.conv.3.weight" in keys
    assert not any(isinstance(m, nn.Dropout2d) for m in UNet(3, 1, width=2, depth=1).modules())


# --------------------------------------------------------------------------------------------------
# Attention U-Net: pruning


def test_ratio_zero_gives_the_identical_network():
    model = small()
    result = prune(model, l1_scores(model), X, ratio=0.0)
    assert all(r["before"] == r["after"] for r in result.channels)
    a, b = model.state_dict(), result.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(X), result.model(X))


def test_psi_is_neither_scored_nor_pruned_and_the_broadcast_is_not_a_scored_layer():
    names = set(prunable_layers(small()))
    assert not any(".gate.psi" in n or ".gate.broadcast" in n for n in names)
    assert {f"decoder.{i}.gate.{b}.0" for i in range(3) for b in ("w_g", "w_x")} <= names


def _hand_pruned_reference(model: AttentionUNet, classes: int) -> AttentionUNet:
    """Half-width network holding the first half of every channel group of `model`, built by hand.

    Every conv / BN / transposed conv keeps its leading channels; the decoder convs that read
    cat([gated skip, up-sampled map]) keep the leading half of *each* part of their input.
    """
    ref = AttentionUNet(3, classes, width=model.encoder[0].conv[0].out_channels // 2, depth=model.depth, dropout=0.0, batch_norm=True).eval()
    full = model.state_dict()
    sliced = {}
    for key, target in ref.state_dict().items():
        source = full[key]
        if source.dim() == 0:
            sliced[key] = source.clone()
            continue
        index = [slice(0, n) for n in target.shape]
        if key.startswith("decoder.") and key.endswith(".conv.0.weight"):
            c, h = source.shape[1] // 2, target.shape[1] // 2
            source = torch.cat([source[:, :h], source[:, c : c + h]], dim=1)
        sliced[key] = source[tuple(index)].clone()
    ref.load_state_dict(sliced, strict=True)
    return ref


def test_half_pruning_matches_a_reference_built_by_hand():
    model = small(classes=2)
    result = prune(model, descending_scores(model), X, ratio=0.5)
    for row in result.channels:
        assert row["after"] == row["before"] // 2, row
    ref = _hand_pruned_reference(model, classes=2)
    got, want = result.model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.allclose(result.model(X), ref(X), atol=1e-6)


def test_half_pruning_keeps_the_gates_consistent():
    model = small(classes=3)
    pruned = prune(model, l1_scores(model), X, ratio=0.5).model
    depth = model.depth
    for i, level in enumerate(pruned.decoder):
        skip = pruned.encoder[depth - 1 - i].conv[3].out_channels  # the encoder conv making this skip
        before = model.encoder[depth - 1 - i].conv[3].out_channels
        gate = level.gate
        assert skip == before // 2
        assert gate.w_x[0].in_channels == gate.broadcast.out_channels == skip  # x branch, x * psi
        assert gate.w_g[0].in_channels == level.up.out_channels  # g branch
        assert level.conv[0].in_channels == skip + level.up.out_channels  # the concatenation
        f_int = gate.w_x[0].out_channels
        assert gate.w_g[0].out_channels == gate.psi[0].in_channels == f_int
        assert f_int == model.decoder[i].gate.w_x[0].out_channels // 2  # F_int is pruned too
        assert gate.psi[0].out_channels == gate.psi[1].num_features == 1  # psi keeps its one channel
        assert gate.broadcast.in_channels == 1
    assert pruned.segmentation_head.out_channels == 3
    assert count_params(pruned) < 0.3 * count_params(model)
    x = torch.randn(2, 3, 64, 64)
    out = pruned.train()(x)
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in pruned.named_parameters() if p.requires_grad and p.numel())


@pytest.mark.parametrize(("scope", "batch_norm"), [("encoder", True), ("decoder", True), ("all", False)])
def test_scopes_and_batch_norm_free_gates_prune_consistently(scope, batch_norm):
    model = small(batch_norm=batch_norm)
    result = prune(model, l1_scores(model), X, ratio=0.5, scope=scope)
    pruned = result.model
    changed = {r["layer"] for r in result.channels if r["after"] < r["before"]}
    assert changed and all(n.startswith(f"{scope}.") or scope == "all" for n in changed)
    for i, level in enumerate(pruned.decoder):
        skip = pruned.encoder[model.depth - 1 - i].conv[-3 if batch_norm else -2]
        assert level.gate.broadcast.out_channels == level.gate.w_x[0].in_channels == skip.out_channels
        assert level.gate.psi[0].out_channels == 1
    assert pruned(X).shape == (1, 2, 64, 64)


def test_pruned_attention_unet_trains():
    model = small(classes=1)
    pruned = prune(model, l1_scores(model), X, ratio=0.5).model
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    losses = train_steps(pruned, x, y)
    assert losses[-1] < losses[0], losses


def test_custom_unet_with_dropout_prunes_and_trains():
    model = small(classes=1, depth=4, dropout=0.2)  # same layout as the custom_unet config, tiny width
    pruned = prune(model, l1_scores(model), X, ratio=0.5).model
    assert count_params(pruned) < 0.3 * count_params(model)
    assert pruned.decoder[0].gate.psi[0].out_channels == 1
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    losses = train_steps(pruned, x, y, steps=6)
    assert losses[-1] < losses[0], losses


def test_plain_broadcast_multiply_would_freeze_the_skips(monkeypatch):
    """Why ChannelBroadcast exists: with a plain `x * psi` torch-pruning 1.6 couples the skip's channels
    to psi's single channel (and, failing to size the concatenation, to the up-conv), so those groups
    are skipped. If this starts failing, torch-pruning learnt broadcasting and the gate could be plain."""
    monkeypatch.setattr(AttentionGate, "forward", lambda self, g, x: x * self.attention(g, x))
    model = small()
    rows = {r["layer"]: r for r in prune(model, l1_scores(model), X, ratio=0.5).channels}
    assert rows["encoder.0.conv.3"]["after"] == rows["encoder.0.conv.3"]["before"]
    assert rows["decoder.2.up"]["after"] == rows["decoder.2.up"]["before"]


def test_raw_torch_pruning_also_keeps_psi_whole():
    # Without pipeline.pruning's ignored layers (e.g. tests/test_models.py's prune_half): still consistent.
    model = small()
    pr = tp.pruner.BasePruner(model, X, importance=tp.importance.GroupMagnitudeImportance(p=1),
                              pruning_ratio=0.5, ignored_layers=[model.segmentation_head])
    pr.step()
    assert all(level.gate.psi[0].out_channels == 1 for level in model.decoder)
    assert model.encoder[0].conv[3].out_channels == 4
    assert model(X).shape == (1, 2, 64, 64)


def test_pruned_attention_unet_roundtrip(tmp_path):
    cfg = {**SMALL, "dropout": 0.2}
    model = models.build_model(cfg, in_channels=3, num_classes=2)
    _randomise_batch_norms(model)
    pruned = prune(model.eval(), l1_scores(model), X, ratio=0.5).model
    loaded = assert_roundtrip(pruned, cfg, 3, 2, tmp_path / "m", torch.randn(2, 3, 64, 64))
    assert loaded.decoder[0].gate.broadcast.out_channels == pruned.decoder[0].gate.broadcast.out_channels == 16


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    ("name", "params_m"), [("attention_unet", 31.39), ("custom_unet", 31.45), ("deeplabv3plus", 22.44)]
)
def test_yamls_build_through_the_factory(name, params_m):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    model = models.build_model(cfg, in_channels=1, num_classes=2).eval()
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.01)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_custom_unet_config_is_one_level_deeper_with_dropout():
    cfg = OmegaConf.load(CONF / "custom_unet.yaml")
    model = models.build_model(cfg, in_channels=1, num_classes=1)
    assert model.depth == 5 and len(model.decoder) == 5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.encoder[5].conv[-1], nn.Dropout2d) and model.encoder[5].conv[-1].p == 0.2


# --------------------------------------------------------------------------------------------------
# DeepLabV3+


def deeplab(encoder: str = "resnet34", classes: int = 2) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / "deeplabv3plus.yaml")), "encoder_name": encoder}
    return models.build_model(cfg, in_channels=3, num_classes=classes).eval(), cfg


def test_deeplabv3plus_prunes_with_torch_pruning_and_roundtrips(tmp_path):
    """The network side: depthwise ASPP / decoder convs, the image-pooling branch and the 5-way concat all
    prune consistently on torch-pruning's graph (its own magnitude importance)."""
    model, cfg = deeplab()
    before = count_params(model)
    pr = tp.pruner.BasePruner(model, X, importance=tp.importance.GroupMagnitudeImportance(p=1),
                              pruning_ratio=0.5, ignored_layers=[model.segmentation_head])
    pr.step()
    assert count_params(model) < 0.4 * before
    assert model.segmentation_head[0].out_channels == 2
    for m in model.modules():  # depthwise convs stay depthwise
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    pooling = model.decoder.aspp[0].convs[4]
    assert pooling[1].out_channels == pooling[2].num_features < 256
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    y = (torch.rand(2, 2, 64, 64) > 0.5).float()
    losses = train_steps(model, x, y, steps=4, lr=1e-3)  # batch 2: the pooling branch's BN needs > 1 value
    assert losses[-1] < losses[0], losses
    assert_roundtrip(model, cfg, 3, 2, tmp_path / "m", x)


def test_deeplabv3plus_prunes_through_the_pipeline():
    model, _ = deeplab(encoder="resnet18")
    scores = l1_scores(model)
    same = prune(model, scores, X, ratio=0.0).model
    with torch.no_grad():
        assert torch.equal(same(X), model(X))
    result = prune(model, scores, X, ratio=0.5)
    assert count_params(result.model) < 0.4 * count_params(model)
    # every layer loses channels, the ASPP + low-level concatenation included (scores are compared
    # relative to each layer's mean, so the low-magnitude 48-channel branch is not emptied and skipped)
    assert [r["layer"] for r in result.channels if r["after"] == r["before"]] == []
    assert result.model.segmentation_head[0].out_channels == 2
    assert result.model(X).shape == (1, 2, 64, 64)
