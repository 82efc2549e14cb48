"""The small explicit state passed from stage to stage, and what every stage may use.

Stages hand each other *folders*, not objects: each stage persists its output (a model folder, a
scores folder, metrics) and records the path here, and `state.json` in the run folder is rewritten
after every stage. A later job can therefore start at any stage from an earlier run's state.

A run folder holds every network it names (the baseline too: `keep_baseline` links it in from the
baseline cache), and `state.json` stores their paths relative to the folder: a copied or moved run
folder names its own files, and `load_contained` (pipeline.evaluate, pipeline.predict) refuses a
state.json that names anything outside it.
"""
from __future__ import annotations

import json
import random
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from data.files import atomic_write
from pipeline.tracking import Tracker

if TYPE_CHECKING:
    from data.base import ImageInput


# The networks a run holds, in the order the stages make them: each is a model folder in the state, a row of
# the results table, a prefix of the results (final/dice) and a choice of pipeline.predict / pipeline.report.
NETWORKS = ("baseline", "pruned", "final")
INT8_NETWORKS = ("quantized", "quantized_dynamic")  # the quantize stage's int8 ONNX files of the last network
MODEL_ARTIFACTS = dict(zip(NETWORKS, ("baseline", "pruned_model", "final_model")))  # the MLflow artifact of each network


@dataclass(frozen=True)
class RunState:
    baseline: Optional[str] = None  # model folder of the trained baseline
    baseline_key: Optional[str] = None
    baseline_run_id: Optional[str] = None  # MLflow run that trained it
    sparse: Optional[str] = None  # model folder of the baseline after sparsity-inducing training (sparsify stage)
    layer_ratios: Optional[str] = None  # per-layer rates (YAML) derived by the sensitivity stage
    scores: Optional[str] = None  # scores folder (scores.safetensors + scores.json)
    pruned: Optional[str] = None  # model folder right after pruning
    final: Optional[str] = None  # model folder after fine-tuning (== pruned when finetune.epochs=0)
    quantized: Optional[str] = None  # quantize folder: int8 ONNX files of the final network + quantize.json
    metrics: dict = field(default_factory=dict)
    done: list = field(default_factory=list)  # stages finished, in order (a resumed job skips them)
    # images each training phase's optimiser steps saw (train, between_steps, recovery, teacher), and
    # from_scratch=1 when the final network did not start from the pruned one: `budget_images`
    budget: dict = field(default_factory=dict)
    kept_start: bool = False  # the recovery kept its starting weights: the final network is the pruned one
    val_dice: dict = field(default_factory=dict)  # network -> validation Dice of its kept weights (what recipes are chosen on)

    PATHS = ("baseline", "sparse", "layer_ratios", "scores", "pruned", "final", "quantized")  # a file or folder each
    BUDGET = {"baseline": ("train",), "pruned": ("train", "sparse", "between_steps"),
              "final": ("train", "sparse", "between_steps", "recovery", "teacher")}  # what each network's weights cost
    OPTIONAL_PHASES = ("sparse", "between_steps", "teacher")  # phases a run may not have had (0 images)

    @property
    def to_prune(self) -> Optional[str]:
        """The network the score and prune stages work on: the sparse-trained baseline where there is one."""
        return self.sparse or self.baseline

    def budget_images(self) -> dict[str, int]:
        """network -> the images seen by every training phase behind its weights (one unit for every method:
        teacher passes count as images seen too); a final network trained from scratch counts its own phases
        only. Networks whose cost is not known (a baseline from an older cache) are left out."""
        out = {}
        for network, phases in self.BUDGET.items():
            if network == "final" and self.budget.get("from_scratch"):
                phases = ("recovery", "teacher")
            if all(p in self.budget for p in phases if p not in self.OPTIONAL_PHASES):
                out[network] = int(sum(self.budget.get(p, 0) for p in phases))
        return out

    def save(self, run_dir: Path) -> Path:
        """state.json, with the paths inside `run_dir` relative to it."""
        run_dir = Path(run_dir).resolve()
        raw = asdict(self)
        for name in self.PATHS:
            if raw[name]:
                path = Path(raw[name]).resolve()
                raw[name] = str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)
        return atomic_write(run_dir / "state.json", json.dumps(raw, indent=2))

    @classmethod
    def read(cls, run_dir: Path) -> "RunState":
        """state.json as written (paths as stored); ValueError when it is not a medprune state file."""
        path = Path(run_dir) / "state.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds a {type(raw).__name__}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in known})
        for name in cls.PATHS:
            value = getattr(state, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: {name} is a {type(value).__name__}: expected a path or null")
        return state

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        """state.json of `run_dir`, relative paths resolved against it (absolute ones, of runs written before
        paths were stored relative, as they are)."""
        run_dir = Path(run_dir)
        state = cls.read(run_dir)
        return replace(state, **{n: str(run_dir / getattr(state, n)) for n in cls.PATHS
                                 if getattr(state, n) and not Path(getattr(state, n)).is_absolute()})

    @classmethod
    def load_contained(cls, run_dir: Path) -> "RunState":
        """`load`, refusing (ValueError naming the field) a path that leads outside `run_dir`: a copied, moved
        or edited run folder is scored on its own files, never on files it points to elsewhere."""
        run_dir = Path(run_dir).resolve()
        state = cls.load(run_dir)
        for name in cls.PATHS:
            value = getattr(state, name)
            if value and not Path(value).resolve().is_relative_to(run_dir):
                raise ValueError(f"{run_dir / 'state.json'}: {name}={value} is outside the run folder: expected every "
                                 f"file of the run inside it (an earlier medprune left the baseline in its cache: "
                                 f"evaluate such a run by its MLflow run id)")
        return state


def keep_baseline(state: RunState, run_dir: Path) -> RunState:
    """The baseline (and its sparse-trained form) inside the run folder: a model folder elsewhere (a cache,
    `baseline=<folder>`) is linked in as `<run_dir>/baseline/` (`sparse/`; hard links, copies across file
    systems), so the folder holds every network it names."""
    linked = {}
    for field_name in ("baseline", "sparse"):
        value = getattr(state, field_name)
        if not value:
            continue
        source, run_dir = Path(value).resolve(), Path(run_dir).resolve()
        if source.is_relative_to(run_dir):
            continue
        target = run_dir / field_name
        if target.exists():
            shutil.rmtree(target)
        tmp = run_dir / f".{field_name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in source.iterdir():
            if item.is_file():
                try:
                    os.link(item, tmp / item.name)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(item, tmp / item.name)
        tmp.replace(target)
        linked[field_name] = str(target)
    return replace(state, **linked) if linked else state


class DataSource(Protocol):
    """What the stages use of a run's data (data.SegmentationData; the reader of `dataset._target_`)."""

    in_channels: int
    num_classes: int
    dims: int  # 2: items are images [C, H, W]; 3: volumes, trained on as patches [C, D, H, W]
    regions: Optional[tuple[str, ...]]  # the output channels' names (BraTS regions); None: one foreground class
    challenge: Optional[str]  # whose scoring rules apply ("isic2018": the thresholded Jaccard); None: none

    @property
    def input_size(self) -> tuple[int, ...]: ...  # one network input's spatial size (3D: the training patch)

    def dataset(self, split: str, augment: bool = False) -> Dataset: ...

    def case_spacing(self, case_id: str) -> Optional[tuple[float, ...]]: ...  # voxel spacing in mm; None: pixels

    def image_input(self) -> Optional[ImageInput]: ...  # how an image file becomes an input; None: not image files

    def original_mask(self, split: str, index: int) -> Optional[np.ndarray]: ...  # 2D: the mask at its file's size


@dataclass
class Context:
    """Everything a stage reads besides the state: config, data, device, tracker, folders."""

    cfg: DictConfig
    run_dir: Path
    outputs: Path
    device: torch.device
    data: DataSource
    tracker: Tracker

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One network input, batch 1: an image (2D data), a training patch (3D data: the inference window)."""
        return (1, self.data.in_channels, *self.data.input_size)

    def example_input(self) -> torch.Tensor:
        return torch.randn(self.input_shape)

    def stage_dir(self, name: str) -> Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """The torch device `device=` names; ValueError when it is not usable on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
