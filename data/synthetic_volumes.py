"""Synthetic twins of the volumetric datasets and of 2D slice folders, written in the real layouts.

Tests and demos then go through the real readers:
- BraTS: `<case>/<case>_<modality>.nii.gz` (2018-2021 naming, optionally BraTS 2015-style case names,
  float32 labels and a `brainmask` of 0/0.99999997 like the real 2015 subset) or the 2023 naming
  `<case>/<case>-<t1n|t1c|t2w|t2f>.nii.gz`, labels in any scheme (2015: 1-4, 2017-2021: 1, 2, 4,
  2023: 1, 2, 3), stored LPS like the real files (or RAS, or oblique and permuted);
- Kaggle COVID-19 CT: `ct_scans/`, `lung_mask/`, `infection_mask/`, `lung_and_infection_mask/`,
  `metadata.csv` whose paths carry the uploader's prefix; coronacases volumes in raw HU (int16),
  radiopaedia volumes windowed to 0-255 (uint8), some files inside a folder of the same name, one
  volume with an oblique, permuted and flipped affine, one with a NaN slice in its lung mask and one
  with a duplicated slice;
- slice folders: `Imgs/N.jpg` (grayscale, varying sizes) and `GT/N.png` ({0,255}) as COVID-SemiSeg.
The anatomy is deliberately asymmetric (the left lung is smaller, the spine is posterior, tumours sit
in the left hemisphere), so orientation mistakes are visible. Every file is drawn from a seeded RNG.
How many cases a writer draws (`count`) has no default here: conf/dataset/synthetic_*.yaml (or the caller) says it.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from PIL import Image

from data.brats import FILE_TOKENS, resolve_scheme
from data.checks import check_choice

log = logging.getLogger(__name__)

ORIENTATIONS = ("LPS", "RAS", "oblique", "mixed")
_ALL_MODALITIES = ("flair", "t1", "t1ce", "t2")


# -- NIfTI writing in a chosen storage orientation --------------------------------------------------


def _tilt(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


def stored(data_ras: np.ndarray, spacing: Sequence[float], orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """A RAS+ array [x, y, z] -> (array as stored, its affine) for a storage orientation:
    LPS (the BraTS files), RAS, or "oblique": axes permuted and flipped (P, I, L) with a 4 degree tilt."""
    affine = np.diag([*[float(s) for s in spacing], 1.0])
    affine[:3, 3] = [-s * (n - 1) / 2 for s, n in zip(spacing, data_ras.shape)]
    codes = {"RAS": ("R", "A", "S"), "LPS": ("L", "P", "S"), "oblique": ("P", "I", "L")}[orientation]
    if orientation == "oblique":
        affine = _tilt(4.0) @ affine
    img = nib.Nifti1Image(data_ras, affine)
    transform = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt(codes))
    out = img.as_reoriented(transform)
    return np.asarray(out.dataobj), out.affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _smooth(rng: np.random.Generator, shape: Sequence[int], cell: int = 6) -> np.ndarray:
    coarse = rng.normal(0, 1, [max(2, s // cell + 2) for s in shape]).astype(np.float32)
    out = coarse
    for axis, n in enumerate(shape):  # separable linear upsampling
        old = np.linspace(0, 1, out.shape[axis])
        new = np.linspace(0, 1, n)
        out = np.apply_along_axis(lambda v: np.interp(new, old, v), axis, out)
    return out.astype(np.float32)


# -- BraTS ------------------------------------------------------------------------------------------


def brats_case_ids(count: int, naming: str, label_scheme: str, followups: int = 0) -> list[str]:
    if naming == "2023":
        ids = [f"BraTS-GLI-{i:05d}-000" for i in range(count)]
        ids += [f"BraTS-GLI-{i:05d}-001" for i in range(min(followups, count))]  # later time points, same patient
        return sorted(ids)
    if resolve_scheme(label_scheme) == "brats2015":
        return [f"brats_2013_pat{i + 1:04d}_1" for i in range(count)] + [f"brats_2013_pat{i + 1:04d}_2" for i in range(min(followups, count))]
    return [f"BraTS2021_{i:05d}" for i in range(count)]


def draw_brats(rng: np.random.Generator, shape: Sequence[int], scheme: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """RAS+ volumes: ({modality: raw intensities}, labels in `scheme`, brain mask)."""
    nx, ny, nz = shape
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy, cz = (nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2
    brain = ((x - cx) / (0.42 * nx)) ** 2 + ((y - cy) / (0.45 * ny)) ** 2 + ((z - cz) / (0.38 * nz)) ** 2 <= 1.0
    # Tumour in the patient's left hemisphere (RAS: left = low x), somewhat anterior.
    tx = cx - rng.uniform(0.12, 0.2) * nx
    ty = cy + rng.uniform(0.0, 0.15) * ny
    tz = cz + rng.uniform(-0.1, 0.1) * nz
    radius = rng.uniform(0.13, 0.18) * min(nx, ny)
    d = np.sqrt((x - tx) ** 2 + (y - ty) ** 2 + ((z - tz) * nx / nz * 0.8) ** 2) / radius
    d = d * (1 + 0.1 * _smooth(rng, shape, 8))
    inside = brain
    edema = inside & (d < 1.0)
    enhancing = inside & (d < 0.6)
    non_enhancing = inside & (d < 0.42)
    necrosis = inside & (d < 0.25)
    codes = {"brats2015": (1, 2, 3, 4), "brats2017": (1, 2, 1, 4), "brats2023": (1, 2, 1, 3)}[scheme]
    labels = np.zeros(shape, dtype=np.uint8)
    for mask, value in zip((edema, enhancing, non_enhancing, necrosis), (codes[1], codes[3], codes[2], codes[0])):
        labels[mask] = value
    base = {"flair": 400.0, "t1": 500.0, "t1ce": 450.0, "t2": 350.0}
    effect = {  # (edema, enhancing, non-enhancing, necrosis)
        "flair": (350, 250, 150, -100), "t1": (-120, -80, -150, -250),
        "t1ce": (-50, 600, 50, -200), "t2": (300, 200, 250, 400),
    }
    volumes = {}
    for modality in _ALL_MODALITIES:
        v = base[modality] * (1 + 0.08 * _smooth(rng, shape, 6)) + rng.normal(0, 12, shape).astype(np.float32)
        for mask, delta in zip((edema & ~enhancing, enhancing & ~non_enhancing, non_enhancing & ~necrosis, necrosis), effect[modality]):
            v[mask] += delta
        v[~brain] = 0.0
        volumes[modality] = np.clip(v, 0, 32000)
    return volumes, labels, brain


def write_synthetic_brats(
    root,
    count: int,
    seed: int = 0,
    naming: str = "2018",
    label_scheme: str = "brats2021",
    shape: Sequence[int] = (40, 40, 24),
    brainmask: bool = False,
    normalized: bool = False,
    orientation: str = "LPS",
    followups: int = 0,
    modalities: Sequence[str] = _ALL_MODALITIES,
) -> list[str]:
    """Writes BraTS cases under `root`; returns their ids. `normalized` stores float32 z-scores with a
    constant non-zero background (as the real 2015 subset), `brainmask` adds `<case>_brainmask`."""
    check_choice(naming, "naming", ("2018", "2023"))
    check_choice(orientation, "orientation", ORIENTATIONS[:3])
    scheme = resolve_scheme(label_scheme)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = brats_case_ids(count, naming, label_scheme, followups)
    sep = "-" if naming == "2023" else "_"
    for index, case_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        volumes, labels, brain = draw_brats(rng, shape, scheme)
        folder = root / case_id
        for modality in modalities:
            v = volumes[modality]
            dtype = np.int16
            if normalized:
                mean, std = v[brain].mean(), v[brain].std()
                v = (v - mean) / std  # background becomes -mean/std, a constant, as in the real subset
                dtype = np.float32
            data, affine = stored(v, (1.0, 1.0, 1.0), orientation)
            _save(folder / f"{case_id}{sep}{FILE_TOKENS[naming][modality]}.nii.gz", data, affine, dtype)
        data, affine = stored(labels.astype(np.float32), (1.0, 1.0, 1.0), orientation)
        _save(folder / f"{case_id}{sep}seg.nii.gz", data, affine, np.float32 if scheme == "brats2015" else np.uint8)
        if brainmask:
            data, affine = stored(np.where(brain, 0.99999997, 0.0), (1.0, 1.0, 1.0), orientation)
            _save(folder / f"{case_id}{sep}brainmask.nii.gz", data, affine, np.float64)
        (folder / "License.txt").write_text("Synthetic volumes generated by medprune; no patient data. CC0.\n")
    (root / "name_mapping.csv").write_text("synthetic,ids\n" + "".join(f"{i},{i}\n" for i in ids))
    return ids


# -- Kaggle COVID-19 CT -----------------------------------------------------------------------------

KAGGLE_PREFIX = "../input/covid19-ct-scans/"
HU_WINDOW = (-1250.0, 250.0)


def covid_case_names(count: int) -> list[tuple[str, str, str]]:
    """(kind, CT file name, mask file name): even cases coronacases (HU), odd ones radiopaedia (0-255).
    With three or more radiopaedia volumes, the last is another series of the previous one's patient
    (as radiopaedia 10_85902_1 and 10_85902_3 in the real set), to exercise patient-level splits."""
    out = []
    patients = [4, 7, 10, 14, 27, 29, 36, 40, 41, 42]
    radiopaedia = [i for i in range(count) if i % 2 == 1]
    for i in range(count):
        if i % 2 == 0:
            out.append(("hu", f"coronacases_org_{i // 2 + 1:03d}.nii", f"coronacases_{i // 2 + 1:03d}.nii"))
            continue
        rank = radiopaedia.index(i)
        series = 1
        if len(radiopaedia) >= 3 and rank == len(radiopaedia) - 1:
            rank, series = rank - 1, 3
        patient = patients[rank % len(patients)] + 100 * (rank // len(patients))
        study = 85000 + 17 * patient
        out.append(("windowed", f"radiopaedia_org_covid-19-pneumonia-{patient}_{study}_{series}-dcm.nii", f"radiopaedia_{patient}_{study}_{series}.nii"))
    return out


def draw_chest(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS+ (HU volume float32, lung labels 0/1/2, infection 0/1). The heart side (patient's left, low x)
    has the smaller lung; the spine is posterior (low y); the top and bottom slices have no lung."""
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij")
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    body = ((x - cx) / (0.46 * nx)) ** 2 + ((y - cy) / (0.36 * ny)) ** 2 <= 1
    spine = ((x - cx) / (0.07 * nx)) ** 2 + ((y - (cy - 0.26 * ny)) / (0.06 * ny)) ** 2 <= 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    lungs = np.zeros(shape, dtype=np.uint8)
    infection = np.zeros(shape, dtype=np.uint8)
    blobs = []
    for _ in range(int(rng.integers(1, 4))):
        side = rng.choice([-1, 1])
        blobs.append((cx + side * 0.22 * nx + rng.normal(0, 0.03 * nx), cy + rng.normal(0, 0.08 * ny), rng.uniform(0.35, 0.65) * (nz - 1), rng.uniform(0.05, 0.09) * nx))
    texture = _smooth(rng, shape, 6)
    for k in range(nz):
        t = (k + 0.5) / nz
        scale = max(0.0, 1 - ((t - 0.5) / 0.36) ** 2) ** 0.5  # lungs in about the middle 70% of slices
        plane = np.where(body, 40.0, -1000.0) + 15 * texture[..., k]
        plane[spine] = 700.0
        right = ((x - (cx + 0.22 * nx)) / (0.15 * nx * scale + 1e-6)) ** 2 + ((y - cy) / (0.24 * ny * scale + 1e-6)) ** 2 <= 1
        left = ((x - (cx - 0.21 * nx)) / (0.11 * nx * scale + 1e-6)) ** 2 + ((y - cy) / (0.2 * ny * scale + 1e-6)) ** 2 <= 1
        right &= scale > 0.05
        left &= scale > 0.05
        plane[right | left] = -850.0 + 30 * texture[..., k][right | left]
        lungs[..., k][right] = 1
        lungs[..., k][left] = 2
        for bx, by, bz, br in blobs:
            r2 = br ** 2 - (k - bz) ** 2 * (nx / nz * 0.25) ** 2
            if r2 <= 0:
                continue
            blob = ((x - bx) ** 2 + (y - by) ** 2 <= r2) & (right | left)
            plane[blob] = -400.0 + 40 * texture[..., k][blob]
            infection[..., k][blob] = 1
        hu[..., k] = plane
    hu += rng.normal(0, 8, shape).astype(np.float32)
    return hu, lungs, infection


def write_synthetic_covid_ct(
    root,
    count: int,
    seed: int = 0,
    shape: Sequence[int] = (48, 48, 16),
    orientation: str = "mixed",
    nested: bool = True,
    prefix: str = KAGGLE_PREFIX,
    quirks: bool = True,
) -> list[str]:
    """Writes the Kaggle layout under `root`; returns the case ids (CT file stems).
    orientation "mixed": coronacases LPS, radiopaedia RAS, the second volume oblique/permuted/flipped.
    `nested`: every third volume's files sit in folders of the same name. `quirks`: a NaN slice in one
    lung mask and a duplicated slice in another volume."""
    check_choice(orientation, "orientation", ORIENTATIONS)
    root = Path(root)
    for folder in ("ct_scans", "lung_mask", "infection_mask", "lung_and_infection_mask"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows, ids = [], []
    spacing = (0.8, 0.8, 5.0)
    for index, (kind, ct_name, mask_name) in enumerate(covid_case_names(count)):
        rng = np.random.default_rng([seed, index])
        hu, lungs, infection = draw_chest(rng, shape)
        lung_values = lungs.astype(np.float32)
        if quirks and index == 0:  # a duplicated slice (the scanner wrote one position twice)
            k = shape[2] // 2
            hu[..., k + 1], lungs[..., k + 1], infection[..., k + 1] = hu[..., k], lungs[..., k], infection[..., k]
            lung_values = lungs.astype(np.float32)
        if quirks and index == 1:  # a lung-mask slice of NaN
            lung_values[..., shape[2] // 2 - 2] = np.nan
        if orientation == "mixed":
            layout = "oblique" if index == 1 else ("LPS" if kind == "hu" else "RAS")
        else:
            layout = orientation
        if kind == "hu":
            ct, ct_dtype = np.rint(hu), np.int16
        else:
            low, high = HU_WINDOW
            ct, ct_dtype = np.clip(np.rint((hu - low) * 255.0 / (high - low)), 0, 255), np.uint8
        nest = nested and index % 3 == 2
        targets = {
            "ct_scans": (ct_name, ct, ct_dtype),
            "lung_mask": (mask_name, lung_values, np.float32 if quirks and index == 1 else np.uint8),
            "infection_mask": (mask_name, infection.astype(np.float32), np.uint8),
            "lung_and_infection_mask": (mask_name, np.where(infection > 0, 3, lungs).astype(np.float32), np.uint8),
        }
        for folder, (name, data, dtype) in targets.items():
            stored_data, affine = stored(np.asarray(data, dtype=np.float32), spacing, layout)
            path = root / folder / name / name if nest else root / folder / name
            _save(path, stored_data, affine, dtype)
        rows.append([f"{prefix}{folder}/{targets[folder][0]}" for folder in targets])
        ids.append(ct_name[: -len(".nii")])
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ct_scan", "lung_mask", "infection_mask", "lung_and_infection_mask"])
        writer.writerows(rows)
    return ids


# -- 2D slice folders -------------------------------------------------------------------------------


def write_synthetic_slices(
    root, count: int, seed: int = 0, image_dir: str = "Imgs", mask_dir: str = "GT", min_side: int = 48, max_side: int = 96,
    image_ext: str = ".jpg", empty_every: int = 6,
) -> list[str]:
    """COVID-SemiSeg-like pairs: grayscale chest slices `Imgs/N.jpg` (sizes vary) with infection masks
    `GT/N.png` ({0,255}); every `empty_every`-th mask is empty (a slice without infection)."""
    root = Path(root)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(count):
        rng = np.random.default_rng([seed, 7, i])
        w, h = int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))
        hu, lungs, infection = draw_chest(rng, (w, h, 1))
        if empty_every and i % empty_every == empty_every - 1:
            hu[..., 0][infection[..., 0] > 0] = -850.0
            infection[..., 0] = 0
        low, high = HU_WINDOW
        pixels = np.clip((hu[..., 0] - low) * 255.0 / (high - low), 0, 255).astype(np.uint8)
        image = pixels.T[::-1, ::-1]  # axial view, as the readers show volumes
        mask = (infection[..., 0].T[::-1, ::-1] > 0).astype(np.uint8) * 255
        Image.fromarray(np.ascontiguousarray(image), "L").save(root / image_dir / f"{i}{image_ext}", quality=92)
        Image.fromarray(np.ascontiguousarray(mask), "L").save(root / mask_dir / f"{i}.png")
        ids.append(str(i))
    (root / "LICENSE.txt").write_text("Synthetic slices generated by medprune; no patient data. CC0.\n")
    return ids
