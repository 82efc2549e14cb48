"""What the pipeline needs from a dataset, whatever the modality.

Every dataset reads and checks all of its files in `setup()`, so that a bad file fails a run before any
training starts, and keeps the preprocessed arrays in memory, so that `__getitem__` only augments and
normalises (the loader must never be the bottleneck of a training or latency benchmark).
"""
from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")

# (image as stored, mask as stored) -> (image float32 [C,H,W], mask float32 [K,H,W] in {0,1})
PairTransform = Callable[[np.ndarray, np.ndarray], "tuple[torch.Tensor, torch.Tensor]"]


class DatasetError(ValueError):
    """Bad input data; the message names the file/folder and what was expected."""


class ArrayDataset(Dataset):
    """Items of a split held as one array per kind.

    One contiguous array (not a list of small ones) keeps DataLoader workers that fork from copying
    the whole dataset as they touch reference counts.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: Sequence[str], transform: PairTransform):
        if len(images) != len(masks) or len(images) != len(ids):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(ids)} ids: expected equal counts")
        self.images = images
        self.masks = masks
        self.ids: list[str] = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index], self.masks[index])


class SegmentationData(abc.ABC):
    """A dataset with fixed train/val/test splits, read once by `setup(seed)`."""

    in_channels: int
    num_classes: int
    image_size: int

    def __init__(self) -> None:
        self._split_ids: Optional[dict[str, list[str]]] = None
        self._stats: dict[str, float] = {}

    @abc.abstractmethod
    def setup(self, seed: int) -> None:
        """Reads and validates every file, then fixes the splits (`seed` picks carved splits)."""

    @abc.abstractmethod
    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """Items are (image [C,H,W] float32, mask [num_classes,H,W] float32 in {0,1}); ids in `.ids`."""

    def split_ids(self) -> dict[str, list[str]]:
        """Case ids per split, saved with the run so that a result can be traced to its test cases."""
        self._require_setup()
        return {name: list(ids) for name, ids in self._split_ids.items()}

    def stats(self) -> dict[str, float]:
        """Numbers worth logging with the run (counts of pairs, ignored files, load time...)."""
        self._require_setup()
        return {key: float(value) for key, value in self._stats.items()}

    def _require_setup(self) -> None:
        if self._split_ids is None:
            raise RuntimeError(f"{type(self).__name__}.setup(seed) must be called first")

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
