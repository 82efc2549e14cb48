"""Training checkpoints: everything `training.fit` needs to continue an interrupted run exactly.

A checkpoint is one safetensors file of every tensor (model, best weights so far, optimizer state)
plus `checkpoint.json` with the rest (epoch, history, best Dice, scheduler, scaler and optimizer
settings) and the tensor file's sha256. Nothing is pickled. Writing is atomic: the new tensor file is
written under a new name, then `checkpoint.json` is replaced in one rename, then the old tensor file is
removed, so a kill at any moment leaves the previous checkpoint or the new one, never a mix.

Random state is not stored: `fit` reseeds every RNG at the start of each epoch from (seed, epoch)
(`epoch_seed`), so epoch k draws the same shuffles, augmentations and dropout masks whether or not
the run was interrupted before it; that also holds for DataLoader worker processes, whose generators
a saved main-process state would not capture.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data.files import atomic_write
from models.io import ModelFileError, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

FORMAT = "medprune-checkpoint/1"
META = "checkpoint.json"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch` of a run seeded with `seed` (independent streams per epoch)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)[0])


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict -> JSON-able structure with tensors replaced by references into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


class Checkpoint:
    """The checkpoint folder of one training run (`fit`)."""

    def __init__(self, folder, every: int):
        self.folder = Path(folder)
        self.every = int(every)

    def due(self, epoch: int, last: int) -> bool:
        return self.every > 0 and (epoch % self.every == 0 or epoch == last)

    def save(self, epoch: int, parts: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        structure = _split(parts, "", tensors)
        name = f"epoch-{epoch:05d}.safetensors"
        digest = save_tensors(tensors, self.folder / name)
        meta = {"format": FORMAT, "epoch": epoch, "file": name, "sha256": digest, "state": structure}
        atomic_write(self.folder / META, json.dumps(meta))
        for old in self.folder.glob("epoch-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self) -> Optional[tuple[int, dict[str, Any]]]:
        """(epoch, parts) of the last checkpoint, or None when there is none; a damaged one is an error."""
        path = self.folder / META
        if not path.exists():
            return None
        meta = read_json(path, "checkpoint")
        if meta.get("format") != FORMAT or not isinstance(meta.get("file"), str) or "/" in meta["file"]:
            raise ModelFileError(f"checkpoint {path}: not a {FORMAT} file")
        tensors = load_tensors(self.folder / meta["file"], meta.get("sha256"), "checkpoint")
        return int(meta["epoch"]), _join(meta["state"], tensors)
