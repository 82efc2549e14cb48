"""COVID-19 CT volumes in the public Kaggle "COVID-19 CT scans" layout, served as axial slices.

Layout under `root`:
    ct_scans/<name>.nii                    20 volumes: coronacases_org_NNN (raw HU), radiopaedia_org_... (0-255)
    lung_mask/<name>.nii                   0 background, 1 and 2 the two lungs
    infection_mask/<name>.nii              0 / 1
    lung_and_infection_mask/<name>.nii     (not needed: lungs and infection are read from the two above)
    metadata.csv                           columns ct_scan, lung_mask, infection_mask, lung_and_infection_mask
The paths in metadata.csv carry the uploader's prefix (`../input/covid19-ct-scans/ct_scans/...`), so
files are found by name in the folders above. Some downloads unpack every file into a folder of the
same name (`ct_scans/x.nii/x.nii`); both forms are read.

Preprocessing (the custom-UNet lung study, per case, streamed into the slice cache):
1. reorient CT and masks to RAS+ and cut axial slices (radiological view);
2. one intensity range: HU volumes are windowed to [-1250, 250] HU and scaled to 0-255; volumes
   already windowed to 0-255 are kept. The kind is detected from the values: a volume with any
   negative value is HU (air is about -1000 HU); one whose values all lie in [0, 255] is windowed;
   anything else is an error unless `intensity` is set to hu or windowed;
3. drop slices whose lung or infection mask holds NaN, and slices without lung (no box to crop to);
4. CLAHE on the 8-bit slice, crop to the lung bounding box (per slice, per volume or none), resize to
   `image_size` (grayscale, area averaging; masks by majority vote);
5. drop duplicate slices within a case (identical preprocessed image and masks).
Stored labels: bit 0 lung, bit 1 infection, so `target` (infection or lungs) is chosen when serving.
Optional offline flipped copies (up-down and left-right) of the train split are served in addition to
the online augmentation.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import cv2
import nibabel as nib
import numpy as np

from data.base import DatasetError
from data.volumes3d import Volume3D
from data.checks import check_choice, check_floats, check_int, check_number
from data.nifti import VolumeProblem, axial, load_canonical, read_headers, same_grid, shape_str, strip_nifti
from data.volumes import (
    Case, Processed, VolumeSliceData, resize_image, resize_labels,
)

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1
FOLDERS = {"ct": "ct_scans", "lung": "lung_mask", "infection": "infection_mask"}
COLUMNS = {"ct": "ct_scan", "lung": "lung_mask", "infection": "infection_mask"}
METADATA = "metadata.csv"
TARGETS = {"infection": (2, 3), "lungs": (1, 3)}  # stored label = lung bit (1) | infection bit (2)
INTENSITY = ("auto", "hu", "windowed")
CROPS = ("slice", "volume", "none")
# radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm and ..._85902_3-dcm are two series of patient 10.


def resolve_listed(folder: Path, listed: str) -> tuple[Optional[Path], bool]:
    """A metadata.csv path -> the file in `folder` with that name: (path, inside a same-name folder)."""
    name = str(listed).replace("\\", "/").rstrip("/").split("/")[-1].strip()
    if not name:
        return None, False
    for candidate_name in (name, name + ".gz") if name.endswith(".nii") else (name,):
        candidate = folder / candidate_name
        if candidate.is_file():
            return candidate, False
        if candidate.is_dir() and (candidate / candidate_name).is_file():
            return candidate / candidate_name, True
    return None, False


def detect_intensity(volume: np.ndarray, path: Path) -> str:
    low, high = float(volume.min()), float(volume.max())
    if low < 0:
        return "hu"
    if high <= 255:
        return "windowed"
    raise VolumeProblem(
        f"{path} has intensities {low:g}..{high:g}: neither Hounsfield units (air is about -1000 HU, so some values "
        f"are negative) nor windowed to 0-255; set dataset.intensity=hu or dataset.intensity=windowed"
    )


def to_uint8(volume: np.ndarray, kind: str, window: tuple[float, float]) -> np.ndarray:
    if kind == "hu":
        low, high = window
        scaled = (volume - low) * (255.0 / (high - low))
    else:
        scaled = volume
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_mask(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(boolean RAS+ mask, per-axial-slice NaN flags); values must be integer labels >= 0 (NaN aside)."""
    values = load_canonical(nib.load(str(path), mmap=False), path)
    nan = np.isnan(values)
    nan_slices = axial(nan).any(axis=(1, 2))
    values[nan] = 0
    if not np.isfinite(values).all() or values.min(initial=0) < 0 or np.abs(values - np.rint(values)).max(initial=0) > 1e-3:
        raise VolumeProblem(f"{what} {path} holds values other than integer labels >= 0: expected 0 background and positive labels")
    return values >= 0.5, nan_slices


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class CovidCT(VolumeSliceData):
    """Kaggle COVID-19 CT scans: grayscale lung CT slices, binary infection (or lung) masks."""

    kind = "covid_ct"
    ROOT_EXPECTED = "the folder holding ct_scans/, infection_mask/, lung_mask/ and metadata.csv"
    image_dtype = np.uint8
    in_channels = 1
    num_classes = 1

    def __init__(
        self,
        *,
        target: str,
        intensity: str,
        hu_window: Sequence[float],
        clahe_clip: float,
        clahe_grid: int,
        crop: str,
        offline_flips: bool,
        mean: Sequence[float],
        std: Sequence[float],
        vflip_p: float,
        **volume,
    ):
        """The CT reader's own keys; `volume` holds the keys every volumetric dataset takes (VolumeSliceData).
        Keys and defaults: conf/dataset/covid_ct.yaml."""
        super().__init__(**volume)
        self.target = check_choice(target, "target", tuple(TARGETS))
        self.intensity = check_choice(intensity, "intensity", INTENSITY)
        window = check_floats(hu_window, "hu_window", 2)
        if window[0] >= window[1]:
            raise ValueError(f"hu_window={list(hu_window)!r} is invalid: expected [low, high] with low < high (HU)")
        self.hu_window = window
        self.clahe_clip = check_number(clahe_clip, "clahe_clip", 0.0, 1000.0)
        self.clahe_grid = check_int(clahe_grid, "clahe_grid", 1)
        self.crop = check_choice(crop, "crop", CROPS)
        if not isinstance(offline_flips, bool):
            raise ValueError(f"offline_flips={offline_flips!r} is invalid: expected true or false")
        self.offline_flips = offline_flips
        self.mean = check_floats(mean, "mean", 1)
        self.std = check_floats(std, "std", 1, positive=True)
        self.vflip_p = check_number(vflip_p, "vflip_p", 0.0, 1.0)

    # -- scanning -----------------------------------------------------------------------------------

    def _describe(self, root: Path) -> str:
        return f"the COVID-19 CT data under {root}"

    def _scan(self, root: Path):
        if not root.is_dir():
            raise DatasetError(
                f"{self._folder_name(root)} {root} does not exist or is not a folder: expected the Kaggle COVID-19 CT scans "
                f"folder holding {', '.join(FOLDERS.values())}/ and {METADATA}"
            )
        missing = [name + "/" for name in FOLDERS.values() if not (root / name).is_dir()]
        if not (root / METADATA).is_file():
            missing.append(METADATA)
        if missing:
            present = sorted(os.listdir(root))
            hint = ""
            inner = [p for p in present if (root / p / FOLDERS["ct"]).is_dir()]
            if inner:
                key = "test_root" if root == self.test_root else "root"
                hint = f"; the layout is one level down: use {key}={root / inner[0]}"
            raise DatasetError(
                f"{', '.join(missing)} missing in {root} (found: {', '.join(present[:10]) or 'nothing'}): expected the "
                f"Kaggle layout {', '.join(FOLDERS.values())}/ and {METADATA}{hint}"
            )
        csv_path = root / METADATA
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                header = [h.strip() for h in (reader.fieldnames or [])]
                rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"{csv_path} cannot be read ({type(err).__name__}: {err}): expected a CSV file")
        absent = [c for c in COLUMNS.values() if c not in header]
        if absent:
            raise DatasetError(
                f"{csv_path} has columns {header}: expected {', '.join(COLUMNS.values())} (and lung_and_infection_mask)"
            )
        if not rows:
            raise DatasetError(f"{csv_path} lists no volume: expected one row per CT scan")

        cases: list[Case] = []
        problems: list[tuple[Optional[str], str]] = []
        seen: set[str] = set()
        nested = 0
        for line, row in enumerate(rows, start=2):
            ct_listed = row[COLUMNS["ct"]]
            ct_name = ct_listed.replace("\\", "/").split("/")[-1]
            case_id = strip_nifti(ct_name) or ct_name or f"row{line}"
            if case_id in seen:
                problems.append((case_id, f"{csv_path} line {line} lists {ct_name} again: expected one row per CT scan"))
                continue
            seen.add(case_id)
            files: dict[str, Path] = {}
            row_problems = []
            for role, column in COLUMNS.items():
                folder = root / FOLDERS[role]
                listed = row[column]
                path, in_folder = resolve_listed(folder, listed) if listed else (None, False)
                name = listed.replace("\\", "/").split("/")[-1] if listed else ""
                if path is None:
                    what = "CT scan" if role == "ct" else f"{role} mask"
                    if not name:
                        row_problems.append(f"case {case_id}: {csv_path} line {line} has no {column} entry: expected the {what}'s file name")
                    else:
                        row_problems.append(
                            f"case {case_id}: {what} {name} ({csv_path.name} line {line}) not found: expected {folder / name} "
                            f"(or {folder / name / name})"
                        )
                    continue
                nested += in_folder
                files[role] = path
            if not row_problems:
                row_problems = self._check_headers(case_id, files)
            if row_problems:
                problems += [(case_id, m) for m in row_problems]
                continue
            cases.append(Case(case_id, files))

        listed_cts = {c.files["ct"] for c in cases}
        ignored: list[str] = []
        for entry in sorted(os.scandir(root / FOLDERS["ct"]), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_dir() and (path / entry.name).is_file():
                path = path / entry.name
            if path not in listed_cts and strip_nifti(entry.name) not in seen:
                ignored.append(f"{path}: not listed in {csv_path}")
        self._note_ignored(ignored)
        return cases, problems, {"entries_ignored": len(ignored), "files_in_same_name_folder": nested}

    def _check_headers(self, case_id: str, files: dict[str, Path]) -> list[str]:
        headers, problems = read_headers(files)
        if problems:
            return problems
        ct = headers["ct"]
        for role in ("lung", "infection"):
            img = headers[role]
            if shape_str(img.shape) != shape_str(ct.shape):
                problems.append(
                    f"case {case_id}: {role} mask {files[role]} is {shape_str(img.shape)} but its CT scan {files['ct']} is "
                    f"{shape_str(ct.shape)}: expected the same shape"
                )
            elif not same_grid(ct, img):
                problems.append(
                    f"case {case_id}: {role} mask {files[role]} has another voxel-to-world affine than {files['ct']}: "
                    f"expected the mask on the CT's grid"
                )
        return problems

    # -- preprocessing ------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "version": PREPROCESS_VERSION, "image_size": self.image_size, "intensity": self.intensity,
            "hu_window": list(self.hu_window), "clahe_clip": self.clahe_clip, "clahe_grid": self.clahe_grid, "crop": self.crop,
        }

    def _target_values(self) -> list[tuple[int, ...]]:
        return [TARGETS[self.target]]

    def _normalisation(self):
        return self.mean, self.std

    def _process(self, case: Case) -> Processed:
        ct_path = case.files["ct"]
        volume = load_canonical(nib.load(str(ct_path), mmap=False), ct_path)
        if not np.isfinite(volume).all():
            raise VolumeProblem(f"CT scan {ct_path} contains NaN or infinite values: expected finite intensities")
        kind = detect_intensity(volume, ct_path) if self.intensity == "auto" else self.intensity
        pixels = axial(to_uint8(volume, kind, self.hu_window))
        del volume
        lung, lung_nan = load_mask(case.files["lung"], "lung mask")
        infection, infection_nan = load_mask(case.files["infection"], "infection mask")
        lung_ax, infection_ax = axial(lung), axial(infection)
        depth = pixels.shape[0]
        box = bounding_box(lung_ax.any(axis=0)) if self.crop == "volume" and lung_ax.any() else None
        clahe = cv2.createCLAHE(clipLimit=self.clahe_clip, tileGridSize=(self.clahe_grid, self.clahe_grid)) if self.clahe_clip > 0 else None
        size = self.image_size
        images, labels, kept = [], [], []
        dropped = {"nan_mask": 0, "no_lung": 0, "duplicate": 0}
        seen: set[bytes] = set()
        for z in range(depth):
            if lung_nan[z] or infection_nan[z]:
                dropped["nan_mask"] += 1
                continue
            lung_z = lung_ax[z]
            if not lung_z.any():
                dropped["no_lung"] += 1
                continue
            image = np.ascontiguousarray(pixels[z])
            if clahe is not None:
                image = clahe.apply(image)
            label = lung_z.astype(np.uint8) | (infection_ax[z].astype(np.uint8) << 1)
            r0, r1, c0, c1 = bounding_box(lung_z) if self.crop == "slice" else box if box else (0, image.shape[0], 0, image.shape[1])
            image = resize_image(image[r0:r1, c0:c1, None], size)
            label = resize_labels(label[r0:r1, c0:c1], size)
            digest = hashlib.blake2b(image.tobytes() + label.tobytes(), digest_size=16).digest()
            if digest in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(digest)
            images.append(image)
            labels.append(label)
            kept.append(z)
        out_images = np.stack(images) if images else np.zeros((0, size, size, 1), np.uint8)
        out_labels = np.stack(labels) if labels else np.zeros((0, size, size), np.uint8)
        return Processed(out_images, out_labels, kept, dropped, depth, {"intensity": kind})

    def _extra_stats(self, meta: dict, used) -> dict[str, float]:
        return {
            "volumes_hu": sum(c.get("intensity") == "hu" for c in used),
            "volumes_windowed": sum(c.get("intensity") == "windowed" for c in used),
        }


class CovidCT3D(Volume3D, CovidCT):
    """COVID-19 CT in 3D: whole volumes and random patches (data/volumes3d.py). Slices cropped each to its own lung
    box have no common 3D grid, so `crop` must be volume or none."""

    def __init__(self, **keys):
        super().__init__(**keys)
        if self.crop == "slice":
            raise ValueError("crop='slice' is invalid for a 3D dataset: each slice cropped to its own lung box leaves no "
                             "common 3D grid; expected crop: volume (one box per case) or none")
