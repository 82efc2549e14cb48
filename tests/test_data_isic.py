"""ISIC 2018 reader, its synthetic twin and their configs: real layout in, checked tensors out."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL, compose_config, conf, kwargs_of, requires_real
from omegaconf import OmegaConf
from PIL import Image

from data import DatasetError, SegmentationData, build_data
from data.isic import ISIC2018, MASK_SUFFIX, OFFICIAL_DIRS, TRAIN_DIRS
from data.synthetic import ensure_generated, read_stamp, write_synthetic_isic

REPO = Path(__file__).resolve().parents[1]
REAL_ISIC = REAL / "isic2018_subset"
COUNT = 24
SMALL = dict(min_side=64, max_side=112)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("isic") / "synthetic"
    write_synthetic_isic(root, count=COUNT, seed=3, **SMALL)
    return root


@pytest.fixture
def copy_root(synthetic_root, tmp_path) -> Path:
    """A private copy for tests that damage the data."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "copy"))


def load(root, seed: int = 0, **kwargs) -> ISIC2018:
    data = ISIC2018(**kwargs_of("dataset", "isic2018", root=str(root), **{"image_size": 32, **kwargs}))
    data.setup(seed)
    return data


def inputs(root: Path) -> Path:
    return root / TRAIN_DIRS[0]


def masks(root: Path) -> Path:
    return root / TRAIN_DIRS[1]


# -- reading the real layout ------------------------------------------------------------------------


def test_synthetic_data_in_real_layout_is_read_by_real_reader(synthetic_root):
    assert sorted(p.name for p in inputs(synthetic_root).iterdir())[:2] == ["ATTRIBUTION.txt", "ISIC_0000000.jpg"]
    sizes = {Image.open(p).size for p in inputs(synthetic_root).glob("ISIC_*.jpg")}
    assert len(sizes) > 5, "images should vary in size, as the archive's do"
    for p in masks(synthetic_root).glob(f"*{MASK_SUFFIX}"):
        m = Image.open(p)
        assert m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}
        assert m.size == Image.open(inputs(synthetic_root) / p.name.replace(MASK_SUFFIX, ".jpg")).size

    data = load(synthetic_root)
    assert isinstance(data, SegmentationData)
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 1, 32)
    stats = data.stats()
    assert stats["pairs_found"] == COUNT and stats["files_ignored"] == 4  # LICENSE + ATTRIBUTION, twice
    assert stats["n_train"] + stats["n_val"] + stats["n_test"] == COUNT
    assert all(isinstance(v, float) for v in stats.values())

    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        assert len(ds) == len(ds.ids) == len(data.split_ids()[split]) > 0
        image, mask = ds[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert -2.5 < image.min() < image.max() < 2.7  # ImageNet-normalised uint8
    images, batch_masks = next(iter(torch.utils.data.DataLoader(data.dataset("train", augment=True), batch_size=5)))
    assert images.shape == (5, 3, 32, 32) and batch_masks.shape == (5, 1, 32, 32)


def test_items_follow_the_ids(synthetic_root):
    data = load(synthetic_root, image_size=48)
    ds = data.dataset("val")
    for index, case_id in enumerate(ds.ids):
        _, mask = ds[index]
        raw = np.asarray(Image.open(masks(synthetic_root) / f"{case_id}{MASK_SUFFIX}").resize((48, 48), Image.BOX)) > 127
        assert (mask[0].numpy() == raw).mean() > 0.97


def test_splits_disjoint_complete_and_seeded(synthetic_root):
    a, b = load(synthetic_root, split_seed=1).split_ids(), load(synthetic_root, split_seed=1).split_ids()
    other = load(synthetic_root, split_seed=2).split_ids()
    assert a == b
    assert a != other
    # the run's seed (initialisation, augmentation) does not move the test set
    assert load(synthetic_root, seed=7, split_seed=1).split_ids() == a
    all_ids = sorted(p.stem for p in inputs(synthetic_root).glob("ISIC_*.jpg"))
    assert sorted(a["train"] + a["val"] + a["test"]) == all_ids
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert len(a["val"]) == len(a["test"]) == round(COUNT * 0.15)
    assert all(ids == sorted(ids) for ids in a.values())


def test_official_val_and_test_folders_are_the_splits(tmp_path):
    root = tmp_path / "official"
    write_synthetic_isic(root, count=10, seed=0, val_count=3, test_count=4, **SMALL)
    data = load(root)
    ids = data.split_ids()
    assert len(ids["train"]) == 10 and len(ids["val"]) == 3 and len(ids["test"]) == 4
    assert ids["val"] == sorted(p.stem for p in (root / OFFICIAL_DIRS["val"][0]).glob("ISIC_*.jpg"))
    assert data.stats()["official_val"] == 1 and data.stats()["official_test"] == 1
    assert load(root, seed=5).split_ids() == ids  # nothing carved: the seed does not matter

    shutil.rmtree(root / OFFICIAL_DIRS["test"][1])  # test images without ground truth: carve test instead
    data = load(root)
    ids = data.split_ids()
    assert len(ids["val"]) == 3 and data.stats()["official_test"] == 0
    assert len(ids["test"]) == 2 and len(ids["train"]) == 8 and set(ids["test"]) < {f"ISIC_{i:07d}" for i in range(10)}


def test_non_isic_files_are_ignored_and_counted(copy_root):
    (inputs(copy_root) / "ISIC_0000000_superpixels.png").write_bytes(b"not read")
    (inputs(copy_root) / ".DS_Store").write_bytes(b"\0")
    (inputs(copy_root) / "notes.jpg").write_bytes(b"not an ISIC name")
    (inputs(copy_root) / "__MACOSX").mkdir()
    stats = load(copy_root).stats()
    assert stats["pairs_found"] == COUNT
    assert stats["files_ignored"] == 4 + 4


def test_an_image_name_that_is_no_image_file_is_named_in_a_warning(copy_root, caplog):
    """A folder or a dangling symlink named like an image is passed over: said in a WARNING that names it (a count
    alone hid it), and listed in full by `ignored_files` (the run's data/ignored_files.txt)."""
    (inputs(copy_root) / "ISIC_9000010.jpg").mkdir()
    os.symlink(copy_root / "nowhere.jpg", inputs(copy_root) / "ISIC_9000011.jpg")
    with caplog.at_level("WARNING", logger="data"):
        data = load(copy_root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignored" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("6 entries ignored: ")
    ignored = data.ignored_files()
    assert len(ignored) == data.stats()["files_ignored"] == 6
    assert f"{inputs(copy_root) / 'ISIC_9000010.jpg'}: named like an image but a folder" in ignored
    assert f"{inputs(copy_root) / 'ISIC_9000011.jpg'}: named like an image but a dangling symlink" in ignored
    assert str(inputs(copy_root) / "ISIC_9000010.jpg") in warnings[0] or "more" in warnings[0]


def test_limit_uses_the_first_sorted_pairs(synthetic_root):
    data = load(synthetic_root, limit=10)
    ids = data.split_ids()
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == [f"ISIC_{i:07d}" for i in range(10)]
    assert data.stats()["pairs_found"] == COUNT and data.stats()["pairs_loaded"] == 10


def test_augmentation_changes_pixels_but_not_plain_items(synthetic_root):
    data = load(synthetic_root)
    plain, augmented = data.dataset("train"), data.dataset("train", augment=True)
    changed = 0
    for index in range(8):
        image, mask = plain[index]
        again, _ = plain[index]
        assert torch.equal(image, again)
        aug_image, aug_mask = augmented[index]
        assert set(aug_mask.unique().tolist()) <= {0.0, 1.0}
        changed += not torch.equal(aug_image, image)
    assert changed >= 6


def test_augmentation_is_reseeded_per_epoch(synthetic_root):
    """The training loop reseeds the augmentation per epoch, so that an epoch's augmentations depend
    only on (seed, epoch), never on the epochs before it (resume)."""
    ds = load(synthetic_root).dataset("train", augment=True)

    def first_items(seed):
        ds.reseed(seed)
        return torch.stack([ds[i][0] for i in range(6)])

    one = first_items(1)
    first_items(2)
    assert torch.equal(first_items(1), one)  # the same seed again: the same draws, whatever came between
    assert not torch.equal(first_items(2), one)


def test_dataloader_workers_draw_different_augmentations(synthetic_root):
    """Forked workers start from copies of one generator; without reseeding they would agree."""
    ds = load(synthetic_root).dataset("train", augment=True)
    same_item = torch.utils.data.Subset(ds, [0] * 4)
    loader = torch.utils.data.DataLoader(same_item, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    images = [image for image, _ in loader]  # batches alternate between worker 0 and worker 1
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[2], images[3])


# -- bad input: one DatasetError, naming the file, before any training -------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        load(tmp_path / "nowhere")


def test_missing_training_input_folder(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DatasetError, match=TRAIN_DIRS[0]) as err:
        load(tmp_path)
    assert "something_else" in str(err.value)


def test_no_isic_images(copy_root):
    for p in inputs(copy_root).glob("ISIC_*.jpg"):
        p.unlink()
    with pytest.raises(DatasetError, match=r"no ISIC_\*\.jpg"):
        load(copy_root)


def test_image_without_mask_names_image_and_expected_mask(copy_root):
    (masks(copy_root) / f"ISIC_0000005{MASK_SUFFIX}").unlink()
    with pytest.raises(DatasetError) as err:
        load(copy_root)
    assert "ISIC_0000005.jpg" in str(err.value) and f"ISIC_0000005{MASK_SUFFIX}" in str(err.value)


def test_mask_of_another_size_names_both_files_and_sizes(copy_root):
    mask_path = masks(copy_root) / f"ISIC_0000007{MASK_SUFFIX}"
    w, h = Image.open(mask_path).size
    Image.new("L", (w + 3, h), 0).save(mask_path)
    with pytest.raises(DatasetError) as err:
        load(copy_root)
    msg = str(err.value)
    assert mask_path.name in msg and "ISIC_0000007.jpg" in msg and f"{w + 3}x{h}" in msg and f"{w}x{h}" in msg


@pytest.mark.parametrize("keep", [200, 0.9])  # header only; most of the scan data (draft decoding must still notice)
def test_truncated_jpeg_is_named(copy_root, keep):
    path = inputs(copy_root) / "ISIC_0000002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(DatasetError, match="ISIC_0000002.jpg"):
        load(copy_root)


def test_corrupt_mask_is_named(copy_root):
    path = masks(copy_root) / f"ISIC_0000003{MASK_SUFFIX}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetError, match=f"ISIC_0000003{MASK_SUFFIX}"):
        load(copy_root)


def test_rgb_mask_with_differing_channels_is_rejected(copy_root):
    path = masks(copy_root) / f"ISIC_0000004{MASK_SUFFIX}"
    gray = np.asarray(Image.open(path))
    rgb = np.stack([gray, gray, np.zeros_like(gray)], axis=-1)
    Image.fromarray(rgb, "RGB").save(path)
    with pytest.raises(DatasetError, match=f"ISIC_0000004{MASK_SUFFIX}.*differing channels"):
        load(copy_root)


def _all_masks(data):
    return {i: m for ds in (data.dataset(s) for s in ("train", "val", "test")) for i, (_, m) in zip(ds.ids, ds)}


def test_zero_one_label_mask_reads_as_the_same_lesion(copy_root):
    before = _all_masks(load(copy_root, image_size=40))
    path = masks(copy_root) / f"ISIC_0000006{MASK_SUFFIX}"
    Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8), "L").save(path)
    after = _all_masks(load(copy_root, image_size=40))
    assert after["ISIC_0000006"].sum() > 0 and torch.equal(after["ISIC_0000006"], before["ISIC_0000006"])


def test_mask_in_another_encoding_is_an_error_naming_file_and_values(copy_root):
    """A lesion stored as 200 on a background of 100 would read as all lesion, or (0/100) as empty."""
    path = masks(copy_root) / f"ISIC_0000006{MASK_SUFFIX}"
    lesion = np.asarray(Image.open(path)) > 0
    Image.fromarray(np.where(lesion, 200, 100).astype(np.uint8), "L").save(path)
    with pytest.raises(DatasetError, match=f"ISIC_0000006{MASK_SUFFIX} has values {{100, 200}}: expected 0/255 or 0/1"):
        load(copy_root)
    # an explicit threshold says what the values mean
    data = _all_masks(load(copy_root, image_size=40, mask_threshold=150))
    assert data["ISIC_0000006"].sum() > 0


def test_single_channel_like_masks_are_accepted(copy_root):
    """Grey RGB, palette and 1-bit masks mean the same lesion as the 8-bit one."""
    reference = load(copy_root, image_size=40, seed=0)
    before = {i: m for ds in (reference.dataset(s) for s in ("train", "val", "test")) for i, (_, m) in zip(ds.ids, ds)}
    for case_id, mode in (("ISIC_0000001", "RGB"), ("ISIC_0000002", "P"), ("ISIC_0000003", "1")):
        path = masks(copy_root) / f"{case_id}{MASK_SUFFIX}"
        Image.open(path).convert(mode).save(path)
        assert Image.open(path).mode == mode
    data = load(copy_root, image_size=40, seed=0)
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        for case_id, (_, mask) in zip(ds.ids, ds):
            assert torch.equal(mask, before[case_id]), case_id


def test_every_problem_is_reported_at_once(copy_root):
    (masks(copy_root) / f"ISIC_0000001{MASK_SUFFIX}").unlink()
    (inputs(copy_root) / "ISIC_0000009.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DatasetError) as err:
        load(copy_root)
    assert "2 problem(s)" in str(err.value)
    assert "ISIC_0000001.jpg" in str(err.value) and "ISIC_0000009.jpg" in str(err.value)


def test_too_few_pairs_for_three_splits(synthetic_root):
    with pytest.raises(DatasetError, match=r"has 2 image/mask pair\(s\).*at least 3"):
        load(synthetic_root, limit=2)


@pytest.mark.parametrize(
    "key, value",
    [("image_size", 0), ("image_size", 64.5), ("val_fraction", 0.0), ("test_fraction", 1.2), ("limit", 0),
     ("rotate_limit", -1), ("hflip_p", 2), ("mean", [0.5, 0.5]), ("std", [1, 0, 1]), ("workers", 0)],
)
def test_bad_settings_name_their_key(key, value, synthetic_root):
    with pytest.raises(ValueError, match=key):
        ISIC2018(**kwargs_of("dataset", "isic2018", root=str(synthetic_root), **{key: value}))


def test_fractions_must_leave_training_data(synthetic_root):
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        ISIC2018(**kwargs_of("dataset", "isic2018", root=str(synthetic_root), val_fraction=0.5, test_fraction=0.5))


def test_dataset_before_setup_is_an_error(synthetic_root):
    data = ISIC2018(**kwargs_of("dataset", "isic2018", root=str(synthetic_root)))
    with pytest.raises(RuntimeError, match="setup"):
        data.dataset("train")
    with pytest.raises(ValueError, match="split"):
        load(synthetic_root).dataset("validation")


# -- synthetic twin and configs ---------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path):
    write_synthetic_isic(tmp_path / "a", count=3, seed=7, **SMALL)
    write_synthetic_isic(tmp_path / "b", count=3, seed=7, **SMALL)
    write_synthetic_isic(tmp_path / "c", count=3, seed=8, **SMALL)
    for name in ("ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg", f"ISIC2018_Task1_Training_GroundTruth/ISIC_0000001{MASK_SUFFIX}"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def synthetic(root, **settings):
    return build_data(conf("dataset", "isic2018", root=str(root), image_size=32, synthetic={"kind": "isic", **settings}), seed=0)


def test_synthetic_dataset_generates_once_and_regenerates_on_change(tmp_path):
    root = tmp_path / "syn"
    data = synthetic(root, count=12)
    assert data.stats()["synthetic_generated"] == 1 and data.stats()["pairs_found"] == 12
    assert read_stamp(root)["count"] == 12
    first = (inputs(root) / "ISIC_0000000.jpg").stat().st_mtime_ns

    again = synthetic(root, count=12)
    assert again.stats()["synthetic_generated"] == 0
    assert (inputs(root) / "ISIC_0000000.jpg").stat().st_mtime_ns == first
    assert again.split_ids() == data.split_ids()

    (tmp_path / ".syn.tmp-killedjob").mkdir()  # a generator killed half-way leaves one of these
    changed = synthetic(root, count=14, seed=1)
    assert changed.stats()["synthetic_generated"] == 1 and changed.stats()["pairs_found"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == [".syn.lock", "syn"]  # no temp or old folders left


def test_synthetic_refuses_to_overwrite_a_real_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        ensure_generated(tmp_path / "real", {"kind": "isic", "count": 8})
    assert (tmp_path / "real" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("name, count", [("synthetic_isic", 100), ("synthetic_brats", 8), ("synthetic_brats3d", 8),
                                         ("synthetic_covid_ct", 8), ("synthetic_covid_ct3d", 8)])
def test_a_synthetic_count_has_one_home_the_yaml(name, count):
    """The YAML says how many cases the default job generates; the writer has no competing default (it was
    ISIC 60 against the YAML's 100, volumes 6 against 8), and a block without a count fails before any work."""
    import inspect

    from data.synthetic import check_synthetic, generators

    block = OmegaConf.to_container(compose_config(f"dataset={name}").dataset.synthetic, resolve=True)
    assert block["count"] == count
    for kind, writer in generators().items():
        assert inspect.signature(writer).parameters["count"].default is inspect.Parameter.empty, kind
    del block["count"]
    with pytest.raises(ValueError, match="dataset.synthetic.count must be set"):
        check_synthetic(block)
    with pytest.raises(ValueError, match="dataset.synthetic.count=0 is invalid"):
        check_synthetic({**block, "count": 0})


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_parallel_jobs_share_one_synthetic_root(tmp_path):
    root = tmp_path / "shared_root"
    script = (
        "import sys; from data import build_data; from helpers import conf\n"
        "d = build_data(conf('dataset', 'isic2018', root=sys.argv[1], image_size=16,\n"
        "                    synthetic={'kind': 'isic', 'count': int(sys.argv[2])}), 0)\n"
        "print(int(d.stats()['pairs_found']))\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), "30"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["30"] * 3
    assert read_stamp(root)["count"] == 30 and len(list(inputs(root).glob("ISIC_*.jpg"))) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared_root.lock", "shared_root"]


def _yaml(name: str):
    return OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")




def test_build_data_from_the_synthetic_yaml(tmp_path):
    cfg = compose_config("dataset=synthetic_isic", f"paths.outputs={tmp_path}", "dataset.image_size=32", "dataset.synthetic.count=12")
    data = build_data(cfg.dataset, seed=0)
    assert type(data) is ISIC2018 and data.stats()["synthetic_generated"] == 1
    assert data.root == (tmp_path / "data" / "synthetic_isic").resolve()
    assert data.mean == (0.485, 0.456, 0.406)
    assert len(data.dataset("train")) == 12 - 2 - 2


def test_build_data_from_a_dict(synthetic_root):
    data = build_data(conf("dataset", "isic2018", root=str(synthetic_root), image_size=16), seed=4)
    assert data.split_ids() == load(synthetic_root, seed=4, image_size=16).split_ids()


# -- real data --------------------------------------------------------------------------------------


@requires_real(REAL_ISIC)
def test_real_isic_subset_loads_every_pair():
    start = time.perf_counter()
    data = load(REAL_ISIC, image_size=64, workers=2)
    elapsed = time.perf_counter() - start
    stats = data.stats()
    assert stats["pairs_found"] == stats["pairs_loaded"] == 311
    assert stats["n_train"] + stats["n_val"] + stats["n_test"] == 311
    assert stats["empty_masks"] == 0
    for split in ("train", "val", "test"):
        ds = data.dataset(split)
        assert all(ds[i][1].sum() > 0 for i in range(len(ds)))
    assert 0.05 < stats["foreground_fraction"] < 0.8
    assert elapsed < 30, f"loading 311 real pairs took {elapsed:.1f}s: JPEG draft decoding should keep it to seconds"
