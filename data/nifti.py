"""NIfTI reading shared by the volumetric datasets: headers, canonical orientation, axial slices.

Every volume is reoriented to the closest canonical orientation (RAS+: x towards the patient's right,
y anterior, z superior; nibabel's `io_orientation`, the same choice as `as_closest_canonical`, so an
oblique affine is snapped to its nearest axes). Axial slices are then cut along z (inferior to superior)
and shown in the radiological convention: anterior at the top, the patient's right on the image's left.
So the same anatomy comes out the same way whatever order and direction the file stores it in.

Errors are `VolumeProblem`s naming the file and what was expected; the datasets collect them and raise
one DatasetError (or skip the case, with `on_missing=skip`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel import orientations

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class VolumeProblem(Exception):
    """One bad file or case; collected so that a single error lists them all."""


def strip_nifti(name: str) -> Optional[str]:
    """`case_flair.nii.gz` -> `case_flair`; None for a name that is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def find_nifti(folder: Path, stem: str, names: Optional[set[str]] = None) -> Optional[Path]:
    """`folder/stem.nii.gz` or `folder/stem.nii`, whichever exists (compressed first)."""
    for suffix in NIFTI_SUFFIXES:
        name = stem + suffix
        if (name in names) if names is not None else (folder / name).is_file():
            return folder / name
    return None


def read_header(path: Path, dims: tuple[int, ...] = (3,)) -> nib.Nifti1Image:
    """Opens a NIfTI lazily (header only) and checks what can be checked without decompressing; `dims`: the
    dimensions allowed (4: modalities stacked along a last axis)."""
    try:
        img = nib.load(str(path))
    except Exception as err:  # ImageFileError, OSError, EOFError, zlib.error, ValueError...
        raise VolumeProblem(f"{path} cannot be read as NIfTI ({type(err).__name__}: {err}); expected a .nii or .nii.gz volume")
    shape = squeeze_shape(img.shape)
    if len(shape) not in dims:
        raise VolumeProblem(f"{path} has shape {tuple(img.shape)}: expected a {' or '.join(f'{d}D' for d in dims)} volume")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise VolumeProblem(f"{path} has a degenerate affine {img.affine.tolist()}: expected an invertible voxel-to-world matrix")
    if str(path).endswith(".nii") and not str(path).endswith(".nii.gz"):
        # Uncompressed: a truncated file is visible from its size alone.
        header = img.header
        expected = int(header["vox_offset"]) + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
        actual = os.path.getsize(path)
        if actual < expected:
            raise VolumeProblem(f"{path} is truncated: {actual} bytes, expected {expected} for a {shape_str(img.shape)} volume")
    return img


def read_headers(files: dict[str, Path]) -> tuple[dict[str, nib.Nifti1Image], list[str]]:
    """Every role's header (read_header), and the problems of those that cannot be read."""
    headers, problems = {}, []
    for role, path in files.items():
        try:
            headers[role] = read_header(path)
        except VolumeProblem as problem:
            problems.append(str(problem))
    return headers, problems


def squeeze_shape(shape) -> tuple[int, ...]:
    """(240, 240, 155, 1) -> (240, 240, 155): trailing singleton dimensions carry nothing."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def shape_str(shape) -> str:
    return "x".join(str(s) for s in squeeze_shape(shape))


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-2) -> bool:
    """Same voxel grid (shape and affine within `atol` mm), so voxels correspond one to one."""
    return squeeze_shape(a.shape) == squeeze_shape(b.shape) and np.allclose(a.affine, b.affine, atol=atol)


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """Axis permutation/flips taking the stored array to the closest RAS+ orientation."""
    return orientations.io_orientation(affine)


def load_canonical(img: nib.Nifti1Image, path: Path, dtype=np.float32) -> np.ndarray:
    """Decompresses one volume, scaled (scl_slope/inter applied) and reoriented to RAS+ ([x, y, z])."""
    try:
        data = img.get_fdata(dtype=dtype)
    except Exception as err:  # EOFError (truncated .gz), OSError (truncated .nii), zlib.error, MemoryError...
        raise VolumeProblem(f"{path} cannot be decompressed ({type(err).__name__}: {err}); expected a complete volume (corrupt or truncated file?)")
    data = data.reshape(squeeze_shape(data.shape))
    return np.ascontiguousarray(orientations.apply_orientation(data, canonical_ornt(img.affine)))


def from_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of `load_canonical`'s reorientation: a RAS+ array ([x, y, z]) back in the axis order and
    directions of the file whose affine is `affine`, so that it is saved with that affine."""
    ras = orientations.axcodes2ornt("RAS")
    return np.ascontiguousarray(orientations.apply_orientation(volume, orientations.ornt_transform(ras, canonical_ornt(affine))))


def canonical_affine(img: nib.Nifti1Image) -> np.ndarray:
    """The affine of the reoriented array (as `as_closest_canonical` would give)."""
    shape = squeeze_shape(img.shape)
    ornt = canonical_ornt(img.affine)
    return img.affine @ orientations.inv_ornt_aff(ornt, shape)


def axial(volume: np.ndarray) -> np.ndarray:
    """RAS+ volume [x, y, z] -> axial slices [z, rows, cols]: z inferior->superior, anterior at the top,
    the patient's right on the left (radiological convention). A view, not a copy."""
    return volume.transpose(2, 1, 0)[:, ::-1, ::-1]


def from_axial(slices: np.ndarray) -> np.ndarray:
    """The inverse of `axial`: axial slices [z, rows, cols] -> the RAS+ volume [x, y, z]."""
    return slices[:, ::-1, ::-1].transpose(2, 1, 0)
