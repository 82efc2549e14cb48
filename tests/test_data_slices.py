"""Generic 2D slice-folder reader: name mapping, the COVID-SemiSeg preset (synthetic and real subset),
grouped splits and bad input."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import DatasetError, SegmentationData, build_data
from data.slices import SliceFolders
from data.synthetic_volumes import write_synthetic_slices
from helpers import REAL, kwargs_of, requires_real

REPO = Path(__file__).resolve().parents[1]
REAL_SEMISEG = REAL / "covid_semiseg_subset"
COUNT = 18


@pytest.fixture(scope="module")
def semiseg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slices") / "semiseg"
    write_synthetic_slices(root, count=COUNT, seed=1)
    return root


@pytest.fixture
def copy_root(semiseg_root, tmp_path) -> Path:
    return Path(shutil.copytree(semiseg_root, tmp_path / "copy"))


def load(root, seed=0, **kwargs) -> SliceFolders:
    data = SliceFolders(**kwargs_of("dataset", "covid_semiseg", root=str(root), **{"image_size": 32, **kwargs}))
    data.setup(seed)
    return data


def test_covid_semiseg_layout_is_read(semiseg_root):
    data = load(semiseg_root)
    assert isinstance(data, SegmentationData) and (data.in_channels, data.num_classes, data.image_size) == (1, 1, 32)
    stats = data.stats()
    assert stats["pairs_found"] == stats["pairs_loaded"] == COUNT and stats["files_ignored"] == 0
    assert stats["empty_masks"] == COUNT // 6  # every sixth synthetic slice has no infection
    assert stats["n_train"] + stats["n_val"] + stats["n_test"] == COUNT
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        assert len(ds) == len(ds.ids) > 0 and ds.cases is None  # 2D data: no volumes to rebuild
        image, mask = ds[0]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    ids = data.split_ids()
    assert not (set(ids["train"]) & set(ids["val"]) or set(ids["train"]) & set(ids["test"]) or set(ids["val"]) & set(ids["test"]))
    assert sorted(sum(ids.values(), []), key=int) == [str(i) for i in range(COUNT)]
    batch = next(iter(torch.utils.data.DataLoader(data.dataset("train", augment=True), batch_size=4)))
    assert batch[0].shape == (4, 1, 32, 32)


def test_items_follow_the_ids(semiseg_root):
    data = load(semiseg_root, image_size=40)
    ds = data.dataset("train")
    for index, case_id in enumerate(ds.ids):
        raw = np.asarray(Image.open(semiseg_root / "GT" / f"{case_id}.png").resize((40, 40), Image.BOX)) > 127
        assert (ds[index][1][0].numpy() == raw).mean() > 0.97


def test_name_mapping_and_rgb(tmp_path):
    """An ISIC-like mapping: <id>.jpg with <id>_segmentation.png, RGB, in other folder names."""
    write_synthetic_slices(tmp_path / "raw", count=9, seed=2)
    root = tmp_path / "mapped"
    (root / "inputs").mkdir(parents=True)
    (root / "truth").mkdir()
    for i in range(9):
        Image.open(tmp_path / "raw" / "Imgs" / f"{i}.jpg").convert("RGB").save(root / "inputs" / f"case_{i}.jpg")
        shutil.copy(tmp_path / "raw" / "GT" / f"{i}.png", root / "truth" / f"case_{i}_segmentation.png")
    (root / "inputs" / "LICENSE.txt").write_text("x")
    data = SliceFolders(**kwargs_of("dataset", "slice_folders", root=str(root), image_dir="inputs", mask_dir="truth",
                                    image_pattern="case_{id}.jpg", mask_pattern="case_{id}_segmentation.png", channels=3,
                                    mean=[0.5] * 3, std=[0.25] * 3, image_size=24))
    data.setup(0)
    assert data.in_channels == 3 and data.stats()["files_ignored"] == 1
    assert sorted(sum(data.split_ids().values(), []), key=int) == [str(i) for i in range(9)]
    assert data.dataset("val")[0][0].shape == (3, 24, 24)


def test_group_regex_keeps_a_group_in_one_split(tmp_path):
    write_synthetic_slices(tmp_path / "s", count=24, seed=3)
    for p in sorted((tmp_path / "s" / "Imgs").glob("*.jpg")):  # patient = id // 4, slice = id % 4
        i = int(p.stem)
        p.rename(p.with_name(f"p{i // 4}_s{i % 4}.jpg"))
        m = tmp_path / "s" / "GT" / f"{i}.png"
        m.rename(m.with_name(f"p{i // 4}_s{i % 4}.png"))
    data = load(tmp_path / "s", group_regex=r"^(p\d+)_")
    assert data.stats()["groups"] == 6
    splits = data.split_ids()
    for split, ids in splits.items():
        for other, other_ids in splits.items():
            if other != split:
                assert not ({i.split("_")[0] for i in ids} & {i.split("_")[0] for i in other_ids})


def test_limit_and_seeds(semiseg_root):
    limited = load(semiseg_root, limit=10)
    assert sorted(sum(limited.split_ids().values(), []), key=int) == [str(i) for i in range(10)]
    assert load(semiseg_root, split_seed=3).split_ids() == load(semiseg_root, split_seed=3, seed=5).split_ids()
    assert load(semiseg_root, split_seed=3).split_ids() != load(semiseg_root, split_seed=4).split_ids()


# -- bad input --------------------------------------------------------------------------------------


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DatasetError, match="nowhere does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "Imgs").mkdir()
    with pytest.raises(DatasetError, match=r"mask folder .*GT is missing.*found in .*: Imgs"):
        load(tmp_path)


def test_no_image_matching_the_pattern(copy_root):
    with pytest.raises(DatasetError, match=r"no image matching '\{id\}\.png'"):
        load(copy_root, image_pattern="{id}.png")


def test_image_without_mask(copy_root):
    (copy_root / "GT" / "4.png").unlink()
    with pytest.raises(DatasetError, match=r"Imgs/4\.jpg has no mask: expected .*GT/4\.png"):
        load(copy_root)


def test_mask_of_another_size(copy_root):
    w, h = Image.open(copy_root / "Imgs" / "3.jpg").size
    Image.new("L", (w + 2, h), 0).save(copy_root / "GT" / "3.png")
    with pytest.raises(DatasetError, match=rf"GT/3\.png is {w + 2}x{h} but its image .*Imgs/3\.jpg is {w}x{h}"):
        load(copy_root)


def test_corrupt_files_are_all_reported(copy_root):
    (copy_root / "Imgs" / "2.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (copy_root / "GT" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
    with pytest.raises(DatasetError, match=r"(?s)2 problem\(s\).*Imgs/2\.jpg cannot be read.*GT/5\.png cannot be read"):
        load(copy_root)


def test_zero_one_masks_read_like_zero_255(copy_root):
    before = load(copy_root).stats()["foreground_fraction"]
    for p in (copy_root / "GT").glob("*.png"):
        Image.fromarray((np.asarray(Image.open(p)) > 0).astype(np.uint8)).save(p)
    assert load(copy_root).stats()["foreground_fraction"] == before > 0


def test_masks_in_another_encoding_need_a_threshold(copy_root):
    for p in (copy_root / "GT").glob("*.png"):
        Image.fromarray(np.where(np.asarray(Image.open(p)) > 0, 100, 0).astype(np.uint8)).save(p)
    with pytest.raises(DatasetError, match=r"GT/\d+\.png has values \{0, 100\}: expected 0/255 or 0/1"):
        load(copy_root)
    assert load(copy_root, mask_threshold=50).stats()["foreground_fraction"] > 0


def test_all_empty_masks(copy_root):
    for p in (copy_root / "GT").glob("*.png"):
        Image.new("L", Image.open(p).size, 0).save(p)
    with pytest.raises(DatasetError, match="training split .* has no foreground pixel"):
        load(copy_root)


@pytest.mark.parametrize(
    "key, value",
    [("image_pattern", "img.png"), ("mask_pattern", "{id}/{id}.png"), ("channels", 2), ("mask_threshold", 255),
     ("mean", [0.5, 0.5]), ("std", [0.0]), ("group_regex", "("), ("limit", 0), ("image_dir", "")],
)
def test_bad_settings_name_their_key(key, value, semiseg_root):
    with pytest.raises(ValueError, match=key):
        SliceFolders(**kwargs_of("dataset", "covid_semiseg", root=str(semiseg_root), **{key: value}))


# -- configs and real data --------------------------------------------------------------------------




def test_covid_semiseg_yaml_on_synthetic_data(semiseg_root):
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "covid_semiseg.yaml")
    cfg.root = str(semiseg_root)
    cfg.image_size = 32
    data = build_data(cfg, seed=0)
    assert data.stats()["pairs_loaded"] == COUNT


@requires_real(REAL_SEMISEG)
def test_real_covid_semiseg_subset():
    start = time.perf_counter()
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "covid_semiseg.yaml")
    cfg.root = str(REAL_SEMISEG)
    cfg.image_size = 64
    data = build_data(cfg, seed=0)
    stats = data.stats()
    assert stats["pairs_found"] == stats["pairs_loaded"] == 50 and stats["files_ignored"] == 0
    assert stats["n_train"] + stats["n_val"] + stats["n_test"] == 50
    assert 0.005 < stats["foreground_fraction"] < 0.5
    image, mask = data.dataset("test")[0]
    assert image.shape == (1, 64, 64) and mask.shape == (1, 64, 64)
    assert time.perf_counter() - start < 20
