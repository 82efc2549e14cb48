"""Recovery after pruning: the recovery recipes (conf/recovery), sparsity-inducing training before pruning (the
sparsify stage, pipeline/sparsity.py), and the budget every network's training cost, in images seen."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models  # noqa: F401  (torchvision compatibility)
from helpers import TINY, compose_config, mlflow_runs, run_pipeline
from pipeline.config import ConfigError, validate
from pipeline.sparsity import GroupPenalty, penalty

RECOVERIES = ("finetune", "rewind", "sparse_rewind", "iterative_rewind", "distill_rewind", "scratch")


@pytest.mark.parametrize("recovery", RECOVERIES)
def test_every_recovery_composes_and_validates(recovery):
    validate(compose_config(f"recovery={recovery}"))


def test_rewinding_is_the_default_and_a_preset_may_pin_fine_tuning():
    default = compose_config()
    assert (default.finetune.epochs, default.finetune.lr, default.finetune.schedule_epochs) == (10, 1e-3, 10)
    # the study's recipe (lwunet_isic and the presets on it) pins fine-tuning: 5 epochs at lr x 0.1 at the small setting,
    # on the training schedule as its tables were measured (StepLR's step at 80 % of train.epochs, never reached)
    paper = compose_config("experiment=real_isic_small")
    assert (paper.finetune.epochs, paper.finetune.lr, paper.finetune.schedule_epochs) == (5, pytest.approx(1e-4), 15)
    base = compose_config("experiment=real_isic_base")  # no pin: the default, rewinding over its 15 epochs
    assert (base.finetune.epochs, base.finetune.lr, base.finetune.schedule_epochs) == (15, 1e-3, 15)
    # a recovery chosen on the command line applies, but a preset's own finetune.* values win (its budget), and the
    # command line wins over both
    rewound = compose_config("experiment=real_isic_small", "recovery=rewind")
    assert (rewound.finetune.epochs, rewound.finetune.lr, rewound.finetune.schedule_epochs) == (5, 1e-3, 15)
    assert compose_config("experiment=real_isic_small", "recovery=rewind", "finetune.epochs=15").finetune.epochs == 15
    scratch = compose_config("experiment=real_isic_base", "recovery=scratch")
    assert (scratch.finetune.epochs, str(scratch.finetune.init), str(scratch.finetune.keep)) == (30, "random", "best_trained")
    sparse = compose_config("recovery=sparse_rewind")
    assert str(sparse.sparsity.method) == "group_norm" and "sparsify" in [str(s) for s in sparse.stages]
    assert compose_config("recovery=iterative_rewind").prune.schedule == "iterative"
    assert compose_config("recovery=distill_rewind").finetune.distill.enabled


def test_a_penalty_goes_with_the_sparsify_stage():
    with pytest.raises(ConfigError, match="add sparsify after train"):
        validate(compose_config("sparsity=group_norm"))
    with pytest.raises(ConfigError, match="it needs a penalty"):
        validate(compose_config("stages=[train,sparsify,score,prune,finetune,evaluate]"))
    with pytest.raises(ConfigError, match="sparsity.strength=0.0 is out of range"):
        validate(compose_config("recovery=sparse_rewind", "sparsity.strength=0"))


def _tiny_unet():
    from models.unet import UNet

    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=1, width=8, depth=2).eval()


def test_group_lasso_sums_each_channels_norm_over_its_group_transposed_convolutions_included():
    """The penalty's channel norms, by hand: a conv's filters, its BatchNorm scales and the next layers' input
    slices (a transposed convolution holds its inputs on axis 0), one norm per channel of the group."""
    model = _tiny_unet()
    group_lasso = GroupPenalty(model, torch.randn(1, 3, 32, 32), "all", "group_norm", 1.0, 0.0)
    assert group_lasso.groups and any(isinstance(w, nn.Parameter) for parts, _ in group_lasso.groups for w, *_ in parts)
    transposed = [(w, axis) for parts, _ in group_lasso.groups for w, axis, *_ in parts
                  if any(m.weight is w and getattr(m, "transposed", False) for m in model.modules() if hasattr(m, "weight"))]
    assert transposed and {axis for _, axis in transposed} <= {0, 1}
    first = model.encoder[0].conv[0]  # its group: its filters, its BatchNorm, the next conv's input slice
    parts, n = next(g for g in group_lasso.groups if any(w is first.weight for w, *_ in g[0]))
    by_hand = first.weight.detach().pow(2).flatten(1).sum(1)
    for w, axis, idxs, root in parts:
        if w is not first.weight:
            by_hand = by_hand + w.detach().index_select(axis, idxs).pow(2).movedim(axis, 0).reshape(len(idxs), -1).sum(1)
    assert torch.allclose(group_lasso._norms_sq(parts, n), by_hand)
    loss = group_lasso.loss(model)
    loss.backward()
    assert loss > 0 and first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_growing_regularisation_grows_the_weak_channels_coefficients_only():
    model = _tiny_unet()
    growing = penalty(model, "growing_reg", 1e-4, 1e-2, torch.randn(1, 3, 32, 32), "all")
    before = [c.clone() for c in growing.coefficients]
    growing.after_epoch()
    grown = [c - b for c, b in zip(growing.coefficients, before)]
    assert all(g.min() >= 0 and g.max() == pytest.approx(1e-2) for g in grown)  # the weakest channel: + growth
    assert all(g.min() == pytest.approx(0) for g in grown)  # the strongest: unchanged
    assert penalty(model, "bn_l1", 1e-4, 0, torch.randn(1, 3, 32, 32), "all") is None


@pytest.mark.integration
def test_sparse_training_before_pruning_is_cached_and_counted_in_the_budget(tmp_path):
    outputs = tmp_path / "out"
    args = [*TINY, "evaluate.runtimes=[]", "evaluate.mask_examples=0", "recovery=sparse_rewind", "sparsity.epochs=2",
            "sparsity.strength=0.01"]
    out = run_pipeline(outputs, *args, "prune.ratio=0.5")
    assert "Sparse training: group_norm" in out
    again = run_pipeline(outputs, *args, "prune.ratio=0.25")
    assert "Reusing the sparse network" in again and "Sparse training: group_norm" not in again
    first, second = sorted(mlflow_runs(outputs), key=lambda r: r.info.start_time)
    m = first.data.metrics
    train = m["baseline/budget_images"]
    sparse = second.data.metrics["pruned/budget_images"] - train  # the cached sparse network's images count again
    assert sparse > 0 and m["pruned/budget_images"] == train + sparse
    assert m["final/budget_images"] > m["pruned/budget_images"]  # + the rewinding
    assert first.data.tags["medprune.sparse_key"] == second.data.tags["medprune.sparse_key"]


@pytest.mark.integration
def test_the_scratch_control_counts_its_own_training_only_and_starts_afresh(tmp_path):
    outputs = tmp_path / "out"
    out = run_pipeline(outputs, *TINY, "evaluate.runtimes=[]", "evaluate.mask_examples=0", "recovery=scratch")
    assert "the pruned architecture re-initialised" in out
    (r,) = mlflow_runs(outputs)
    m = r.data.metrics
    # debug=tiny trains 1 epoch and recovers 1: a pruned network recovered counts both (2 epochs of images), the
    # scratch control its own epoch only
    assert m["final/budget_images"] == m["baseline/budget_images"] == m["pruned/budget_images"] > 0
    assert m["finetune/kept_epoch"] >= 1  # keep=best_trained: the random start is no candidate
