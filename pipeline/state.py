"""The small explicit state passed from stage to stage, and what every stage may use.

Stages hand each other *folders*, not objects: each stage persists its output (a model folder, a
scores folder, metrics) and records the path here, and `state.json` in the run folder is rewritten
after every stage. A later job can therefore start at any stage from an earlier run's state.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from data.files import atomic_write
from pipeline.tracking import Tracker


@dataclass(frozen=True)
class RunState:
    baseline: Optional[str] = None  # model folder of the trained baseline
    baseline_key: Optional[str] = None
    baseline_run_id: Optional[str] = None  # MLflow run that trained it
    layer_ratios: Optional[str] = None  # per-layer rates (YAML) derived by the sensitivity stage
    scores: Optional[str] = None  # scores folder (scores.safetensors + scores.json)
    pruned: Optional[str] = None  # model folder right after pruning
    final: Optional[str] = None  # model folder after fine-tuning (== pruned when finetune.epochs=0)
    quantized: Optional[str] = None  # quantize folder: int8 ONNX files of the final network + quantize.json
    metrics: dict = field(default_factory=dict)
    done: list = field(default_factory=list)  # stages finished, in order (a resumed job skips them)

    def save(self, run_dir: Path) -> Path:
        return atomic_write(Path(run_dir) / "state.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        raw = json.loads((Path(run_dir) / "state.json").read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class Context:
    """Everything a stage reads besides the state: config, data, device, tracker, folders."""

    cfg: DictConfig
    run_dir: Path
    outputs: Path
    device: torch.device
    data: object  # data.SegmentationData
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
