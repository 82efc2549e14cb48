"""Typed configuration schema, checked before any work starts.

Hydra composes conf/ on top of `MedpruneConfig` (registered as `medprune_schema`), so an unknown key
or a wrong type in the fixed groups fails at compose time with the key's full name. Three groups vary
by what they build (dataset, model, criterion): their keys are checked against the signature of their
`_target_` (and their constructors check their ranges). A fixed group's range (a ratio in [0, 1)) is declared
beside its key (`key(ge=0.0, lt=1.0)`, pipeline/declared.py) and checked by one function, `check_ranges`;
`validate` adds only the rules between keys.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from data.readers import ReaderSettingsError, accepted_keys
from pipeline.declared import BOUNDS, key
from pipeline.distillation import DistillLoss
from pipeline.enums import ConfigEnum
from pipeline.measure.runtimes import OPTIONAL as OPTIONAL_RUNTIMES
from pipeline.precision import Precision
from pipeline.quantization import Calibration
from pipeline.schedules import SCHEDULES, Scope  # noqa: F401  (Scope: the schema's type, re-exported)
from pipeline.sparsity import SparsityMethod


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class Stage(ConfigEnum):
    train = "train"
    sparsify = "sparsify"
    sensitivity = "sensitivity"
    score = "score"
    prune = "prune"
    finetune = "finetune"
    quantize = "quantize"
    evaluate = "evaluate"


# Every value of the fixed groups lives in its YAML (conf/<group>/<option>.yaml); these dataclasses only
# type the keys (MISSING = no default here), so a default is written once. tests/test_config.py checks that
# every option of every group sets exactly the schema's keys.


# An inference runtime the evaluate stage deploys a network in besides torch: the optional ones of the
# registry (pipeline/measure/runtimes.py), so a runtime is added in one place.
Runtime = ConfigEnum("Runtime", [(name, name) for name in OPTIONAL_RUNTIMES])


class KeepRule(ConfigEnum):
    """Which epoch's weights a training phase keeps (pipeline/training.py, `fit`)."""

    best = "best"  # the best validation Dice, the starting weights included (a phase never ends worse than it began)
    best_trained = "best_trained"  # the best validation Dice of the epochs trained (the start is not a candidate)
    last = "last"  # the last epoch's


class Init(ConfigEnum):
    """What the fine-tuning phase starts from (pipeline/stages/finetune.py)."""

    pruned = "pruned"  # the pruned network's weights (fine-tuning, rewinding)
    random = "random"  # the pruned architecture re-initialised: the scratch control (Liu et al., ICLR 2019)


@dataclass
class TrainConfig:
    epochs: int = key(ge=1)  # training needs an epoch (fine-tuning may have none)
    batch_size: int = key(ge=1)
    lr: float = key(ge=0.0)  # passed to the optimizer (conf/optimizer)
    weight_decay: float = key(ge=0.0)  # passed to the optimizer
    precision: Precision = MISSING  # fp32 | bf16 | fp16: autocast type of the loop (pipeline/precision.py)
    checkpoint_every: int = key(ge=0)  # save the training state every N epochs (0: never); a rerun resumes from it
    bn_l1: float = key(ge=0.0)  # network slimming: L1 penalty on BatchNorm gammas added to the loss
    num_workers: int = key(ge=0)
    threads: Optional[int] = key(ge=1)  # CPU threads of the training loop (on CPU only); null: all cores
    keep: KeepRule = MISSING  # best | best_trained | last: the epoch whose weights the phase keeps


@dataclass
class DistillConfig:
    enabled: bool = MISSING  # the unpruned baseline teaches the pruned network while it is fine-tuned
    alpha: float = key(ge=0.0)  # loss = task loss + alpha x distillation loss on the logits
    temperature: float = key(gt=0.0)  # T of the softened sigmoid probabilities (kl)
    loss: DistillLoss = MISSING  # kl (pixel-wise sigmoid KL x T^2) | mse (on the logits)
    feature_weight: float = key(ge=0.0)  # > 0: + this x MSE between the decoder outputs (through a 1x1 adapter)


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = key(ge=0)  # 0: no fine-tuning (a budget in steps, or none)
    steps: Optional[int] = key(ge=1)  # the budget in optimiser steps instead of epochs (null: finetune.epochs)
    # The learning-rate schedule the phase follows: the scheduler group's, over schedule_epochs epochs (null: the
    # phase's own length), entered at epoch schedule_start. Rewinding replays the training schedule:
    # schedule_epochs = train.epochs, lr = train.lr (recovery=rewind).
    schedule_epochs: Optional[int] = key(ge=0)
    schedule_start: int = key(ge=0)
    init: Init = MISSING  # pruned | random (the scratch control: the pruned architecture re-initialised)
    distill: DistillConfig = MISSING  # knowledge distillation from the baseline (conf/finetune: distill.*)


PRUNE_SCHEMAS: dict[str, type] = {name: schedule.schema for name, schedule in SCHEDULES.items()}


@dataclass
class SparsityConfig:
    """Sparsity-inducing training of the baseline before it is scored and pruned (the sparsify stage,
    pipeline/sparsity.py); the training loop's other settings are train.*."""

    method: SparsityMethod = MISSING  # none | group_norm | growing_reg | bn_l1
    epochs: int = key(ge=0)  # the phase's length: epochs trained on after the baseline's training (its extra budget)
    lr: float = key(ge=0.0)  # its learning rate (the scheduler group over these epochs)
    strength: float = key(ge=0.0)  # the penalty's coefficient (growing_reg: its starting value)
    growth: float = key(ge=0.0)  # growing_reg: added per epoch to a group's coefficient, x its unimportance in [0, 1]


@dataclass
class SensitivityConfig:
    ratios: List[float] = key(ge=0.0, lt=1.0)  # each layer is pruned alone at each of these ratios
    target_flops: float = key(ge=0.0, lt=1.0)  # the derived per-layer rates keep at most this fraction of FLOPs
    max_batches: Optional[int] = key(ge=1)  # validation batches per measurement (null: all)


@dataclass
class QuantizeConfig:
    calibration_images: int = key(ge=1)  # training-split images (no augmentation) that calibrate the activation ranges
    calibration: Calibration = MISSING  # minmax | entropy | percentile: how ONNX Runtime turns them into ranges
    dynamic: bool = MISSING  # also a dynamically quantized copy (the quantized_dynamic row), for comparison


@dataclass
class EvaluateConfig:
    batch_size: int = key(ge=1)
    threshold: float = key(ge=0.0, lt=1.0)
    extra_splits: List[str] = MISSING  # e.g. [train]: also <row>/train_dice, train_iou
    mask_examples: int = key(ge=0)  # test images in the before/after mask plot (0: no plot)
    # Per-case results (pipeline/measure/casewise.py, evaluate/cases_<network>.csv)
    ignore_empty: bool = MISSING  # MONAI's ignore_empty: cases with an empty true mask are left out of the means
    nsd_tolerance: float = key(gt=0.0)  # normalised surface Dice tolerance, mm (volumes with spacing) or pixels (2D)
    jaccard_threshold: Optional[float] = key(ge=0.0, le=1.0)  # ISIC 2018's thresholded Jaccard (IoU below it counts 0), on ISIC data; null: off
    collapse_tolerance: float = key(ge=0.0, lt=0.5)  # flag a network predicting >= 1 - tol of the pixels, or <= tol x the truth's
    collapse_margin: float = key(ge=0.0, lt=1.0)  # ... or whose Dice is within this of a trivial predictor's (all fore-/background)
    export_masks: int = key(ge=0)  # predicted masks written for the first N test cases (evaluate/masks/<network>/)
    original_resolution: bool = MISSING  # 2D: also score predictions resized back to each image's size (*_orig)
    # How latency is measured (docs/PERFORMANCE.md): latency_ms is the network as deployed
    fold_bn: bool = MISSING  # BatchNorm folded into the convolution before it (exact in eval mode)
    channels_last: bool = MISSING  # NHWC memory layout
    latency_eager: bool = MISSING  # also latency_eager_ms (the network as trained) when the form above differs
    runtimes: List[Runtime] = MISSING  # deployed forms timed beside torch's: onnxruntime | openvino | compile
    precision: Precision = MISSING  # fp32 | bf16 | fp16: also time every form in this type and score Dice in it
    onnx_opset: int = MISSING
    onnx_dynamo: bool = MISSING  # torch.export-based exporter instead of the TorchScript one
    machine_peak: bool = MISSING  # time the machine's peak (pipeline/measure/peak.py) and each network's share of it
    threads: Optional[int] = key(ge=1)  # CPU threads of the whole stage (quality and timing); null: all cores
    # Timing (profiling.time_interleaved): every form of every network in one round-robin pass
    latency_warmup: int = key(ge=0)  # untimed rounds
    latency_runs: int = key(ge=2)  # the window (>= 2 runs): stable when the CV of each form's last latency_runs timings is low
    latency_max_runs: int = key(ge=1)  # timed rounds at most
    latency_target_cv: float = key(ge=0.0)  # stdev / mean a window must reach to count as settled
    latency_max_seconds: float = key(gt=0.0)  # time budget of all the timed rounds (each form still gets 3 runs)


@dataclass
class TrackingConfig:
    uri: Optional[str] = MISSING  # null: $MLFLOW_TRACKING_URI, else the SQLite store in outputs/
    experiment: str = MISSING
    run_name: Optional[str] = MISSING  # null: "<model>-<dataset>-<criterion>-r<ratio>-s<seed>"
    log_models: bool = MISSING  # the baseline (when trained) and final networks as MLflow models (ONNX flavour)
    register_as: Optional[str] = MISSING  # register the final network in the model registry under this name
    system_metrics: bool = MISSING  # CPU, memory (and GPU) usage of the job as system/* metrics


@dataclass
class PathsConfig:
    outputs: str = MISSING


# The report's columns for a sweep without a published table.
GENERIC_COLUMNS = {"dice": "Dice", "iou": "IoU", "params_m": "Params (M)", "flops_g": "FLOPs (G)", "latency_ms": "Latency (ms)"}


@dataclass
class PaperConfig:
    """A published table to compare against (`python -m pipeline.report <experiment>`). The block has no
    group file of its own: a preset sets what differs from these defaults."""

    source: str = ""
    table: str = ""
    rows_by: str = "prune.ratio"  # the run param that tells the table's rows apart (comma-separated: several)
    # "key=value" of rows_by: each row is also paired with the row that has this value (and the row's other
    # keys), e.g. criterion.name=l1; empty: only with the run's own baseline
    reference: str = ""
    metric_prefix: str = "final"  # compare final/<metric> (a row may say `source: baseline`)
    columns: Dict[str, str] = field(default_factory=dict)  # metric -> column title, in order (empty: GENERIC_COLUMNS)
    scale: Dict[str, float] = field(default_factory=dict)  # ours x scale = the paper's unit (Dice 0-1 -> %)
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # row key -> {metric: paper value}
    notes: str = ""


@dataclass
class MedpruneConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    criterion: Any = MISSING
    optimizer: Any = MISSING  # a partial torch.optim class; lr and weight_decay come from train / finetune
    scheduler: Any = MISSING  # a partial torch.optim.lr_scheduler class, stepped once per epoch
    loss: Any = MISSING  # the training loss (also used by the data-driven criteria)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    prune: Any = MISSING  # typed per schedule: PRUNE_SCHEMAS (each conf/prune option extends its schema)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: List[Stage] = MISSING
    baseline: Optional[str] = MISSING  # an MLflow run id, a run folder or a model folder to start from
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    resume: bool = MISSING  # rerunning a killed job's command continues it (pipeline/journal.py)
    paper: Optional[PaperConfig] = None  # set by experiment presets that reproduce a published table


def register_schema() -> None:
    store = ConfigStore.instance()
    store.store(name="medprune_schema", node=MedpruneConfig)
    for name, schema in PRUNE_SCHEMAS.items():  # conf/prune/<option>.yaml: defaults: [/schema/prune/<schedule>@_here_]
        store.store(group="schema/prune", name=name, node=schema)



def _import_target(path: str, key: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from err


def check_target_keys(node: DictConfig, key: str) -> None:
    """Every key of `node` must be a parameter of its `_target_`."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} must be a mapping with a _target_ (got {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r})")
    accepted = accepted_keys(_import_target(node._target_, key))
    if accepted is None:
        return
    for name in node.keys():
        if not name.startswith("_") and name not in accepted:
            raise ConfigError(f"Unknown key {key}.{name} for {node._target_}; accepted keys: {', '.join(sorted(accepted))}")


def check_ranges(node: DictConfig, schema: type, prefix: str = "") -> None:
    """The one validator of the declared ranges: every field of `schema` declared with `key(...)`
    (pipeline/declared.py) against its value in `node`, each item of a list or mapping, recursing into
    nested schemas (`prune`, typed by its schedule: validate_prune passes PRUNE_SCHEMAS[schedule]). ConfigError
    naming the full key; null passes (the schema's Optional says where null is allowed)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        value, name = node[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, DictConfig):
            check_ranges(value, hints[f.name], name + ".")
        elif BOUNDS in f.metadata:
            items = (value.items() if isinstance(value, DictConfig) else enumerate(value) if isinstance(value, ListConfig)
                     else [(None, value)])
            for index, item in items:
                _check_bounds(item, name if index is None else f"{name}[{index}]", f.metadata[BOUNDS])


def _check_bounds(value: Any, name: str, bounds) -> None:
    if value is None:
        return
    integer = isinstance(value, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is invalid: expected a number {bounds.describe()}")
    if not bounds.admits(value):
        raise ConfigError(f"{name}={value} is out of range: expected {bounds.describe(integer)}")


def validate_prune(p: DictConfig, stages: list[str]) -> None:
    """The prune block against its schedule's schema: every key used, none ignored, values in range."""
    schedule = str(p.schedule)
    if schedule not in PRUNE_SCHEMAS:
        raise ConfigError(f"prune.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)} (prune=<schedule>)")
    wanted = {f.name for f in dataclasses.fields(PRUNE_SCHEMAS[schedule])}
    extra, missing = sorted(set(p.keys()) - wanted), sorted(wanted - set(p.keys()))
    if extra or missing:
        raise ConfigError(
            f"prune.schedule={schedule} uses the keys {', '.join(sorted(wanted))}: "
            + (f"{', '.join('prune.' + k for k in extra)} would be ignored" if extra else "")
            + ("; " if extra and missing else "") + (f"{', '.join('prune.' + k for k in missing)} missing" if missing else "")
            + f" (select a schedule with prune=<name>: {', '.join(SCHEDULES)})"
        )
    check_ranges(p, PRUNE_SCHEMAS[schedule], "prune.")
    # the rules between keys (each key's own range is declared beside it in pipeline/schedules.py)
    if p.round_to_high_res is not None and p.round_to is not None and p.round_to_high_res % p.round_to:
        raise ConfigError(f"prune.round_to_high_res={p.round_to_high_res}: expected a multiple of "
                          f"prune.round_to={p.round_to} (or null)")
    if schedule == "latency_budget" and str(p.device) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("prune.device=cuda: this machine has no CUDA device to time on (prune.device=cpu)")
    if schedule == "per_layer" and not p.layer_ratios:
        raise ConfigError("prune.schedule=per_layer needs prune.layer_ratios ({glob pattern: ratio})")
    if (schedule == "sensitivity") != ("sensitivity" in stages) and "prune" in stages:
        raise ConfigError(
            "the sensitivity stage derives the per-layer rates that prune applies: use prune=sensitivity together "
            f"with stages=[train,sensitivity,prune,...] (got prune.schedule={schedule}, stages={stages})"
        )


def check_dims(data, reader_target: str, builder, model_keys: dict, model_target: str) -> None:
    """A 2D network on a 3D dataset (or the reverse) fails here, not in the first forward; a 3D patch must
    halve evenly at every level of the network (`model.depth` stride-2 steps)."""
    data_dims, model_dims = int(data.dims), int(getattr(builder, "spatial_dims", 2))
    if data_dims != model_dims:
        hint = ("a 3D model (model=unet3d, attention_unet3d) with a 3D dataset (dataset=brats3d, covid_ct3d)" if data_dims == 3 else
                "a 2D model (e.g. model=unet_small) with a 2D dataset, or a 3D dataset (dataset=brats3d, covid_ct3d)")
        raise ConfigError(f"model._target_={model_target} is a {model_dims}D network but dataset._target_={reader_target} "
                          f"serves {data_dims}D items: expected {hint}")
    depth = model_keys.get("depth")
    if data_dims == 3 and isinstance(depth, int) and data.patch_size % 2**depth:
        raise ConfigError(f"dataset.patch_size={data.patch_size} is invalid for model.depth={depth}: expected a multiple of "
                          f"{2**depth} (the patch is halved {depth} times)")


def evaluate_settings(node: Any) -> DictConfig:
    """An `evaluate` block (a mapping) checked against EvaluateConfig's types: what an evaluate-only job gets
    from a stored config and its command line (pipeline.evaluate); ConfigError naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        e = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"evaluate.{key}: {str(err).splitlines()[0]}" if key else f"evaluate: {str(err).splitlines()[0]}") from err
    missing = sorted(OmegaConf.missing_keys(e))
    if missing:
        raise ConfigError(f"{', '.join('evaluate.' + k for k in missing)} must be set")
    check_ranges(e, EvaluateConfig, "evaluate.")
    validate_evaluate(e)
    return e


def validate_evaluate(e: DictConfig) -> None:
    """The evaluate block's rules between keys and its closed list (each key's range is declared in EvaluateConfig)."""
    for split in e.extra_splits:
        if split not in ("train", "val"):
            raise ConfigError(f"evaluate.extra_splits has {split!r}: expected train and/or val (test is always evaluated)")
    if e.latency_max_runs < e.latency_runs:
        raise ConfigError(f"evaluate.latency_max_runs={e.latency_max_runs} is below evaluate.latency_runs={e.latency_runs}: "
                          "the window could never fill")


def validate(cfg: DictConfig) -> None:
    """Checks what the schema's types cannot; raises ConfigError naming the key."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k != "paper" and not k.startswith("paper."))
    if missing:
        hint = " (e.g. dataset.root=/data/ISIC2018: the folder holding the dataset)" if "dataset.root" in missing else ""
        raise ConfigError(f"{', '.join(missing)} must be set{hint}")
    check_ranges(cfg, MedpruneConfig)  # every declared range (prune's: validate_prune, by its schedule)
    from data.synthetic import check_synthetic, split_synthetic

    from data import build_reader

    reader, synthetic = split_synthetic(OmegaConf.to_container(cfg.dataset, resolve=True))
    if synthetic is not None:
        try:
            check_synthetic(synthetic)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    try:  # the allow-listed reader built from plain values; constructors only check them (files are read in setup)
        data = build_reader(reader)
    except ReaderSettingsError as err:
        raise ConfigError(str(err)) from err
    from models import model_kwargs_check  # also knows each smp architecture's own keys

    try:
        builder, model_keys = model_kwargs_check(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_dims(data, reader["_target_"], builder, model_keys, str(cfg.model._target_))
    if data.dims == 3 and str(cfg.prune.schedule) == "latency_budget" and "prune" in cfg.stages:
        raise ConfigError("prune=latency_budget times 2D convolutions only: expected another prune schedule for a 3D "
                          "network (e.g. prune=uniform, global)")
    for group in ("criterion", "optimizer", "loss"):
        check_target_keys(cfg[group], group)
    from hydra.errors import InstantiationException

    from pipeline.criteria import build_criterion

    try:  # a criterion's constructor only checks and keeps its values (the one home of their ranges)
        build_criterion(cfg.criterion, cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    except InstantiationException as err:
        raise ConfigError(f"criterion ({cfg.criterion._target_}): {str(err.__cause__ or err).splitlines()[0]}") from err
    from pipeline.training import LENGTH_FRACTIONS, scheduler_fractions  # step_fraction: the loop's, not StepLR's

    try:
        scheduler, fractions = scheduler_fractions(cfg.scheduler)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_target_keys(OmegaConf.create(scheduler), "scheduler")
    accepted = accepted_keys(_import_target(scheduler["_target_"], "scheduler"))
    for fraction_key, arg in LENGTH_FRACTIONS.items():
        if arg in fractions and accepted is not None and arg not in accepted:
            raise ConfigError(f"Unknown key scheduler.{fraction_key} for {scheduler['_target_']}: it sets {arg}, which it "
                              "does not take")

    stages = [str(s) for s in cfg.stages]
    validate_prune(cfg.prune, stages)
    sp = cfg.sparsity
    sparse = str(sp.method) != "none"
    if sparse != ("sparsify" in stages):
        raise ConfigError(
            f"sparsity.method={sp.method} and stages={stages}: the sparsify stage trains with the penalty, so "
            + ("add sparsify after train (stages=[train,sparsify,score,prune,finetune,evaluate])" if sparse else
               "it needs a penalty: sparsity=group_norm, growing_reg or bn_l1 (or drop sparsify from stages)"))
    if sparse and sp.epochs < 1:  # sparsity=none has neither epochs nor a penalty
        raise ConfigError(f"sparsity.epochs={sp.epochs} is out of range: expected an integer >= 1 with sparsity.method={sp.method}")
    if sparse and not sp.strength > 0:
        raise ConfigError(f"sparsity.strength={sp.strength} is out of range: expected > 0 (the penalty's coefficient) "
                          f"with sparsity.method={sp.method}")
    f = cfg.finetune
    span = f.schedule_epochs if f.schedule_epochs is not None else f.epochs
    if f.schedule_start and f.schedule_start >= span:
        raise ConfigError(f"finetune.schedule_start={f.schedule_start} is past the end of the {span}-epoch schedule "
                          f"(finetune.schedule_epochs={f.schedule_epochs}): expected an epoch in [0, {span})")
    validate_evaluate(cfg.evaluate)
    if not stages:
        raise ConfigError("stages is empty: expected a list such as [train, score, prune, finetune, evaluate]")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages={stages} lists a stage twice")
    order = [s.value for s in Stage]
    if stages != sorted(stages, key=order.index):
        raise ConfigError(f"stages={stages} is out of order: expected a subsequence of {order}")
    if not (cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    from pipeline.precision import supported
    from pipeline.state import pick_device

    try:
        device = pick_device(str(cfg.device))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for name in ("train.precision", "finetune.precision"):
        value = str(OmegaConf.select(cfg, name))
        if value == "fp16" and supported(value, device):
            raise ConfigError(f"{name}=fp16: {supported(value, device)}")
