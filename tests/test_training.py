"""The training loop: the configured recipe (optimizer, scheduler, loss), best-on-validation weights, the
network-slimming penalty, and the loss from segmentation_models_pytorch checked against its formula."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import models  # noqa: F401
from helpers import compose_config, from_conf
from models.unet import UNet
from pipeline.training import Recipe, fit


def toy_data(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, :1] > 0.5).float()  # learnable: the mask is a threshold of the first channel
    return TensorDataset(x, y)


def recipe_and_settings(*overrides: str):
    cfg = compose_config("train.batch_size=4", "train.lr=0.01", *overrides)
    return Recipe.from_config(cfg), cfg.train


def reference_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss medprune wrote by hand before it used smp's: BCE + (1 - soft Dice with add-one smoothing)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    prob, tgt = torch.sigmoid(logits).flatten(2), target.flatten(2)
    dice = (2 * (prob * tgt).sum(-1) + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
    return bce + 1 - dice.mean()


def test_the_smp_dice_bce_loss_is_the_formula_for_one_image():
    """smp's Dice is over the batch per class; for one image it is the per-image formula exactly."""
    loss = from_conf("loss", "dice_bce")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 16, 16, generator=g) * 3
    target = (torch.rand(1, 2, 16, 16, generator=g) > 0.6).float()
    assert loss(logits, target).item() == pytest.approx(reference_dice_bce(logits, target).item(), abs=1e-5)


@pytest.mark.parametrize("name", ["dice_bce", "dice", "focal_dice"])
def test_every_loss_is_low_for_a_perfect_prediction_and_high_for_the_opposite(name):
    loss = from_conf("loss", name)
    target = torch.zeros(2, 1, 8, 8)
    target[..., :4, :] = 1
    good, bad = loss(target * 20 - 10, target), loss(10 - target * 20, target)
    assert good < 0.05 and bad > 0.9 and bad > 10 * good


def test_fit_learns_and_keeps_the_best_validation_weights():
    torch.manual_seed(0)
    model = UNet(3, 1, width=4, depth=2)
    recipe, settings = recipe_and_settings("train.epochs=4")
    fitted = fit(model, toy_data(), toy_data(seed=1), settings, recipe, torch.device("cpu"), seed=0)
    history, best = fitted.history, fitted.best_dice
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    assert best == max([best] + [h["val_dice"] for h in history])
    assert fitted.images == sum(h["images"] for h in history) == 4 * len(toy_data()) // settings.batch_size * settings.batch_size


def test_zero_epochs_leaves_the_model_untouched():
    model = UNet(3, 1, width=4, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = compose_config("finetune.epochs=0")
    history = fit(model, toy_data(), toy_data(), cfg.finetune, Recipe.from_config(cfg), torch.device("cpu"), seed=0).history
    assert history == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_l1_penalty_is_part_of_the_optimised_loss():
    def first_epoch_loss(bn_l1):
        torch.manual_seed(0)
        model = UNet(3, 1, width=4, depth=2)
        n_gammas = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        recipe, settings = recipe_and_settings("train.epochs=1", "train.lr=1e-4", f"train.bn_l1={bn_l1}")
        history = fit(model, toy_data(), toy_data(seed=1), settings, recipe, torch.device("cpu"), seed=0).history
        return history[0]["loss"], n_gammas

    plain, n = first_epoch_loss(0.0)
    slim, _ = first_epoch_loss(0.05)
    # gammas start at 1: the penalty adds about bn_l1 * (number of gammas) while they barely move
    assert slim - plain == pytest.approx(0.05 * n, rel=0.05)


@pytest.mark.parametrize("overrides, expected", [
    # Adam 1e-3 + StepLR 0.1 80% into training (the default recipe): 8 epochs at 1e-3, then 1e-4
    ([], [1e-3] * 8 + [1e-4] * 2),
    # nnU-Net's: SGD 0.01, momentum 0.99, Nesterov, poly (power 0.9) over the phase
    (["optimizer=sgd", "scheduler=poly", "train.lr=0.01"], [0.01 * (1 - e / 10) ** 0.9 for e in range(10)]),
    (["scheduler=cosine"], [0.5e-3 * (1 + __import__("math").cos(__import__("math").pi * e / 10)) for e in range(10)]),
])
def test_recipes_are_config_only(overrides, expected):
    cfg = compose_config("train.epochs=10", *overrides)
    optimizer, scheduler = Recipe.from_config(cfg).build(torch.nn.Linear(2, 2), cfg.train)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-6)
    if "optimizer=sgd" in overrides:
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.99 and optimizer.defaults["nesterov"]


def test_fine_tuning_with_step_lr_steps_at_its_own_schedules_fraction_not_at_train_epochs():
    """scheduler=step: step_size is step_fraction (0.8) of the phase's schedule, set by the loop like cosine's
    T_max; it was ${train.epochs} x 0.8 in the YAML, so a 5-epoch fine-tuning after 20 training epochs never stepped."""
    cfg = compose_config("scheduler=step", "recovery=finetune", "train.epochs=20", "finetune.epochs=5")
    assert cfg.finetune.schedule_epochs is None
    optimizer, scheduler = Recipe.from_config(cfg).build(torch.nn.Linear(2, 2), cfg.finetune)
    assert scheduler.step_size == 4  # round(0.8 x 5), not round(0.8 x 20) = 16
    train_optimizer, train_scheduler = Recipe.from_config(cfg).build(torch.nn.Linear(2, 2), cfg.train)
    assert train_scheduler.step_size == 16
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = cfg.finetune.lr
    assert lrs == pytest.approx([lr] * 4 + [lr * 0.1])


@pytest.mark.parametrize("value", [0, 1.5, "x"])
def test_a_step_fraction_out_of_range_is_a_config_error_naming_it(value):
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"scheduler\.step_fraction="):
        validate(compose_config("scheduler=step", f"scheduler.step_fraction={value}"))
    with pytest.raises(ConfigError, match=r"scheduler\.step_fraction for torch\.optim\.lr_scheduler\.CosineAnnealingLR"):
        validate(compose_config("scheduler=cosine", "+scheduler.step_fraction=0.5"))


def test_a_fine_tuning_budget_in_steps_runs_exactly_that_many_optimiser_steps():
    cfg = compose_config("train.batch_size=4", "finetune.steps=3")
    model = UNet(3, 1, width=4, depth=2)
    calls = []
    recipe = Recipe.from_config(cfg)
    make = recipe.optimizer
    recipe.optimizer = lambda *a, **k: _counting(make(*a, **k), calls)
    history = fit(model, toy_data(), toy_data(seed=1), cfg.finetune, recipe, torch.device("cpu"), seed=0).history
    assert len(calls) == 3  # 8 images at batch 4: 2 steps per epoch, so 2 epochs, the second cut after 1 step
    assert len(history) == 2


def test_a_step_budget_is_fine_tuning_only_and_counted():
    from omegaconf import OmegaConf

    assert "steps" not in OmegaConf.to_container(compose_config().train)
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match="finetune.steps"):
        validate(compose_config("finetune.steps=0"))


def _counting(optimizer, calls):
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    return optimizer


class _DtypeSpy(torch.nn.Module):
    """Records the type of the convolution output the loop sees (bf16 under bf16 autocast)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x):
        out = self.model(x)
        self.seen.add(out.dtype)
        return out


def test_bf16_training_runs_under_autocast_where_the_cpu_has_bf16(monkeypatch):
    from pipeline import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    torch.manual_seed(0)
    spy = _DtypeSpy(UNet(3, 1, width=4, depth=2))
    recipe, settings = recipe_and_settings("train.epochs=2", "train.precision=bf16")
    history = fit(spy, toy_data(), toy_data(seed=1), settings, recipe, torch.device("cpu"), seed=0).history
    assert torch.bfloat16 in {d for d in spy.seen} and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(p.dtype == torch.float32 for p in spy.parameters())  # autocast: the weights stay fp32


def test_bf16_falls_back_to_fp32_with_a_notice_where_the_cpu_would_emulate_it(monkeypatch, caplog):
    from pipeline import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    spy = _DtypeSpy(UNet(3, 1, width=4, depth=2))
    recipe, settings = recipe_and_settings("train.epochs=1", "train.precision=bf16")
    with caplog.at_level("WARNING", logger="pipeline.precision"):
        fit(spy, toy_data(), toy_data(seed=1), settings, recipe, torch.device("cpu"), seed=0)
    assert spy.seen == {torch.float32}
    assert "train.precision=bf16 falls back to fp32: this CPU has no native bf16" in caplog.text


# -- the kept epoch, rewinding, the scratch control --------------------------------------------------------


def _fit_with_val(keep: str, val_dice: list[float], monkeypatch):
    """fit on toy data with validation Dice scripted: the start, then one value per epoch."""
    import pipeline.training as training

    scripted = iter(val_dice)
    monkeypatch.setattr(training, "split_metrics", lambda *a, **k: {"dice": next(scripted), "iou": 0.0})
    torch.manual_seed(0)
    model = UNet(3, 1, width=4, depth=2)
    recipe, settings = recipe_and_settings(f"train.epochs={len(val_dice) - 1}", f"train.keep={keep}")
    return fit(model, toy_data(), toy_data(seed=1), settings, recipe, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("keep, val_dice, kept", [
    ("best", [0.9, 0.5, 0.6], 0),          # nothing beat the start: the start is kept (and says so: kept_epoch 0)
    ("best", [0.4, 0.5, 0.45], 1),
    ("best_trained", [0.9, 0.5, 0.6], 2),  # the start is no candidate
    ("last", [0.4, 0.7, 0.5], 2),
])
def test_the_keep_rule_picks_the_kept_epoch(keep, val_dice, kept, monkeypatch):
    fitted = _fit_with_val(keep, val_dice, monkeypatch)
    assert fitted.kept_epoch == kept and fitted.best_dice == val_dice[kept]


def test_rewinding_replays_the_training_schedule_from_the_chosen_epoch():
    """recovery=rewind (the default): train.lr and the training schedule's length, entered at
    finetune.schedule_start, whatever the phase's own length; fine-tuning follows its own length at a tenth of the
    rate."""
    def lrs(*overrides):
        cfg = compose_config("train.epochs=10", *overrides)
        optimizer, scheduler = Recipe.from_config(cfg).build(torch.nn.Linear(2, 2), cfg.finetune)
        out = []
        for _ in range(int(cfg.finetune.epochs)):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs() == pytest.approx([1e-3] * 8 + [1e-4] * 2)  # the training schedule, replayed
    assert lrs("finetune.schedule_start=6", "finetune.epochs=4") == pytest.approx([1e-3] * 2 + [1e-4] * 2)
    assert lrs("scheduler=cosine", "finetune.epochs=5") == pytest.approx(
        [0.5e-3 * (1 + math.cos(math.pi * e / 10)) for e in range(5)])  # the first half of training's cosine
    assert lrs("recovery=finetune") == pytest.approx([1e-4] * 4 + [1e-5])  # lr x 0.1, StepLR 80% into its own 5 epochs
    cfg = compose_config("recovery=scratch", "train.epochs=10")
    assert cfg.finetune.epochs == 20 and cfg.finetune.lr == cfg.train.lr and str(cfg.finetune.init) == "random"


def test_a_schedule_start_past_the_schedule_is_refused():
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match="finetune.schedule_start=10 is past the end of the 10-epoch schedule"):
        validate(compose_config("train.epochs=10", "finetune.schedule_start=10"))


def test_the_scratch_control_reinitialises_every_layer_seeded():
    from pipeline.stages.finetune import reinitialize

    torch.manual_seed(1)
    trained = UNet(3, 1, width=4, depth=2)
    with torch.no_grad():
        for p in trained.parameters():
            p.fill_(0.5)
    a, b = UNet(3, 1, width=4, depth=2), UNet(3, 1, width=4, depth=2)
    a.load_state_dict(trained.state_dict())
    b.load_state_dict(trained.state_dict())
    reinitialize(a, seed=3)
    reinitialize(b, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name  # seeded
    convs = [m for m in a.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(not torch.all(m.weight == 0.5) for m in convs)  # nothing left of the weights it had
