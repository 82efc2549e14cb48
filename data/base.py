"""What the pipeline needs from a dataset, whatever the modality.

Every dataset reads and checks all of its files in `setup()`, so that a bad file fails a run before any
training starts, and keeps the preprocessed arrays in memory, so that `__getitem__` only augments and
normalises (the loader must never be the bottleneck of a training or latency benchmark).
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data.checks import check_fraction, check_int, check_number

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The largest image_size (pixels a side) a reader accepts: readers hold every resized image in memory, and
# 100000 a side asked for 838 GiB before a range said no. 4096 is beyond any segmentation network's input.
MAX_IMAGE_SIZE = 4096
# Files read from `test_root` are named `<TEST_ROOT_PREFIX><path relative to test_root>` in the content digest.
TEST_ROOT_PREFIX = "test_root:"

# (image as stored, mask as stored) -> (image float32 [C,H,W], mask float32 [K,H,W] in {0,1})
PairTransform = Callable[[np.ndarray, np.ndarray], "tuple[torch.Tensor, torch.Tensor]"]


class DatasetError(ValueError):
    """Bad input data; the message names the file/folder and what was expected."""


def binary_mask(gray: np.ndarray, path, threshold: Optional[int]) -> np.ndarray:
    """A mask as stored (uint8, HxW) -> bool foreground.

    Without `threshold` only the documented encodings pass: {0,255} (the challenges' PNGs) or {0,1}
    (label maps); anything else (e.g. 100/200, or JPEG-compressed masks) is a ValueError naming the
    file and the values found, because guessing would silently read a lesion as empty or as everything.
    With `threshold` (dataset.mask_threshold), foreground is value > threshold.
    """
    present = np.flatnonzero(np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256))
    if threshold is not None:
        return gray > threshold
    values = set(present.tolist())
    if values <= {0, 255}:
        return gray == 255
    if values <= {0, 1}:
        return gray == 1
    shown = ", ".join(str(v) for v in present[:8]) + (f", ... ({len(present)} values)" if len(present) > 8 else "")
    raise ValueError(
        f"mask {path} has values {{{shown}}}: expected 0/255 or 0/1; for another encoding set "
        f"dataset.mask_threshold (foreground = value > threshold)"
    )


MAX_PROBLEMS_SHOWN = 20
IGNORED_SHOWN = 5  # ignored entries named in the warning (the run's data/ignored_files.txt lists all)


def read_mask(path: Path, threshold: Optional[int]) -> np.ndarray:
    """A mask file at its own resolution -> bool [1, H, W] (the encoding rules of `binary_mask`)."""
    from PIL import Image

    with Image.open(path) as m:
        gray = np.asarray(m if m.mode == "L" else m.convert("L"))
    return binary_mask(gray, path, threshold)[None]


def format_problems(problems: Sequence[str], where: str) -> str:
    """Every bad file at once (the first MAX_PROBLEMS_SHOWN), so that one run finds them all."""
    shown = "\n  - ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return f"{len(problems)} problem(s) in {where}:\n  - {shown}{more}"


def check_foreground(masks: np.ndarray, where: str) -> None:
    """A training split without a single foreground pixel cannot teach anything: an error, not a warning."""
    if not len(masks) or not np.asarray(masks).any():
        raise DatasetError(
            f"the training split of {where} has no foreground pixel in any of its {len(masks)} mask(s): "
            f"expected some lesion/tumour/infection to learn (check the masks and dataset.mask_threshold)"
        )


class ArrayDataset(Dataset):
    """Items of a split held as one array per kind.

    One contiguous array (not a list of small ones) keeps DataLoader workers that fork from copying
    the whole dataset as they touch reference counts. The arrays may be memory-mapped (a slice cache).

    `rows` (optional) picks the items of this split out of larger arrays (item i is row `rows[i]`), so
    a split of a memory-mapped cache needs no copy. `cases` (optional, volumetric data) is the case id of
    each item, aligned with `ids`: the items of one case are contiguous and in ascending slice order, so
    that predictions can be stacked back into a volume per case. None for 2D data.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        ids: Sequence[str],
        transform: PairTransform,
        cases: Optional[Sequence[str]] = None,
        rows: Optional[np.ndarray] = None,
    ):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images and {len(masks)} masks: expected equal counts")
        n = len(images) if rows is None else len(rows)
        if n != len(ids):
            raise ValueError(f"{n} items and {len(ids)} ids: expected equal counts")
        if cases is not None and len(cases) != n:
            raise ValueError(f"{n} items and {len(cases)} case ids: expected one case id per item")
        if rows is not None and len(rows) and (int(np.min(rows)) < 0 or int(np.max(rows)) >= len(images)):
            raise ValueError(f"rows must index the {len(images)} stored items")
        self.images = images
        self.masks = masks
        self.ids: list[str] = list(ids)
        self.cases: Optional[list[str]] = None if cases is None else list(cases)
        self.rows: Optional[np.ndarray] = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index if self.rows is None else int(self.rows[index])

    def reseed(self, seed: int) -> None:
        """Reseeds the augmentation (the training loop does at every epoch; data/transforms.py)."""
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._row(index)
        return self.transform(self.images[row], self.masks[row])


@dataclass(frozen=True)
class ImageInput:
    """How a 2D image reader turns an image file's pixels (uint8, channels last, any size) into a network input:
    resized to `size` x `size` with PIL's bilinear filter, then albumentations' Normalize(mean, std). What a
    deployed graph repeats (pipeline/deploy_graph.py)."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class MaskFiles:
    """For a 2D reader of image and mask files (ISIC, slice folders), which keeps each split's mask files
    (`_mask_files`, read with its `mask_threshold`): a mask at its image's original resolution
    (SegmentationData.original_mask), and how an image file becomes a network input (`image_input`)."""

    _mask_files: dict[str, list[Path]]
    mask_threshold: Optional[int]
    in_channels: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def image_input(self) -> ImageInput:
        return ImageInput(int(self.image_size), int(self.in_channels), tuple(map(float, self.mean)), tuple(map(float, self.std)))

    def original_mask(self, split: str, index: int) -> np.ndarray:
        self._check_read(split)
        return read_mask(self._mask_files[split][index], self.mask_threshold)


def check_folds(folds, fold) -> tuple[Optional[int], int]:
    """(folds, fold) of k-fold cross-validation: folds null (the fractions' split) or an integer >= 2, and
    fold in [0, folds). With folds null, fold must be 0, so that a fold set without folds is caught."""
    if folds is None:
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold != 0:
            raise ValueError(f"fold={fold!r} is invalid: expected 0 while folds is null (set dataset.folds to "
                             f"cross-validate)")
        return None, 0
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds={folds!r} is invalid: expected null or an integer >= 2")
    return int(folds), check_int(fold, "fold", 0, int(folds) - 1)


class SegmentationData(abc.ABC):
    """A dataset with fixed train/val/test splits, read once by `setup(seed)`.

    The constructor takes the keys every reader has (checked here once); a reader adds its own keys and
    passes these on (`**common`). Values: the reader's YAML in conf/dataset/ (no defaults in code)."""

    in_channels: int
    num_classes: int
    image_size: int
    dims = 2  # 2: items are images [C, H, W]; 3: volumes and patches [C, D, H, W] (data/volumes3d.py)
    regions: Optional[tuple[str, ...]] = None  # the output channels' names (BraTS regions); None: one foreground
    challenge: Optional[str] = None  # the challenge whose scoring rules apply to the data (ISIC 2018's thresholded Jaccard)
    # Constructor keys that change where or how fast the data is read, never what a network trains on
    # (the content is keyed by `content_digest`): left out of the baseline cache key.
    SERVING_KEYS: tuple[str, ...] = ("root", "test_root", "workers")

    ROOT_EXPECTED = "the dataset folder"  # what `root` must hold, for the error when it is not set

    def __init__(
        self, *, root: Optional[str], test_root: Optional[str], image_size: int, val_fraction: float, test_fraction: float,
        split_seed: int, folds: Optional[int], fold: int, rotate_limit: float, hflip_p: float, workers: int,
    ) -> None:
        self.test_root = None if test_root is None or str(test_root).strip() == "" else Path(str(test_root)).expanduser()
        if root is None or str(root).strip() == "":
            if self.test_root is None:  # an evaluate-only job may leave root unset: it reads test_root alone
                raise ValueError(f"root is not set: expected {self.ROOT_EXPECTED}")
            self.root: Optional[Path] = None
        else:
            self.root = Path(str(root)).expanduser()
        if self.root is not None and self.test_root is not None and self.root.absolute() == self.test_root.absolute():
            raise ValueError(f"test_root={str(test_root)!r} is root itself: expected a separate folder holding only the test set")
        self.image_size = check_int(image_size, "image_size", 8, MAX_IMAGE_SIZE)
        self.val_fraction = check_fraction(val_fraction, "val_fraction")
        self.test_fraction = check_fraction(test_fraction, "test_fraction")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} is invalid: "
                f"expected < 1 so that training keeps some cases"
            )
        self.split_seed = check_int(split_seed, "split_seed", 0)
        self.folds, self.fold = check_folds(folds, fold)
        self.rotate_limit = check_number(rotate_limit, "rotate_limit", 0.0, 180.0)
        self.hflip_p = check_number(hflip_p, "hflip_p", 0.0, 1.0)
        self.workers = check_int(workers, "workers", 1)
        self.test_only = False
        self._split_ids: Optional[dict[str, list[str]]] = None
        self._stats: dict[str, float] = {}
        self._files: list[tuple[str, int]] = []  # (path relative to the root, size) of every file read
        self._ignored: list[str] = []  # "<path>: <why>" of every entry a scan passed over (ignored_files)

    @property
    def input_size(self) -> tuple[int, ...]:
        """The spatial size of one network input (an image here; a patch for 3D readers)."""
        return (self.image_size, self.image_size)

    def content_digest(self) -> str:
        """sha256 of what the data is: each split's case ids and every file read, by its path relative to
        the dataset root (files of `test_root` relative to it, under TEST_ROOT_PREFIX) and its size. A moved
        or copied dataset keeps its digest; an added, removed or rewritten file (of another size) changes it.
        Keys the baseline cache (pipeline/baseline.py). In a test-only setup it is the test set's digest."""
        self._require_setup()
        payload = {"splits": self.split_ids(), "files": sorted([str(p), int(n)] for p, n in self._files)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def relative_sizes(paths: Iterable[Path], root: Path) -> list[tuple[str, int]]:
        """(path relative to `root`, size in bytes) for each file."""
        out = []
        for path in paths:
            path = Path(path)
            try:
                rel = str(path.relative_to(root))
            except ValueError:
                rel = str(path)
            out.append((rel, os.stat(path).st_size))
        return out

    @abc.abstractmethod
    def setup(self, seed: int, test_only: bool = False) -> None:
        """Reads and validates every file, then fixes the splits (`seed` picks carved splits).

        `test_only` (an evaluate-only job): reads `test_root` alone, never `root`; the train and val splits
        are then empty and `dataset("train"/"val")` is an error."""

    # -- test_root ------------------------------------------------------------------------------------

    def _begin_setup(self, test_only: bool) -> None:
        """Checks the mode of this setup against the keys, before any file is read; says where the test
        split comes from."""
        if not isinstance(test_only, bool):
            raise TypeError(f"test_only={test_only!r}: expected True or False")
        if test_only and self.test_root is None:
            raise DatasetError(
                "dataset.test_root is not set: an evaluate-only (test-only) job needs the folder holding the test set"
            )
        if not test_only and self.root is None:
            raise DatasetError(
                f"dataset.root is not set: expected {self.ROOT_EXPECTED} (only an evaluate-only job, reading "
                f"dataset.test_root alone, may leave it unset)"
            )
        self.test_only = test_only
        self._split_ids = None
        self._ignored = []
        if test_only:
            return
        if self.test_root is not None and self.folds is not None:
            log.info("dataset.test_root is set: the test split is all of %s; %s provides train and val "
                     "(dataset.folds=%d: fold %d is val, the other folds train; val_fraction and test_fraction are "
                     "not used)", self.test_root, self.root, self.folds, self.fold)
        elif self.test_root is not None:
            log.info("dataset.test_root is set: the test split is all of %s; %s provides train and val "
                     "(val_fraction=%g; test_fraction is not used)", self.test_root, self.root, self.val_fraction)
        elif self.folds is not None:
            log.info("dataset.folds=%d: fold %d of %s (split_seed=%d) is the test split, val is carved from the other "
                     "folds (val_fraction=%g; test_fraction is not used)", self.folds, self.fold, self.root,
                     self.split_seed, self.val_fraction)

    def _folder_name(self, folder: Path) -> str:
        """How an error names a folder read: "dataset root" or "dataset.test_root"."""
        return "dataset.test_root" if self.test_root is not None and folder == self.test_root else "dataset root"

    def _test_root_files(self, paths: Iterable[Path]) -> list[tuple[str, int]]:
        """`relative_sizes` of files under test_root, named apart from root's files of the same path."""
        return [(f"{TEST_ROOT_PREFIX}{rel}", size) for rel, size in self.relative_sizes(paths, self.test_root)]

    def _test_root_stats(self, n_cases: int, unit: str = "cases") -> dict[str, float]:
        """Where the test split came from, for the logged data parameters; logs it once."""
        if self.test_root is not None:
            log.info("test split: all %d %s of %s", n_cases, unit, self.test_root)
        return {"test_from_test_root": int(self.test_root is not None), "test_only": int(self.test_only)}

    def _check_read(self, split: str) -> None:
        """A test-only setup read no train/val data: asking for it is an error, not an empty split."""
        self._check_split(split)
        self._require_setup()
        if self.test_only and split != "test":
            raise DatasetError(
                f"the {split} split was not read (test-only job): setup(seed, test_only=True) reads only "
                f"dataset.test_root ({self.test_root})"
            )

    @abc.abstractmethod
    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """Items are (image [C,H,W] float32, mask [num_classes,H,W] float32 in {0,1}); ids in `.ids`."""

    def transform(self, augment: bool = False) -> PairTransform:
        """The per-item transform `dataset(split, augment)` applies: normalisation, augmentation when `augment`."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its item transform")

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """One image as the reader stores its items (H x W x C, at image_size) -> the network's input [C, H, W],
        exactly as `dataset(split)` serves a test item: how `pipeline.predict` prepares new data."""
        return self.transform(augment=False)(image, np.zeros(np.shape(image)[:2], np.uint8))[0]

    def image_input(self) -> Optional[ImageInput]:
        """How an image file becomes a network input, for readers of image files (MaskFiles); None: the reader's
        items are not images as a file holds them (volumes, CT crops)."""
        return None

    def case_spacing(self, case_id: str) -> Optional[tuple[float, ...]]:
        """A case's voxel spacing in mm (volumes read from NIfTI); None: distances are in pixels."""
        return None

    def original_mask(self, split: str, index: int) -> Optional[np.ndarray]:
        """The `index`-th item's true mask at the image's original resolution (bool [K, H, W]), for scoring as
        the challenges do (predictions resized back); None where the reader serves no such thing (volumes,
        scored on their served grid). 2D readers re-read the mask file, checked when the data was set up."""
        return None

    def ignored_files(self) -> list[str]:
        """Every file or folder the last setup passed over, as "<path>: <why>" (the run logs them as an artifact,
        data/ignored_files.txt): a licence file, a mask without its image, an image name that is a folder or a
        dangling symlink."""
        return list(self._ignored)

    def _note_ignored(self, entries: Iterable[str]) -> None:
        """Records what a scan passed over, and names the first few in one WARNING: a count alone hides a
        dangling symlink or a folder where an image should be."""
        entries = list(entries)
        self._ignored += entries
        if entries:
            shown = "; ".join(entries[:IGNORED_SHOWN]) + (f"; ... ({len(entries) - IGNORED_SHOWN} more)"
                                                           if len(entries) > IGNORED_SHOWN else "")
            log.warning("%d entr%s ignored: %s (a run lists them all in its data/ignored_files.txt)", len(entries),
                        "y" if len(entries) == 1 else "ies", shown)

    def split_ids(self) -> dict[str, list[str]]:
        """Case ids per split, saved with the run so that a result can be traced to its test cases."""
        self._require_setup()
        return {name: list(ids) for name, ids in self._split_ids.items()}

    def stats(self) -> dict[str, float]:
        """Numbers worth logging with the run (counts of pairs, ignored files, load time...), with the fold
        (`folds` 0 without cross-validation) so that runs can be grouped by fold."""
        self._require_setup()
        return {**{key: float(value) for key, value in self._stats.items()},
                "folds": float(self.folds or 0), "fold": float(self.fold)}

    def _require_setup(self) -> None:
        if self._split_ids is None:
            raise RuntimeError(f"{type(self).__name__}.setup(seed) must be called first")

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
