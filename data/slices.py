"""A generic reader for 2D image/mask folder pairs (slices exported from volumes, photographs...).

`image_dir/<image_pattern>` is paired with `mask_dir/<mask_pattern>`, where `{id}` in a pattern stands
for the shared part of the names: the COVID-SemiSeg preset is `Imgs/{id}.jpg` with `GT/{id}.png`; the
ISIC layout would be `{id}.jpg` with `{id}_segmentation.png`. Files that match no pattern are ignored
and counted. Images are decoded once, converted to grayscale (`channels: 1`) or RGB (`channels: 3`),
resized to `image_size` and kept in memory (as ISIC: the loader must not be the bottleneck). Masks are
0/255 or 0/1; another encoding is an error naming the file unless `mask_threshold` is set (foreground
is then a value above it).

Slices carry no patient id, so the split is per image unless `group_regex` extracts a group (patient)
from the id, in which case all images of a group go to one split (and, with `folds`, to one fold).
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.base import (
    ArrayDataset, DatasetError, SegmentationData, MaskFiles, binary_mask, check_foreground, format_problems,
)
from data.checks import check_floats, check_int, check_mask_threshold
from data.splits import carve, carve_fold, carve_groups, check_disjoint, group_of
from data.transforms import build_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlicePair:
    case_id: str
    image: Path
    mask: Path


class _Problem(Exception):
    pass


def compile_pattern(pattern: str, key: str) -> re.Pattern:
    if not isinstance(pattern, str) or pattern.count("{id}") != 1 or "/" in pattern:
        raise ValueError(f"{key}={pattern!r} is invalid: expected a file name holding {{id}} once, e.g. '{{id}}.png'")
    head, tail = pattern.split("{id}")
    return re.compile(f"^{re.escape(head)}(?P<id>.+?){re.escape(tail)}$")


def natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class SliceFolders(MaskFiles, SegmentationData):
    """Image/mask folder pairs with a configurable name mapping; one binary mask per image."""

    num_classes = 1

    ROOT_EXPECTED = "the folder holding the image and mask folders"

    def __init__(
        self, *, image_dir: str, mask_dir: str, image_pattern: str, mask_pattern: str, channels: int,
        mask_threshold: Optional[int], group_regex: Optional[str], limit: Optional[int], mean: Sequence[float],
        std: Sequence[float], **common,
    ):
        """The slice reader's own keys; `common` holds every reader's (SegmentationData). Values:
        conf/dataset/slice_folders.yaml (and covid_semiseg.yaml)."""
        super().__init__(**common)
        for key, value in (("image_dir", image_dir), ("mask_dir", mask_dir)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{key}={value!r} is invalid: expected a folder name under root")
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_pattern, self.mask_pattern = image_pattern, mask_pattern
        self._image_re = compile_pattern(image_pattern, "image_pattern")
        compile_pattern(mask_pattern, "mask_pattern")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels={channels!r} is invalid: expected 1 (grayscale) or 3 (RGB)")
        self.in_channels = int(channels)
        self.mask_threshold = check_mask_threshold(mask_threshold)
        try:
            self.group_regex = re.compile(group_regex) if group_regex else None
        except (re.error, TypeError) as err:
            raise ValueError(f"group_regex={group_regex!r} is invalid: {err}") from err
        self.limit = None if limit is None else check_int(limit, "limit", 1)
        self.mean = check_floats(mean, "mean", self.in_channels)
        self.std = check_floats(std, "std", self.in_channels, positive=True)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._transforms: dict[bool, object] = {}

    def _describe(self) -> str:
        folders = [str(f) for f in (None if self.test_only else self.root, self.test_root) if f is not None]
        return f"the slice folders under {' and '.join(folders)}"

    def _scan(self, root: Path) -> tuple[list[SlicePair], int, list[str]]:
        """The pairs of one folder (`_scan_folder`); the entries it passes over are recorded (`_note_ignored`)."""
        pairs, ignored, problems = self._scan_folder(root)
        self._note_ignored(ignored)
        return pairs, len(ignored), problems

    def _scan_folder(self, root: Path) -> tuple[list[SlicePair], list[str], list[str]]:
        """Pairs of one folder in the configured layout: root, or test_root (read the same way)."""
        if not root.is_dir():
            raise DatasetError(
                f"{self._folder_name(root)} {root} does not exist or is not a folder: expected the folder holding "
                f"{self.image_dir}/{self.image_pattern} and {self.mask_dir}/{self.mask_pattern}"
            )
        image_dir, mask_dir = root / self.image_dir, root / self.mask_dir
        for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
            if not folder.is_dir():
                present = sorted(os.listdir(root))[:10]
                raise DatasetError(
                    f"{what} folder {folder} is missing (found in {root}: {', '.join(present) or 'nothing'}): expected "
                    f"{self.image_dir}/{self.image_pattern} with {self.mask_dir}/{self.mask_pattern}"
                )
        pairs, problems, ignored = [], [], []
        mask_names = set(os.listdir(mask_dir))
        used_masks = set()
        for entry in sorted(os.scandir(image_dir), key=lambda e: natural_key(e.name)):
            match = self._image_re.match(entry.name)
            if not match:
                ignored.append(f"{entry.path}: does not match image_pattern {self.image_pattern!r}")
                continue
            if not entry.is_file():
                what = "a folder" if entry.is_dir() else "a dangling symlink" if entry.is_symlink() and not os.path.exists(entry.path) else "not a regular file"
                ignored.append(f"{entry.path}: named like an image but {what}")
                continue
            case_id = match.group("id")
            mask_name = self.mask_pattern.replace("{id}", case_id)
            if mask_name not in mask_names:
                problems.append(f"image {Path(entry.path)} has no mask: expected {mask_dir / mask_name}")
                continue
            used_masks.add(mask_name)
            pairs.append(SlicePair(case_id, Path(entry.path), mask_dir / mask_name))
        ignored += [f"{mask_dir / name}: not the mask of an image read" for name in sorted(mask_names - used_masks)]
        if not pairs and not problems:
            raise DatasetError(
                f"no image matching {self.image_pattern!r} in {image_dir} (found: "
                f"{', '.join(sorted(os.listdir(image_dir))[:5]) or 'nothing'}): expected files named {self.image_pattern}"
            )
        return pairs, ignored, problems

    def _load_image(self, path: Path, draft: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
        """(uint8 [size, size, channels], original (width, height)); raises _Problem. `draft`: a large JPEG is
        decoded at a reduced DCT scale (the splits: faster); else at full scale (`read_image`)."""
        size, mode = self.image_size, "L" if self.in_channels == 1 else "RGB"
        try:
            with Image.open(path) as im:
                original = im.size
                if draft:
                    im.draft(mode, (size, size))
                pixels = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
        except Exception as err:
            raise _Problem(f"image {path} cannot be read ({type(err).__name__}: {err}); expected a complete image file")
        return (pixels[..., None] if pixels.ndim == 2 else pixels), original

    def read_image(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """A new image (no mask) as the splits hold theirs, decoded at full scale (as the logged model's graph is
        given it: the same pixels): (uint8 [S, S, channels], its original (height, width)); a file that cannot be
        read is a DatasetError naming it."""
        try:
            pixels, (width, height) = self._load_image(Path(path), draft=False)
        except _Problem as problem:
            raise DatasetError(str(problem)) from None
        return pixels, (height, width)

    def _load(self, pair: SlicePair) -> tuple[np.ndarray, np.ndarray]:
        size = self.image_size
        image, image_size = self._load_image(pair.image)
        try:
            with Image.open(pair.mask) as m:
                m.load()
                if m.size != image_size:
                    raise _Problem(
                        f"mask {pair.mask} is {m.size[0]}x{m.size[1]} but its image {pair.image} is "
                        f"{image_size[0]}x{image_size[1]}: expected the same size"
                    )
                if m.mode in ("RGB", "RGBA"):
                    rgb = np.asarray(m.convert("RGB"))
                    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                        raise _Problem(f"mask {pair.mask} is {m.mode} with differing channels: expected a single-channel mask")
                gray = np.asarray(m.convert("L") if m.mode != "L" else m)
        except _Problem:
            raise
        except Exception as err:
            raise _Problem(f"mask {pair.mask} cannot be read ({type(err).__name__}: {err}); expected a PNG mask")
        try:
            foreground = binary_mask(gray, pair.mask, self.mask_threshold)
        except ValueError as err:
            raise _Problem(str(err))
        binary = Image.fromarray(foreground.astype(np.uint8) * 255, "L")
        mask = (np.asarray(binary.resize((size, size), Image.BOX)) > 127).astype(np.uint8)
        return image, mask

    def _group(self, case_id: str) -> str:
        return group_of(case_id, self.group_regex)

    def setup(self, seed: int, test_only: bool = False) -> None:
        start = time.perf_counter()
        self._begin_setup(test_only)
        pairs, ignored, problems, found = [], 0, [], 0
        if not test_only:
            pairs, ignored, problems = self._scan(self.root)
            found = len(pairs)
            if self.limit is not None:
                pairs = pairs[: self.limit]
        test_pairs: list[SlicePair] = []
        if self.test_root is not None:  # all of it is the test split; `limit` is for root's pairs
            test_pairs, test_ignored, test_problems = self._scan(self.test_root)
            found += len(test_pairs)
            ignored += test_ignored
            problems += test_problems
            check_disjoint({"train/val": [p.case_id for p in pairs], "test": [p.case_id for p in test_pairs]})
        root_count = len(pairs)
        pairs = pairs + test_pairs
        images = np.empty((len(pairs), self.image_size, self.image_size, self.in_channels), dtype=np.uint8)
        masks = np.empty((len(pairs), self.image_size, self.image_size), dtype=np.uint8)

        def work(index: int) -> Optional[str]:
            try:
                images[index], masks[index] = self._load(pairs[index])
            except _Problem as problem:
                return str(problem)
            return None

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            bar = tqdm(pool.map(work, range(len(pairs))), total=len(pairs), desc=f"slices @{self.image_size}px", unit="img", disable=None, leave=False)
            problems += [r for r in bar if r is not None]
        if problems:
            raise DatasetError(format_problems(problems, self._describe()))
        foreground = masks.reshape(len(masks), -1).mean(axis=1)
        ids = [p.case_id for p in pairs]
        root_ids, test_ids = ids[:root_count], ids[root_count:]
        fractions = {"val": self.val_fraction}
        if self.test_root is None:
            fractions["test"] = self.test_fraction
        if test_only:
            split_ids = {"train": [], "val": []}
        else:
            source = f"{self.root / self.image_dir}" + (f" (limit={self.limit})" if self.limit is not None else "")
            if self.group_regex is None:
                log.warning(
                    "dataset.group_regex is null: %s is split per image, so slices of one patient may sit in both train "
                    "and %s; set dataset.group_regex to split by patient", self.root, "/".join(fractions),
                )
            groups = {i: self._group(i) for i in root_ids} if self.group_regex is not None else None
            if self.folds is not None:  # fold is test, or val beside test_root: the splits `fractions` names
                val_fraction = None if self.test_root is not None else self.val_fraction
                split_ids = carve_fold(root_ids if groups is None else groups, self.folds, self.fold, val_fraction,
                                       self.split_seed, source=source, unit="image/mask pair" if groups is None else "group")
            elif groups is not None:
                split_ids = carve_groups(groups, fractions, self.split_seed, source=source, unit="group")
            else:
                split_ids = carve(root_ids, fractions, self.split_seed, source=source)
        if self.test_root is not None:
            split_ids["test"] = test_ids
        check_disjoint(split_ids)
        position = {case_id: i for i, case_id in enumerate(ids)}
        self._arrays = {}
        self._split_ids = {}
        self._mask_files: dict[str, list[Path]] = {}
        for split in ("train", "val", "test"):
            chosen = sorted(split_ids[split], key=natural_key)
            index = np.array([position[i] for i in chosen], dtype=np.int64)
            self._arrays[split] = (images[index], masks[index])
            self._split_ids[split] = chosen
            self._mask_files[split] = [pairs[position[i]].mask for i in chosen]
        if not test_only:  # a test-only job reads no training split
            check_foreground(self._arrays["train"][1], self._describe())
        self._files = self._test_root_files([f for p in test_pairs for f in (p.image, p.mask)]) if test_pairs else []
        if not test_only:
            self._files += self.relative_sizes([f for p in pairs[:root_count] for f in (p.image, p.mask)], self.root)
        self._transforms = {}
        empty = int((foreground == 0).sum())
        self._stats = {
            "pairs_found": found,
            "pairs_loaded": len(pairs),
            "files_ignored": ignored,
            "n_train": len(self._split_ids["train"]),
            "n_val": len(self._split_ids["val"]),
            "n_test": len(self._split_ids["test"]),
            "empty_masks": empty,
            "foreground_fraction": float(foreground.mean()) if len(foreground) else 0.0,
            "image_size": self.image_size,
            "load_seconds": time.perf_counter() - start,
            "split_by_group": int(self.group_regex is not None),
            **self._test_root_stats(len(test_ids), "pairs"),
        }
        if self.group_regex is not None:
            self._stats["groups"] = len({self._group(i) for i in ids})
        log.info(
            "%s: %d train / %d val / %d test pairs at %dpx (%d files ignored, named in the run's data/ignored_files.txt; %d empty masks)",
            self._describe(), self._stats["n_train"], self._stats["n_val"], self._stats["n_test"], self.image_size, ignored, empty,
        )

    def transform(self, augment: bool = False):
        augment = bool(augment)
        if augment not in self._transforms:
            self._transforms[augment] = build_transform(augment, self.mean, self.std, self.rotate_limit, self.hflip_p)
        return self._transforms[augment]

    def dataset(self, split: str, augment: bool = False) -> ArrayDataset:
        self._check_read(split)
        images, masks = self._arrays[split]
        return ArrayDataset(images, masks, self._split_ids[split], self.transform(augment))
