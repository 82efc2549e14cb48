"""`dataset.test_root`, for every reader: the whole folder is the test split (root then gives train and val
only), read and checked like root; a test-only setup (an evaluate-only job) reads it alone, never root."""
from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import conf
from PIL import Image

from data import DatasetError, build_data
from data.isic import OFFICIAL_DIRS, TRAIN_DIRS
from data.synthetic import write_synthetic_isic
from data.synthetic_volumes import write_synthetic_brats, write_synthetic_covid_ct, write_synthetic_slices

NOWHERE = "/nonexistent/medprune-root-never-read"


def build(name: str, root, test_root, test_only: bool = False, **overrides):
    cfg = conf("dataset", name, root=None if root is None else str(root), test_root=None if test_root is None else str(test_root),
               **overrides)
    return build_data(cfg, seed=0, test_only=test_only)


def check_test_only(data, expected_test: list[str]) -> None:
    """A test-only setup serves the test split alone, and still has stats and a digest."""
    assert data.split_ids() == {"train": [], "val": [], "test": expected_test}
    for split in ("train", "val"):
        with pytest.raises(DatasetError, match=f"the {split} split was not read \\(test-only job\\)"):
            data.dataset(split)
    assert len(data.dataset("test")) > 0
    stats = data.stats()
    assert stats["test_from_test_root"] == 1 and stats["test_only"] == 1 and stats["n_train"] == stats["n_val"] == 0
    assert len(data.content_digest()) == 64


# -- ISIC 2018 --------------------------------------------------------------------------------------


def test_isic_test_root(tmp_path, caplog):
    root, test_root = tmp_path / "root", tmp_path / "test_root"
    write_synthetic_isic(root, count=10, seed=1, min_side=32, max_side=48, test_count=2)  # an official Test folder: ignored
    write_synthetic_isic(test_root, count=1, seed=2, min_side=32, max_side=48, val_count=2, test_count=3)
    training = [test_root / name for name in TRAIN_DIRS]
    for folder in training:  # keep its Training pair aside: its ISIC_0000000 is also a case of root
        shutil.move(folder, tmp_path / folder.name)
    expected = sorted(p.name[: -len(".jpg")] for name, _ in OFFICIAL_DIRS.values() for p in (test_root / name).glob("ISIC_*.jpg"))
    assert len(expected) == 5

    with caplog.at_level(logging.INFO):
        data = build("isic2018", root, test_root, image_size=16)
    ids = data.split_ids()
    assert ids["test"] == expected  # every pair of every folder pair in test_root, nothing carved
    assert sorted(ids["train"] + ids["val"]) == [f"ISIC_{i:07d}" for i in range(10)]
    assert len(ids["val"]) == 2  # val_fraction of root (0.15 of 10, rounded)
    stats = data.stats()
    assert stats["n_test"] == 5 and stats["test_from_test_root"] == 1 and stats["test_only"] == 0
    assert "test split: all 5 pairs of" in caplog.text and "ignoring" in caplog.text and "test_fraction is not used" in caplog.text

    only = build("isic2018", NOWHERE, test_root, test_only=True, image_size=16)
    check_test_only(only, expected)
    moved = Path(shutil.copytree(test_root, tmp_path / "moved"))
    assert build("isic2018", None, moved, test_only=True, image_size=16).content_digest() == only.content_digest()
    assert only.content_digest() != data.content_digest()
    mask = moved / OFFICIAL_DIRS["test"][1] / f"{expected[-1]}_segmentation.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(mask)  # test_root is checked as root is
    with pytest.raises(DatasetError, match=f"mask {mask} (is|has)"):
        build("isic2018", root, moved, image_size=16)

    for folder in training:  # ISIC_0000000 now in both
        shutil.move(tmp_path / folder.name, folder)
    with pytest.raises(DatasetError, match="case id\\(s\\) are in both the train and the test split: ISIC_0000000"):
        build("isic2018", root, test_root, image_size=16)
    with pytest.raises(DatasetError, match="dataset.test_root is not set: an evaluate-only"):
        build("isic2018", root, None, test_only=True, image_size=16)


# -- slice folders (COVID-SemiSeg) ------------------------------------------------------------------


def renamed_slices(folder: Path, count: int, first: int) -> list[str]:
    """Synthetic slices whose ids start at `first` (the generator always starts at 0)."""
    raw = folder.parent / f"{folder.name}-raw"
    write_synthetic_slices(raw, count=count, seed=first, min_side=32, max_side=40)
    for sub, ext in (("Imgs", ".jpg"), ("GT", ".png")):
        (folder / sub).mkdir(parents=True)
        for i in range(count):
            shutil.move(raw / sub / f"{i}{ext}", folder / sub / f"{first + i}{ext}")
    return [str(first + i) for i in range(count)]


def test_slice_folders_test_root(tmp_path, caplog):
    root, test_root = tmp_path / "root", tmp_path / "test_root"
    write_synthetic_slices(root, count=10, seed=1, min_side=32, max_side=40)
    expected = renamed_slices(test_root, 4, 100)

    with caplog.at_level(logging.INFO, logger="data"):
        data = build("covid_semiseg", root, test_root, image_size=16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "group_regex" in r.getMessage()]
    assert len(warnings) == 1 and "slices of one patient may sit in both train and val" in warnings[0].getMessage()
    ids = data.split_ids()
    assert ids["test"] == expected and sorted(ids["train"] + ids["val"], key=int) == [str(i) for i in range(10)]
    stats = data.stats()
    assert stats["n_test"] == 4 and stats["split_by_group"] == 0 and stats["test_from_test_root"] == 1
    assert "test split: all 4 pairs of" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        grouped = build("covid_semiseg", root, None, image_size=16, group_regex=r"^(\d)")
    assert grouped.stats()["split_by_group"] == 1 and "group_regex" not in caplog.text

    only = build("covid_semiseg", NOWHERE, test_root, test_only=True, image_size=16)
    check_test_only(only, expected)

    write_synthetic_slices(tmp_path / "overlap", count=3, seed=5, min_side=32, max_side=40)  # ids 0, 1, 2: in root too
    with pytest.raises(DatasetError, match="3 case id\\(s\\) are in both the train/val and the test split: 0, 1, 2"):
        build("covid_semiseg", root, tmp_path / "overlap", image_size=16)
    with pytest.raises(DatasetError, match="dataset.test_root is not set"):
        build("covid_semiseg", root, None, test_only=True, image_size=16)
    with pytest.raises(DatasetError, match=f"dataset.test_root {tmp_path / 'absent'} does not exist"):
        build("covid_semiseg", root, tmp_path / "absent", image_size=16)


# -- BraTS ------------------------------------------------------------------------------------------


def test_brats_test_root(tmp_path, caplog):
    root, test_root, cache = tmp_path / "root", tmp_path / "test_root", tmp_path / "cache"
    shape = (32, 32, 20)
    train_ids = write_synthetic_brats(root, count=4, seed=1, shape=shape)
    expected = write_synthetic_brats(test_root, count=2, seed=2, shape=shape, naming="2023")  # other ids
    settings = dict(image_size=16, cache_dir=str(cache), workers=1, eval_empty_slice_fraction=0.0)

    with caplog.at_level(logging.INFO):
        data = build("brats", root, test_root, **settings)
    ids = data.split_ids()
    assert ids["test"] == sorted(expected) and sorted(ids["train"] + ids["val"]) == sorted(train_ids)
    assert len(ids["val"]) == 1
    stats = data.stats()
    assert stats["cases"] == 6 and stats["cases_test"] == 2 and stats["test_from_test_root"] == 1
    assert "test split: all 2 cases of" in caplog.text
    test = data.dataset("test")
    assert set(test.cases) == set(expected)
    assert stats["slices_dropped_empty_target_test"] > 0  # eval_empty_slice_fraction applies to test_root's slices
    assert all(test[i][1].sum() > 0 for i in range(len(test)))
    assert len({p.name for p in cache.iterdir() if not p.name.startswith(".")}) == 2  # a cache entry per folder

    only = build("brats", NOWHERE, test_root, test_only=True, **settings)
    check_test_only(only, sorted(expected))
    assert only.stats()["cache_hit"] == 1 and only.dataset("test").ids == test.ids  # test_root's cache entry, reused

    shutil.copytree(root / train_ids[0], test_root / train_ids[0])
    with pytest.raises(DatasetError, match=f"1 case id\\(s\\) are in both the train/val and the test split: {train_ids[0]}"):
        build("brats", root, test_root, **settings)
    with pytest.raises(DatasetError, match="dataset.test_root is not set"):
        build("brats", root, None, test_only=True, **settings)


# -- COVID-19 CT ------------------------------------------------------------------------------------


def keep_rows(folder: Path, keep: slice) -> list[str]:
    """Leaves only the `keep` rows of a synthetic Kaggle folder (files of the others deleted); their ids."""
    with open(folder / "metadata.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    for row in body[:keep.start] + body[keep.stop:]:
        for listed in row:
            path = folder / listed.split("/")[-2] / listed.split("/")[-1]
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(folder / "metadata.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *body[keep]])
    return sorted(row[0].split("/")[-1][: -len(".nii")] for row in body[keep])


def test_covid_ct_test_root(tmp_path, caplog):
    root, test_root, cache = tmp_path / "root", tmp_path / "test_root", tmp_path / "cache"
    shape = (40, 40, 14)
    train_ids = write_synthetic_covid_ct(root, count=4, seed=1, shape=shape)
    write_synthetic_covid_ct(test_root, count=6, seed=2, shape=shape)
    expected = keep_rows(test_root, slice(4, 6))  # coronacases 003 and a second series of a patient of root
    settings = dict(image_size=24, cache_dir=str(cache), workers=1)

    with caplog.at_level(logging.INFO):
        data = build("covid_ct", root, test_root, **settings)
    ids = data.split_ids()
    assert ids["test"] == expected and sorted(ids["train"] + ids["val"]) == sorted(train_ids)
    stats = data.stats()
    assert stats["cases_test"] == 2 and stats["test_from_test_root"] == 1 and stats["entries_ignored"] == 0
    assert "test split: all 2 cases of" in caplog.text
    assert "1 patient(s) have cases in both root and dataset.test_root" in caplog.text

    only = build("covid_ct", NOWHERE, test_root, test_only=True, **settings)
    check_test_only(only, expected)
    assert only.stats()["cases"] == 2 and only.dataset("test").ids == data.dataset("test").ids

    copy = shutil.copytree(root, tmp_path / "copy_of_root")
    with pytest.raises(DatasetError, match="4 case id\\(s\\) are in both the train/val and the test split"):
        build("covid_ct", root, copy, **settings)
    with pytest.raises(DatasetError, match="dataset.test_root is not set"):
        build("covid_ct", root, None, test_only=True, **settings)
