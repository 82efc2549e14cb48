"""Every model x every criterion (the shipped YAMLs), pruned at 0.5 on CPU: the result is smaller and runs."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import models
from helpers import fast_criterion, training_loss
from pipeline.criteria import ScoringContext
from pipeline.paths import CONF_DIR
from pipeline.measure.profiling import count_flops, count_params
from pipeline.pruning import prunable_layers, prune

SIZE = 32
# Tiny versions of every shipped model config (same builder and architecture, smaller widths).
TINY_MODELS = {
    "unet": {"width": 4, "depth": 2},
    "unet_small": {"width": 4, "depth": 2},
    "unet_tiny": {},
    "attention_unet": {"width": 4, "depth": 2},
    "custom_unet": {"width": 4, "depth": 3},
    "smp_unet": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    "smp_unetplusplus": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    "deeplabv3plus": {"encoder_name": "resnet18", "decoder_channels": 32},
}
MODELS_3D = ("unet3d", "attention_unet3d")
CRITERIA = sorted(p.stem for p in (CONF_DIR / "criterion").glob("*.yaml"))




def test_the_lists_cover_every_shipped_config():
    # the 3D networks take volumes: tests/test_models_3d.py runs every criterion on them
    assert set(TINY_MODELS) | set(MODELS_3D) == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    assert {"l1", "l2", "random", "fpgm", "bn_scale", "taylor", "activation", "se", "eca", "cbam", "saca", "sbca"} <= set(CRITERIA)


def build(name: str):
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), TINY_MODELS[name])
    torch.manual_seed(0)
    return models.build_model(cfg, 3, 1).eval()


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 3, SIZE, SIZE, generator=g)
        yield x, (x[:, :1] > 0.5).float()


@pytest.mark.parametrize("crit", CRITERIA)
@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_prune_every_model_with_every_criterion(model_name, crit):
    model = build(model_name)
    keys_before = list(model.state_dict())
    modules_before = len(list(model.modules()))
    layers = prunable_layers(model)
    scores = fast_criterion(crit).score(model, layers, ScoringContext(device=torch.device("cpu"), batches=batches, loss=training_loss()))
    # the criterion left nothing behind (attention modules, hooks) and scored every prunable layer
    assert list(model.state_dict()) == keys_before and len(list(model.modules())) == modules_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert set(scores) == set(layers)
    assert all(s.shape == (layers[n].out_channels,) and torch.isfinite(s).all() for n, s in scores.items())

    x = torch.randn(1, 3, SIZE, SIZE)
    result = prune(model, scores, x, 0.5)
    pruned = result.model
    assert count_params(pruned) < 0.5 * count_params(model)
    assert count_flops(pruned, x.shape) < 0.5 * count_flops(model, x.shape)
    with torch.no_grad():
        assert pruned(x).shape == (1, 1, SIZE, SIZE)
