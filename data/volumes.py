"""What every volumetric dataset shares: scan and check, slice cache, patient splits, slice serving.

A subclass knows its layout and preprocessing:
- `_scan(root)` lists the cases of a folder (root, or test_root in the same layout) with their files and
  checks what headers can tell (files present, shapes, grids), without decompressing any volume;
- `_process(case)` reads one case and returns its kept axial slices, preprocessed, in ascending order;
- `_settings()` is everything the preprocessing depends on (part of the cache key);
- `_target_values()` says which stored label values are foreground, per output channel.

`setup(seed)` then: reports every problem at once (or skips those cases with `on_missing=skip`), builds
the slice cache unless it exists (streaming one volume at a time per worker), splits by patient with
`split_seed` (with `folds`: fold `fold` of a k-fold partition of the patients is the test split), and
chooses which target-free slices to serve. With `test_root`, that folder gets a slice cache entry of its
own and all its cases are the test split (root's patients then make train and val only). Items are
served from the memory-mapped cache: `dataset(split)` carries `ids` ("<case>/<slice>") and `cases`, one
case's items contiguous and in ascending slice order, so that predictions can be stacked back into volumes.
"""
from __future__ import annotations

import abc
import logging
import re
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from tqdm import tqdm

from data.base import TEST_ROOT_PREFIX, ArrayDataset, DatasetError, SegmentationData, format_problems
from data.checks import check_choice, check_number
from data.cache import CachedSlices, SliceCache, file_signature
from data.nifti import VolumeProblem
from data.splits import carve_fold, carve_groups, check_disjoint, group_of
from data.transforms import build_transform

log = logging.getLogger(__name__)

ON_MISSING = ("error", "skip")
# What a damaged or unexpected file makes the readers raise (decompression, headers, shapes, values).
FILE_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError, cv2.error)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """HxWxC -> size x size x C: area averaging when shrinking, bilinear when enlarging."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size <= min(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
    return out.reshape(size, size, -1) if out.ndim == 2 else out


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """HxW label map -> size x size by a majority vote per output pixel (area-weighted), so thin
    structures keep their outline better than with nearest neighbour, and no new label appears."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    if labels.shape == (size, size):
        return labels.copy()
    values = np.unique(labels)
    if len(values) == 1:
        return np.full((size, size), values[0], dtype=np.uint8)
    h, w = labels.shape
    interp = cv2.INTER_AREA if size <= min(h, w) else cv2.INTER_LINEAR
    votes = np.stack([cv2.resize((labels == v).astype(np.float32), (size, size), interpolation=interp) for v in values])
    return values[np.argmax(votes, axis=0)].astype(np.uint8)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` on `workers` threads, in order, with at most `workers` items in flight: a slow
    volume never lets finished ones pile up in memory."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque(pool.submit(fn, item) for item in islice(iterator, workers))
        while pending:
            result = pending.popleft().result()
            for item in islice(iterator, 1):
                pending.append(pool.submit(fn, item))
            yield result


class LabelTarget:
    """Label map (HxW uint8) -> K binary channels, one per output class, via a lookup table."""

    def __init__(self, values_per_channel: Sequence[Iterable[int]]):
        self.lut = np.zeros((len(values_per_channel), 256), dtype=np.float32)
        for k, values in enumerate(values_per_channel):
            self.lut[k, list(values)] = 1.0

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        return self.lut[:, np.asarray(labels, dtype=np.uint8)]


class SliceDataset(ArrayDataset):
    """Rows of a slice cache; `flips` (optional, per item: 0 none, 1 up-down, 2 left-right) serves
    offline flipped copies of stored slices without storing them."""

    def __init__(self, images, labels, ids, transform, cases, rows, flips: Optional[np.ndarray] = None):
        super().__init__(images, labels, ids, transform, cases=cases, rows=rows)
        if flips is not None and len(flips) != len(self.ids):
            raise ValueError(f"{len(flips)} flip codes for {len(self.ids)} items")
        self.flips = None if flips is None else np.asarray(flips, dtype=np.int8)

    def __getstate__(self) -> dict:
        """Pickled for spawned DataLoader workers: memory maps travel as (file, dtype, shape), not as
        a copy of the whole cache."""
        state = dict(self.__dict__)
        for key in ("images", "masks"):
            array = state[key]
            if isinstance(array, np.memmap) and array.filename:
                state[key] = ("memmap", array.filename, array.dtype.str, array.shape, array.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("images", "masks"):
            value = state[key]
            if isinstance(value, tuple) and value and value[0] == "memmap":
                _, filename, dtype, shape, offset = value
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)

    def __getitem__(self, index: int):
        row = self._row(index)
        image, labels = self.images[row], self.masks[row]
        if self.flips is not None and self.flips[index]:
            axis = 0 if self.flips[index] == 1 else 1
            image, labels = np.ascontiguousarray(np.flip(image, axis)), np.ascontiguousarray(np.flip(labels, axis))
        return self.transform(image, labels)


@dataclass
class Case:
    """One case as scanned: its id, its files by role, and whatever the reader needs to remember."""

    case_id: str
    files: dict[str, Path]
    info: dict = field(default_factory=dict)


@dataclass
class _Read:
    """One folder (root or test_root) read into its slice cache, with what its cases hold."""

    root: Path
    cache: SliceCache
    cached: CachedSlices
    hit: bool
    used: list[dict]  # cache entries of the cases that kept slices
    without: int  # cases that kept none
    has_target: np.ndarray  # per cached row
    signature: list[list]  # file_signature of its files
    stats: dict  # the scan's statistics
    skipped: int  # cases left out for problems (on_missing=skip)


@dataclass
class Processed:
    """One case after preprocessing: kept slices in ascending order, and why the others were dropped."""

    images: np.ndarray  # [n, H, W, C]
    labels: np.ndarray  # [n, H, W] uint8
    slices: list[int]
    dropped: dict[str, int]
    total: int  # axial slices in the volume
    info: dict = field(default_factory=dict)


# -- the base class ---------------------------------------------------------------------------------


class VolumeSliceData(SegmentationData):
    """A volumetric dataset served as 2D axial slices from an on-disk slice cache."""

    kind: str = "volumes"  # cache folder prefix
    SERVING_KEYS = SegmentationData.SERVING_KEYS + ("cache_dir", "eval_empty_slice_fraction")
    image_dtype = np.float16
    num_classes = 1

    def __init__(
        self, *, cache_dir: Optional[str], on_missing: str, empty_slice_fraction: float,
        eval_empty_slice_fraction: float, patient_regex: Optional[str], **common,
    ):
        """The keys every volumetric reader has; `common` holds every reader's (SegmentationData)."""
        super().__init__(**common)
        self.cache_dir = None if cache_dir is None or str(cache_dir).strip() == "" else Path(str(cache_dir)).expanduser()
        self.on_missing = check_choice(on_missing, "on_missing", ON_MISSING)
        self.empty_slice_fraction = check_number(empty_slice_fraction, "empty_slice_fraction", 0.0, 1.0)
        self.eval_empty_slice_fraction = check_number(eval_empty_slice_fraction, "eval_empty_slice_fraction", 0.0, 1.0)
        if patient_regex is not None and str(patient_regex) != "":
            try:
                self.patient_regex: Optional[re.Pattern] = re.compile(str(patient_regex))
            except re.error as err:
                raise ValueError(f"patient_regex={patient_regex!r} is invalid: {err}") from err
        else:
            self.patient_regex = None
        self.vflip_p = 0.0
        self.offline_flips = False
        self._transforms: dict[bool, object] = {}
        self._served: dict[str, tuple[np.ndarray, list[str], list[str], Optional[np.ndarray]]] = {}
        self._cached = None  # root's slices (test_root's in a test-only setup)
        self._cache: Optional[SliceCache] = None
        self._reads: dict[str, _Read] = {}  # "root" and/or "test_root"
        self._source: dict[str, CachedSlices] = {}  # the slices each split is served from

    # -- what a subclass provides -------------------------------------------------------------------

    @abc.abstractmethod
    def _scan(self, root: Path) -> tuple[list[Case], list[tuple[Optional[str], str]], dict[str, float]]:
        """The cases of one folder in the reader's layout (root, or test_root read the same way): (cases,
        problems as (case id or None, message), numeric scan statistics). Raises DatasetError when the
        layout itself is wrong (missing folder)."""

    @abc.abstractmethod
    def _process(self, case: Case) -> Processed:
        """Reads and preprocesses one case; raises VolumeProblem naming the file."""

    @abc.abstractmethod
    def _settings(self) -> dict:
        """Every setting the stored slices depend on (the cache key)."""

    @abc.abstractmethod
    def _target_values(self) -> list[tuple[int, ...]]:
        """Stored label values that are foreground, one tuple per output channel."""

    @property
    def _channels(self) -> int:
        return self.in_channels

    def _normalisation(self) -> tuple[Optional[Sequence[float]], Optional[Sequence[float]]]:
        return None, None  # float slices: already normalised per volume

    def _describe(self, root: Path) -> str:
        """The data of one folder read (root or test_root), for messages."""
        return f"{self.kind} data under {root}"

    def _extra_stats(self, meta: dict, used: Sequence[dict]) -> dict[str, float]:
        return {}

    # -- loading ------------------------------------------------------------------------------------

    def _process_safely(self, case: Case):
        """The case's slices, or a VolumeProblem naming it when its files are unreadable or malformed.
        Only errors that bad files raise become problems; a bug (TypeError, KeyError...) keeps its traceback."""
        try:
            return self._process(case)
        except VolumeProblem as problem:
            return problem
        except FILE_ERRORS as err:
            return VolumeProblem(f"case {case.case_id} ({', '.join(str(p) for p in case.files.values())}) failed: {type(err).__name__}: {err}")

    def _build(self, cases: list[Case], folder: Path, root: Path) -> dict:
        from data.cache import SliceWriter

        writer = SliceWriter(folder, (self.image_size, self.image_size, self._channels), self.image_dtype)
        dropped: Counter = Counter()
        skipped: dict[str, str] = {}
        total = 0
        bar = tqdm(total=len(cases), desc=f"building slice cache ({self.kind})", unit="case", disable=None, leave=False)
        try:
            for case, result in zip(cases, ordered_map(self._process_safely, cases, self.workers)):
                bar.update()
                if isinstance(result, VolumeProblem):
                    skipped[case.case_id] = str(result)
                    continue
                writer.add_case(case.case_id, result.images, result.labels, result.slices, total=result.total, **result.info)
                dropped.update(result.dropped)
                total += result.total
        finally:
            bar.close()
            writer.close()
        if skipped and self.on_missing == "error":
            raise DatasetError(
                format_problems(list(skipped.values()), self._describe(root))
                + "\n(set on_missing=skip to leave these cases out)"
            )
        return {
            "image_shape": [self.image_size, self.image_size, self._channels],
            "image_dtype": np.dtype(self.image_dtype).name,
            "cases": writer.cases,
            "slices_total": total,
            "slices_cached": writer.rows,
            "dropped": dict(dropped),
            "skipped": skipped,
            "settings": self._settings(),
        }

    def _patient(self, case_id: str) -> str:
        return group_of(case_id, self.patient_regex)

    def _usable_cases(self, root: Path, minimum: str) -> tuple[list[Case], dict, dict[str, list[str]]]:
        """Scans one folder: (cases to read, scan statistics, cases skipped for problems). Every problem
        is reported at once, or (on_missing=skip) its case is left out."""
        cases, problems, stats = self._scan(root)
        stats = dict(stats)
        stats["cases_found"] = len(cases) + len({case_id for case_id, _ in problems})
        scan_skipped: dict[str, list[str]] = {}
        if problems:
            if self.on_missing == "error":
                raise DatasetError(
                    format_problems([msg for _, msg in problems], self._describe(root))
                    + "\n(set on_missing=skip to leave these cases out)"
                )
            for case_id, message in problems:
                scan_skipped.setdefault(case_id or "?", []).append(message)
                log.warning("skipping: %s", message)
            cases = [c for c in cases if c.case_id not in scan_skipped]
        if not cases:
            raise DatasetError(
                f"no usable case in {self._describe(root)}"
                + (f" ({len(scan_skipped)} skipped for problems)" if scan_skipped else "")
                + f": expected {minimum}"
            )
        return cases, stats, scan_skipped

    def _read_cached(self, root: Path, cases: list[Case], stats: dict, scan_skipped: dict) -> "_Read":
        """Finds or builds the slice cache of one folder's cases and checks what it holds. root and
        test_root each get a cache entry of their own (keyed by settings and files, like any other)."""
        files = [path for case in cases for path in case.files.values()]
        signature = file_signature(files, root.resolve())
        payload = {"settings": self._settings(), "files": signature}
        cache = SliceCache(self.cache_dir, self.kind, payload)
        hit = cache.ensure(lambda folder: self._build(cases, folder, root), label=f"{self.kind} ({len(cases)} cases, {root})")
        cached = cache.open()
        meta = cached.meta
        if meta["skipped"]:
            if self.on_missing == "error":  # a cache built with on_missing=skip, now read with error
                raise DatasetError(
                    format_problems(list(meta["skipped"].values()), self._describe(root))
                    + "\n(set on_missing=skip to leave these cases out)"
                )
            for message in meta["skipped"].values():
                log.warning("skipping: %s", message)

        used = [c for c in meta["cases"] if c["stop"] > c["start"]]
        without = [c["id"] for c in meta["cases"] if c["stop"] == c["start"]]
        if without:
            log.warning("%d case(s) kept no slice after preprocessing: %s", len(without), ", ".join(without[:10]))
        if not used:
            raise DatasetError(
                f"all-empty dataset: preprocessing kept no slice of the {len(meta['cases'])} case(s) in {self._describe(root)} "
                f"(dropped: {meta['dropped']}): expected volumes with anatomy in them"
            )
        union = sorted({v for values in self._target_values() for v in values})
        has_target = (cached.counts[:, [v - 1 for v in union]] > 0).any(axis=1) if union else np.zeros(len(cached.case), bool)
        if not has_target.any():
            raise DatasetError(
                f"all-empty dataset: no slice of {self._describe(root)} has a non-empty target mask "
                f"(label values {union}): expected some foreground; check the label scheme and the target settings"
            )
        return _Read(root, cache, cached, hit, used, len(without), has_target, signature, stats,
                     len(scan_skipped) + len(meta["skipped"]))

    def setup(self, seed: int, test_only: bool = False) -> None:
        start = time.perf_counter()
        self._begin_setup(test_only)
        folders = {} if test_only else {"root": self.root}
        if self.test_root is not None:
            folders["test_root"] = self.test_root
        minimum = {"root": "at least 3 cases (train, val and test)" if self.test_root is None else "at least 2 cases (train and val)",
                   "test_root": "at least 1 case (the test split)"}
        scanned = {role: self._usable_cases(folder, minimum[role]) for role, folder in folders.items()}
        if len(scanned) == 2:  # before any volume is read: a case in both would leak test data into training
            check_disjoint({"train/val": [c.case_id for c in scanned["root"][0]], "test": [c.case_id for c in scanned["test_root"][0]]})
        read = {role: self._read_cached(folders[role], *scanned[role]) for role in folders}

        splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        groups: dict[str, str] = {}
        # the folder each split is served from (None: not read, in a test-only setup)
        source = {"train": read.get("root"), "val": read.get("root"), "test": read.get("test_root", read.get("root"))}
        if "root" in read:
            main = read["root"]
            groups.update({c["id"]: self._patient(c["id"]) for c in main.used})
            where = f"{self._describe(main.root)} ({len(main.used)} cases with slices)"
            if self.folds is not None:  # fold is test (val beside test_root), by patient like the fractions' split
                val_fraction = None if self.test_root is not None else self.val_fraction
                splits.update(carve_fold(groups, self.folds, self.fold, val_fraction, self.split_seed, source=where,
                                         unit="patient"))
            else:
                fractions = {"val": self.val_fraction}
                if self.test_root is None:
                    fractions["test"] = self.test_fraction
                splits.update(carve_groups(groups, fractions, self.split_seed, source=where))
        if "test_root" in read:  # all of it is the test split: its patients need no grouping
            test = read["test_root"]
            splits["test"] = sorted(c["id"] for c in test.used)
            test_groups = {c["id"]: self._patient(c["id"]) for c in test.used}
            shared = sorted(set(test_groups.values()) & set(groups.values()))
            if shared:
                log.warning("%d patient(s) have cases in both root and dataset.test_root (by patient_regex): %s",
                            len(shared), ", ".join(shared[:5]))
            groups.update(test_groups)
        check_disjoint(splits)
        by_id = {c["id"]: c for r in read.values() for c in r.used}
        served: dict = {}
        stats: dict = {}
        for r in read.values():  # scan statistics of both folders, added up
            for key, value in r.stats.items():
                stats[key] = stats.get(key, 0) + value
        stats["offline_flip_copies"] = 0
        for split in ("train", "val", "test"):
            r = source[split]
            if r is None:  # a test-only setup: nothing of root was read
                served[split] = (np.zeros(0, np.int64), [], [], None)
                stats.update({f"{key}_{split}": 0 for key in ("cases", "patients", "slices", "n", "slices_dropped_empty_target")})
                continue
            fraction = self.empty_slice_fraction if split == "train" else self.eval_empty_slice_fraction
            rows, ids, case_ids = [], [], []
            dropped_empty = 0
            for case_id in splits[split]:
                case_rows = np.arange(by_id[case_id]["start"], by_id[case_id]["stop"])
                empty = ~r.has_target[case_rows]
                keep = ~empty
                n_empty = int(empty.sum())
                n_keep = int(round(fraction * n_empty))
                if n_keep:
                    rng = np.random.default_rng([self.split_seed, zlib.crc32(case_id.encode())])
                    keep[np.sort(rng.choice(np.flatnonzero(empty), n_keep, replace=False))] = True
                dropped_empty += n_empty - n_keep
                chosen = case_rows[keep]
                rows.append(chosen)
                ids += [f"{case_id}/{int(s):03d}" for s in r.cached.slice[chosen]]
                case_ids += [case_id] * len(chosen)
            rows_arr = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            flips = None
            if split == "train" and self.offline_flips:
                n = len(rows_arr)
                rows_arr = np.concatenate([rows_arr] * 3)
                flips = np.repeat(np.array([0, 1, 2], np.int8), n)
                ids = ids + [f"{i}#flipud" for i in ids] + [f"{i}#fliplr" for i in ids]
                case_ids = case_ids + [f"{c}#flipud" for c in case_ids] + [f"{c}#fliplr" for c in case_ids]
            if not len(rows_arr):
                raise DatasetError(
                    f"the {split} split of {self._describe(r.root)} has no slice (cases {', '.join(splits[split])}): "
                    f"raise empty_slice_fraction / eval_empty_slice_fraction or add cases"
                )
            served[split] = (rows_arr, ids, case_ids, flips)
            stats[f"cases_{split}"] = len(splits[split])
            stats[f"patients_{split}"] = len({groups[c] for c in splits[split]})
            stats[f"slices_{split}"] = len(rows_arr) if flips is None else len(rows_arr) // 3
            stats[f"n_{split}"] = len(rows_arr)
            stats[f"slices_dropped_empty_target_{split}"] = dropped_empty
            if flips is not None:
                stats["offline_flip_copies"] = 2 * (len(rows_arr) // 3)

        target_values = self._target_values()
        union = sorted({v for values in target_values for v in values})
        if not test_only and not source["train"].has_target[served["train"][0]].any():
            raise DatasetError(
                f"the training split of {self._describe(self.root)} (cases {', '.join(splits['train'][:10])}) has no slice with "
                f"target label values {union}: expected some foreground to learn; check the label scheme and region"
            )
        self._reads = read
        self._source = {split: r.cached for split, r in source.items() if r is not None}
        first = read["root" if "root" in read else "test_root"]
        self._cache, self._cached = first.cache, first.cached
        self._served = served
        self._split_ids = {split: list(splits[split]) for split in ("train", "val", "test")}
        self._files = [(rel, size) for rel, size, _ in read["root"].signature] if "root" in read else []
        if "test_root" in read:
            self._files += [(f"{TEST_ROOT_PREFIX}{rel}", size) for rel, size, _ in read["test_root"].signature]
        self._transforms = {}

        pixels = self.image_size * self.image_size
        empty_served = foreground = n_served = 0
        for r in read.values():  # what each folder serves (root: train and val, or all three; test_root: test)
            rows = [served[split][0] for split in splits if source[split] is r and len(served[split][0])]
            rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            empty_served += int((~r.has_target[rows]).sum())
            foreground += sum(int(r.cached.counts[rows][:, [v - 1 for v in values]].sum()) for values in target_values)
            n_served += len(rows)
        dropped: Counter = Counter()
        for r in read.values():
            dropped.update(r.cached.meta["dropped"])
        used = [c for r in read.values() for c in r.used]
        stats.update(
            cases=len(used),
            patients=len(set(groups.values())),
            cases_skipped=sum(r.skipped for r in read.values()),
            cases_without_slices=sum(r.without for r in read.values()),
            slices_total=sum(r.cached.meta["slices_total"] for r in read.values()),
            slices_cached=sum(r.cached.meta["slices_cached"] for r in read.values()),
            **{f"slices_dropped_{reason}": count for reason, count in sorted(dropped.items())},
            target_empty_slices=empty_served,
            foreground_fraction=float(foreground / (n_served * pixels * len(target_values))),
            image_size=self.image_size,
            cache_hit=int(all(r.hit for r in read.values())),
            cache_build_seconds=sum(0.0 if r.hit else float(r.cached.meta["build_seconds"]) for r in read.values()),
            load_seconds=time.perf_counter() - start,
        )
        stats.update(self._extra_stats({"cases": used}, used))
        stats.update(self._test_root_stats(len(splits["test"]) if self.test_root is not None else 0))
        self._stats = stats
        log.info(
            "%s: %d cases (%d patients), %d/%d/%d train/val/test slices at %dpx, slice cache %s in %.1fs",
            self.kind, stats["cases"], stats["patients"], stats["n_train"], stats["n_val"], stats["n_test"], self.image_size,
            ", ".join(f"{'hit' if r.hit else 'built'} ({r.cache.folder})" for r in read.values()), stats["load_seconds"],
        )
        if dropped:
            log.info("%s: slices dropped by preprocessing: %s", self.kind, ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))

    # -- serving ------------------------------------------------------------------------------------

    @property
    def cache_folder(self) -> Optional[Path]:
        return None if self._cache is None else self._cache.folder

    def case_spacing(self, case_id: str) -> Optional[tuple[float, ...]]:
        """Millimetres per voxel of a case's served slices stacked back ([slice, row, col]), where the reader
        records it (BraTS); None otherwise (per-case distances are then in voxels)."""
        self._require_setup()
        for cached in self._source.values():
            for case in cached.meta["cases"]:
                if case["id"] == case_id and case.get("spacing"):
                    return tuple(float(s) for s in case["spacing"])
        return None

    def transform(self, augment: bool = False):
        augment = bool(augment)
        if augment not in self._transforms:
            mean, std = self._normalisation()
            self._transforms[augment] = build_transform(
                augment, mean, std, self.rotate_limit, self.hflip_p,
                vflip_p=self.vflip_p, target=LabelTarget(self._target_values()),
            )
        return self._transforms[augment]

    def dataset(self, split: str, augment: bool = False) -> SliceDataset:
        self._check_read(split)
        rows, ids, cases, flips = self._served[split]
        cached = self._source[split]
        return SliceDataset(cached.images, cached.labels, ids, self.transform(augment), cases, rows, flips)
