"""Knowledge distillation while fine-tuning (finetune.distill, pipeline/distillation.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY, compose_config, mlflow_runs, run_pipeline, training_loss
from pipeline.config import ConfigError, validate
from pipeline.distillation import Distiller, sigmoid_kl
from pipeline.pruning import prune
from pipeline.training import Recipe, fit

from test_pruning import l1_scores, small_unet

X = torch.randn(2, 3, 32, 32)


def test_sigmoid_kl_is_zero_for_equal_logits_positive_otherwise_and_scaled_by_t_squared():
    t = torch.randn(2, 1, 8, 8)
    assert float(sigmoid_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = sigmoid_kl(s, t, 1.0)
    assert float(loss.detach()) > 0
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    # the same probabilities at T=1 and at T=2 with logits doubled: the T^2 factor is the only difference
    assert float(sigmoid_kl(2 * s.detach(), 2 * t, 2.0)) == pytest.approx(4 * float(sigmoid_kl(s.detach(), t, 1.0)), rel=1e-5)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_a_student_equal_to_its_teacher_has_no_distillation_loss(kind):
    student = small_unet(width=8, depth=2)
    distiller = Distiller(copy.deepcopy(student), student, X[:1], alpha=1.0, temperature=2.0, loss=kind, feature_weight=1.0)
    with torch.no_grad():
        logits = student(X)
    assert isinstance(distiller.adapter, torch.nn.Identity)  # same decoder width: nothing to map
    assert float(distiller.loss(X, logits)) == pytest.approx(0.0, abs=1e-6)
    distiller.close()


def _settings(**over):
    base = dict(epochs=1, batch_size=2, lr=1e-3, weight_decay=0.0, precision="fp32", checkpoint_every=0, bn_l1=0.0,
                num_workers=0, threads=1, steps=None)
    return OmegaConf.create({**base, **over})


def test_fine_tuning_with_a_teacher_trains_the_adapter_and_leaves_the_teacher_alone():
    teacher = small_unet(width=8, depth=2)
    student = prune(teacher, l1_scores(teacher), X[:1], 0.5).model
    data = [(torch.randn(3, 32, 32), (torch.rand(1, 32, 32) > 0.5).float()) for _ in range(4)]
    distiller = Distiller(teacher, student, X[:1], alpha=0.5, temperature=2.0, loss="kl", feature_weight=0.5)
    assert isinstance(distiller.adapter, torch.nn.Conv2d) and distiller.adapter.in_channels < distiller.adapter.out_channels
    before_teacher = copy.deepcopy(teacher.state_dict())
    before_adapter = distiller.adapter.weight.detach().clone()
    recipe = Recipe(lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
                    lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1), training_loss())
    history = fit(student, data, data, _settings(), recipe, torch.device("cpu"), 0, desc="finetune", distiller=distiller).history
    distiller.close()
    assert history[0]["distill_loss"] > 0 and history[0]["teacher_s"] > 0 and 0 < history[0]["teacher_fraction"] < 1
    assert not torch.equal(before_adapter, distiller.adapter.weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_distillation_loss_outside_its_enum_fails_at_compose_time_naming_the_key():
    """finetune.distill.loss is typed DistillLoss (its values: LOSSES, one home): no check of its own in validate."""
    from hydra.errors import ConfigCompositionException

    from pipeline.shell import one_line

    with pytest.raises(ConfigCompositionException) as err:
        compose_config("finetune.distill.loss=l1")
    assert "finetune.distill.loss" in one_line(err.value) and "kl, mse" in str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [("finetune.distill.temperature=0", "finetune.distill.temperature"),
                                           ("finetune.distill.alpha=-1", "finetune.distill.alpha")])
def test_bad_distillation_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(override))


@pytest.mark.integration
def test_a_job_with_distillation_logs_the_teacher_overhead(tmp_path):
    run_pipeline(tmp_path, *TINY, "finetune.distill.enabled=true", "finetune.distill.feature_weight=0.1")
    (run,) = mlflow_runs(tmp_path)
    m = run.data.metrics
    assert {"finetune/teacher_mb", "finetune/teacher_total_s"} <= set(m)  # results (results.json)
    from data.files import read_csv  # the per-epoch curves: the fine-tuning's history.csv

    history = read_csv(Path(run.data.tags["medprune.run_dir"]) / "final" / "history.csv")
    assert {"distill_loss", "teacher_s", "teacher_fraction"} <= set(history[0])
    assert m["finetune/teacher_mb"] == pytest.approx(4 * run.data.metrics["baseline/params_m"], rel=0.01)
    assert run.data.params["finetune.distill.enabled"] == "True"
