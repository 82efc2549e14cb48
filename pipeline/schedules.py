"""Prune schedules: each is a typed config (the keys it uses, and no other) and the function that prunes
by it. A new schedule is a dataclass and a function here, registered in SCHEDULES, and its YAML in
conf/prune/ (which extends the dataclass: `defaults: [/schema/prune/<name>@_here_]`).

Every function gets the baseline, its scores and what the prune stage provides (`Inputs`), and returns
the pruned network, what was applied and where the rates came from (logged as pruned/rates.json and the
`medprune.rates_source` tag), and any metrics it found (prune/found_ratio).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import MISSING
from torch import nn

from pipeline.declared import key
from pipeline.enums import ConfigEnum
from pipeline.latency_budget import LatencyBudget, interleaved_timer
from pipeline.measure.profiling import thread_count
from pipeline.pruning import PruneResult, prune, ratio_for_flops


class Scope(ConfigEnum):
    encoder = "encoder"
    decoder = "decoder"
    all = "all"


class LatencyDevice(ConfigEnum):
    cpu = "cpu"
    cuda = "cuda"


# -- the typed configs (values: conf/prune/<option>.yaml) -------------------------------------------


@dataclass
class PruneBase:
    schedule: str = MISSING  # the schedule's name (a key of SCHEDULES); its option file sets it
    scope: Scope = MISSING  # encoder | decoder | all: the layers that may lose channels
    round_to: Optional[int] = key(ge=1)  # keep channel counts a multiple of this (null: exact rates, no rounding)
    round_to_high_res: Optional[int] = key(ge=1)  # ... and of this at output stride <= 4 (null: round_to)


@dataclass
class UniformPrune(PruneBase):
    ratio: float = key(ge=0.0, lt=1.0)  # fraction of the output channels removed from every in-scope layer


@dataclass
class PerLayerPrune(PruneBase):
    layer_ratios: Dict[str, float] = key(ge=0.0, lt=1.0)  # {glob pattern over layer names: fraction removed}, first match wins
    ratio: float = key(ge=0.0, lt=1.0)  # fraction removed from the in-scope layers no pattern matches


@dataclass
class GlobalPrune(PruneBase):
    ratio: float = key(ge=0.0, lt=1.0)  # fraction of all in-scope channels removed, by one ranking across layers
    max_layer_ratio: float = key(ge=0.0, lt=1.0)  # ... but never more than this fraction of one layer


@dataclass
class IterativePrune(PruneBase):
    ratio: float = key(ge=0.0, lt=1.0)  # the final fraction removed from every in-scope layer, reached in `steps` equal steps
    steps: int = key(ge=2)
    epochs_between: int = key(ge=0)  # fine-tuning epochs (finetune settings) between steps


@dataclass
class BudgetPrune(PruneBase):
    target_flops: float = key(gt=0.0, lt=1.0)  # fraction of the baseline FLOPs to keep; the uniform ratio is searched


@dataclass
class BudgetGlobalPrune(PruneBase):
    target_flops: float = key(gt=0.0, lt=1.0)  # fraction of the baseline FLOPs to keep; the global ranking's ratio is searched
    max_layer_ratio: float = key(ge=0.0, lt=1.0)


@dataclass
class LatencyBudgetPrune(PruneBase):
    """Per-layer rates searched so that the deployed network meets a measured latency (pipeline/latency_budget.py)."""

    target_ms: float = key(gt=0.0)  # latency to reach, ms: the deployed network (BatchNorm folded, channels_last), batch 1
    device: LatencyDevice = MISSING  # cpu | cuda: where it is timed
    threads: Optional[int] = key(ge=1)  # CPU threads while timing (null: all cores)
    max_layer_ratio: float = key(gt=0.0, lt=1.0)  # never more than this fraction of one layer's channels (0: none could lose one)
    timing_warmup: int = key(ge=0)  # untimed rounds before each timing pass
    timing_runs: int = key(ge=2)  # timed rounds of a pass; a latency is the median of its runs (> 1)
    timing_max_seconds: float = key(gt=0.0)  # ... but a pass stops after this long (each probe timed >= 3 times)


@dataclass
class SensitivityPrune(PruneBase):
    """The per-layer rates the sensitivity stage derives (its settings: the `sensitivity` group)."""


# -- how each prunes ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a schedule may use besides its config: the network and its scores, an example input, a FLOPs
    counter, and the prune stage's callbacks (re-scoring, fine-tuning between steps, derived rates)."""

    model: nn.Module
    scores: dict[str, torch.Tensor]
    example: torch.Tensor
    flops: Callable[[nn.Module], int]
    rescore: Callable[[nn.Module], dict[str, torch.Tensor]]
    between_steps: Callable[[nn.Module, int], None]
    derived_rates: Optional[tuple[str, dict[str, float]]] = None  # (source, rates) of the sensitivity stage
    folder: Optional[Path] = None  # where a schedule writes files of its own (the prune stage logs them)


Outcome = tuple[PruneResult, dict[str, Any], dict[str, float]]  # network, what was applied, metrics


def _plan(p) -> dict:
    return dict(scope=str(p.scope), round_to=p.round_to, round_to_high_res=p.round_to_high_res)


def uniform(p, x: Inputs) -> Outcome:
    return prune(x.model, x.scores, x.example, p.ratio, **_plan(p)), {"source": "config", "ratio": p.ratio}, {}


def per_layer(p, x: Inputs) -> Outcome:
    rates = dict(p.layer_ratios)
    result = prune(x.model, x.scores, x.example, p.ratio, **_plan(p), layer_ratios=rates)
    return result, {"source": "config", "ratio": p.ratio, "layer_ratios": rates}, {}


def global_ranking(p, x: Inputs) -> Outcome:
    result = prune(x.model, x.scores, x.example, p.ratio, **_plan(p), global_ranking=True, max_layer_ratio=p.max_layer_ratio)
    return result, {"source": "config (global ranking)", "ratio": p.ratio, "max_layer_ratio": p.max_layer_ratio}, {}


def iterative(p, x: Inputs) -> Outcome:
    result = prune(x.model, x.scores, x.example, p.ratio, **_plan(p), steps=p.steps, rescore=x.rescore,
                   between_steps=x.between_steps)
    return result, {"source": "config", "ratio": p.ratio, "steps": p.steps}, {}


def budget(p, x: Inputs) -> Outcome:
    extra = dict(global_ranking=True, max_layer_ratio=p.max_layer_ratio) if "max_layer_ratio" in p else {}
    ratio, result = ratio_for_flops(x.model, x.scores, x.example, p.target_flops, x.flops, **_plan(p), **extra)
    return result, {"source": f"search for prune.target_flops={p.target_flops}", "ratio": ratio, **extra}, {"prune/found_ratio": ratio}


def sensitivity(p, x: Inputs) -> Outcome:
    if x.derived_rates is None:
        raise RuntimeError("prune=sensitivity needs the rates of a sensitivity stage: add sensitivity to stages")
    source, rates = x.derived_rates
    result = prune(x.model, x.scores, x.example, 0.0, **_plan(p), layer_ratios=rates)
    return result, {"source": f"sensitivity stage ({source})", "layer_ratios": rates}, {}


def latency_budget(p, x: Inputs) -> Outcome:
    device = torch.device(str(p.device))
    n = thread_count(p.threads)
    threads = (f"{n} thread" + "s" * (n != 1)) if device.type == "cpu" else "CUDA"
    budget = LatencyBudget(x.model, x.scores, x.example, **_plan(p), max_layer_ratio=p.max_layer_ratio, device=device)
    found = budget.search(p.target_ms, interleaved_timer(device, p.threads, p.timing_warmup, p.timing_runs, p.timing_max_seconds))
    files = budget.write(found, x.folder, threads) if x.folder is not None else []
    applied = {"source": f"latency search for prune.target_ms={p.target_ms:g} on {budget.where} ({threads})",
               "target_ms": p.target_ms, "measured_ms": found.measured_ms, "unpruned_ms": found.unpruned_ms,
               "max_layer_ratio": p.max_layer_ratio, "layer_ratios": found.rates, "files": [f.name for f in files]}
    metrics = {"prune/target_ms": p.target_ms, "prune/predicted_ms": found.predicted_ms, "prune/measured_ms": found.measured_ms,
               "prune/unpruned_ms": found.unpruned_ms}
    return found.result, applied, metrics


@dataclass(frozen=True)
class Schedule:
    schema: type
    apply: Callable[[Any, Inputs], Outcome] = field(repr=False)
    rates_from_config: bool = False  # its rates are the config's own: a dry run before training shows what they remove


SCHEDULES: dict[str, Schedule] = {
    "uniform": Schedule(UniformPrune, uniform, rates_from_config=True),
    "per_layer": Schedule(PerLayerPrune, per_layer, rates_from_config=True),
    "global": Schedule(GlobalPrune, global_ranking, rates_from_config=True),
    "iterative": Schedule(IterativePrune, iterative, rates_from_config=True),
    "budget": Schedule(BudgetPrune, budget),
    "budget_global": Schedule(BudgetGlobalPrune, budget),
    "sensitivity": Schedule(SensitivityPrune, sensitivity),
    "latency_budget": Schedule(LatencyBudgetPrune, latency_budget),
}
