"""Kaggle COVID-19 CT reader on synthetic volumes in the real layout: metadata with a foreign prefix,
same-name folders, HU and 0-255 volumes, orientation, the study's preprocessing, targets, offline
flips, patient splits and bad input (there are no real CT volumes in ../shared)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_config, kwargs_of
from omegaconf import OmegaConf

from data import DatasetError, build_data
from data.covid_ct import CovidCT, detect_intensity, to_uint8
from data.nifti import VolumeProblem
from data.synthetic_volumes import HU_WINDOW, KAGGLE_PREFIX, write_synthetic_covid_ct

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 40, 14)
COUNT = 6


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("covid") / "kaggle"
    write_synthetic_covid_ct(root, count=COUNT, seed=1, shape=SHAPE)
    return root


@pytest.fixture
def copy_root(ct_root, tmp_path) -> Path:
    return Path(shutil.copytree(ct_root, tmp_path / "copy"))


def load(root, cache=None, seed=0, **kwargs) -> CovidCT:
    data = CovidCT(**kwargs_of("dataset", "covid_ct", root=str(root), **{"image_size": 24, "cache_dir": cache, "workers": 1, **kwargs}))
    data.setup(seed)
    return data


def cached_case(data: CovidCT, case_id: str):
    c = data._cached
    entry = next(e for e in c.meta["cases"] if e["id"] == case_id)
    rows = slice(entry["start"], entry["stop"])
    return np.asarray(c.images[rows]), np.asarray(c.labels[rows]), c.slice[rows]


def all_cases(data) -> list[str]:
    return sorted(sum(data.split_ids().values(), []))


def test_the_kaggle_layout_is_read(ct_root, tmp_path):
    rows = list(csv.DictReader(open(ct_root / "metadata.csv")))
    assert rows[0]["ct_scan"].startswith(KAGGLE_PREFIX)  # paths of the uploader's machine
    assert (ct_root / "ct_scans" / rows[2]["ct_scan"].split("/")[-1]).is_dir()  # the same-name folder quirk
    data = load(ct_root, tmp_path / "cache")
    assert (data.in_channels, data.num_classes) == (1, 1)
    stats = data.stats()
    assert stats["cases"] == COUNT and stats["patients"] == COUNT - 1  # two radiopaedia series of one patient
    assert stats["volumes_hu"] == 3 and stats["volumes_windowed"] == 3
    assert stats["files_in_same_name_folder"] == 6  # CT, lung and infection mask of volumes 3 and 6
    assert stats["slices_dropped_nan_mask"] == 1 and stats["slices_dropped_duplicate"] == 1
    assert stats["slices_dropped_no_lung"] > 0
    dropped = sum(v for k, v in stats.items() if k.startswith("slices_dropped_") and not k.startswith("slices_dropped_empty"))
    assert stats["slices_cached"] + dropped == stats["slices_total"] == COUNT * SHAPE[2]
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        assert len(ds) == len(ds.cases) == stats[f"n_{split}"] > 0
        image, mask = ds[0]
        assert image.shape == (1, 24, 24) and image.dtype == torch.float32
        assert mask.shape == (1, 24, 24) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert -2.1 <= float(image.min()) and float(image.max()) <= 2.1  # (x/255 - 0.5) / 0.25
    assert stats["foreground_fraction"] > 0.01


def test_patient_split_keeps_series_of_one_patient_together(ct_root, tmp_path):
    for split_seed in range(6):
        ids = load(ct_root, tmp_path / "cache", split_seed=split_seed).split_ids()
        together = [c for c in sum(ids.values(), []) if c.startswith("radiopaedia_org_covid-19-pneumonia-7_")]
        assert len(together) == 2
        assert any(set(together) <= set(cases) for cases in ids.values()), (split_seed, ids)


def test_hu_and_windowed_volumes_meet_in_one_range(copy_root, tmp_path):
    """Rewrite a HU volume as 0-255 with the same window: the stored slices must not change."""
    before = load(copy_root, tmp_path / "cache")
    path = copy_root / "ct_scans" / "coronacases_org_001.nii"
    img = nib.load(str(path), mmap=False)  # the file is rewritten below
    hu = np.asarray(img.dataobj, dtype=np.float32)
    assert hu.min() < -900 and img.get_data_dtype() == np.int16
    low, high = HU_WINDOW
    windowed = np.clip(np.rint((hu - low) * 255 / (high - low)), 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(windowed, img.affine), str(path))
    after = load(copy_root, tmp_path / "cache")
    assert after.stats()["volumes_windowed"] == before.stats()["volumes_windowed"] + 1
    a, la, za = cached_case(before, "coronacases_org_001")
    b, lb, zb = cached_case(after, "coronacases_org_001")
    np.testing.assert_array_equal(za, zb)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_intensity_kind_detection():
    assert detect_intensity(np.array([-1024.0, 40, 900]), Path("x.nii")) == "hu"
    assert detect_intensity(np.array([0.0, 17, 255]), Path("x.nii")) == "windowed"
    with pytest.raises(VolumeProblem, match=r"x\.nii has intensities 0\.\.3000.*dataset\.intensity=hu"):
        detect_intensity(np.array([0.0, 3000]), Path("x.nii"))
    np.testing.assert_array_equal(to_uint8(np.array([-2000.0, -1250, -500, 250, 900]), "hu", (-1250, 250)), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 17.4, 300]), "windowed", (-1250, 250)), [0, 17, 255])


def test_an_ambiguous_range_is_an_error_unless_the_kind_is_set(copy_root, tmp_path):
    path = copy_root / "ct_scans" / "coronacases_org_003.nii"
    img = nib.load(str(path), mmap=False)  # the file is rewritten below
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) + 1100).astype(np.int16), img.affine), str(path))  # HU + 1100
    with pytest.raises(DatasetError, match="coronacases_org_003.nii has intensities .* neither Hounsfield"):
        load(copy_root, tmp_path / "cache")
    forced = load(copy_root, tmp_path / "cache", intensity="hu", hu_window=[-150, 1350])
    assert forced.stats()["volumes_hu"] == COUNT


def test_storage_orientation_does_not_change_the_slices(tmp_path):
    """RAS, LPS, and an oblique (4 degree tilt) permuted and flipped affine: the same slices come out."""
    for layout in ("RAS", "LPS", "oblique"):
        write_synthetic_covid_ct(tmp_path / layout, count=3, seed=2, shape=SHAPE, orientation=layout, quirks=False)
    ct = nib.load(str(tmp_path / "oblique" / "ct_scans" / "coronacases_org_001.nii"))
    assert nib.aff2axcodes(ct.affine) == ("P", "I", "L") and np.count_nonzero(np.abs(ct.affine[:3, :3]) > 1e-6) > 3
    ref = load(tmp_path / "RAS", tmp_path / "cache")
    for layout in ("LPS", "oblique"):
        other = load(tmp_path / layout, tmp_path / "cache")
        for case in all_cases(ref):
            for x, y in zip(cached_case(ref, case), cached_case(other, case)):
                np.testing.assert_array_equal(x, y)


def test_anatomy_comes_out_in_the_radiological_view(ct_root, tmp_path):
    """Spine posterior -> bottom of the image; the smaller (left, heart-side) lung -> the image's right."""
    data = load(ct_root, tmp_path / "cache", crop="none", clahe_clip=0.0, image_size=40)
    for case in all_cases(data):
        images, labels, _ = cached_case(data, case)
        middle = len(images) // 2
        image, lungs = images[middle, ..., 0].astype(float), (labels[middle] & 1) > 0
        assert image[28:, 16:24].max() == 255 > 240 > image[:12, 16:24].max()  # bone (700 HU) at the bottom only
        assert lungs[:, :20].sum() > lungs[:, 20:].sum() > 0  # patient's right lung (bigger) on the left


def test_crop_modes(ct_root, tmp_path):
    per_slice = load(ct_root, tmp_path / "cache", target="lungs")
    whole = load(ct_root, tmp_path / "cache", target="lungs", crop="none")
    per_volume = load(ct_root, tmp_path / "cache", target="lungs", crop="volume")
    case = all_cases(per_slice)[0]
    _, labels, _ = cached_case(per_slice, case)
    for lab in labels:  # the lung box fills each slice: lung on every border
        lung = (lab & 1) > 0
        assert lung[0].any() and lung[-1].any() and lung[:, 0].any() and lung[:, -1].any()
    frac = {name: d.stats()["foreground_fraction"] for name, d in (("slice", per_slice), ("volume", per_volume), ("none", whole))}
    assert frac["slice"] > frac["volume"] > frac["none"]


def test_clahe_changes_pixels(ct_root, tmp_path):
    with_clahe = load(ct_root, tmp_path / "cache")
    without = load(ct_root, tmp_path / "cache", clahe_clip=0.0)
    case = all_cases(without)[0]
    a, la, _ = cached_case(with_clahe, case)
    b, lb, _ = cached_case(without, case)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, b)


def test_targets_infection_and_lungs(ct_root, tmp_path):
    infection = load(ct_root, tmp_path / "cache")
    lungs = load(ct_root, tmp_path / "cache", target="lungs")
    assert lungs.stats()["cache_hit"] == 1  # the target is chosen when serving
    ds_i, ds_l = infection.dataset("train"), lungs.dataset("train")
    assert ds_i.ids == ds_l.ids
    inside = total = 0
    for index in range(len(ds_i)):
        mi, ml = ds_i[index][1], ds_l[index][1]
        inside += float((mi * ml).sum())
        total += float(mi.sum())
    assert total > 0 and inside / total > 0.95
    assert lungs.stats()["foreground_fraction"] > 5 * infection.stats()["foreground_fraction"]


def test_offline_flips_add_two_copies_to_train_only(ct_root, tmp_path):
    plain = load(ct_root, tmp_path / "cache")
    flipped = load(ct_root, tmp_path / "cache", offline_flips=True)
    n = len(plain.dataset("train"))
    ds = flipped.dataset("train")
    assert len(ds) == 3 * n and flipped.stats()["offline_flip_copies"] == 2 * n
    assert len(flipped.dataset("test")) == len(plain.dataset("test"))
    assert ds.ids[n] == ds.ids[0] + "#flipud" and ds.cases[2 * n] == ds.cases[0] + "#fliplr"
    image, mask = ds[0]
    up_down, up_down_mask = ds[n]
    left_right, _ = ds[2 * n]
    assert torch.equal(up_down, torch.flip(image, dims=[1])) and torch.equal(up_down_mask, torch.flip(mask, dims=[1]))
    assert torch.equal(left_right, torch.flip(image, dims=[2]))


def test_empty_target_fraction_and_cases_order(ct_root, tmp_path):
    data = load(ct_root, tmp_path / "cache", empty_slice_fraction=0.0)
    ds = data.dataset("train")
    assert all(float(ds[i][1].sum()) > 0 for i in range(len(ds)))
    test = data.dataset("test")
    assert any(float(test[i][1].sum()) == 0 for i in range(len(test)))  # eval keeps every lung slice
    for split in ("val", "test"):
        d = data.dataset(split)
        for case in set(d.cases):
            slices = [int(i.rsplit("/", 1)[1]) for i, c in zip(d.ids, d.cases) if c == case]
            assert slices == sorted(slices)


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["lung_mask", "infection_mask", "ct_scans", "metadata.csv"])
def test_missing_folder_or_metadata(copy_root, tmp_path, missing):
    target = copy_root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=f"{missing}/? missing in {copy_root}.*expected the Kaggle layout"):
        load(copy_root, tmp_path / "cache")


def test_root_one_level_too_high(ct_root, tmp_path):
    with pytest.raises(DatasetError, match=f"use root={ct_root}"):
        load(ct_root.parent, tmp_path / "cache")


def test_metadata_without_a_column(copy_root, tmp_path):
    lines = (copy_root / "metadata.csv").read_text().splitlines()
    (copy_root / "metadata.csv").write_text("\n".join([lines[0].replace("infection_mask,", "infection,")] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match="metadata.csv has columns .*expected ct_scan, lung_mask, infection_mask"):
        load(copy_root, tmp_path / "cache")


def test_case_without_a_mask_and_skip(copy_root, tmp_path, caplog):
    victim = copy_root / "infection_mask" / "coronacases_003.nii"
    victim.unlink()
    with pytest.raises(DatasetError, match=f"infection mask coronacases_003.nii .*not found: expected {victim}"):
        load(copy_root, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        data = load(copy_root, tmp_path / "cache", on_missing="skip")
    assert data.stats()["cases_skipped"] == 1 and "coronacases_org_003" not in all_cases(data)
    assert "coronacases_003.nii" in caplog.text


def test_listed_ct_scan_missing(copy_root, tmp_path):
    (copy_root / "ct_scans" / "coronacases_org_003.nii").unlink()
    with pytest.raises(DatasetError, match="CT scan coronacases_org_003.nii .*line 6.* not found"):
        load(copy_root, tmp_path / "cache")
    shutil.rmtree(copy_root / "ct_scans" / "coronacases_org_002.nii")  # a same-name folder, gone
    with pytest.raises(DatasetError, match=r"(?s)2 problem.*coronacases_org_002.nii/coronacases_org_002.nii"):
        load(copy_root, tmp_path / "cache")


def test_unlisted_files_are_ignored_and_counted(copy_root, tmp_path, caplog):
    shutil.copy(copy_root / "ct_scans" / "coronacases_org_001.nii", copy_root / "ct_scans" / "extra_scan.nii")
    with caplog.at_level("WARNING"):
        data = load(copy_root, tmp_path / "cache")
    assert data.stats()["entries_ignored"] == 1 and "extra_scan.nii: not listed in" in caplog.text
    (entry,) = data.ignored_files()
    assert entry.startswith(str(copy_root / "ct_scans" / "extra_scan.nii"))


def test_mask_of_another_shape_names_both_files(copy_root, tmp_path):
    path = copy_root / "lung_mask" / "coronacases_001.nii"
    img = nib.load(str(path), mmap=False)  # the file is rewritten below
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(path))
    with pytest.raises(DatasetError, match=r"lung mask .*coronacases_001.nii is 40x40x13 but its CT scan .*coronacases_org_001.nii is 40x40x14"):
        load(copy_root, tmp_path / "cache")


def test_mask_on_another_grid(copy_root, tmp_path):
    path = copy_root / "infection_mask" / "coronacases_001.nii"
    img = nib.load(str(path), mmap=False)  # the file is rewritten below
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1, 1, 2, 1])), str(path))
    with pytest.raises(DatasetError, match="another voxel-to-world affine"):
        load(copy_root, tmp_path / "cache")


def test_corrupt_and_truncated_volumes_are_named(copy_root, tmp_path):
    garbage = copy_root / "lung_mask" / "coronacases_001.nii"
    garbage.write_bytes(b"\0" * 100)
    truncated = copy_root / "ct_scans" / "coronacases_org_003.nii"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(DatasetError) as err:
        load(copy_root, tmp_path / "cache")
    msg = str(err.value)
    assert "2 problem(s)" in msg and f"{garbage} cannot be read as NIfTI" in msg and f"{truncated} is truncated" in msg


def test_gzipped_volume_truncated_inside_is_found_while_building(copy_root, tmp_path):
    import gzip

    plain = copy_root / "ct_scans" / "coronacases_org_001.nii"
    packed = gzip.compress(plain.read_bytes())
    plain.unlink()
    Path(str(plain) + ".gz").write_bytes(packed[:-300])  # metadata says .nii: the .nii.gz is found too
    with pytest.raises(DatasetError, match=r"coronacases_org_001\.nii\.gz cannot be decompressed"):
        load(copy_root, tmp_path / "cache")


def test_nan_in_a_ct_scan_is_an_error(copy_root, tmp_path):
    path = copy_root / "ct_scans" / "radiopaedia_org_covid-19-pneumonia-4_85068_1-dcm.nii"
    img = nib.load(str(path), mmap=False)  # the file is rewritten below
    data = np.asarray(img.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(DatasetError, match="pneumonia-4_85068_1-dcm.nii contains NaN"):
        load(copy_root, tmp_path / "cache")


def test_all_empty_dataset(copy_root, tmp_path):
    for path in copy_root.glob("infection_mask/**/*.nii"):
        if path.is_file():
            img = nib.load(str(path), mmap=False)  # the file is rewritten below
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(path))
    with pytest.raises(DatasetError, match="all-empty dataset: no slice .* non-empty target"):
        load(copy_root, tmp_path / "cache")
    load(copy_root, tmp_path / "cache", target="lungs")  # lungs are still there


@pytest.mark.parametrize(
    "key, value",
    [("target", "lesion"), ("intensity", "raw"), ("hu_window", [250, -1250]), ("hu_window", [1]), ("crop", "box"),
     ("clahe_grid", 0), ("offline_flips", 1), ("mean", [0.5, 0.5]), ("std", [0]), ("vflip_p", 3), ("on_missing", "warn")],
)
def test_bad_settings_name_their_key(key, value, ct_root):
    with pytest.raises(ValueError, match=key):
        CovidCT(**kwargs_of("dataset", "covid_ct", root=str(ct_root), **{key: value}))


# -- configs ----------------------------------------------------------------------------------------


def _yaml(name: str):
    return OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")




def test_synthetic_covid_ct_from_its_yaml(tmp_path):
    cfg = compose_config("dataset=synthetic_covid_ct", f"paths.outputs={tmp_path}", "dataset.synthetic.count=6")
    data = build_data(cfg.dataset, seed=0)
    assert data.stats()["synthetic_generated"] == 1 and data.stats()["cache_hit"] == 0
    assert data.root == (tmp_path / "data" / "synthetic_covid_ct").resolve()
    again = build_data(cfg.dataset, seed=0)
    assert again.stats()["synthetic_generated"] == 0 and again.stats()["cache_hit"] == 1
