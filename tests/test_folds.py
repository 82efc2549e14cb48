"""Cross-validation folds (`dataset.folds`, `dataset.fold`), for every reader: fold k of a seeded k-fold partition of
root's cases (by patient or group) is the test split, val is carved from the other folds; with test_root the fold
is val. Over k = 0..K-1 every case is a test case exactly once; `folds: null` leaves today's splits unchanged."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from helpers import compose_config, conf
from omegaconf import OmegaConf

from data import DatasetError, ReaderSettingsError, build_data, build_reader
from data.splits import carve_fold, group_of
from data.synthetic import write_synthetic_isic
from data.synthetic_volumes import write_synthetic_brats, write_synthetic_slices

SLICES = dict(min_side=32, max_side=40)
BRATS_SHAPE = (32, 32, 20)
PATIENT = re.compile(r"^(BraTS-GLI-\d+)-\d+$")

# The splits of `folds: null` as the readers carved them before folds existed (same data, same settings): runs
# measured on them must keep their test sets.
TODAY = {
    "isic": {"train": ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003", "ISIC_0000005", "ISIC_0000008", "ISIC_0000009"],
             "val": ["ISIC_0000004", "ISIC_0000006"], "test": ["ISIC_0000002", "ISIC_0000007"]},
    "slices": {"train": ["0", "1", "3", "4", "6", "8", "9", "11"], "val": ["7", "10"], "test": ["2", "5"]},
    "slices_grouped": {"train": ["0", "1", "3", "5", "8", "9", "10", "11"], "val": ["4", "6"], "test": ["2", "7"]},
    "brats": {"train": ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001", "BraTS-GLI-00001-000", "BraTS-GLI-00001-001",
                        "BraTS-GLI-00004-000", "BraTS-GLI-00005-000"],
              "val": ["BraTS-GLI-00003-000"], "test": ["BraTS-GLI-00002-000", "BraTS-GLI-00002-001"]},
}


def build(name: str, root, **overrides):
    return build_data(conf("dataset", name, root=str(root), **overrides), seed=0)


def check_folds(folds: list[dict[str, list[str]]], everything: list[str], group=lambda case_id: case_id) -> None:
    """Each fold's splits are disjoint and cover every case, no group straddles two of them, and the test
    splits of the folds partition the cases (and the groups): each is a test case exactly once."""
    tested: list[str] = []
    for ids in folds:
        assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(everything)
        assert all(ids[split] for split in ("train", "val", "test"))
        by_split = {split: {group(i) for i in members} for split, members in ids.items()}
        assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                    or by_split["val"] & by_split["test"])
        tested += ids["test"]
    assert sorted(tested) == sorted(everything)
    test_groups = [{group(i) for i in ids["test"]} for ids in folds]
    assert sum(len(g) for g in test_groups) == len(set().union(*test_groups)) == len({group(i) for i in everything})


# -- the partition --------------------------------------------------------------------------------------


def test_carve_fold_partitions_the_groups_into_near_equal_folds():
    groups = {f"p{g}_s{s}": f"p{g}" for g in range(11) for s in range(1 + g % 3)}  # 11 groups of 1-3 cases
    folds = [carve_fold(groups, 4, k, val_fraction=0.2, seed=0) for k in range(4)]
    check_folds(folds, list(groups), group=lambda i: groups[i])
    assert sorted(len({groups[i] for i in ids["test"]}) for ids in folds) == [2, 3, 3, 3]  # sizes count groups
    assert all(len({groups[i] for i in ids["val"]}) == 2 for ids in folds)  # 0.2 of the 8 or 9 other groups
    assert all(ids[s] == sorted(ids[s]) for ids in folds for s in ids)
    # the order the cases come in does not matter; a plain list of ids is its own groups
    assert carve_fold(dict(reversed(groups.items())), 4, 1, 0.2, 0) == folds[1]
    plain = [carve_fold(list(groups), 4, k, 0.2, 0) for k in range(4)]
    check_folds(plain, list(groups))
    # without val_fraction (test_root holds the test set) the fold is val, the other folds train
    assert carve_fold(groups, 4, 1, None, 0) == {"train": sorted(folds[1]["train"] + folds[1]["val"]), "val": folds[1]["test"]}


def test_too_few_groups_for_the_folds_is_an_error_for_every_fold():
    for fold in (0, 4):
        with pytest.raises(DatasetError, match=r"has 4 case\(s\): too few for folds=5 .* at least 5 are needed"):
            carve_fold([f"c{i}" for i in range(4)], 5, fold, 0.15, 0)
    with pytest.raises(DatasetError, match=r"has 3 patient\(s\): too few for folds=2 .*at least 4 are needed"):
        carve_fold({"a1": "a", "a2": "a", "b": "b", "c": "c"}, 2, 1, 0.15, 0, unit="patient")  # 2 + 1: no train beside val
    carve_fold({"a1": "a", "a2": "a", "b": "b", "c": "c"}, 3, 0, 0.15, 0)  # one patient each for test, val and train
    carve_fold(["a", "b"], 2, 1, None, 0)  # beside test_root: the fold is val, the other fold train


# -- ISIC ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("isic-folds") / "isic"
    write_synthetic_isic(root, count=10, seed=1, **SLICES)
    return root


def test_isic_folds_partition_the_pairs(isic_root, caplog):
    with caplog.at_level(logging.INFO, logger="data"):
        folds = [build("isic2018", isic_root, image_size=16, folds=5, fold=k) for k in range(5)]
    everything = [f"ISIC_{i:07d}" for i in range(10)]
    check_folds([d.split_ids() for d in folds], everything)
    for k, data in enumerate(folds):
        stats = data.stats()
        assert (stats["folds"], stats["fold"]) == (5, k)
        assert (stats["n_test"], stats["n_val"], stats["n_train"]) == (2, 1, 7)  # 10 / 5; 0.15 of the other 8
        assert data.dataset("test").ids == data.split_ids()["test"]
    told = [r.getMessage() for r in caplog.records if "dataset.folds=5" in r.getMessage()]
    assert len(told) == 5 and "fold 3 of" in told[3] and "test_fraction is not used" in told[3]  # once per setup


def test_folds_null_keeps_todays_splits(isic_root, tmp_path):
    data = build("isic2018", isic_root, image_size=16)
    assert data.split_ids() == TODAY["isic"]
    assert build("isic2018", isic_root, image_size=16, folds=None, fold=0).split_ids() == TODAY["isic"]
    assert (data.stats()["folds"], data.stats()["fold"]) == (0, 0)

    write_synthetic_slices(tmp_path / "slices", count=12, seed=1, **SLICES)
    assert build("covid_semiseg", tmp_path / "slices", image_size=16).split_ids() == TODAY["slices"]
    grouped = build("covid_semiseg", tmp_path / "slices", image_size=16, group_regex=r"^(\d)", folds=None)
    assert grouped.split_ids() == TODAY["slices_grouped"]


def test_isic_refuses_official_folders_with_folds(tmp_path):
    root = tmp_path / "official"
    write_synthetic_isic(root, count=6, seed=0, val_count=2, test_count=2, **SLICES)
    with pytest.raises(DatasetError, match=r"dataset.folds=3 splits the training pairs .* official val split"):
        build("isic2018", root, image_size=16, folds=3, fold=0)
    shutil.rmtree(root / "ISIC2018_Task1_Validation_GroundTruth")  # no ground truth: not a split, left aside
    with pytest.raises(DatasetError, match=r"official test split \(ISIC2018_Task1-2_Test_Input/"):
        build("isic2018", root, image_size=16, folds=3, fold=0)


# -- slice folders, grouped -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_root(tmp_path_factory) -> Path:
    """24 slices of 6 patients: p<patient>_s<slice>."""
    root = tmp_path_factory.mktemp("slices-folds") / "grouped"
    write_synthetic_slices(root, count=24, seed=3, **SLICES)
    for sub, ext in (("Imgs", ".jpg"), ("GT", ".png")):
        for i in range(24):
            (root / sub / f"{i}{ext}").rename(root / sub / f"p{i // 4}_s{i % 4}{ext}")
    return root


def test_slice_folders_folds_keep_a_group_in_one_split(grouped_root):
    def folds(**settings):
        return [build("covid_semiseg", grouped_root, image_size=16, group_regex=r"^(p\d+)_", folds=3, fold=k,
                      **settings).split_ids() for k in range(3)]

    seeded = folds()
    everything = [f"p{i // 4}_s{i % 4}" for i in range(24)]
    check_folds(seeded, everything, group=lambda i: i.split("_")[0])
    assert all(len({i.split("_")[0] for i in ids["test"]}) == 2 for ids in seeded)  # 6 patients, 3 folds
    assert folds() == seeded  # seeded by split_seed, not the run's seed
    other = folds(split_seed=1)
    assert other != seeded
    check_folds(other, everything, group=lambda i: i.split("_")[0])


def test_too_few_slices_for_the_folds_fails_at_setup(tmp_path):
    write_synthetic_slices(tmp_path / "four", count=4, seed=1, **SLICES)
    with pytest.raises(DatasetError, match=r"has 4 image/mask pair\(s\): too few for folds=5"):
        build("covid_semiseg", tmp_path / "four", image_size=16, folds=5, fold=0)


# -- test_root ------------------------------------------------------------------------------------------


def test_with_test_root_the_fold_is_val(tmp_path, caplog):
    root, test_root = tmp_path / "root", tmp_path / "test_root"
    write_synthetic_slices(root, count=10, seed=1, **SLICES)
    raw = tmp_path / "raw"
    write_synthetic_slices(raw, count=3, seed=2, **SLICES)
    for sub, ext in (("Imgs", ".jpg"), ("GT", ".png")):
        (test_root / sub).mkdir(parents=True)
        for i in range(3):
            shutil.move(raw / sub / f"{i}{ext}", test_root / sub / f"{100 + i}{ext}")

    with caplog.at_level(logging.INFO, logger="data"):
        folds = [build("covid_semiseg", root, test_root=str(test_root), image_size=16, folds=5, fold=k).split_ids()
                 for k in range(5)]
    everything = [str(i) for i in range(10)]
    vals: list[str] = []
    for ids in folds:
        assert ids["test"] == ["100", "101", "102"]
        assert len(ids["val"]) == 2 and sorted(ids["train"] + ids["val"], key=int) == everything
        assert not set(ids["train"]) & set(ids["val"])
        vals += ids["val"]
    assert sorted(vals, key=int) == everything  # every case of root is a val case exactly once
    assert "dataset.folds=5: fold 4 is val, the other folds train" in caplog.text


# -- volumes: patients, 2D and 3D -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    """9 cases of 6 patients (3 with a second time point)."""
    root = tmp_path_factory.mktemp("brats-folds") / "brats"
    write_synthetic_brats(root, count=6, seed=3, shape=BRATS_SHAPE, naming="2023", label_scheme="brats2023", followups=3)
    return root


def test_brats_folds_keep_a_patient_in_one_split(brats_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("brats-folds-cache")
    settings = dict(image_size=16, cache_dir=str(cache), workers=1, label_scheme="brats2023")
    assert build("brats", brats_root, **settings).split_ids() == TODAY["brats"]
    folds = [build("brats", brats_root, folds=3, fold=k, **settings) for k in range(3)]
    everything = sorted(c for split in TODAY["brats"].values() for c in split)
    check_folds([d.split_ids() for d in folds], everything, group=lambda i: group_of(i, PATIENT))
    for k, data in enumerate(folds):
        stats = data.stats()
        assert (stats["folds"], stats["fold"], stats["patients_test"], stats["patients_val"]) == (3, k, 2, 1)
        assert set(data.dataset("test").cases) == set(data.split_ids()["test"])

    # the 3D reader splits as its 2D reader does (and shares its slice cache)
    cfg = compose_config("dataset=brats3d", f"paths.outputs={cache}", f"dataset.root={brats_root}", "dataset.workers=1",
                         "dataset.image_size=16", "dataset.patch_size=16", "dataset.label_scheme=brats2023",
                         f"dataset.cache_dir={cache}", "dataset.folds=3", "dataset.fold=2")
    volumes = build_data(OmegaConf.to_container(cfg.dataset, resolve=True), seed=0)
    assert volumes.split_ids() == folds[2].split_ids()
    assert volumes.dataset("test").ids == folds[2].split_ids()["test"]
    assert (volumes.stats()["folds"], volumes.stats()["fold"]) == (3, 2)


# -- bad settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["isic2018", "covid_semiseg", "brats", "covid_ct"])
@pytest.mark.parametrize(
    "folds, fold, message",
    [(1, 0, "folds=1 is invalid: expected null or an integer >= 2"),
     (True, 0, "folds=True is invalid"),
     (2.0, 0, "folds=2.0 is invalid"),
     (5, 5, r"fold=5 is invalid: expected an integer in \[0, 4\]"),
     (5, -1, r"fold=-1 is invalid: expected an integer in \[0, 4\]"),
     (None, 1, "fold=1 is invalid: expected 0 while folds is null")],
)
def test_bad_fold_settings_fail_in_the_constructor(name, folds, fold, message):
    """Before any file is read: root does not even exist."""
    with pytest.raises(ReaderSettingsError, match=message):
        build_reader(conf("dataset", name, root="/nonexistent/medprune-folds", folds=folds, fold=fold))
