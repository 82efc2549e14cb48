"""The real conf/ composes, and bad configuration fails at start-up naming the key."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import pipeline.run  # noqa: F401  (registers the schema and resolvers)
from pipeline.config import ConfigError, validate
from pipeline.paths import CONF_DIR


def load(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = load()
    validate(cfg)
    assert [str(s.value) for s in cfg.stages] == ["train", "score", "prune", "finetune", "evaluate"]
    assert cfg.finetune.lr == pytest.approx(cfg.train.lr * 0.1)
    assert cfg.criterion.name == "l1"
    assert cfg.paths.outputs.endswith("outputs")


@pytest.mark.parametrize(
    "choice",
    ["dataset=isic2018", "model=unet", "model=smp_unet", "model=smp_unetplusplus", "criterion=l2", "train=default"],
)
def test_every_group_option_validates(choice):
    needs_root = choice in ("dataset=isic2018",)
    overrides = [choice] + (["dataset.root=/data/isic"] if needs_root else [])
    validate(load(*overrides))


def test_unknown_key_in_a_typed_group_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        load("prune.ratoi=0.3")
    assert "ratoi" in str(err.value) or "ratoi" in str(err.value.__cause__)


def test_unknown_key_in_a_target_group_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.widht"):
        validate(load("+model.widht=8"))
    with pytest.raises(ConfigError, match=r"dataset\.image_szie"):
        validate(load("+dataset.image_szie=64"))


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ConfigError, match=r"prune\.ratio"):
        validate(load(f"prune.ratio={ratio}"))


def test_ratio_zero_is_allowed():
    validate(load("prune.ratio=0"))


def test_unknown_scope_is_rejected_with_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        load("prune.scope=middle")
    text = str(err.value) + str(err.value.__cause__)
    assert "scope" in text and "encoder" in text


def test_experiment_preset_sets_the_papers_setting():
    cfg = load("experiment=lwunet_table2", "dataset.root=/data/isic")
    validate(cfg)
    assert cfg.model.width == 64 and cfg.dataset.image_size == 256 and cfg.prune.ratio == 0.4
    assert cfg.dataset._target_ == "data.isic.ISIC2018"
    assert cfg.paper.rows["0.6"].dice == 86.7 and cfg.tracking.experiment == "lwunet_table2"


def test_unknown_criterion_is_rejected_with_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        load("criterion=l7")
    assert "criterion/l7" in str(err.value) and "l1" in str(err.value)


def test_unknown_stage_and_bad_order_are_rejected():
    with pytest.raises(ConfigCompositionException):
        load("stages=[train,squash]")
    with pytest.raises(ConfigError, match="out of order"):
        validate(load("stages=[prune,train]"))


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException) as err:
        load("train.epochs=many")
    assert isinstance(err.value.__cause__, ValidationError) or "epochs" in str(err.value)


def test_model_keys_injected_by_the_pipeline_are_refused():
    with pytest.raises(ConfigError, match=r"model\.in_channels"):
        validate(load("+model.in_channels=4"))


def test_a_dataset_value_the_reader_rejects_fails_at_start_up():
    with pytest.raises(ConfigError, match="image_size"):
        validate(load("dataset.image_size=0"))
