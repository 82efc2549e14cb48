"""BraTS brain tumour MRI (NIfTI), read from its published folder layouts and served as axial slices.

Layouts (detected per case folder):
- BraTS 2018-2021: `<case>/<case>_<flair|t1|t1ce|t2>.nii[.gz]` and `<case>/<case>_seg.nii[.gz]`
  (the real BraTS 2015 subset is renamed into this naming);
- BraTS 2023: `<case>/<case>-<t2f|t1n|t1c|t2w>.nii.gz` and `<case>/<case>-seg.nii.gz`.
`modalities` lists the input channels in order, in either naming (flair = t2f, t1 = t1n, t1ce = t1c,
t2 = t2w). An optional `<case>_brainmask` volume defines the brain; otherwise the brain is every voxel
where some modality differs from its background value (the value in the volume's corners: 0 for raw
BraTS, a constant for data z-scored before skull-stripped zeros were kept).

Preprocessing (per case, streamed into the slice cache): reorient to RAS+, z-score each modality over
the brain (skipped with `already_normalized`), set outside-brain voxels to 0, cut axial slices, drop
slices with neither brain nor tumour, resize to `image_size` (area averaging; labels by majority vote),
store float16 slices and the raw label values. The target region is applied when serving, so changing
`region` or the slice fractions reuses the cache.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import nibabel as nib
import numpy as np

from data.base import DatasetError
from data.nifti import (
    VolumeProblem, axial, canonical_affine, find_nifti, load_canonical, read_header, read_headers, same_grid, shape_str,
    squeeze_shape, strip_nifti,
)
from data.volumes import Case, Processed, VolumeSliceData, resize_image, resize_labels
from data.volumes3d import Volume3D

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # bump when the stored slices (or their per-case info: 2 added the voxel spacing) change

# Configured modality -> canonical name; the canonical name -> file token per naming.
MODALITY_ALIASES = {"flair": "flair", "t2f": "flair", "t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t2": "t2", "t2w": "t2"}
FILE_TOKENS = {
    "2018": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "2023": {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
}
SEPARATOR = {"2018": "_", "2023": "-"}

# Label values per scheme, and the label values of each region.
LABEL_SCHEMES: dict[str, dict] = {
    "brats2015": {
        "labels": (1, 2, 3, 4),
        "meaning": "1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing tumour",
        "regions": {
            "whole_tumor": (1, 2, 3, 4), "tumor_core": (1, 3, 4), "enhancing_tumor": (4,),
            "edema": (2,), "necrosis": (1,), "non_enhancing_tumor": (3,),
        },
    },
    "brats2017": {
        "labels": (1, 2, 4),
        "meaning": "1 necrotic and non-enhancing tumour core (NCR/NET), 2 edema, 4 enhancing tumour",
        "regions": {"whole_tumor": (1, 2, 4), "tumor_core": (1, 4), "enhancing_tumor": (4,), "edema": (2,)},
    },
    "brats2023": {
        "labels": (1, 2, 3),
        "meaning": "1 necrotic tumour core (NCR, includes the former NET), 2 edema, 3 enhancing tumour",
        "regions": {"whole_tumor": (1, 2, 3), "tumor_core": (1, 3), "enhancing_tumor": (3,), "edema": (2,)},
    },
}
SCHEME_ALIASES = {"brats2018": "brats2017", "brats2019": "brats2017", "brats2020": "brats2017", "brats2021": "brats2017"}
REGION_ALIASES = {
    "wt": "whole_tumor", "tc": "tumor_core", "et": "enhancing_tumor", "ed": "edema",
    "whole_tumour": "whole_tumor", "tumour_core": "tumor_core", "enhancing_tumour": "enhancing_tumor",
    "non_enhancing_tumour": "non_enhancing_tumor", "net": "non_enhancing_tumor", "ncr": "necrosis",
}
ALL_REGIONS = ("whole_tumor", "tumor_core", "enhancing_tumor", "edema", "necrosis", "non_enhancing_tumor")
# BraTS 2023 "BraTS-GLI-00001-000": patient 00001, time point 000; BraTS 2015 "brats_tcia_pat123_1".


def resolve_scheme(label_scheme) -> str:
    if not isinstance(label_scheme, str) or (label_scheme not in LABEL_SCHEMES and label_scheme not in SCHEME_ALIASES):
        names = ", ".join([*LABEL_SCHEMES, *SCHEME_ALIASES])
        raise ValueError(f"label_scheme={label_scheme!r} is invalid: expected one of {names}")
    return SCHEME_ALIASES.get(label_scheme, label_scheme)


def resolve_regions(region, scheme: str) -> tuple[str, ...]:
    """A region name or a list of them (one output channel each); a region the scheme cannot express is
    a config error (e.g. necrosis alone in the 2017+ schemes, where label 1 merges necrosis and NET)."""
    names = [region] if isinstance(region, str) else list(region) if isinstance(region, (list, tuple)) else None
    if not names:
        raise ValueError(f"region={region!r} is invalid: expected one of {', '.join(ALL_REGIONS)} or a list of them")
    out = []
    for name in names:
        canonical = REGION_ALIASES.get(str(name).lower(), str(name).lower()) if isinstance(name, str) else None
        if canonical not in ALL_REGIONS:
            raise ValueError(f"region={name!r} is invalid: expected one of {', '.join(ALL_REGIONS)} (or wt, tc, et)")
        if canonical not in LABEL_SCHEMES[scheme]["regions"]:
            available = ", ".join(LABEL_SCHEMES[scheme]["regions"])
            raise ValueError(
                f"region={name!r} makes no sense with label_scheme={scheme} (labels: {LABEL_SCHEMES[scheme]['meaning']}): "
                f"no label value holds it alone; expected one of {available} (necrosis and non_enhancing_tumor exist "
                f"only in label_scheme=brats2015)"
            )
        if canonical in out:
            raise ValueError(f"region={region!r} lists {canonical} twice")
        out.append(canonical)
    return tuple(out)


def resolve_modalities(modalities) -> tuple[str, ...]:
    names = [modalities] if isinstance(modalities, str) else list(modalities) if isinstance(modalities, (list, tuple)) else []
    out = []
    for name in names:
        canonical = MODALITY_ALIASES.get(str(name).lower()) if isinstance(name, str) else None
        if canonical is None:
            raise ValueError(
                f"modalities={modalities!r} is invalid: {name!r} is not a BraTS modality; expected names from "
                f"flair, t1, t1ce, t2 (or the 2023 names t2f, t1n, t1c, t2w)"
            )
        if canonical in out:
            raise ValueError(f"modalities={modalities!r} lists {canonical} twice")
        out.append(canonical)
    if not out:
        raise ValueError(f"modalities={modalities!r} is invalid: expected at least one of flair, t1, t1ce, t2")
    return tuple(out)


def background_value(volume: np.ndarray) -> float:
    """The most common value of the 8 corner voxels: 0 for raw BraTS, the z-score of 0 for data
    normalised before the background was zeroed."""
    corners = volume[np.ix_([0, -1], [0, -1], [0, -1])].ravel()
    values, counts = np.unique(corners, return_counts=True)
    return float(values[np.argmax(counts)])


def load_modality(path: Path) -> np.ndarray:
    """One modality volume (3D; or 4D, modalities stacked last), decompressed and RAS+; checked finite."""
    volume = load_canonical(nib.load(str(path), mmap=False), path)
    if not np.isfinite(volume).all():
        raise VolumeProblem(f"{path} contains NaN or infinite values: expected finite intensities")
    return volume


def load_brainmask(path: Path) -> np.ndarray:
    """A brain mask volume, RAS+, as booleans (stored as 0 / 0.99999997)."""
    return load_canonical(nib.load(str(path), mmap=False), path) >= 0.5


def check_labels(seg: np.ndarray, path: Path, scheme: str) -> np.ndarray:
    """Float or integer label volume -> uint8 labels, checked against the scheme."""
    if not np.isfinite(seg).all():
        raise VolumeProblem(f"segmentation {path} contains NaN or infinite values: expected integer labels")
    rounded = np.rint(seg)
    if np.abs(seg - rounded).max(initial=0.0) > 1e-3:
        raise VolumeProblem(f"segmentation {path} has non-integer values: expected integer labels (0, {', '.join(map(str, LABEL_SCHEMES[scheme]['labels']))})")
    low, high = float(rounded.min(initial=0)), float(rounded.max(initial=0))
    allowed = set(LABEL_SCHEMES[scheme]["labels"]) | {0}
    if low < 0 or high > 255:
        found = sorted({int(low), int(high)} - allowed)
    else:
        labels = rounded.astype(np.uint8)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
        found = sorted(set(int(v) for v in present) - allowed)
        if not found:
            return labels
    raise VolumeProblem(
        f"segmentation {path} has label value(s) {found}, not in label_scheme={scheme} "
        f"(0 background, {LABEL_SCHEMES[scheme]['meaning']}): expected BraTS 2015 labels 0-4 (brats2015), "
        f"2017-2021 labels 0, 1, 2, 4 (brats2017..brats2021) or 2023 labels 0-3 (brats2023); set dataset.label_scheme"
    )


class BraTS(VolumeSliceData):
    """BraTS brain tumour segmentation, one binary region (or several) from multi-modal MRI slices."""

    kind = "brats"
    ROOT_EXPECTED = "the BraTS folder holding one folder per case"
    image_dtype = np.float16

    def __init__(
        self,
        *,
        modalities: Sequence[str],
        label_scheme: str,
        region: Union[str, Sequence[str]],
        already_normalized: bool,
        **volume,
    ):
        """BraTS's own keys; `volume` holds the keys every volumetric dataset takes (VolumeSliceData). Keys
        and defaults: conf/dataset/brats.yaml."""
        super().__init__(**volume)
        self.modalities = resolve_modalities(modalities)
        self.label_scheme = resolve_scheme(label_scheme)
        self.regions = resolve_regions(region, self.label_scheme)
        if not isinstance(already_normalized, bool):
            raise ValueError(f"already_normalized={already_normalized!r} is invalid: expected true or false")
        self.already_normalized = already_normalized
        self.in_channels = len(self.modalities)
        self.num_classes = len(self.regions)

    # -- scanning -----------------------------------------------------------------------------------

    def _describe(self, root: Path) -> str:
        return f"the BraTS data under {root}"

    def _expected(self, case: str = "<case>") -> str:
        first = self.modalities[0]
        return (
            f"{case}/{case}_{FILE_TOKENS['2018'][first]}.nii.gz (BraTS 2018-2021 naming) or "
            f"{case}/{case}-{FILE_TOKENS['2023'][first]}.nii.gz (2023 naming)"
        )

    def _scan(self, root: Path):
        if not root.is_dir():
            raise DatasetError(
                f"{self._folder_name(root)} {root} does not exist or is not a folder: expected the BraTS folder holding one "
                f"folder per case, e.g. {self._expected()}"
            )
        cases: list[Case] = []
        problems: list[tuple[Optional[str], str]] = []
        ignored: list[str] = []
        naming_2023 = brainmasks = 0
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir():
                ignored.append(f"{entry.path}: not a case folder")  # name_mapping.csv, survival_info.csv, licences...
                continue
            folder, case_id = Path(entry.path), entry.name
            naming, files, missing = self.case_files(folder)
            if naming is None and not missing:
                ignored.append(f"{folder}: no NIfTI file in it")  # __MACOSX and other folders without volumes
                continue
            if naming is not None and "seg" not in files:
                sep = SEPARATOR[naming]
                missing.append(f"case {case_id} has no segmentation (mask): expected {folder / f'{case_id}{sep}seg'}.nii.gz (or .nii)")
            if missing:
                problems += [(case_id, m) for m in missing]
                continue
            found = self._check_headers(case_id, files)
            if found:
                problems += [(case_id, m) for m in found]
                continue
            naming_2023 += naming == "2023"
            brainmasks += "brainmask" in files
            cases.append(Case(case_id, files, {"naming": naming}))
        if not cases and not problems:
            present = sorted(os.listdir(root))[:10]
            raise DatasetError(
                f"no BraTS case folder found in {root} (found: {', '.join(present) or 'nothing'}): expected one folder "
                f"per case, e.g. {self._expected()}"
            )
        self._note_ignored(ignored)
        return cases, problems, {"entries_ignored": len(ignored), "cases_naming_2023": naming_2023, "cases_with_brainmask": brainmasks}

    def case_files(self, folder: Path) -> tuple[Optional[str], dict[str, Path], list[str]]:
        """A case folder's volumes by role (each modality; `seg` and `brainmask` where present), the naming they
        follow ('2018' or '2023'; None for a folder without NIfTI files, or with none named after it) and the
        problems found (a modality missing, files not named after the folder), each naming the file expected."""
        case_id = folder.name
        names = set(os.listdir(folder))
        stems = {strip_nifti(n): n for n in names if strip_nifti(n)}
        if not stems:
            return None, {}, []
        if any(s.startswith(case_id + "-") for s in stems):
            naming = "2023"
        elif any(s.startswith(case_id + "_") for s in stems):
            naming = "2018"
        else:
            shown = ", ".join(sorted(stems.values())[:4])
            return None, {}, [f"case folder {folder} holds NIfTI files not named after it ({shown}): expected {self._expected(case_id)}"]
        sep = SEPARATOR[naming]
        files: dict[str, Path] = {}
        missing = []
        for modality in self.modalities:
            stem = f"{case_id}{sep}{FILE_TOKENS[naming][modality]}"
            path = find_nifti(folder, stem, names)
            if path is None:
                missing.append(f"case {case_id}: modality {modality} is missing: expected {folder / stem}.nii.gz (or .nii); found {', '.join(sorted(stems.values()))}")
            else:
                files[modality] = path
        for role in ("seg", "brainmask"):
            path = find_nifti(folder, f"{case_id}{sep}{role}", names)
            if path is not None:
                files[role] = path
        return naming, files, missing

    def _check_headers(self, case_id: str, files: dict[str, Path]) -> list[str]:
        headers, problems = read_headers(files)
        if problems:
            return problems
        first = self.modalities[0]
        ref = headers[first]
        for role, img in headers.items():
            if role == first or same_grid(ref, img):
                continue
            what = "segmentation" if role == "seg" else "brain mask" if role == "brainmask" else f"modality {role}"
            if shape_str(img.shape) != shape_str(ref.shape):
                problems.append(
                    f"case {case_id}: {what} {files[role]} is {shape_str(img.shape)} but its images ({files[first]}) are "
                    f"{shape_str(ref.shape)}: expected the same shape"
                )
            else:
                problems.append(
                    f"case {case_id}: {what} {files[role]} has another voxel-to-world affine than {files[first]}: "
                    f"expected every volume of a case on one grid"
                )
        return problems

    # -- preprocessing ------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "version": PREPROCESS_VERSION, "modalities": list(self.modalities), "label_scheme": self.label_scheme,
            "image_size": self.image_size, "already_normalized": self.already_normalized,
        }

    def _target_values(self) -> list[tuple[int, ...]]:
        return [LABEL_SCHEMES[self.label_scheme]["regions"][r] for r in self.regions]

    def _process(self, case: Case) -> Processed:
        volumes = [load_modality(case.files[modality]) for modality in self.modalities]
        seg_path = case.files["seg"]
        seg_image = nib.load(str(seg_path), mmap=False)
        labels = check_labels(load_canonical(seg_image, seg_path), seg_path, self.label_scheme)
        sx, sy, sz = (float(v) for v in nib.affines.voxel_sizes(canonical_affine(seg_image))[:3])
        brain = load_brainmask(case.files["brainmask"]) if "brainmask" in case.files else None
        images, keep, out_labels = self.preprocess(volumes, brain, labels)
        depth, rows, cols = axial(labels).shape
        size = self.image_size
        # mm per voxel of the served grid (slices [z, rows, cols] resized to size x size): per-case HD95 in mm
        spacing = [sz, sy * rows / size, sx * cols / size]
        info = {"naming": case.info.get("naming", "2018"), "brainmask": "brainmask" in case.files, "spacing": spacing}
        return Processed(images, out_labels, keep, {"no_brain": depth - len(keep)}, depth, info)

    def preprocess(self, volumes: list[np.ndarray], brain: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                   ) -> tuple[np.ndarray, list[int], Optional[np.ndarray]]:
        """RAS+ modality volumes (in `modalities` order; normalised in place) -> the kept axial slices resized to
        image_size [n, S, S, C], their z indices, and (given `labels`, RAS+ uint8) their labels resized by majority
        vote. The brain is `brain` (a brain mask) or every voxel where some modality differs from its background
        value; each modality is z-scored over it (unless already_normalized) and zeroed outside it; a slice with
        neither brain nor tumour is dropped."""
        if brain is None:
            brain = np.zeros(volumes[0].shape, dtype=bool)
            for volume in volumes:
                brain |= volume != background_value(volume)
        for volume in volumes:
            inside = volume[brain]
            if not self.already_normalized and inside.size:
                std = float(inside.std())
                volume -= float(inside.mean())
                volume /= std if std > 1e-6 else 1.0
            volume[~brain] = 0.0

        slices_axial = [axial(v) for v in volumes]
        brain_axial = axial(brain)
        labels_axial = None if labels is None else axial(labels)
        depth = brain_axial.shape[0]
        keep = [z for z in range(depth) if brain_axial[z].any() or (labels_axial is not None and labels_axial[z].any())]
        size = self.image_size
        images = np.empty((len(keep), size, size, len(volumes)), dtype=self.image_dtype)
        out_labels = None if labels is None else np.empty((len(keep), size, size), dtype=np.uint8)
        for i, z in enumerate(keep):
            stacked = np.stack([s[z] for s in slices_axial], axis=-1)
            images[i] = resize_image(stacked, size)
            if out_labels is not None:
                out_labels[i] = resize_labels(labels_axial[z], size)
        return images, keep, out_labels

    # -- new data (pipeline.predict) ----------------------------------------------------------------

    def read_case(self, folder: Path) -> tuple[list[np.ndarray], Optional[np.ndarray], nib.Nifti1Image]:
        """A case folder of new data (a segmentation there is not read): its modality volumes in `modalities` order
        and its brain mask (None without one), RAS+, and its first modality's image (the grid they share). A
        missing, unreadable or off-grid file is a VolumeProblem naming it."""
        naming, files, problems = self.case_files(folder)
        if naming is None and not problems:
            raise VolumeProblem(f"{folder} holds no NIfTI file: expected {self._expected(folder.name)}")
        files.pop("seg", None)
        problems = problems or self._check_headers(folder.name, files)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise VolumeProblem(problems[0] + more)
        volumes = [load_modality(files[modality]) for modality in self.modalities]
        brain = load_brainmask(files["brainmask"]) if "brainmask" in files else None
        return volumes, brain, nib.load(str(files[self.modalities[0]]))

    def read_stacked(self, path: Path) -> tuple[list[np.ndarray], nib.Nifti1Image]:
        """One NIfTI file of new data holding every modality (3D for one modality; else 4D, the modalities along
        the last axis in `modalities` order): the volumes, RAS+, and the file's image. A file of another
        modality count, or one that cannot be read, is a VolumeProblem naming it."""
        img = read_header(path, dims=(3, 4))
        shape = squeeze_shape(img.shape)
        count = shape[3] if len(shape) == 4 else 1
        if count != len(self.modalities):
            raise VolumeProblem(
                f"{path} holds {count} modalit{'y' if count == 1 else 'ies'} (shape {shape_str(shape)}): expected "
                f"{len(self.modalities)} ({', '.join(self.modalities)}), a 3D volume for one modality, else 4D with the "
                f"modalities along the last axis in that order"
            )
        stacked = load_modality(path)
        return [np.ascontiguousarray(stacked[..., c]) for c in range(count)] if stacked.ndim == 4 else [stacked], img

    def _extra_stats(self, meta: dict, used) -> dict[str, float]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes}


class BraTS3D(Volume3D, BraTS):
    """BraTS in 3D: whole volumes and random patches (data/volumes3d.py). Its dropped slices (neither brain nor
    tumour) were zeroed by the preprocessing, so a gap in a case's slices is filled with zeros exactly."""

    GAPS_ARE_ZERO = True
