"""The real conf/ composes, and bad configuration fails at start-up naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import ConfigError, validate
from pipeline.declared import key
from pipeline.paths import CONF_DIR


def load(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = load()
    validate(cfg)
    assert [str(s.value) for s in cfg.stages] == ["train", "score", "prune", "finetune", "evaluate"]
    assert cfg.finetune.lr == cfg.train.lr and cfg.finetune.schedule_epochs == cfg.train.epochs  # rewinding
    assert load("recovery=finetune").finetune.lr == pytest.approx(cfg.train.lr * 0.1)
    assert cfg.criterion.name == "l1"
    assert cfg.paths.outputs.endswith("outputs")


@pytest.mark.parametrize("criterion", ["se", "eca", "cbam", "saca", "sbca", "random"])
def test_a_criterion_seed_follows_the_global_seed(criterion):
    """A criterion's seed is the job's (one home: no criterion.seed key, which was 0 whatever seed a sweep set),
    so a seed sweep varies the gates' init and the control's draw, and the runs of a row differ only by seed."""
    from pipeline.criteria import build_criterion

    cfg = load(f"criterion={criterion}", "seed=3")
    assert "seed" not in cfg.criterion and build_criterion(cfg.criterion, cfg.seed).seed == 3
    with pytest.raises(ConfigError, match=r"^criterion\.seed is the job's seed: set seed=<n> instead$"):
        validate(load(f"criterion={criterion}", "+criterion.seed=3"))


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


@pytest.mark.parametrize("preset", ["lwunet_table2", "lwunet_table3", "lwunet_table4", "channel_attention", "lung_custom_unet",
                                    "real_isic_mini", "criteria_isic"])
def test_channels_round_to_8_by_default_and_the_papers_presets_keep_exact_rates(preset):
    assert load().prune.round_to == 8 and load().prune.round_to_high_res == 16
    assert load(f"experiment={preset}").prune.round_to is None
    assert load("experiment=lung_custom_unet", "prune=custom003_deep").prune.round_to is None


def test_round_to_high_res_must_be_a_multiple_of_round_to():
    with pytest.raises(ConfigError, match=r"prune\.round_to_high_res=12: expected a multiple of prune\.round_to=8"):
        validate(load("prune.round_to_high_res=12"))
    validate(load("prune.round_to_high_res=null"))
    validate(load("prune.round_to=null", "prune.round_to_high_res=12"))  # no rounding at all


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
    with pytest.raises(ConfigError, match=r"dataset.*image_size=100000 is invalid: expected an integer in \[8, 4096\]"):
        validate(load("dataset.image_size=100000"))  # a range, not an 838 GiB allocation


@pytest.mark.parametrize("epochs", [0, -5])
def test_train_epochs_below_one_gives_one_message(epochs):
    with pytest.raises(ConfigError, match=f"train.epochs={epochs} is out of range: expected an integer >= 1"):
        validate(load(f"train.epochs={epochs}"))


def test_the_reader_allow_list_is_the_readers_conf_names():
    """data.READERS (what a config may name, stored ones included) and conf/dataset/*.yaml agree."""
    import yaml

    from data import READERS, ReaderSettingsError, build_reader

    named = {yaml.safe_load(p.read_text()).get("_target_") for p in (CONF_DIR / "dataset").glob("*.yaml")} - {None}
    assert named == set(READERS)
    for target, error in (("pathlib.Path.touch", "is not one of medprune's readers"), ("data.base.SegmentationData", "is not one of")):
        with pytest.raises(ReaderSettingsError, match=error):
            build_reader({"_target_": target, "root": "/x"})
    with pytest.raises(ReaderSettingsError, match=r"dataset.mean holds a nested value"):
        build_reader({"_target_": "data.isic.ISIC2018", "mean": [{"_target_": "joblib.load"}, 0.4, 0.4]})
    with pytest.raises(ConfigError, match="dataset._target_='builtins.print' is not one of medprune's readers"):
        validate(load("dataset._target_=builtins.print"))


# -- one home for every setting ------------------------------------------------------------------------

import dataclasses  # noqa: E402
import inspect  # noqa: E402
import importlib  # noqa: E402

from omegaconf import MISSING, OmegaConf  # noqa: E402

from pipeline import config as schema  # noqa: E402

FIXED_GROUPS = {"train": schema.TrainConfig, "finetune": schema.FinetuneConfig, "sensitivity": schema.SensitivityConfig,
                "evaluate": schema.EvaluateConfig, "tracking": schema.TrackingConfig}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in [*FIXED_GROUPS, "prune"] for o in _options(g)])
def test_every_option_sets_exactly_its_schemas_keys_and_the_schema_holds_no_value(group, option):
    extra = {"sensitivity": ["stages=[train,sensitivity,prune,finetune,evaluate]"],
             "per_layer": ["++prune.layer_ratios={encoder.0.*:0.5}"]}.get(option, []) if group == "prune" else []
    cfg = load(f"{group}={option}", *extra)
    node = cfg[group]
    typed = FIXED_GROUPS.get(group) or schema.PRUNE_SCHEMAS[str(node.schedule)]
    fields = dataclasses.fields(typed)
    assert sorted(node.keys()) == sorted(f.name for f in fields)
    assert not OmegaConf.missing_keys(node), f"{group}={option} leaves keys without a value"
    assert all(f.default == MISSING and f.default_factory is dataclasses.MISSING for f in fields), \
        f"{typed.__name__} holds a default value: the YAML is its home"
    validate(cfg)


def test_the_composed_default_config_has_every_schema_key_set():
    cfg = load()
    assert not OmegaConf.missing_keys(cfg)
    top = {f.name for f in dataclasses.fields(schema.MedpruneConfig)}
    assert top <= set(cfg.keys())


def _target_options():
    out = []
    for group in ("dataset", "model", "criterion", "optimizer", "scheduler", "loss"):
        for option in _options(group):
            node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
            if "defaults" not in node:  # synthetic_* extend their reader's YAML
                out.append((group, option))
    return out


@pytest.mark.parametrize("group, option", _target_options())
def test_target_groups_yaml_is_the_only_home_of_their_defaults(group, option):
    """Our own builders (datasets, models, criteria) declare no default of their own: every value is in
    the YAML, which sets every key they take. Library targets (torch, smp) only get known keys."""
    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    module, _, name = node._target_.rpartition(".")
    target = getattr(importlib.import_module(module), name)
    accepted = schema.accepted_keys(target)
    keys = {k for k in node if not k.startswith("_")} - ({"synthetic"} if group == "dataset" else set())
    if group == "scheduler":  # step_fraction: the training loop's (pipeline.training.LENGTH_FRACTIONS), it sets step_size
        from pipeline.training import LENGTH_FRACTIONS

        keys = {LENGTH_FRACTIONS.get(k, k) for k in keys}
    if accepted is not None:
        assert keys <= accepted
    if module.split(".")[0] in ("data", "models", "pipeline") and node._target_ != "pipeline.losses.WeightedSum":
        from pipeline.criteria import JOB_KEYS  # the job's seed, passed by build_criterion

        own = {k for k in accepted if k not in ("in_channels", "num_classes", *JOB_KEYS)} if accepted is not None else keys
        if node._target_ == "models.smp.build_smp":  # smp's own architecture keys may be added, not required
            own = {n for n, p in inspect.signature(target).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert own <= keys, f"conf/{group}/{option}.yaml lacks {sorted(own - keys)}"
        functions = [c.__dict__["__init__"] for c in inspect.getmro(target) if "__init__" in c.__dict__ and c is not object] \
            if inspect.isclass(target) else [target]
        for function in functions:
            for p in inspect.signature(function).parameters.values():
                if p.name in keys:
                    assert p.default is inspect.Parameter.empty, f"{node._target_}.{p.name} has a default in code"


def test_a_key_the_schedule_does_not_use_is_an_error():
    with pytest.raises(ConfigCompositionException):
        load("prune=uniform", "prune.max_layer_ratio=0.5")  # not a key of the uniform schedule
    with pytest.raises(ConfigError, match=r"prune\.max_layer_ratio would be ignored"):
        validate(load("prune=uniform", "+prune.max_layer_ratio=0.5"))  # forced in: still refused
    with pytest.raises(ConfigError, match=r"prune\.ratio would be ignored"):
        validate(load("prune=uniform", "prune.schedule=budget", "+prune.target_flops=0.3"))


def test_the_sensitivity_stage_goes_with_prune_sensitivity():
    with pytest.raises(ConfigError, match="prune=sensitivity"):
        validate(load("stages=[train,sensitivity,prune,finetune,evaluate]"))
    with pytest.raises(ConfigError, match="prune=sensitivity"):
        validate(load("prune=sensitivity"))
    validate(load("prune=sensitivity", "stages=[train,sensitivity,prune,finetune,evaluate]"))


def test_fp16_training_on_a_cpu_job_is_refused_before_work_starts():
    with pytest.raises(ConfigError, match=r"^train.precision=fp16: fp16 is for CUDA devices; this job runs on cpu"):
        validate(load("train.precision=fp16", "device=cpu"))
    with pytest.raises(ConfigError, match=r"^finetune.precision=fp16"):
        validate(load("finetune.precision=fp16", "device=cpu"))
    validate(load("train.precision=bf16", "device=cpu"))  # bf16 falls back at run time where it is not native


# -- declared ranges (pipeline/declared.py, read by pipeline.config.check_ranges) ----------------------


@dataclass
class _Inner:
    rates: Dict[str, float] = key(ge=0.0, lt=1.0)


@dataclass
class _Outer:
    runs: int = key(ge=2)
    limit: Optional[int] = key(ge=1)
    ratios: List[float] = key(gt=0.0, le=1.0)
    inner: _Inner = field(default_factory=_Inner)


def test_check_ranges_reads_the_range_declared_beside_each_key():
    """One walker: a nested schema, a list's items, a mapping's values, null where Optional; the full key named."""
    from omegaconf import OmegaConf

    from pipeline.config import check_ranges

    def check(**values):
        good = {"runs": 2, "limit": None, "ratios": [0.5, 1.0], "inner": {"rates": {"a*": 0.0}}}
        check_ranges(OmegaConf.merge(OmegaConf.structured(_Outer), {**good, **values}), _Outer, "x.")

    check()
    for values, message in [({"runs": 1}, "x.runs=1 is out of range: expected an integer >= 2"),
                            ({"limit": 0}, "x.limit=0 is out of range: expected an integer >= 1"),
                            ({"ratios": [0.5, 0.0]}, r"x.ratios\[1\]=0.0 is out of range: expected > 0.0 and <= 1.0"),
                            ({"inner": {"rates": {"a*": 1.0}}}, r"x.inner.rates\[a\*\]=1.0 is out of range: expected >= 0.0 and < 1.0")]:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            check(**values)


def test_a_declared_range_fails_at_start_up_with_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^prune\.ratio=1\.2 is out of range: expected >= 0\.0 and < 1\.0$"):
        validate(load("prune.ratio=1.2"))
    with pytest.raises(ConfigError, match=r"^prune\.timing_runs=1 is out of range: expected an integer >= 2$"):
        validate(load("prune=latency_budget", "prune.timing_runs=1"))  # a schedule's schema (pipeline/schedules.py)


def test_a_rule_between_keys_stays_explicit():
    with pytest.raises(ConfigError, match=r"evaluate\.latency_max_runs=10 is below evaluate\.latency_runs=20"):
        validate(load("evaluate.latency_runs=20", "evaluate.latency_max_runs=10"))  # each in range on its own


def test_every_number_of_the_fixed_groups_declares_its_range():
    """A new count or rate in a fixed group's schema gets its range beside it, or is listed here with why not."""
    import dataclasses
    import typing

    from pipeline.config import PRUNE_SCHEMAS, MedpruneConfig
    from pipeline.declared import BOUNDS

    unbounded = {"MedpruneConfig.seed", "EvaluateConfig.onnx_opset"}  # any seed; the exporter checks its opsets
    numbers = (int, float, typing.Optional[int], typing.Optional[float], typing.List[float], typing.Dict[str, float])
    found = []

    def walk(schema):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])
            elif hints[f.name] in numbers and BOUNDS not in f.metadata and f"{schema.__name__}.{f.name}" not in unbounded:
                found.append(f"{schema.__name__}.{f.name}")

    for schema in (MedpruneConfig, *PRUNE_SCHEMAS.values()):
        walk(schema)
    assert not found
