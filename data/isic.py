"""ISIC 2018 Task 1 (lesion boundary segmentation), read from the official folder layout.

Full-size dermoscopy JPEGs (up to 3072x2304) are decoded once, at reduced scale (JPEG draft mode),
resized to `image_size` and kept in memory; decoding them per item would make the loader, not the
model, the bottleneck of every epoch and benchmark. Every file is checked while loading, and all
problems are reported together in one DatasetError before any training starts.
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
from data.splits import carve, carve_fold, check_disjoint
from data.transforms import build_transform

log = logging.getLogger(__name__)

TRAIN_DIRS = ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth")
# Official held-out folders: used as the val/test split when they are there with their ground truth.
OFFICIAL_DIRS = {
    "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
IMAGE_NAME = re.compile(r"^(ISIC_[^.]+)\.(jpg|jpeg)$", re.IGNORECASE)
MASK_SUFFIX = "_segmentation.png"


@dataclass(frozen=True)
class Pair:
    case_id: str
    image: Path
    mask: Path


class _Problem(Exception):
    """One bad file; collected so that a single error lists them all."""


def scan_folder(input_dir: Path, mask_dir: Path) -> tuple[list[Pair], list[str], list[str]]:
    """Pairs ISIC_*.jpg with their masks. Returns (pairs sorted by id, entries ignored as "<path>: <why>",
    problems); a folder without a single ISIC image (and so without problems either) is a DatasetError naming it."""
    if not mask_dir.is_dir():
        raise DatasetError(
            f"mask folder {mask_dir} is missing: expected it beside {input_dir.name}, holding "
            f"ISIC_XXXXXXX{MASK_SUFFIX} for every image"
        )
    pairs, problems, ignored = [], [], []
    for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
        match = IMAGE_NAME.match(entry.name)
        if not match:
            ignored.append(f"{entry.path}: not an ISIC_XXXXXXX.jpg image")  # LICENSE.txt, ATTRIBUTION.txt, superpixels
            continue
        if not entry.is_file():
            what = "a folder" if entry.is_dir() else "a dangling symlink" if entry.is_symlink() and not os.path.exists(entry.path) else "not a regular file"
            ignored.append(f"{entry.path}: named like an image but {what}")
            continue
        case_id = match.group(1)
        mask = mask_dir / f"{case_id}{MASK_SUFFIX}"
        if not mask.is_file():
            problems.append(f"image {Path(entry.path)} has no mask: expected {mask}")
            continue
        pairs.append(Pair(case_id, Path(entry.path), mask))
    if not pairs and not problems:
        raise DatasetError(f"no ISIC_*.jpg images found in {input_dir}: expected files named ISIC_XXXXXXX.jpg")
    mask_names = {f"{p.case_id}{MASK_SUFFIX}" for p in pairs}
    ignored += [f"{mask_dir / name}: not the mask of an image read" for name in sorted(os.listdir(mask_dir)) if name not in mask_names]
    return pairs, ignored, problems


def load_image(path: Path, size: int, draft: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes one image and resizes it: (uint8 [size,size,3], its original (width, height)); raises _Problem.
    The one way an image becomes a network input's pixels, for the splits and for `pipeline.predict`.
    `draft`: a large JPEG is decoded at a reduced DCT scale (the splits: far faster); else at full scale, as a
    user's own code reads it and a logged model is given it (`read_image`)."""
    try:
        with Image.open(path) as im:
            original = im.size
            if draft:
                im.draft("RGB", (size, size))  # JPEG decodes at 1/2..1/8 scale, still >= size
            rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _Problem(f"image {path} cannot be read ({type(err).__name__}: {err}); expected a complete RGB JPEG")
    return np.asarray(rgb, dtype=np.uint8), original


def load_pair(pair: Pair, size: int, mask_threshold: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Decodes and resizes one pair: (uint8 [size,size,3], uint8 [size,size] in {0,1}); raises _Problem.

    Masks must be 0/255 or 0/1 unless `mask_threshold` is given (data.base.binary_mask)."""
    rgb, image_size = load_image(pair.image, size)
    try:
        with Image.open(pair.mask) as m:
            if m.size != image_size:
                raise _Problem(
                    f"mask {pair.mask} is {m.size[0]}x{m.size[1]} but its image {pair.image} is "
                    f"{image_size[0]}x{image_size[1]}: expected the same size"
                )
            m.load()
            if m.mode in ("RGB", "RGBA"):
                channels = np.asarray(m.convert("RGB"))
                if not ((channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()):
                    raise _Problem(
                        f"mask {pair.mask} is {m.mode} with differing channels: expected a single-channel "
                        f"(grayscale) mask with values {{0,255}}"
                    )
            elif m.mode not in ("1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "I;16L", "F"):
                raise _Problem(f"mask {pair.mask} has mode {m.mode}: expected a single-channel (grayscale) mask")
            gray = m if m.mode == "L" else m.convert("L")
    except _Problem:
        raise
    except Exception as err:
        raise _Problem(f"mask {pair.mask} cannot be read ({type(err).__name__}: {err}); expected a PNG mask")
    try:
        foreground = binary_mask(np.asarray(gray), pair.mask, mask_threshold)
    except ValueError as err:
        raise _Problem(str(err))
    # Binarise at full resolution, then area-average and re-threshold: a majority vote per output pixel
    # keeps the lesion outline better than picking one full-resolution pixel in 40 (nearest).
    binary = Image.fromarray(foreground.astype(np.uint8) * 255, "L").resize((size, size), Image.BOX)
    mask = (np.asarray(binary) > 127).astype(np.uint8)
    return rgb, mask


class ISIC2018(MaskFiles, SegmentationData):
    """ISIC 2018 Task 1: RGB dermoscopy images, one binary lesion mask each.

    Official validation/test folders (with ground truth) are used as the val/test splits when present;
    a split without them is carved from the training pairs with `split_seed` (not the run's seed, so a
    sweep over seeds keeps one test set). With `test_root`, every folder pair found there is the test
    split instead (root's official test folder is then left unread).

    With `folds` (cross-validation), the training pairs are split into folds with `split_seed` and fold `fold`
    is the test split (the val split with `test_root`). An official validation/test folder with ground truth
    under root is then refused rather than pooled into the folds: its cases are the challenge's held-out sets,
    and a root holding them is not a single pool of cases (point root at a folder without them).
    """

    in_channels = 3
    num_classes = 1
    challenge = "isic2018"  # its challenge's rules apply (the thresholded Jaccard)

    ROOT_EXPECTED = "the folder holding ISIC2018_Task1-2_Training_Input"

    def __init__(self, *, limit: Optional[int], mean: Sequence[float], std: Sequence[float],
                 mask_threshold: Optional[int], **common):
        """ISIC's own keys; `common` holds every reader's (SegmentationData). Values: conf/dataset/isic2018.yaml."""
        super().__init__(**common)
        self.limit = None if limit is None else check_int(limit, "limit", 1)
        self.mean = check_floats(mean, "mean", 3)
        self.std = check_floats(std, "std", 3, positive=True)
        self.mask_threshold = check_mask_threshold(mask_threshold)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._transforms: dict[bool, object] = {}

    # -- reading -----------------------------------------------------------------------------------

    def _find_pairs(self) -> tuple[dict[str, list[Pair]], dict[str, float], list[str]]:
        """Lists every pair to load under root, per source ("train" and any official "val"/"test"; an
        official test folder is left unread when test_root holds the test split)."""
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {self.root} does not exist or is not a folder: expected the ISIC 2018 folder "
                f"holding {TRAIN_DIRS[0]}/ and {TRAIN_DIRS[1]}/"
            )
        input_dir = self.root / TRAIN_DIRS[0]
        if not input_dir.is_dir():
            present = sorted(os.listdir(self.root))[:10]
            hint = ""
            if self.root.name == TRAIN_DIRS[0]:
                hint = f"; root points at the image folder itself: use its parent {self.root.parent}"
            raise DatasetError(
                f"training input folder {input_dir} is missing: expected {TRAIN_DIRS[0]}/ in {self.root} "
                f"(found: {', '.join(present) or 'nothing'}){hint}"
            )
        sources: dict[str, list[Pair]] = {}
        stats: dict[str, float] = {}
        problems: list[str] = []
        ignored: list[str] = []
        pairs, skipped, found = scan_folder(input_dir, self.root / TRAIN_DIRS[1])
        stats["train_pairs_found"] = len(pairs)
        ignored += skipped
        problems += found
        if self.limit is not None:
            pairs = pairs[: self.limit]
        sources["train"] = pairs
        for split, (in_name, gt_name) in OFFICIAL_DIRS.items():
            official_in, official_gt = self.root / in_name, self.root / gt_name
            stats[f"official_{split}"] = 0
            if not official_in.is_dir():
                continue
            if split == "test" and self.test_root is not None:
                log.info("ignoring %s: the test split is dataset.test_root (%s)", official_in, self.test_root)
                continue
            if not official_gt.is_dir():
                log.warning("%s has no ground truth folder %s: carving %s from training instead", official_in, gt_name, split)
                continue
            if self.folds is not None:
                raise DatasetError(
                    f"dataset.folds={self.folds} splits the training pairs of {self.root} into folds, but the root also "
                    f"holds an official {split} split ({in_name}/ with {gt_name}/): expected a root with "
                    f"{TRAIN_DIRS[0]}/ and {TRAIN_DIRS[1]}/ only (move the official folders out, or set dataset.folds=null)"
                )
            pairs, skipped, found = scan_folder(official_in, official_gt)
            sources[split] = pairs
            stats[f"official_{split}"] = 1
            ignored += skipped
            problems += found
        stats["files_ignored"] = len(ignored)
        self._note_ignored(ignored)
        return sources, stats, problems

    def _find_test_pairs(self) -> tuple[list[Pair], dict[str, float], list[str]]:
        """Every pair of every official folder pair found in test_root (the whole folder is the test split)."""
        test_root = self.test_root
        names = [TRAIN_DIRS, *OFFICIAL_DIRS.values()]
        if not test_root.is_dir():
            raise DatasetError(
                f"dataset.test_root {test_root} does not exist or is not a folder: expected a folder holding ISIC 2018 "
                f"folder pairs, e.g. {OFFICIAL_DIRS['test'][0]}/ and {OFFICIAL_DIRS['test'][1]}/"
            )
        pairs: list[Pair] = []
        problems: list[str] = []
        ignored: list[str] = []
        folder_of: dict[str, Path] = {}
        for in_name, gt_name in names:
            input_dir = test_root / in_name
            if not input_dir.is_dir():
                continue
            found, skipped, found_problems = scan_folder(input_dir, test_root / gt_name)
            for pair in found:
                if pair.case_id in folder_of:
                    raise DatasetError(
                        f"{pair.case_id} is in both {folder_of[pair.case_id]} and {input_dir} of dataset.test_root: "
                        f"expected each case once"
                    )
                folder_of[pair.case_id] = input_dir
            pairs += found
            ignored += skipped
            problems += found_problems
        if not folder_of and not problems:
            present = sorted(os.listdir(test_root))[:10]
            raise DatasetError(
                f"no ISIC 2018 input folder in dataset.test_root {test_root} (found: {', '.join(present) or 'nothing'}): "
                f"expected one or more of {', '.join(n for n, _ in names)}, each beside its GroundTruth folder"
            )
        self._note_ignored(ignored)
        return sorted(pairs, key=lambda p: p.case_id), {"test_pairs_found": len(pairs), "test_files_ignored": len(ignored)}, problems

    def _where(self) -> str:
        folders = [str(f) for f in (None if self.test_only else self.root, self.test_root) if f is not None]
        return f"the ISIC 2018 data under {' and '.join(folders)}"

    def setup(self, seed: int, test_only: bool = False) -> None:
        start = time.perf_counter()
        self._begin_setup(test_only)
        if test_only:
            sources, stats, problems = {"train": []}, {"train_pairs_found": 0, "files_ignored": 0}, []
        else:
            sources, stats, problems = self._find_pairs()
        test_pairs: list[Pair] = []
        if self.test_root is not None:
            test_pairs, test_stats, test_problems = self._find_test_pairs()
            stats.update(test_stats)
            stats["files_ignored"] += test_stats["test_files_ignored"]
            problems += test_problems
        train_pairs = sources["train"]
        carved = {s: f for s, f in (("val", self.val_fraction), ("test", self.test_fraction))
                  if s not in sources and not (s == "test" and self.test_root is not None)}
        split_ids = {"train": [p.case_id for p in train_pairs]}
        if carved and not problems and not test_only:
            source = f"{self.root / TRAIN_DIRS[0]}" + (f" (limit={self.limit})" if self.limit is not None else "")
            if self.folds is not None:  # no official folder here (_find_pairs): fold is test, or val beside test_root
                val_fraction = None if self.test_root is not None else self.val_fraction
                split_ids = carve_fold(split_ids["train"], self.folds, self.fold, val_fraction, self.split_seed,
                                       source=source, unit="image/mask pair")
            else:
                split_ids = carve(split_ids["train"], carved, self.split_seed, source=source)
        for split in ("val", "test"):
            if split in sources:
                split_ids[split] = [p.case_id for p in sources[split]]
        if test_only:
            split_ids["val"] = []
        if self.test_root is not None:
            split_ids["test"] = [p.case_id for p in test_pairs]
        check_disjoint(split_ids)

        by_id = {p.case_id: p for pairs in [*sources.values(), test_pairs] for p in pairs}
        to_load = [by_id[i] for split in ("train", "val", "test") for i in split_ids.get(split, [])]
        images = np.empty((len(to_load), self.image_size, self.image_size, 3), dtype=np.uint8)
        masks = np.empty((len(to_load), self.image_size, self.image_size), dtype=np.uint8)

        def work(index: int) -> Optional[str]:
            try:
                images[index], masks[index] = load_pair(to_load[index], self.image_size, self.mask_threshold)
            except _Problem as problem:
                return str(problem)
            return None

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = pool.map(work, range(len(to_load)))
            bar = tqdm(results, total=len(to_load), desc=f"ISIC 2018 @{self.image_size}px", unit="img", disable=None, leave=False)
            problems += [r for r in bar if r is not None]
        if problems:
            raise DatasetError(format_problems(problems, self._where()))

        offset = 0
        self._arrays = {}
        for split in ("train", "val", "test"):
            n = len(split_ids[split])
            self._arrays[split] = (images[offset:offset + n], masks[offset:offset + n])
            offset += n
        if not test_only:  # a test-only job reads no training split
            check_foreground(self._arrays["train"][1], self._where())
        from_test_root = {p.case_id for p in test_pairs}
        self._files = self._test_root_files([f for p in test_pairs for f in (p.image, p.mask)])
        if not test_only:
            self._files += self.relative_sizes(
                [f for p in to_load if p.case_id not in from_test_root for f in (p.image, p.mask)], self.root)
        self._split_ids = {split: list(split_ids[split]) for split in ("train", "val", "test")}
        self._mask_files = {split: [by_id[i].mask for i in split_ids[split]] for split in ("train", "val", "test")}
        self._transforms = {}

        foreground = masks.reshape(len(masks), -1).mean(axis=1) if len(masks) else np.zeros(0)
        empty = int((foreground == 0).sum())
        if empty:
            log.warning("%d mask(s) are empty at %dpx (lesion absent or smaller than a pixel)", empty, self.image_size)
        stats.update(
            pairs_found=stats["train_pairs_found"] + sum(len(p) for s, p in sources.items() if s != "train") + len(test_pairs),
            pairs_loaded=len(to_load),
            n_train=len(split_ids["train"]),
            n_val=len(split_ids["val"]),
            n_test=len(split_ids["test"]),
            empty_masks=empty,
            foreground_fraction=float(foreground.mean()) if len(foreground) else 0.0,
            image_size=self.image_size,
            load_seconds=time.perf_counter() - start,
        )
        stats.update(self._test_root_stats(len(test_pairs), "pairs"))
        self._stats = stats
        log.info(
            "ISIC 2018: %d train / %d val / %d test pairs at %dpx in %.1fs (%d files ignored, named in the run's data/ignored_files.txt)",
            stats["n_train"], stats["n_val"], stats["n_test"], self.image_size, stats["load_seconds"], stats["files_ignored"],
        )

    # -- serving -----------------------------------------------------------------------------------

    def read_image(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """A new image (no mask) as the splits hold theirs, decoded at full scale (as the logged model's graph is
        given it: the same pixels): (uint8 [S, S, 3], its original (height, width)); a file that cannot be read
        is a DatasetError naming it."""
        try:
            rgb, (width, height) = load_image(Path(path), self.image_size, draft=False)
        except _Problem as problem:
            raise DatasetError(str(problem)) from None
        return rgb, (height, width)

    def transform(self, augment: bool = False):
        augment = bool(augment)
        if augment not in self._transforms:
            self._transforms[augment] = build_transform(
                augment, self.mean, self.std, self.rotate_limit, self.hflip_p
            )
        return self._transforms[augment]

    def dataset(self, split: str, augment: bool = False) -> ArrayDataset:
        self._check_read(split)
        images, masks = self._arrays[split]
        return ArrayDataset(images, masks, self._split_ids[split], self.transform(augment))
