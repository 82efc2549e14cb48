"""Typed configuration schema, checked before any work starts.

Hydra composes conf/ on top of `MedpruneConfig` (registered as `medprune_schema`), so an unknown key
or a wrong type in the fixed groups fails at compose time with the key's full name. Three groups vary
by what they build (dataset, model, criterion): their keys are checked against the signature of their
`_target_`. Ranges that types cannot express (a ratio in [0, 1)) are checked by `validate`.
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class Stage(str, Enum):
    train = "train"
    sensitivity = "sensitivity"
    score = "score"
    prune = "prune"
    finetune = "finetune"
    evaluate = "evaluate"


class Scope(str, Enum):
    encoder = "encoder"
    decoder = "decoder"
    all = "all"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_step_size: int = 30  # StepLR: multiply the lr by lr_gamma every lr_step_size epochs
    lr_gamma: float = 0.1
    amp: bool = False  # CUDA mixed precision (ignored on CPU, with a warning)
    checkpoint_every: int = 1  # save the training state every N epochs (0: never); a rerun resumes from it
    bn_l1: float = 0.0  # network slimming: L1 penalty on BatchNorm gammas added to the loss
    num_workers: int = 0
    dice_weight: float = 1.0  # loss = bce_weight * BCE + dice_weight * soft Dice
    bce_weight: float = 1.0


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = 5


# uniform: one ratio for every prunable layer; per_layer: ratios by layer-name glob pattern
# (layer_ratios), `ratio` for the rest; global: one ranking across layers, at most max_layer_ratio of
# any layer; iterative: `steps` steps to `ratio`, fine-tuning epochs_between epochs between steps;
# budget: the ratio (uniform, or global with global_ranking) that keeps at most target_flops of the FLOPs.
# (Functional API: a member may then be called `global`.)
Schedule = Enum("Schedule", {n: n for n in ("uniform", "per_layer", "global", "iterative", "budget")}, type=str)


@dataclass
class PruneConfig:
    schedule: Schedule = Schedule.uniform
    ratio: float = 0.5  # fraction of output channels removed (per layer; overall for global)
    scope: Scope = Scope.all
    round_to: Optional[int] = None  # keep channel counts a multiple of this
    layer_ratios: Dict[str, float] = field(default_factory=dict)  # per_layer: {"encoder.4.*": 0.5, ...}
    max_layer_ratio: float = 0.9  # global / budget with global ranking: cap per layer
    steps: int = 1  # iterative
    epochs_between: int = 1  # iterative: fine-tuning epochs between steps
    target_flops: Optional[float] = None  # budget: fraction of the baseline FLOPs to keep, in (0, 1)
    global_ranking: bool = False  # budget: search a global-ranking ratio instead of a uniform one


@dataclass
class SensitivityConfig:
    ratios: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    target_flops: float = 0.5  # the derived per-layer rates keep at most this fraction of FLOPs
    max_batches: Optional[int] = None  # validation batches per measurement (None: all)


@dataclass
class EvaluateConfig:
    batch_size: int = 8
    threshold: float = 0.5
    extra_splits: List[str] = field(default_factory=list)  # e.g. [train]: also <row>/train_dice, train_iou
    mask_examples: int = 4  # test images in the before/after mask plot (0: no plot)
    # How latency is measured (docs/PERFORMANCE.md): latency_ms is the network as deployed
    fold_bn: bool = True  # BatchNorm folded into the convolution before it (exact in eval mode)
    channels_last: bool = True  # NHWC memory layout
    latency_eager: bool = True  # also latency_eager_ms (the network as trained) when the form above differs
    onnx: bool = True  # export to ONNX (BatchNorm folded), time with ONNX Runtime: onnx_latency_ms, onnx_max_abs_diff
    onnx_opset: int = 18
    onnx_dynamo: bool = False  # torch.export-based exporter instead of the TorchScript one
    latency_warmup: int = 5
    latency_runs: int = 30
    latency_threads: Optional[int] = None  # None: all cores (os.cpu_count()); the count used is logged


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else the SQLite store in outputs/
    experiment: str = "medprune"
    run_name: Optional[str] = None  # None: "<model>-<dataset>-<criterion>-r<ratio>"


@dataclass
class PathsConfig:
    outputs: str = MISSING


@dataclass
class PaperConfig:
    """A published table to compare against (`python -m pipeline.report <experiment>`)."""

    source: str = ""
    table: str = ""
    rows_by: str = "prune.ratio"  # the run param that tells the table's rows apart
    metric_prefix: str = "final"  # compare final/<metric> (a row may say `source: baseline`)
    columns: Dict[str, str] = field(default_factory=dict)  # metric -> column title, in order
    scale: Dict[str, float] = field(default_factory=dict)  # ours x scale = the paper's unit (Dice 0-1 -> %)
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # row key -> {metric: paper value}
    notes: str = ""


@dataclass
class MedpruneConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    criterion: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: List[Stage] = field(
        default_factory=lambda: [Stage.train, Stage.score, Stage.prune, Stage.finetune, Stage.evaluate]
    )
    baseline: Optional[str] = None  # an MLflow run id, a run folder or a model folder to start from
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = True  # rerunning a killed job's command continues it (pipeline/journal.py)
    paper: Optional[PaperConfig] = None  # set by experiment presets that reproduce a published table


def register_schema() -> None:
    ConfigStore.instance().store(name="medprune_schema", node=MedpruneConfig)



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
    target = _import_target(node._target_, key)
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n != "self"]
    for name in node.keys():
        if name.startswith("_"):
            continue
        if name not in params:
            raise ConfigError(
                f"Unknown key {key}.{name} for {node._target_}; accepted keys: {', '.join(accepted)}"
            )


# Counts, sizes, batches, workers and epochs of every group, recognised by their key's name: each must be
# an integer (or null where the schema allows it) of at least this minimum. One rule for all groups, so
# a new key named like a count is checked without a line of its own.
COUNT_RULES: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"^num_workers$"), 0),
    (re.compile(r"^workers$"), 1),
    (re.compile(r"batch_size$"), 1),
    (re.compile(r"(^|_)epochs(_|$)"), 0),
    (re.compile(r"(^|_)(runs|steps|count|batches|threads)$"), 1),
    (re.compile(r"(^|_)(warmup|examples|every)$"), 0),
    (re.compile(r"(^|_)size$"), 1),
    (re.compile(r"^limit$"), 1),
)


def count_minimum(name: str) -> int | None:
    for pattern, low in COUNT_RULES:
        if pattern.search(name):
            return low
    return None


def check_counts(node: Any, prefix: str = "") -> None:
    """Applies COUNT_RULES to every key of the composed config (the paper block excepted: table data)."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            if prefix == "" and name == "paper":
                continue
            key = f"{prefix}{name}"
            child = node[name]
            if isinstance(child, DictConfig):
                check_counts(child, key + ".")
                continue
            low = count_minimum(str(name))
            if low is None or child is None:
                continue
            if isinstance(child, bool) or not isinstance(child, int):
                raise ConfigError(f"{key}={child!r} is invalid: expected an integer >= {low}")
            if child < low:
                raise ConfigError(f"{key}={child} is out of range: expected an integer >= {low}")


def _check_range(value: float, key: str, low: float, high: float | None, high_open: bool = True) -> None:
    ok = value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ConfigError(f"{key}={value} is out of range: expected >= {low}{bound}")


def validate(cfg: DictConfig) -> None:
    """Checks what the schema's types cannot; raises ConfigError naming the key."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k != "paper" and not k.startswith("paper."))
    if missing:
        hint = " (e.g. dataset.root=/data/ISIC2018: the folder holding the dataset)" if "dataset.root" in missing else ""
        raise ConfigError(f"{', '.join(missing)} must be set{hint}")
    check_counts(cfg)
    from data.synthetic import check_synthetic, split_synthetic

    reader, synthetic = split_synthetic(OmegaConf.to_container(cfg.dataset, resolve=True))
    check_target_keys(OmegaConf.create(reader), "dataset")
    if synthetic is not None:
        try:
            check_synthetic(synthetic)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    try:  # constructors only check their values (files are read in setup): cheap, and fails early
        instantiate(reader, _convert_="all")  # as data.build_data does
    except Exception as err:  # Hydra wraps the constructor's ValueError in an InstantiationException
        cause = err.__cause__ or err
        raise ConfigError(f"dataset ({reader['_target_']}): {cause}") from err
    from models import model_kwargs_check  # also knows each smp architecture's own keys

    try:
        model_kwargs_check(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_target_keys(cfg.criterion, "criterion")

    p = cfg.prune
    _check_range(p.ratio, "prune.ratio", 0.0, 1.0)
    if p.round_to is not None:
        _check_range(p.round_to, "prune.round_to", 1, None)
    for pattern, ratio in p.layer_ratios.items():
        _check_range(ratio, f"prune.layer_ratios[{pattern}]", 0.0, 1.0)
    _check_range(p.max_layer_ratio, "prune.max_layer_ratio", 0.0, 1.0)
    _check_range(p.steps, "prune.steps", 1, None)
    _check_range(p.epochs_between, "prune.epochs_between", 0, None)
    schedule = p.schedule.value if isinstance(p.schedule, Enum) else str(p.schedule)
    if schedule == "per_layer" and not p.layer_ratios:
        raise ConfigError("prune.schedule=per_layer needs prune.layer_ratios ({glob pattern: ratio})")
    if schedule == "budget":
        if p.target_flops is None:
            raise ConfigError("prune.schedule=budget needs prune.target_flops (fraction of FLOPs to keep, e.g. 0.3)")
    if p.target_flops is not None:
        _check_range(p.target_flops, "prune.target_flops", 0.0, 1.0)
        if p.target_flops == 0:
            raise ConfigError("prune.target_flops=0 keeps nothing: expected a fraction in (0, 1)")
    if schedule == "iterative" and p.steps < 2:
        raise ConfigError("prune.schedule=iterative needs prune.steps >= 2")
    for i, r in enumerate(cfg.sensitivity.ratios):
        _check_range(r, f"sensitivity.ratios[{i}]", 0.0, 1.0)
    _check_range(cfg.sensitivity.target_flops, "sensitivity.target_flops", 0.0, 1.0)
    _check_range(cfg.train.bn_l1, "train.bn_l1", 0.0, None)
    for group in ("train", "finetune"):
        node = cfg[group]
        _check_range(node.epochs, f"{group}.epochs", 0 if group == "finetune" else 1, None)
        _check_range(node.batch_size, f"{group}.batch_size", 1, None)
        _check_range(node.lr, f"{group}.lr", 0.0, None)
        _check_range(node.lr_step_size, f"{group}.lr_step_size", 1, None)
        _check_range(node.lr_gamma, f"{group}.lr_gamma", 0.0, 1.0, high_open=False)
        _check_range(node.num_workers, f"{group}.num_workers", 0, None)
    _check_range(cfg.evaluate.threshold, "evaluate.threshold", 0.0, 1.0)
    for split in cfg.evaluate.extra_splits:
        if split not in ("train", "val"):
            raise ConfigError(f"evaluate.extra_splits has {split!r}: expected train and/or val (test is always evaluated)")
    _check_range(cfg.evaluate.latency_runs, "evaluate.latency_runs", 1, None)
    _check_range(cfg.evaluate.latency_warmup, "evaluate.latency_warmup", 0, None)

    stages = [str(s.value if isinstance(s, Enum) else s) for s in cfg.stages]
    if not stages:
        raise ConfigError("stages is empty: expected a list such as [train, score, prune, finetune, evaluate]")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages={stages} lists a stage twice")
    order = [s.value for s in Stage]
    if stages != sorted(stages, key=order.index):
        raise ConfigError(f"stages={stages} is out of order: expected a subsequence of {order}")
    if not (cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    from pipeline.state import pick_device

    try:
        pick_device(str(cfg.device))
    except ValueError as err:
        raise ConfigError(str(err)) from err
