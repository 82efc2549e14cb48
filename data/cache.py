"""The slice cache: preprocessed 2D slices of a volumetric dataset, built once on disk, memory-mapped.

One folder per (dataset kind, preprocessing settings, input files with sizes and mtimes), named
`<kind>-<hash>` under `cache_dir`. A folder appears complete or not at all: it is built in a temporary
folder beside it and renamed into place (`data.files.atomic_folder`), under a file lock on
`.<kind>-<hash>.lock`, so parallel jobs that need the same cache build it once (the others wait, then
reuse it), and a job killed half-way leaves only a temporary folder that the next builder removes.

Inside a folder:
- `images.bin`: raw [N, H, W, C] array (float16 or uint8), rows grouped by case in ascending slice order
- `labels.bin`: raw [N, H, W] uint8 label maps
- `index.npz`: per row `case` (index into meta cases), `slice` (axial index in the canonical volume),
  `counts` [N, 8] (pixels of label value 1..8, for choosing slices by target and for statistics)
- `meta.json`: shapes and dtypes, the cases with their row ranges, dropped-slice counts by reason,
  skipped cases with the reason, build time; `key.json`: what the hash was computed from.

Building streams: volumes are processed one (or `workers`) at a time and their slices appended to the
raw files, so memory stays bounded by a few volumes whatever the dataset size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from data.files import atomic_folder, atomic_write, file_lock

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the folder layout changes
MAX_LABEL = 8  # label values 1..8 are counted per slice


def file_signature(paths: Sequence[Path], root: Path) -> list[list]:
    """[relative path, size, mtime_ns] per file: a changed or replaced file gives another cache key."""
    out = []
    for path in sorted(set(Path(p) for p in paths)):
        st = os.stat(path)
        try:
            rel = str(path.relative_to(root))
        except ValueError:
            rel = str(path)
        out.append([rel, int(st.st_size), int(st.st_mtime_ns)])
    return out


def cache_key(payload: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class SliceWriter:
    """Appends the kept slices of one case after another to the raw files of a cache being built."""

    def __init__(self, folder: Path, image_shape: tuple[int, int, int], image_dtype):
        self.folder = Path(folder)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.image_dtype = np.dtype(image_dtype)
        self._images = open(self.folder / "images.bin", "wb")
        self._labels = open(self.folder / "labels.bin", "wb")
        self.cases: list[dict] = []
        self._case_index: list[np.ndarray] = []
        self._slices: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self.rows = 0

    def add_case(self, case_id: str, images: np.ndarray, labels: np.ndarray, slices: Sequence[int], **info) -> None:
        n = len(slices)
        h, w, c = self.image_shape
        if images.shape != (n, h, w, c) or labels.shape != (n, h, w):
            raise ValueError(f"case {case_id}: images {images.shape} and labels {labels.shape}, expected ({n}, {h}, {w}, {c}) and ({n}, {h}, {w})")
        if n and list(slices) != sorted(slices):
            raise ValueError(f"case {case_id}: slices must come in ascending order")
        self._images.write(np.ascontiguousarray(images, dtype=self.image_dtype).tobytes())
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        self._labels.write(labels.tobytes())
        counts = np.zeros((n, MAX_LABEL), dtype=np.int32)
        for value in range(1, MAX_LABEL + 1):
            counts[:, value - 1] = (labels == value).reshape(n, -1).sum(axis=1)
        self.cases.append({"id": case_id, "start": self.rows, "stop": self.rows + n, **info})
        self._case_index.append(np.full(n, len(self.cases) - 1, dtype=np.int32))
        self._slices.append(np.asarray(slices, dtype=np.int32))
        self._counts.append(counts)
        self.rows += n

    def close(self) -> None:
        self._images.close()
        self._labels.close()
        np.savez(
            self.folder / "index.npz",
            case=np.concatenate(self._case_index) if self._case_index else np.zeros(0, np.int32),
            slice=np.concatenate(self._slices) if self._slices else np.zeros(0, np.int32),
            counts=np.concatenate(self._counts) if self._counts else np.zeros((0, MAX_LABEL), np.int32),
        )


class CachedSlices:
    """An opened cache folder: memory-mapped arrays plus its index and metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        index = np.load(self.folder / "index.npz")
        self.case = index["case"]
        self.slice = index["slice"]
        self.counts = index["counts"]
        n = len(self.case)
        h, w, c = self.meta["image_shape"]
        if n:
            self.images = np.memmap(self.folder / "images.bin", dtype=self.meta["image_dtype"], mode="r", shape=(n, h, w, c))
            self.labels = np.memmap(self.folder / "labels.bin", dtype=np.uint8, mode="r", shape=(n, h, w))
        else:  # np.memmap refuses empty files
            self.images = np.zeros((0, h, w, c), dtype=self.meta["image_dtype"])
            self.labels = np.zeros((0, h, w), dtype=np.uint8)


class SliceCache:
    """Finds or builds the cache folder for one key. `cache_dir=None`: a private temporary folder,
    removed when this object goes away (nothing is reused)."""

    def __init__(self, cache_dir: Optional[Path], kind: str, payload: dict):
        self.kind = kind
        self.payload = payload
        self.key = cache_key({"kind": kind, **payload})
        self.name = f"{kind}-{self.key}"
        if cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="medprune-slices-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.cache_dir), True)
        else:
            self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.folder = self.cache_dir / self.name

    def ensure(self, build: Callable[[Path], dict], label: str = "") -> bool:
        """Returns True on a cache hit; otherwise calls `build(tmp_folder) -> meta` and publishes it."""
        if (self.folder / "meta.json").is_file():
            log.info("slice cache hit %s: %s", label or self.kind, self.folder)
            return True
        with file_lock(self.cache_dir / f".{self.name}.lock"):
            if (self.folder / "meta.json").is_file():  # built by a parallel job while we waited
                log.info("slice cache hit %s: %s (built by a parallel job)", label or self.kind, self.folder)
                return True
            log.info("building slice cache %s in %s", label or self.kind, self.folder)
            start = time.perf_counter()
            with atomic_folder(self.folder) as tmp:  # a folder without meta.json (damaged by hand) is replaced
                meta = build(tmp)
                meta = {"format": CACHE_FORMAT, "kind": self.kind, "key": self.key, "build_seconds": time.perf_counter() - start, **meta}
                atomic_write(tmp / "key.json", json.dumps(self.payload, indent=1, sort_keys=True, default=str) + "\n")
                atomic_write(tmp / "meta.json", json.dumps(meta, indent=1, default=str) + "\n")
            log.info("built slice cache %s in %.1fs", label or self.kind, meta["build_seconds"])
            return False

    def open(self) -> CachedSlices:
        return CachedSlices(self.folder)
