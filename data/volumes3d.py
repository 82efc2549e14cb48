"""The 3D path: a volumetric reader's cases served as whole volumes and as random training patches.

A 3D reader (`BraTS3D`, `CovidCT3D`) is its 2D reader with this mixin first in its bases: reading, checking,
preprocessing, the memory-mapped slice cache and the patient splits are the 2D reader's, unchanged (so a 2D
and a 3D run over the same files share one cache). What changes is serving:

- the stored slices of a case, stacked in slice order, are its volume [D, H, W, C] on the served grid
  (in-plane resized to `image_size`, native slice spacing; `case_spacing` gives the mm per voxel). Where the
  slices of a case are contiguous the volume is a view of the memory map (no copy). A slice the 2D reader
  dropped inside a case's range is filled with zeros when the reader says its dropped slices are exactly that
  (`GAPS_ARE_ZERO`: BraTS drops slices with neither brain nor tumour, which its preprocessing zeroed); otherwise
  the stored slices are stacked as they are and the missing ones are counted (`slices_missing_3d`) and logged;
- `dataset("train")` serves `patches_per_case` random patches of `patch_size` cubed per case and epoch.
  `foreground_fraction` of them (nnU-Net: a third) are centred on a random target voxel, the others anywhere;
  a volume smaller than the patch is padded with zeros. With `augment`, MONAI's random flips (`hflip_p` per
  axis) and affine (rotation up to `rotate_limit` degrees about each axis, scaling by up to `scale_limit`, with
  probability `affine_p`; labels nearest-neighbour) follow;
- `dataset("val"/"test")` serves whole volumes, one item per case (ids are the case ids), with the `window`
  that sliding-window inference tiles them with (pipeline/inference.py: `SlidingWindow`), `window_batch`
  windows per forward pass.

Patches are drawn by hand rather than with MONAI's RandCropByPosNegLabeld: that transform finds the
foreground of the whole label volume on every call; here each case's target voxels are found once and a
patch reads only its own block of the memory map.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data.checks import check_int, check_number
from data.volumes import LabelTarget, VolumeSliceData

log = logging.getLogger(__name__)

MAX_FOREGROUND_COORDS = 20000  # target voxels kept per case to centre patches on (a uniform subsample)


@dataclass(frozen=True)
class Window:
    """How whole volumes are tiled for inference: cubes of `size` overlapping by `overlap`, blended with a
    Gaussian weight (MONAI's sliding_window_inference, mode='gaussian'), `batch` windows per forward pass."""

    size: tuple[int, int, int]
    overlap: float
    batch: int = 1


@dataclass
class CaseVolume:
    """One case on the served grid: image [D, H, W, C] (float16/uint8, possibly a memory map), labels [D, H, W]
    uint8 as stored, and the (z, y, x) coordinates of (up to MAX_FOREGROUND_COORDS of) its target voxels."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray  # [n, 3] int32


class VolumeTransform:
    """Stored volume block [D, H, W, C] + labels [D, H, W] -> (image [C, D, H, W] float32, target [K, D, H, W]):
    normalisation of uint8 data (mean / std of x / 255), the target channels, and (with `augment`) MONAI's
    random flips and affine, drawn from a generator seeded per item."""

    def __init__(self, target: LabelTarget, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                 augment: bool, hflip_p: float = 0.0, rotate_limit: float = 0.0, scale_limit: float = 0.0,
                 affine_p: float = 0.0):
        self.target = target
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(-1, 1, 1, 1)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(-1, 1, 1, 1)
        self.augment = None
        if augment:
            from monai.transforms import Compose, RandAffined, RandFlipd

            steps = [RandFlipd(keys=("image", "label"), prob=hflip_p, spatial_axis=axis) for axis in range(3)] if hflip_p > 0 else []
            if affine_p > 0 and (rotate_limit > 0 or scale_limit > 0):
                angle = math.radians(rotate_limit)
                steps.append(RandAffined(
                    keys=("image", "label"), prob=affine_p, rotate_range=(angle,) * 3, scale_range=(scale_limit,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"))
            self.augment = Compose(steps) if steps else None

    def __call__(self, image: np.ndarray, labels: np.ndarray, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.moveaxis(np.asarray(image), -1, 0).astype(np.float32)
        if self.mean is not None:
            x = (x / 255.0 - self.mean) / self.std
        y = self.target(labels)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(seed or 0) % 2**32)
            out = self.augment({"image": torch.from_numpy(x), "label": torch.from_numpy(y)})
            return plain(out["image"]), plain(out["label"])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def plain(tensor) -> torch.Tensor:
    """A MONAI MetaTensor (what its transforms return) as the plain float32 tensor a DataLoader batches."""
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
    return tensor.float().contiguous()


def fill_gaps(stored: np.ndarray, slices: Sequence[int]) -> np.ndarray:
    """Slices [n, ...] stored at the ascending axial indices `slices` -> the volume they span, [last - first + 1, ...],
    a slice missing between them zeros."""
    slices = np.asarray(slices)
    volume = np.zeros((int(slices[-1] - slices[0]) + 1, *stored.shape[1:]), stored.dtype)
    volume[slices - slices[0]] = stored
    return volume


def patch_start(center: int, size: int, extent: int) -> int:
    """The first index of a `size` window centred on `center`, kept inside [0, extent) where it fits."""
    return int(min(max(center - size // 2, 0), max(extent - size, 0)))


def crop(array: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """A `size`-cube block of `array` [D, H, W, ...] from `start`, zero-padded (at the end) where the array is smaller."""
    block = array[start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size]
    if block.shape[:3] == (size, size, size):
        return np.asarray(block)
    pad = [(0, size - n) for n in block.shape[:3]] + [(0, 0)] * (array.ndim - 3)
    return np.pad(np.asarray(block), pad)


class PatchDataset(Dataset):
    """`patches_per_case` random patches per case (item i is from case i % cases), a `foreground_fraction` of each
    case's centred on its target, each drawn from a generator seeded by (seed, i): an epoch's patches depend only
    on its seed (`reseed`, called by the training loop per epoch)."""

    def __init__(self, volumes: list[CaseVolume], size: int, patches_per_case: int, foreground_fraction: float,
                 transform: VolumeTransform, seed: int = 0):
        self.volumes, self.size, self.transform = volumes, int(size), transform
        self.foreground_fraction = float(foreground_fraction)
        self.ids = [f"{v.case_id}#{k}" for k in range(patches_per_case) for v in volumes]
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)

    def centred_on_foreground(self, index: int) -> bool:
        """Of each case's patches (item index // cases is the patch's number within its case), floor(count x
        foreground_fraction), spread evenly, are centred on the target: every case gets its share."""
        f, k = self.foreground_fraction, index // len(self.volumes)
        return math.floor((k + 1) * f) > math.floor(k * f)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        volume = self.volumes[index % len(self.volumes)]
        rng = np.random.default_rng([self.seed, index])
        shape = volume.labels.shape
        if self.centred_on_foreground(index) and len(volume.foreground):
            center = volume.foreground[rng.integers(len(volume.foreground))]
        else:
            center = [rng.integers(n) for n in shape]
        start = [patch_start(int(c), self.size, n) for c, n in zip(center, shape)]
        return self.transform(crop(volume.image, start, self.size), crop(volume.labels, start, self.size),
                              seed=int(rng.integers(2**31)))


class VolumeDataset(Dataset):
    """Whole volumes, one item per case (ids: the case ids), to be inferred tile by tile with `window`."""

    def __init__(self, volumes: list[CaseVolume], transform: VolumeTransform, window: Window):
        self.volumes, self.transform, self.window = volumes, transform, window
        self.ids = [v.case_id for v in volumes]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.volumes[index]
        return self.transform(volume.image, volume.labels)


class Volume3D:
    """Mixin for a volumetric reader (data.volumes.VolumeSliceData): serves its cases in 3D (module docstring).
    Its own keys: conf/dataset/brats3d.yaml and covid_ct3d.yaml."""

    dims = 3
    GAPS_ARE_ZERO = False
    # how many windows a forward pass takes changes inference speed, never what a network trains on
    SERVING_KEYS = VolumeSliceData.SERVING_KEYS + ("window_batch",)

    def __init__(self, *, patch_size: int, patches_per_case: int, foreground_fraction: float, scale_limit: float,
                 affine_p: float, window_overlap: float, window_batch: int, **reader):
        super().__init__(**reader)
        self.patch_size = check_int(patch_size, "patch_size", 8, 512)  # 512 cubed float32 is 512 MiB a channel
        self.patches_per_case = check_int(patches_per_case, "patches_per_case", 1)
        self.foreground_fraction = check_number(foreground_fraction, "foreground_fraction", 0.0, 1.0)
        self.scale_limit = check_number(scale_limit, "scale_limit", 0.0, 0.9)
        self.affine_p = check_number(affine_p, "affine_p", 0.0, 1.0)
        self.window_overlap = check_number(window_overlap, "window_overlap", 0.0, 0.95)
        self.window_batch = check_int(window_batch, "window_batch", 1)
        self._volumes: dict[str, list[CaseVolume]] = {}

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The network's input: one training patch (also the inference window)."""
        return (self.patch_size,) * 3

    @property
    def window(self) -> Window:
        return Window((self.patch_size,) * 3, self.window_overlap, self.window_batch)

    def setup(self, seed: int, test_only: bool = False) -> None:
        super().setup(seed, test_only=test_only)
        self._volumes = {}
        missing = 0
        for split in ("train", "val", "test"):
            if test_only and split != "test":
                continue
            self._volumes[split], gaps = self._split_volumes(split)
            missing += gaps
        self._stats["slices_missing_3d"] = missing
        self._stats["patches_train"] = len(self._volumes.get("train", [])) * self.patches_per_case
        # n_* count what the loaders serve, as for 2D data: patches per training epoch and whole volumes for
        # validation and test (the stored 2D slices stay counted in slices_*)
        self._stats.update(n_train=self._stats["patches_train"], n_val=len(self._volumes.get("val", [])),
                           n_test=len(self._volumes.get("test", [])))
        shapes = [v.labels.shape for vs in self._volumes.values() for v in vs]
        self._stats["volume_voxels_mean"] = float(np.mean([np.prod(s) for s in shapes]))
        if missing:
            log.warning("%s (3D): %d slice(s) dropped by preprocessing inside the cases' slice ranges are missing from "
                        "their volumes (stacked without them)", self.kind, missing)
        log.info("%s (3D): volumes of %s voxels (first case), patches of %d^3, %d per training case and epoch, %.0f%% "
                 "centred on the target; %d/%d/%d train patches / val / test volumes", self.kind,
                 "x".join(map(str, shapes[0])) if shapes else "?", self.patch_size, self.patches_per_case,
                 100 * self.foreground_fraction, self._stats["n_train"], self._stats["n_val"], self._stats["n_test"])

    def _split_volumes(self, split: str) -> tuple[list[CaseVolume], int]:
        cached = self._source[split]
        by_id = {c["id"]: c for c in cached.meta["cases"]}
        union = sorted({v for values in self._target_values() for v in values})
        volumes, gaps = [], 0
        for case_id in self._split_ids[split]:
            entry = by_id[case_id]
            start, stop = entry["start"], entry["stop"]
            slices = cached.slice[start:stop]
            image, labels = cached.images[start:stop], cached.labels[start:stop]
            span = int(slices[-1] - slices[0] + 1)
            if span != len(slices):
                if self.GAPS_ARE_ZERO:
                    image, labels = fill_gaps(image, slices), fill_gaps(labels, slices)
                else:
                    gaps += span - len(slices)
            foreground = np.argwhere(np.isin(np.asarray(labels), union)).astype(np.int32)
            if len(foreground) > MAX_FOREGROUND_COORDS:
                pick = np.random.default_rng([self.split_seed, len(foreground)]).choice(len(foreground), MAX_FOREGROUND_COORDS, replace=False)
                foreground = foreground[np.sort(pick)]
            volumes.append(CaseVolume(case_id, image, labels, foreground))
        return volumes, gaps

    def transform(self, augment: bool = False) -> VolumeTransform:
        augment = bool(augment)
        if augment not in self._transforms:
            mean, std = self._normalisation()
            self._transforms[augment] = VolumeTransform(
                LabelTarget(self._target_values()), mean, std, augment, hflip_p=self.hflip_p,
                rotate_limit=self.rotate_limit, scale_limit=self.scale_limit, affine_p=self.affine_p)
        return self._transforms[augment]

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """train: random patches (augmented when `augment`); val / test: whole volumes with `window`."""
        self._check_read(split)
        volumes = self._volumes[split]
        if split == "train":
            return PatchDataset(volumes, self.patch_size, self.patches_per_case, self.foreground_fraction,
                                self.transform(augment))
        return VolumeDataset(volumes, self.transform(False), self.window)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}: predicting new volumes with a 3D network is not supported yet")
