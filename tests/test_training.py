"""The training loop: Dice + BCE, best-on-validation weights, the network-slimming penalty."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

import models  # noqa: F401
from models.unet import UNet
from pipeline.config import TrainConfig
from pipeline.training import dice_bce_loss, fit


def toy_data(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, :1] > 0.5).float()  # learnable: the mask is a threshold of the first channel
    return TensorDataset(x, y)


def settings(**overrides):
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), {"batch_size": 4, "lr": 1e-2, **overrides})


def test_loss_is_low_for_a_perfect_prediction_and_high_for_the_opposite():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    good = dice_bce_loss(target * 20 - 10, target)
    bad = dice_bce_loss(10 - target * 20, target)
    assert good < 0.01 and bad > 5


def test_fit_learns_and_keeps_the_best_validation_weights():
    torch.manual_seed(0)
    model = UNet(3, 1, width=4, depth=2)
    history, best = fit(model, toy_data(), toy_data(seed=1), settings(epochs=4), torch.device("cpu"), seed=0)
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    assert best == max([best] + [h["val_dice"] for h in history])


def test_zero_epochs_leaves_the_model_untouched():
    model = UNet(3, 1, width=4, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history, _ = fit(model, toy_data(), toy_data(), settings(epochs=0), torch.device("cpu"), seed=0)
    assert history == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_l1_penalty_is_part_of_the_optimised_loss():
    def first_epoch_loss(bn_l1):
        torch.manual_seed(0)
        model = UNet(3, 1, width=4, depth=2)
        n_gammas = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        history, _ = fit(model, toy_data(), toy_data(seed=1), settings(epochs=1, lr=1e-4, bn_l1=bn_l1),
                         torch.device("cpu"), seed=0)
        return history[0]["loss"], n_gammas

    plain, n = first_epoch_loss(0.0)
    slim, _ = first_epoch_loss(0.05)
    # gammas start at 1: the penalty adds about bn_l1 * (number of gammas) while they barely move
    assert slim - plain == pytest.approx(0.05 * n, rel=0.05)
