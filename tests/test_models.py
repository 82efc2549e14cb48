"""Model zoo, factory and pickle-free save/load of structurally pruned models."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models
from models.io import load_model, model_size_mb, save_model
from models.smp import PretrainedWeightsUnavailable, build_smp
from helpers import kwargs_of, model_from_conf
from models.unet import UNet

tp = pytest.importorskip("torch_pruning")

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

SMALL_UNET = {"_target_": "models.unet.UNet", "width": 8, "depth": 3}
SMALL_SMP = {"_target_": "models.smp.build_smp", "arch": "Unet", "encoder_name": "resnet18", "encoder_depth": 4,
             "encoder_weights": None, "decoder_channels": None}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_half(model: nn.Module, in_channels: int = 3) -> nn.Module:
    example = torch.randn(1, in_channels, 64, 64)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[model.segmentation_head],
    )
    pruner.step()
    return model


def test_classic_unet_has_paper_size():
    assert n_params(model_from_conf("unet")) / 1e6 == pytest.approx(31.0, abs=0.1)


@pytest.mark.parametrize("shape", [(1, 3, 70, 90), (2, 3, 64, 64), (1, 3, 33, 17)])
def test_unet_any_input_size(shape):
    model = UNet(in_channels=3, num_classes=1, width=4, depth=4).eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 1, *shape[2:])


def test_unet_layout_matches_smp_names():
    model = UNet(3, 1, width=4, depth=3)
    assert isinstance(model.encoder, nn.ModuleList) and len(model.encoder) == 4
    assert isinstance(model.decoder, nn.ModuleList) and len(model.decoder) == 3
    assert all(isinstance(up.up, nn.ConvTranspose2d) for up in model.decoder)
    assert isinstance(model.segmentation_head, nn.Conv2d)


@pytest.mark.parametrize(("arch", "depth"), [("Unet", 5), ("Unet", 3), ("UnetPlusPlus", 4)])
def test_smp_forward(arch, depth):
    model = build_smp(in_channels=1, num_classes=3, **kwargs_of("model", "smp_unet", arch=arch, encoder_name="resnet18", encoder_depth=depth)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3, 64, 64)


def test_smp_drops_encoder_stages_beyond_depth():
    # resnet18 at depth 3 only runs conv1..layer2: layer3/layer4 (10.5 M params) must not be kept.
    model = model_from_conf("smp_unet", encoder_name="resnet18", encoder_depth=3)
    assert n_params(model.encoder) < 1e6
    assert isinstance(model.encoder.layer4, nn.Identity)


def test_smp_unknown_arch_lists_valid():
    with pytest.raises(ValueError, match="UnetPlusPlus"):
        build_smp(in_channels=3, num_classes=1, **kwargs_of("model", "smp_unet", arch="Unet3000"))


def test_factory_injects_dataset_channels():
    cfg = OmegaConf.create(SMALL_UNET)
    model = models.build_model(cfg, in_channels=1, num_classes=4)
    assert model.encoder[0].conv[0].in_channels == 1
    assert model.segmentation_head.out_channels == 4
    smp_model = models.build_model(dict(SMALL_SMP), in_channels=2, num_classes=3)
    assert smp_model.encoder.conv1.in_channels == 2
    assert smp_model.segmentation_head[0].out_channels == 3


@pytest.mark.parametrize(
    "name", ["unet", "unet_small", "smp_unet", "smp_unetplusplus", "attention_unet", "custom_unet", "deeplabv3plus"]
)
def test_shipped_configs_are_valid(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert "in_channels" not in cfg and "num_classes" not in cfg
    models.model_kwargs_check(cfg)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({**SMALL_UNET, "widht": 8}, "model.widht"),
        ({**SMALL_SMP, "encoder_nmae": "resnet18"}, "model.encoder_nmae"),
        ({**SMALL_UNET, "num_classes": 2}, "model.num_classes"),
    ],
)
def test_unknown_model_key_is_named(cfg, key):
    with pytest.raises(ValueError, match=key):
        models.model_kwargs_check(OmegaConf.create(cfg))
    with pytest.raises(ValueError, match=key):
        models.build_model(cfg, in_channels=3, num_classes=1)


def test_smp_arch_specific_kwargs_accepted():
    models.model_kwargs_check({**SMALL_SMP, "decoder_attention_type": "scse"})


def test_offline_pretrained_weights_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_smp(in_channels=3, num_classes=1, **kwargs_of("model", "smp_unet", encoder_name="resnet18", encoder_weights="imagenet"))
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "resnet18" in msg and "imagenet" in msg and "encoder_weights=null" in msg


def _roundtrip(model: nn.Module, cfg: dict, in_channels: int, num_classes: int, tmp_path, monkeypatch):
    model.eval()
    x = torch.randn(2, in_channels, 64, 64)
    with torch.no_grad():
        expected = model(x)
    directory = save_model(model, OmegaConf.create(cfg), in_channels, num_classes, tmp_path / "m")
    assert directory == tmp_path / "m"
    assert (directory / "model.safetensors").is_file()
    meta = json.loads((directory / "model.json").read_text())
    assert meta["format"] == "medprune-model/1" and meta["model"]["_target_"] == cfg["_target_"]
    assert (meta["in_channels"], meta["num_classes"]) == (in_channels, num_classes)
    assert model_size_mb(directory) == pytest.approx((directory / "model.safetensors").stat().st_size / 1e6)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    loaded = load_model(directory).eval()
    monkeypatch.undo()

    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    return loaded


def test_pruned_classic_unet_roundtrip(tmp_path, monkeypatch):
    cfg = dict(SMALL_UNET)
    model = models.build_model(cfg, in_channels=3, num_classes=2)
    before = n_params(model)
    prune_half(model)
    assert n_params(model) < before
    assert model.segmentation_head.out_channels == 2
    loaded = _roundtrip(model, cfg, 3, 2, tmp_path, monkeypatch)
    assert loaded.encoder[0].conv[0].out_channels == model.encoder[0].conv[0].out_channels < 8


def test_pruned_smp_unet_roundtrip(tmp_path, monkeypatch):
    cfg = dict(SMALL_SMP)
    model = models.build_model(cfg, in_channels=3, num_classes=2)
    before = n_params(model)
    prune_half(model)
    assert n_params(model) < before
    assert model.segmentation_head[0].out_channels == 2
    _roundtrip(model, cfg, 3, 2, tmp_path, monkeypatch)


def test_unpruned_roundtrip_and_pretrained_flag_not_refetched(tmp_path, monkeypatch):
    # The saved cfg may ask for pretrained weights; loading must not try to download them.
    cfg = {**SMALL_SMP, "encoder_weights": "imagenet"}
    model = model_from_conf("smp_unet", encoder_name="resnet18", encoder_depth=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _roundtrip(model, cfg, 3, 1, tmp_path, monkeypatch)


def test_load_rejects_unknown_format(tmp_path):
    model = UNet(3, 1, width=2, depth=1)
    directory = save_model(model, {"_target_": "models.unet.UNet", "width": 2, "depth": 1}, 3, 1, tmp_path)
    meta = json.loads((directory / "model.json").read_text())
    meta["format"] = "something-else/9"
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        load_model(directory)
