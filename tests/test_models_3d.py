"""The 3D UNet (MONAI DynUNet blocks, smp naming), its attention-gated variant, and structural pruning of volumes: criteria, torch-pruning's
graph through InstanceNorm3d / BatchNorm3d and residual blocks, save / load, FLOPs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models
from helpers import fast_criterion, training_loss
from models.io import load_model, save_model
from models.unet3d import AttentionUNet3D, UNet3D
from pipeline.criteria import ScoringContext, example_input
from pipeline.criteria.attention import SACAGate, SBCAGate
from pipeline.criteria.magnitude import MagnitudeCriterion
from pipeline.criteria.tracing import trace_chains
from pipeline.paths import CONF_DIR
from pipeline.measure.profiling import count_flops, count_params
from pipeline.pruning import high_resolution_layers, prunable_layers, prune

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "unet3d.yaml"
ATTENTION_CONF = CONF.with_name("attention_unet3d.yaml")
SIDE = 16  # divisible by 2**3: every input here fits depth 3


def unet3d(norm="instance", res_block=False, width=8, depth=3, classes=3, cls=UNet3D) -> UNet3D:
    torch.manual_seed(0)
    return cls(in_channels=2, num_classes=classes, width=width, depth=depth, norm=norm, res_block=res_block).eval()


def volumes(side=SIDE, batch=2, seed=0) -> torch.Tensor:
    return torch.randn(batch, 2, side, side, side, generator=torch.Generator().manual_seed(seed))


def l1_scores(model):
    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 2, SIDE, SIDE, SIDE, generator=g)
        yield x, (x[:, :1] > 0.5).float()


def forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.numel() and p.grad is None]  # not the empty broadcast weights
    assert not missing, missing
    return out


def test_shipped_config_builds_the_documented_network():
    cfg = OmegaConf.load(CONF)
    models.model_kwargs_check(cfg)
    model = models.build_model(cfg, in_channels=2, num_classes=3)
    assert isinstance(model, UNet3D) and model.spatial_dims == 3
    assert count_params(model) == 5_601_827  # the count conf/model/unet3d.yaml and the docstring give
    assert [type(m).__name__ for m in model.encoder[0].modules() if "Norm" in type(m).__name__] == ["InstanceNorm3d"] * 2
    assert model.encoder[0].norm1.affine  # per-channel parameters, as DynUNet's default
    out = forward_backward(model, volumes(32))
    assert out.shape == (2, 3, 32, 32, 32)


def test_shipped_attention_config_builds_the_documented_network():
    cfg = OmegaConf.load(ATTENTION_CONF)
    models.model_kwargs_check(cfg)
    model = models.build_model(cfg, in_channels=2, num_classes=3)
    assert type(model) is AttentionUNet3D and model.spatial_dims == 3
    assert count_params(model) == 5_623_897  # the count conf/model/attention_unet3d.yaml and the docstring give
    assert count_flops(model, (1, 2, 64, 64, 64)) == pytest.approx(113.408e9, rel=1e-3)
    out = forward_backward(model, volumes(32))
    assert out.shape == (2, 3, 32, 32, 32)


def test_attention_gates_sit_on_every_skip():
    model = unet3d(width=4, depth=2, cls=AttentionUNet3D)
    assert [up.transp_conv.conv.out_channels for up in model.decoder] == [8, 4]  # MONAI's UnetUpBlock names
    for up, skip in zip(model.decoder, [8, 4]):
        gate = up.gate
        assert gate.w_x[0].in_channels == gate.broadcast.out_channels == skip
        assert gate.w_g[0].out_channels == gate.w_x[0].out_channels == gate.psi[0].in_channels == skip // 2
        assert gate.psi[0].out_channels == 1 and isinstance(gate.psi[-1], nn.Sigmoid)
        assert all(isinstance(m, nn.BatchNorm3d) for m in gate.modules() if "Norm" in type(m).__name__)
        assert gate.broadcast.weight.shape == (skip, 1, 0, 0, 0)
    assert model.unprunable_modules() == [up.gate.psi for up in model.decoder]
    assert not any(".gate.psi" in n or ".gate.broadcast" in n for n in prunable_layers(model))
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # see models/unet3d.py
    g, x = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)
    gate = model.decoder[1].gate.eval()
    with torch.no_grad():
        psi = gate.attention(g, x)
        assert psi.shape == (2, 1, 8, 8, 8) and bool(((psi >= 0) & (psi <= 1)).all())
        assert torch.equal(gate(g, x), x * psi)
        up = model.decoder[1].eval()
        inp, skip = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 4, 8, 8, 8)
        g = up.transp_conv(inp)
        assert torch.equal(up(inp, skip), up.conv_block(torch.cat([g, up.gate(g, skip)], dim=1)))


def test_layout_follows_smp_naming_and_nnunet_levels():
    model = unet3d(width=4, depth=2)
    assert len(model.encoder) == 3 and len(model.decoder) == 2
    assert [level.conv1.conv.stride for level in model.encoder] == [(1, 1, 1), (2, 2, 2), (2, 2, 2)]
    assert [level.conv2.conv.out_channels for level in model.encoder] == [4, 8, 16]
    assert all(isinstance(up.transp_conv.conv, nn.ConvTranspose3d) for up in model.decoder)
    assert model.segmentation_head.conv.conv.out_channels == 3
    assert not any(n.startswith("segmentation_head") for n in prunable_layers(model))
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # see models/unet3d.py


@pytest.mark.parametrize("cls", [UNet3D, AttentionUNet3D])
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"norm": "group"}, r"norm='group': expected one of instance, batch"),
    ({"width": 0}, "width >= 1"),
    ({"depth": 0}, "depth >= 1"),
])
def test_bad_arguments_are_named(kwargs, match, cls):
    with pytest.raises(ValueError, match=cls.__name__ + ".*" + match):
        cls(2, 3, **{"width": 8, "depth": 3, "norm": "instance", "res_block": False, **kwargs})


@pytest.mark.parametrize("res_block", [False, True])
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("cls", [UNet3D, AttentionUNet3D])
def test_half_pruning_shrinks_the_network_and_keeps_it_consistent(cls, norm, res_block):
    model = unet3d(norm, res_block, cls=cls)
    x = volumes()
    result = prune(model, l1_scores(model), x[:1], ratio=0.5, round_to=8)
    pruned = result.model
    for row in result.channels:  # 8-channel layers would keep 4, which rounds to 0: they stay whole (4-channel gates too)
        assert row["after"] == min(row["before"], max(8, row["before"] // 2)), row
    assert count_params(pruned) < 0.3 * count_params(model)
    assert pruned.segmentation_head.conv.conv.out_channels == 3
    for name, module in pruned.named_modules():  # every norm follows its conv
        if isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)) and ".gate." not in name:
            conv = pruned.get_submodule(name.replace("norm", "conv") + ".conv")
            assert module.num_features == module.weight.numel() == conv.out_channels, name
    assert forward_backward(pruned, x).shape == (2, 3, SIDE, SIDE, SIDE)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_attention_gates_keep_psi_whole_and_leave_the_skips_prunable(norm):
    """The #510 coupling (see models/attention_unet.py) would freeze the skips: here they lose half their channels."""
    model = unet3d(norm, cls=AttentionUNet3D)
    x = volumes()
    pruned = prune(model, l1_scores(model), x[:1], ratio=0.5, round_to=8).model
    assert [level.conv2.conv.out_channels for level in pruned.encoder] == [8, 8, 16, 32]  # from 8, 16, 32, 64
    assert [up.transp_conv.conv.out_channels for up in pruned.decoder] == [16, 8, 8]
    for up, skip in zip(pruned.decoder, reversed(pruned.encoder[:-1])):
        gate = up.gate
        assert gate.psi[0].out_channels == gate.psi[1].num_features == 1  # psi keeps its one channel
        assert gate.w_x[0].in_channels == gate.broadcast.out_channels == skip.conv2.conv.out_channels
        assert gate.w_g[0].in_channels == up.transp_conv.conv.out_channels
        assert gate.w_g[0].out_channels == gate.w_x[0].out_channels == gate.psi[0].in_channels
        assert up.conv_block.conv1.conv.in_channels == up.transp_conv.conv.out_channels + skip.conv2.conv.out_channels
    assert pruned.segmentation_head.conv.conv.out_channels == 3
    assert forward_backward(pruned, x).shape == (2, 3, SIDE, SIDE, SIDE)


def test_global_ranking_and_high_resolution_rounding_on_volumes():
    model = unet3d(width=12, depth=3)
    x = volumes(batch=1)
    high = {n for n, m in prunable_layers(model).items() if m in high_resolution_layers(model, x)}
    assert high == {n for n in prunable_layers(model) if not n.startswith("encoder.3.")}  # all but stride 8
    rows = {r["layer"]: r for r in prune(model, l1_scores(model), x, 0.5, round_to=4, round_to_high_res=8).channels}
    assert rows["encoder.1.conv1.conv"]["after"] == 8  # 24 at stride 2 keeps 12: a multiple of 8 there
    assert rows["encoder.3.conv1.conv"]["after"] == 48  # 96 at stride 8 keeps 48: round_to
    result = prune(model, l1_scores(model), x, 0.4, global_ranking=True, max_layer_ratio=0.75)
    assert sum(r["after"] for r in result.channels) < sum(r["before"] for r in result.channels)
    assert result.model(x).shape == (1, 3, SIDE, SIDE, SIDE)


CRITERIA_3D = sorted(p.stem for p in (CONF_DIR / "criterion").glob("*.yaml"))


@pytest.mark.parametrize("cls", [UNet3D, AttentionUNet3D])
@pytest.mark.parametrize("name", CRITERIA_3D)
def test_every_criterion_scores_every_3d_layer_and_prunes(name, cls):
    model = unet3d("batch" if name == "bn_scale" else "instance", res_block=True, width=4, depth=2, classes=1, cls=cls)
    layers = prunable_layers(model)
    keys = list(model.state_dict())
    scores = fast_criterion(name).score(model, layers, ScoringContext(device=torch.device("cpu"), batches=batches, loss=training_loss()))
    assert list(model.state_dict()) == keys and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert set(scores) == set(layers)
    assert all(s.shape == (layers[n].out_channels,) and torch.isfinite(s).all() for n, s in scores.items())
    x = volumes(batch=1)
    pruned = prune(model, scores, x, 0.5).model
    assert count_params(pruned) < 0.5 * count_params(model)
    with torch.no_grad():
        assert pruned(x).shape == (1, 1, SIDE, SIDE, SIDE)


def test_bn_scale_reads_batchnorm3d_and_only_transposed_convs_fall_back():
    model = unet3d("batch", width=4, depth=2)
    crit = fast_criterion("bn_scale")
    scores = crit.score(model, prunable_layers(model), ScoringContext(device=torch.device("cpu"), batches=batches))
    assert crit.last_fallback == ["decoder.0.transp_conv.conv", "decoder.1.transp_conv.conv"]
    assert torch.equal(scores["encoder.1.conv2.conv"], model.encoder[1].norm2.weight.detach().abs())


def test_l1_on_3d_layers_is_torch_prunings_magnitude_importance():
    import torch_pruning as tp

    model = unet3d(width=4, depth=2)
    layers = prunable_layers(model)
    ours = l1_scores(model)
    importance = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="first", bias=False)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=volumes(batch=1))
    for name, layer in layers.items():  # the transposed convs' weights are (in, out, k, k, k)
        group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))
        root = tp.dependency.Group()
        root.add_dep(group[0].dep, group[0].idxs)
        root[0].root_idxs = group[0].root_idxs
        with torch.no_grad():
            assert torch.allclose(ours[name], importance(root).float(), rtol=1e-5, atol=1e-6), name


def test_tracing_follows_instancenorm3d_and_the_example_input_is_a_volume():
    model = unet3d(width=4, depth=2)
    assert example_input(model, None, size=SIDE).shape == (1, 2, SIDE, SIDE, SIDE)
    chains = trace_chains(model, prunable_layers(model), volumes(batch=1))
    assert chains["encoder.0.conv1.conv"].modules == ["encoder.0.norm1", "encoder.0.lrelu"]
    assert chains["decoder.0.transp_conv.conv"].modules == []  # straight into the concatenation


def test_volume_gates_pool_in_3d():
    x = torch.randn(2, 8, 32, 32, 32)
    saca = SACAGate(8, 4, grid=4, spatial_dims=3)
    assert saca.cells.shape == (8, 64) and saca(x).shape == (2, 8)
    sbca = SBCAGate(8, 4)
    # at most 16 per axis (4096 positions, as 64 x 64 in 2D): the same as pooling first by hand
    assert torch.allclose(sbca(x), sbca(torch.nn.functional.adaptive_avg_pool3d(x, 16)))


@pytest.mark.parametrize("conf", [CONF, ATTENTION_CONF], ids=["unet3d", "attention_unet3d"])
def test_pruned_unet3d_roundtrips_through_models_io(tmp_path, conf):
    cfg = {**OmegaConf.to_container(OmegaConf.load(conf)), "width": 4, "depth": 2, "res_block": True}
    model = models.build_model(cfg, in_channels=2, num_classes=3).eval()
    pruned = prune(model, l1_scores(model), volumes(batch=1), 0.5).model
    save_model(pruned, cfg, 2, 3, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert loaded.encoder[0].norm1.num_features == pruned.encoder[0].norm1.num_features == 2
    x = volumes()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_flops_of_a_volume_drop_with_pruning():
    model = unet3d()
    shape = (1, 2, 32, 32, 32)
    base = count_flops(model, shape)
    assert base == pytest.approx(7.208e9 / 8, rel=1e-3)  # 7.2 GFLOPs per 64^3 patch, 1/8 of it at 32^3
    pruned = prune(model, l1_scores(model), volumes(batch=1), 0.5).model
    assert 0 < count_flops(pruned, shape) < 0.35 * base
