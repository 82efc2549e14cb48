"""What every volumetric dataset shares: scan and check, slice cache, patient splits, slice serving.

A subclass knows its layout and preprocessing:
- `_scan()` lists the cases with their files and checks what headers can tell (files present, shapes,
  grids), without decompressing any volume;
- `_process(case)` reads one case and returns its kept axial slices, preprocessed, in ascending order;
- `_settings()` is everything the preprocessing depends on (part of the cache key);
- `_target_values()` says which stored label values are foreground, per output channel.

`setup(seed)` then: reports every problem at once (or skips those cases with `on_missing=skip`), builds
the slice cache unless it exists (streaming one volume at a time per worker), splits by patient with
`split_seed`, and chooses which target-free slices to serve. Items are served from the memory-mapped
cache: `dataset(split)` carries `ids` ("<case>/<slice>") and `cases`, one case's items contiguous and
in ascending slice order, so that predictions can be stacked back into volumes.
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

from data.base import ArrayDataset, DatasetError, SegmentationData, format_problems
from data.checks import check_choice, check_number
from data.cache import SliceCache, file_signature
from data.nifti import VolumeProblem
from data.splits import carve_groups, check_disjoint, group_of
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
        self._cached = None
        self._cache: Optional[SliceCache] = None

    # -- what a subclass provides -------------------------------------------------------------------

    @abc.abstractmethod
    def _scan(self) -> tuple[list[Case], list[tuple[Optional[str], str]], dict[str, float]]:
        """(cases, problems as (case id or None, message), scan statistics). Raises DatasetError when
        the layout itself is wrong (missing root or folder)."""

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

    def _describe(self) -> str:
        return f"{self.kind} data under {self.root}"

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

    def _build(self, cases: list[Case], folder: Path) -> dict:
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
                format_problems(list(skipped.values()), self._describe())
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

    def setup(self, seed: int) -> None:
        start = time.perf_counter()
        cases, problems, stats = self._scan()
        stats = dict(stats)
        stats["cases_found"] = len(cases) + len({case_id for case_id, _ in problems})
        scan_skipped: dict[str, list[str]] = {}
        if problems:
            if self.on_missing == "error":
                raise DatasetError(
                    format_problems([msg for _, msg in problems], self._describe())
                    + "\n(set on_missing=skip to leave these cases out)"
                )
            for case_id, message in problems:
                scan_skipped.setdefault(case_id or "?", []).append(message)
                log.warning("skipping: %s", message)
            cases = [c for c in cases if c.case_id not in scan_skipped]
        if not cases:
            raise DatasetError(
                f"no usable case in {self._describe()}"
                + (f" ({len(scan_skipped)} skipped for problems)" if scan_skipped else "")
                + ": expected at least 3 cases (train, val and test)"
            )

        files = [path for case in cases for path in case.files.values()]
        signature = file_signature(files, self.root.resolve())
        payload = {"settings": self._settings(), "files": signature}
        self._cache = SliceCache(self.cache_dir, self.kind, payload)
        hit = self._cache.ensure(lambda folder: self._build(cases, folder), label=f"{self.kind} ({len(cases)} cases, {self.root})")
        cached = self._cache.open()
        self._cached = cached
        meta = cached.meta
        if meta["skipped"]:
            if self.on_missing == "error":  # a cache built with on_missing=skip, now read with error
                raise DatasetError(
                    format_problems(list(meta["skipped"].values()), self._describe())
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
                f"all-empty dataset: preprocessing kept no slice of the {len(meta['cases'])} case(s) in {self._describe()} "
                f"(dropped: {meta['dropped']}): expected volumes with anatomy in them"
            )
        target_values = self._target_values()
        union = sorted({v for values in target_values for v in values})
        has_target = (cached.counts[:, [v - 1 for v in union]] > 0).any(axis=1) if union else np.zeros(len(cached.case), bool)
        if not has_target.any():
            raise DatasetError(
                f"all-empty dataset: no slice of {self._describe()} has a non-empty target mask "
                f"(label values {union}): expected some foreground; check the label scheme and the target settings"
            )

        groups = {c["id"]: self._patient(c["id"]) for c in used}
        splits = carve_groups(
            groups, {"val": self.val_fraction, "test": self.test_fraction}, self.split_seed,
            source=f"{self._describe()} ({len(used)} cases with slices)",
        )
        check_disjoint(splits)
        by_id = {c["id"]: c for c in used}
        served: dict = {}
        stats["offline_flip_copies"] = 0
        for split in ("train", "val", "test"):
            fraction = self.empty_slice_fraction if split == "train" else self.eval_empty_slice_fraction
            rows, ids, case_ids = [], [], []
            dropped_empty = 0
            for case_id in splits[split]:
                case_rows = np.arange(by_id[case_id]["start"], by_id[case_id]["stop"])
                empty = ~has_target[case_rows]
                keep = ~empty
                n_empty = int(empty.sum())
                n_keep = int(round(fraction * n_empty))
                if n_keep:
                    rng = np.random.default_rng([self.split_seed, zlib.crc32(case_id.encode())])
                    keep[np.sort(rng.choice(np.flatnonzero(empty), n_keep, replace=False))] = True
                dropped_empty += n_empty - n_keep
                chosen = case_rows[keep]
                rows.append(chosen)
                ids += [f"{case_id}/{int(s):03d}" for s in cached.slice[chosen]]
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
                    f"the {split} split of {self._describe()} has no slice (cases {', '.join(splits[split])}): "
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

        if not has_target[served["train"][0]].any():
            raise DatasetError(
                f"the training split of {self._describe()} (cases {', '.join(splits['train'][:10])}) has no slice with "
                f"target label values {union}: expected some foreground to learn; check the label scheme and region"
            )
        self._served = served
        self._split_ids = {split: list(splits[split]) for split in ("train", "val", "test")}
        self._files = [(rel, size) for rel, size, _ in signature]
        self._transforms = {}

        all_rows = np.concatenate([served[s][0] for s in ("train", "val", "test")])
        pixels = self.image_size * self.image_size
        fg = np.stack([cached.counts[all_rows][:, [v - 1 for v in values]].sum(axis=1) for values in target_values], axis=1)
        dropped = meta["dropped"]
        stats.update(
            cases=len(used),
            patients=len(set(groups.values())),
            cases_skipped=len(scan_skipped) + len(meta["skipped"]),
            cases_without_slices=len(without),
            slices_total=meta["slices_total"],
            slices_cached=meta["slices_cached"],
            **{f"slices_dropped_{reason}": count for reason, count in sorted(dropped.items())},
            target_empty_slices=int((~has_target[all_rows]).sum()),
            foreground_fraction=float(fg.sum() / (len(all_rows) * pixels * len(target_values))),
            image_size=self.image_size,
            cache_hit=int(hit),
            cache_build_seconds=0.0 if hit else float(meta["build_seconds"]),
            load_seconds=time.perf_counter() - start,
        )
        stats.update(self._extra_stats(meta, used))
        self._stats = stats
        log.info(
            "%s: %d cases (%d patients), %d/%d/%d train/val/test slices at %dpx, slice cache %s (%s) in %.1fs",
            self.kind, stats["cases"], stats["patients"], stats["n_train"], stats["n_val"], stats["n_test"], self.image_size,
            "hit" if hit else "built", self._cache.folder, stats["load_seconds"],
        )
        if dropped:
            log.info("%s: slices dropped by preprocessing: %s", self.kind, ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))

    # -- serving ------------------------------------------------------------------------------------

    @property
    def cache_folder(self) -> Optional[Path]:
        return None if self._cache is None else self._cache.folder

    def dataset(self, split: str, augment: bool = False) -> SliceDataset:
        self._check_split(split)
        self._require_setup()
        augment = bool(augment)
        if augment not in self._transforms:
            mean, std = self._normalisation()
            self._transforms[augment] = build_transform(
                augment, mean, std, self.rotate_limit, self.hflip_p,
                vflip_p=self.vflip_p, target=LabelTarget(self._target_values()),
            )
        rows, ids, cases, flips = self._served[split]
        return SliceDataset(self._cached.images, self._cached.labels, ids, self._transforms[augment], cases, rows, flips)
