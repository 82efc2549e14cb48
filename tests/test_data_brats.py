"""BraTS reader: both namings, every label scheme and region, orientation, normalisation, slice choice,
patient splits, bad input, and the real subsets (skipped where ../shared is absent)."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REAL, compose_config, kwargs_of, requires_real
from omegaconf import OmegaConf

from data import DatasetError, SegmentationData, build_data
from data.brats import BraTS, LABEL_SCHEMES, resolve_regions
from data.synthetic_volumes import write_synthetic_brats

REPO = Path(__file__).resolve().parents[1]
REAL_2015 = REAL / "brats2015_subset"
REAL_2023 = REAL / "brats2023_no_gt"
SHAPE = (32, 32, 20)
COUNT = 5


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats") / "b2021"
    write_synthetic_brats(root, count=COUNT, seed=1, shape=SHAPE)
    return root


@pytest.fixture
def copy_root(brats_root, tmp_path) -> Path:
    return Path(shutil.copytree(brats_root, tmp_path / "copy"))


def load(root, tmp_cache=None, seed=0, **kwargs) -> BraTS:
    data = BraTS(**kwargs_of("dataset", "brats", root=str(root), **{"image_size": 16, "cache_dir": tmp_cache, "workers": 1, **kwargs}))
    data.setup(seed)
    return data


def cached_case(data: BraTS, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, slice indices) of one case as stored in the cache."""
    c = data._cached
    entry = next(e for e in c.meta["cases"] if e["id"] == case_id)
    rows = slice(entry["start"], entry["stop"])
    return np.asarray(c.images[rows], np.float32), np.asarray(c.labels[rows]), c.slice[rows]


# -- reading ----------------------------------------------------------------------------------------


def test_2018_naming_is_read_and_served(brats_root, tmp_path):
    data = load(brats_root, tmp_path / "cache")
    assert isinstance(data, SegmentationData)
    assert (data.in_channels, data.num_classes, data.image_size) == (4, 1, 16)
    stats = data.stats()
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["cases"] == stats["cases_found"] == COUNT and stats["cases_skipped"] == 0
    assert stats["entries_ignored"] == 1  # name_mapping.csv
    assert stats["slices_total"] == COUNT * SHAPE[2]
    assert stats["slices_dropped_no_brain"] > 0  # the top and bottom slices hold no brain
    assert stats["slices_cached"] + stats["slices_dropped_no_brain"] == stats["slices_total"]
    assert stats["cases_train"] + stats["cases_val"] + stats["cases_test"] == COUNT
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        assert len(ds) == len(ds.ids) == len(ds.cases) == stats[f"n_{split}"] > 0
        assert set(ds.cases) == set(data.split_ids()[split])
        image, mask = ds[0]
        assert image.shape == (4, 16, 16) and image.dtype == torch.float32
        assert mask.shape == (1, 16, 16) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    batch = next(iter(torch.utils.data.DataLoader(data.dataset("train", augment=True), batch_size=4)))
    assert batch[0].shape == (4, 4, 16, 16) and batch[1].shape == (4, 1, 16, 16)


def test_items_of_a_case_are_contiguous_and_in_ascending_slice_order(brats_root, tmp_path):
    data = load(brats_root, tmp_path / "cache", eval_empty_slice_fraction=0.5)
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        seen, previous = [], None
        for case_id, item_id in zip(ds.cases, ds.ids):
            case, _, z = item_id.rpartition("/")
            assert case == case_id
            if case_id != previous:
                assert case_id not in seen, f"{case_id} is not contiguous in {split}"
                seen.append(case_id)
                last = -1
            assert int(z) > last
            last, previous = int(z), case_id


def test_2023_naming_reads_the_same_volumes(tmp_path):
    write_synthetic_brats(tmp_path / "old", count=3, seed=2, shape=SHAPE, naming="2018", label_scheme="brats2023")
    write_synthetic_brats(tmp_path / "new", count=3, seed=2, shape=SHAPE, naming="2023", label_scheme="brats2023")
    assert (tmp_path / "new/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz").is_file()
    old = load(tmp_path / "old", tmp_path / "cache", label_scheme="brats2023", modalities=["flair", "t1ce"])
    new = load(tmp_path / "new", tmp_path / "cache", label_scheme="brats2023", modalities=["t2f", "t1c"])  # 2023 names
    assert new.modalities == ("flair", "t1ce") and new.stats()["cases_naming_2023"] == 3
    for a, b in zip(sorted(old.split_ids()["train"] + old.split_ids()["val"] + old.split_ids()["test"]),
                    sorted(new.split_ids()["train"] + new.split_ids()["val"] + new.split_ids()["test"])):
        images_a, labels_a, _ = cached_case(old, a)
        images_b, labels_b, _ = cached_case(new, b)
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def test_modality_order_is_the_channel_order(brats_root, tmp_path):
    both = load(brats_root, tmp_path / "c", modalities=["flair", "t1ce"])
    swapped = load(brats_root, tmp_path / "c", modalities=["t1ce", "flair"])
    case = both.split_ids()["train"][0]
    a, _, _ = cached_case(both, case)
    b, _, _ = cached_case(swapped, case)
    np.testing.assert_array_equal(a[..., 0], b[..., 1])
    np.testing.assert_array_equal(a[..., 1], b[..., 0])


# -- label schemes and regions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheme_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("schemes")
    roots = {}
    for scheme in ("brats2015", "brats2021", "brats2023"):
        roots[scheme] = base / scheme
        write_synthetic_brats(roots[scheme], count=3, seed=4, shape=SHAPE, label_scheme=scheme)
    return roots


def test_each_label_scheme_has_its_label_values(scheme_roots):
    expected = {"brats2015": {0, 1, 2, 3, 4}, "brats2021": {0, 1, 2, 4}, "brats2023": {0, 1, 2, 3}}
    for scheme, root in scheme_roots.items():
        case = sorted(p for p in root.iterdir() if p.is_dir())[0]
        seg = nib.load(str(case / f"{case.name}_seg.nii.gz"))
        assert set(np.unique(np.asarray(seg.dataobj)).astype(int)) == expected[scheme]
        assert seg.get_data_dtype() == (np.float32 if scheme == "brats2015" else np.uint8)


@pytest.mark.parametrize("region", ["whole_tumor", "tumor_core", "enhancing_tumor", "edema"])
def test_a_region_is_the_same_tissue_in_every_scheme(scheme_roots, region, tmp_path):
    """The generator draws the same tumour for a seed; each scheme's table must find the same voxels."""
    masks = {}
    for scheme, root in scheme_roots.items():
        data = load(root, tmp_path / "cache", label_scheme=scheme, region=region, eval_empty_slice_fraction=1.0, empty_slice_fraction=1.0)
        masks[scheme] = {}
        for split in ("train", "val", "test"):
            ds = data.dataset(split)
            for index in range(len(ds)):
                masks[scheme][ds.ids[index].split("/", 1)[1]] = ds[index][1]
    by_index = [dict(sorted(m.items())) for m in masks.values()]
    for other in by_index[1:]:
        assert list(other) == list(by_index[0])
        for key in other:
            assert torch.equal(other[key], by_index[0][key]), key
    assert sum(float(m.sum()) for m in by_index[0].values()) > 0


def test_regions_nest_and_give_one_channel_each(scheme_roots, tmp_path):
    data = load(scheme_roots["brats2015"], tmp_path / "cache", label_scheme="brats2015", region=["wt", "tc", "et", "non_enhancing_tumor"])
    assert data.num_classes == 4 and data.regions == ("whole_tumor", "tumor_core", "enhancing_tumor", "non_enhancing_tumor")
    ds = data.dataset("train")
    total = torch.zeros(4)
    for index in range(len(ds)):
        _, mask = ds[index]
        wt, tc, et, net = mask
        assert mask.shape == (4, 16, 16)
        assert bool((tc <= wt).all() and (et <= tc).all() and (net <= tc).all())
        total += mask.sum(dim=(1, 2))
    assert total[0] > total[1] > total[2] > 0 and total[3] > 0


@pytest.mark.parametrize(
    "scheme, region, message",
    [
        ("brats2021", "necrosis", "makes no sense with label_scheme=brats2017"),
        ("brats2023", "non_enhancing_tumor", "makes no sense with label_scheme=brats2023"),
        ("brats2020", "net", "makes no sense"),
        ("brats2015", "tumour", "region='tumour' is invalid"),
        ("brats2016", "whole_tumor", "label_scheme='brats2016' is invalid"),
        ("brats2015", ["wt", "whole_tumor"], "twice"),
    ],
)
def test_a_scheme_region_pair_that_makes_no_sense_is_a_config_error(scheme, region, message, brats_root):
    with pytest.raises(ValueError, match=message):
        BraTS(**kwargs_of("dataset", "brats", root=str(brats_root), label_scheme=scheme, region=region))


def test_every_scheme_region_pair_in_the_table_resolves():
    for scheme, table in LABEL_SCHEMES.items():
        for region in table["regions"]:
            assert resolve_regions(region, scheme) == (region,)


def test_labels_outside_the_scheme_name_the_file(scheme_roots, tmp_path):
    with pytest.raises(DatasetError, match=r"_seg\.nii\.gz has label value\(s\) \[3\], not in label_scheme=brats2017") as err:
        load(scheme_roots["brats2015"], tmp_path / "cache", label_scheme="brats2021")
    assert "set dataset.label_scheme" in str(err.value)


# -- orientation and intensities --------------------------------------------------------------------


def test_storage_orientation_does_not_change_the_slices(tmp_path):
    """LPS (the real files), RAS, and an oblique (4 degree) permuted and flipped affine: one anatomy."""
    for layout in ("LPS", "RAS", "oblique"):
        write_synthetic_brats(tmp_path / layout, count=3, seed=5, shape=SHAPE, orientation=layout)
    affine = nib.load(str(next((tmp_path / "oblique").glob("*/*_flair.nii.gz")))).affine
    assert nib.aff2axcodes(affine) == ("P", "I", "L") and np.count_nonzero(np.abs(affine[:3, :3]) > 1e-6) > 3  # oblique
    ref = load(tmp_path / "LPS", tmp_path / "cache")
    for layout in ("RAS", "oblique"):
        other = load(tmp_path / layout, tmp_path / "cache")
        for case in sorted(ref.split_ids()["train"] + ref.split_ids()["val"] + ref.split_ids()["test"]):
            a, la, za = cached_case(ref, case)
            b, lb, zb = cached_case(other, case)
            np.testing.assert_array_equal(za, zb)
            np.testing.assert_array_equal(la, lb)
            np.testing.assert_allclose(a, b, atol=1e-2)


def test_slices_are_shown_in_the_radiological_convention(brats_root, tmp_path):
    """The generator puts every tumour in the patient's left hemisphere: it must appear on the image's right."""
    data = load(brats_root, tmp_path / "cache", image_size=32)
    for case in data.split_ids()["train"]:
        _, labels, _ = cached_case(data, case)
        tumour = labels > 0
        assert tumour[:, :, 16:].sum() > 5 * tumour[:, :, :16].sum()


def test_intensities_are_z_scored_inside_the_brain(brats_root, tmp_path):
    data = load(brats_root, tmp_path / "cache", image_size=32)
    case = data.split_ids()["val"][0]
    images, _, _ = cached_case(data, case)
    inside = np.abs(images).sum(axis=-1) > 0
    for channel in range(4):
        values = images[..., channel][inside]
        assert abs(values.mean()) < 0.25 and 0.6 < values.std() < 1.4
    assert (images[~inside] == 0).all()


def test_already_normalized_data_with_a_brainmask(tmp_path):
    """As the real 2015 subset: float32 z-scores with a constant non-zero background, brainmask 0.99999997."""
    write_synthetic_brats(tmp_path / "norm", count=3, seed=6, shape=SHAPE, label_scheme="brats2015", normalized=True, brainmask=True)
    write_synthetic_brats(tmp_path / "raw", count=3, seed=6, shape=SHAPE, label_scheme="brats2015")
    mask = next((tmp_path / "norm").glob("*/*_brainmask.nii.gz"))
    assert np.asarray(nib.load(str(mask)).dataobj).max() == pytest.approx(0.99999997)
    flair = np.asarray(nib.load(str(next((tmp_path / "norm").glob("*/*_flair.nii.gz")))).dataobj)
    assert flair[0, 0, 0] < -1  # background is not zero
    kwargs = dict(label_scheme="brats2015", image_size=32)
    normed = load(tmp_path / "norm", tmp_path / "cache", already_normalized=True, **kwargs)
    raw = load(tmp_path / "raw", tmp_path / "cache", **kwargs)
    assert normed.stats()["cases_with_brainmask"] == 3
    assert normed.stats()["slices_cached"] == raw.stats()["slices_cached"]  # the same brain found
    case = normed.split_ids()["test"][0]
    a, la, _ = cached_case(normed, case)
    b, lb, _ = cached_case(raw, case)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(a, b, atol=0.02)  # z-scored once either way; background zeroed


# -- slice choice and splits ------------------------------------------------------------------------


def test_empty_slice_fractions(brats_root, tmp_path):
    def empty_count(data, split):
        ds = data.dataset(split)
        return sum(float(ds[i][1].sum()) == 0 for i in range(len(ds))), len(ds)

    everything = load(brats_root, tmp_path / "c", empty_slice_fraction=1.0)
    none = load(brats_root, tmp_path / "c", empty_slice_fraction=0.0, eval_empty_slice_fraction=0.0)
    half = load(brats_root, tmp_path / "c", empty_slice_fraction=0.5)
    all_empty, all_n = empty_count(everything, "train")
    assert all_empty > 4
    assert empty_count(none, "train")[0] == 0 and empty_count(none, "test")[0] == 0
    half_empty, half_n = empty_count(half, "train")
    assert abs(half_empty - all_empty / 2) <= 2 and all_n - half_n == all_empty - half_empty
    assert empty_count(half, "test") == empty_count(everything, "test")  # eval keeps every brain slice by default
    assert half.stats()["slices_dropped_empty_target_train"] == all_empty - half_empty
    again = load(brats_root, tmp_path / "c", empty_slice_fraction=0.5, seed=9)
    assert again.dataset("train").ids == half.dataset("train").ids  # seeded by split_seed, not the run's seed


def test_patient_split_keeps_time_points_together(tmp_path):
    write_synthetic_brats(tmp_path / "long", count=6, seed=3, shape=SHAPE, naming="2023", label_scheme="brats2023", followups=3)
    for split_seed in range(4):
        data = load(tmp_path / "long", tmp_path / "cache", label_scheme="brats2023", split_seed=split_seed)
        ids = data.split_ids()
        assert sorted(sum(ids.values(), [])) == sorted(p.name for p in (tmp_path / "long").iterdir() if p.is_dir())
        for split, cases in ids.items():
            for case in cases:
                if case.endswith("-001"):
                    assert case.replace("-001", "-000") in cases, (split, case)
        assert data.stats()["patients"] == 6 and data.stats()["cases"] == 9
        assert data.stats()["patients_train"] + data.stats()["patients_val"] + data.stats()["patients_test"] == 6


# -- bad input --------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        load(tmp_path / "nowhere")


def test_root_without_case_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no BraTS case folder found.*notes.txt"):
        load(tmp_path)


def test_missing_modality_names_the_expected_file(copy_root, tmp_path):
    victim = copy_root / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz"
    victim.unlink()
    with pytest.raises(DatasetError, match="modality t1ce is missing") as err:
        load(copy_root, tmp_path / "cache")
    assert str(victim) in str(err.value) and "on_missing=skip" in str(err.value)
    load(copy_root, tmp_path / "cache", modalities=["flair", "t2"])  # not needed: fine


def test_on_missing_skip_skips_counts_and_logs(copy_root, tmp_path, caplog):
    (copy_root / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()
    with caplog.at_level("WARNING"):
        data = load(copy_root, tmp_path / "cache", on_missing="skip")
    assert data.stats()["cases_skipped"] == 1 and data.stats()["cases"] == COUNT - 1 and data.stats()["cases_found"] == COUNT
    assert "BraTS2021_00002" not in sum(data.split_ids().values(), [])
    assert "modality t1ce is missing" in caplog.text


def test_case_without_a_mask(copy_root, tmp_path):
    (copy_root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").unlink()
    with pytest.raises(DatasetError, match="BraTS2021_00001 has no segmentation.*BraTS2021_00001_seg.nii.gz"):
        load(copy_root, tmp_path / "cache")


def test_seg_of_another_shape_names_both_files(copy_root, tmp_path):
    seg = copy_root / "BraTS2021_00003" / "BraTS2021_00003_seg.nii.gz"
    img = nib.load(str(seg), mmap=False)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-2], img.affine), str(seg))
    with pytest.raises(DatasetError) as err:
        load(copy_root, tmp_path / "cache")
    msg = str(err.value)
    assert "BraTS2021_00003_seg.nii.gz is 32x32x18" in msg and "BraTS2021_00003_flair.nii.gz) are 32x32x20" in msg
    assert "expected the same shape" in msg


def test_truncated_nifti_is_named_before_training(copy_root, tmp_path):
    path = copy_root / "BraTS2021_00004" / "BraTS2021_00004_t2.nii.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DatasetError, match=r"BraTS2021_00004_t2\.nii\.gz cannot be decompressed.*truncated"):
        load(copy_root, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("brats-*")), "a failed build must not leave a cache behind"
    assert not list((tmp_path / "cache").glob(".brats-*.tmp-*"))
    data = load(copy_root, tmp_path / "cache", on_missing="skip")
    assert data.stats()["cases_skipped"] == 1 and "BraTS2021_00004" not in sum(data.split_ids().values(), [])


def test_corrupt_and_uncompressed_truncated_files_are_named(copy_root, tmp_path):
    garbage = copy_root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"
    garbage.write_bytes(b"not a nifti at all" * 20)
    case = copy_root / "BraTS2021_00001"
    plain = case / "BraTS2021_00001_t1.nii"
    plain.write_bytes(gzip.decompress((case / "BraTS2021_00001_t1.nii.gz").read_bytes())[:-500])
    (case / "BraTS2021_00001_t1.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load(copy_root, tmp_path / "cache")
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert f"{garbage} cannot be read as NIfTI" in msg and f"{plain} is truncated" in msg


def test_case_folder_with_foreign_names(copy_root, tmp_path):
    folder = copy_root / "BraTS2021_00002"
    for f in folder.glob("*.nii.gz"):
        f.rename(folder / f.name.replace("BraTS2021_00002", "Patient7"))
    with pytest.raises(DatasetError, match="not named after it.*expected BraTS2021_00002/BraTS2021_00002_flair.nii.gz"):
        load(copy_root, tmp_path / "cache")


def test_folders_without_volumes_are_ignored(copy_root, tmp_path):
    (copy_root / "__MACOSX").mkdir()
    (copy_root / "__MACOSX" / "._x").write_text("")
    data = load(copy_root, tmp_path / "cache")
    assert data.stats()["entries_ignored"] == 2 and data.stats()["cases"] == COUNT


def test_all_empty_datasets(copy_root, tmp_path):
    for seg in copy_root.glob("*/*_seg.nii.gz"):
        img = nib.load(str(seg), mmap=False)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(seg))
    with pytest.raises(DatasetError, match="all-empty dataset: no slice .* has a non-empty target"):
        load(copy_root, tmp_path / "cache")
    for seg in copy_root.glob("*/*_seg.nii.gz"):
        seg.unlink()
    with pytest.raises(DatasetError, match="no usable case .*5 skipped"):
        load(copy_root, tmp_path / "cache", on_missing="skip")


def test_too_few_patients_for_three_splits(tmp_path):
    write_synthetic_brats(tmp_path / "two", count=2, seed=0, shape=SHAPE)
    with pytest.raises(DatasetError, match=r"has 2 patient\(s\): too few"):
        load(tmp_path / "two", tmp_path / "cache")


@pytest.mark.parametrize(
    "key, value",
    [("image_size", 4), ("modalities", ["flair", "dwi"]), ("modalities", []), ("on_missing", "ignore"),
     ("empty_slice_fraction", 1.5), ("eval_empty_slice_fraction", -0.1), ("patient_regex", "("), ("workers", 0),
     ("already_normalized", "yes"), ("val_fraction", 0), ("hflip_p", 2)],
)
def test_bad_settings_name_their_key(key, value, brats_root):
    with pytest.raises(ValueError, match=key):
        BraTS(**kwargs_of("dataset", "brats", root=str(brats_root), **{key: value}))


# -- configs ----------------------------------------------------------------------------------------


def _yaml(name: str):
    return OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")




def test_synthetic_brats_from_its_yaml_generates_once(tmp_path):
    cfg = compose_config("dataset=synthetic_brats", f"paths.outputs={tmp_path}", "dataset.synthetic.count=4")
    data = build_data(cfg.dataset, seed=0)
    assert data.stats()["synthetic_generated"] == 1
    assert data.stats()["cache_hit"] == 0 and (tmp_path / "cache").is_dir()
    again = build_data(cfg.dataset, seed=0)
    assert again.stats()["synthetic_generated"] == 0 and again.stats()["cache_hit"] == 1
    cfg.dataset.synthetic.naming = "2023"
    cfg.dataset.label_scheme = "brats2023"
    changed = build_data(cfg.dataset, seed=0)
    assert changed.stats()["synthetic_generated"] == 1 and changed.stats()["cases_naming_2023"] == 4


# -- real data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_cache")


@requires_real(REAL_2015)
def test_real_brats2015_subset(real_cache):
    kwargs = dict(modalities=["flair", "t1ce"], label_scheme="brats2015", image_size=32, workers=2)
    data = load(REAL_2015, real_cache, **kwargs)
    stats = data.stats()
    assert stats["cases"] == 4 and stats["cases_with_brainmask"] == 4 and stats["in_channels"] == 2
    assert stats["slices_total"] == 4 * 155 and stats["slices_dropped_no_brain"] > 0
    assert stats["cache_hit"] == 0 and 0.005 < stats["foreground_fraction"] < 0.2
    ds = data.dataset("test")
    assert any(float(ds[i][1].sum()) > 0 for i in range(len(ds)))
    assert 120 <= len(ds) <= 155  # one case: every brain slice, tumour or not
    again = load(REAL_2015, real_cache, **kwargs)
    assert again.stats()["cache_hit"] == 1 and again.split_ids() == data.split_ids()
    # The subset is z-scored already (background a constant < 0): the brain comes from the brain mask.
    case = data.split_ids()["train"][0]
    images, _, _ = cached_case(data, case)
    inside = np.abs(images).sum(axis=-1) > 0
    assert abs(images[..., 0][inside].mean()) < 0.1 and (images[~inside] == 0).all()


@requires_real(REAL_2015)
def test_real_brats2015_core_regions(real_cache):
    data = load(REAL_2015, real_cache, modalities=["flair", "t1ce"], label_scheme="brats2015", image_size=32,
                region=["whole_tumor", "tumor_core", "enhancing_tumor"])
    assert data.stats()["cache_hit"] == 1  # the region is chosen when serving: same cache as above
    ds = data.dataset("val")
    total = sum(ds[i][1].sum(dim=(1, 2)) for i in range(len(ds)))
    assert total[0] >= total[1] >= total[2] > 0


@requires_real(REAL_2023)
def test_real_brats2023_naming_without_ground_truth(tmp_path):
    with pytest.raises(DatasetError, match="BraTS-GLI-00001-000 has no segmentation.*BraTS-GLI-00001-000-seg.nii.gz"):
        load(REAL_2023, tmp_path / "cache", label_scheme="brats2023")
    with pytest.raises(DatasetError, match="no usable case"):
        load(REAL_2023, tmp_path / "cache", label_scheme="brats2023", on_missing="skip")
    # The real 2023 files through the whole reader: link them beside a drawn segmentation, in three cases.
    source = REAL_2023 / "BraTS-GLI-00001-000"
    t2f = nib.load(str(source / "BraTS-GLI-00001-000-t2f.nii.gz"))
    assert t2f.get_data_dtype() == np.int16 and t2f.shape == (240, 240, 155)
    seg = np.zeros(t2f.shape, np.uint8)
    seg[100:130, 110:140, 60:80] = 2
    seg[110:120, 120:130, 65:75] = 3
    for t in range(3):
        case = f"BraTS-GLI-00001-00{t}"
        folder = tmp_path / "linked" / case
        folder.mkdir(parents=True)
        for token in ("t1c", "t2f"):
            os.symlink(source / f"BraTS-GLI-00001-000-{token}.nii.gz", folder / f"{case}-{token}.nii.gz")
        nib.save(nib.Nifti1Image(seg, t2f.affine), str(folder / f"{case}-seg.nii.gz"))
    data = load(tmp_path / "linked", tmp_path / "cache", label_scheme="brats2023", modalities=["t1c", "t2f"],
                image_size=32, patient_regex=None, region="enhancing_tumor")
    assert data.stats()["cases"] == 3 and data.stats()["cases_naming_2023"] == 3
    images, labels, slices = cached_case(data, "BraTS-GLI-00001-000")
    inside = np.abs(images).sum(axis=-1) > 0
    assert abs(images[..., 0][inside].mean()) < 0.3  # int16 raw intensities z-scored in the brain
    assert set(np.unique(labels)) == {0, 2, 3}
