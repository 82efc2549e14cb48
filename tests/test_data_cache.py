"""What all volumetric datasets share: the slice cache (built once, keyed, concurrent-safe, streamed),
patient-level splits, and the served items (ids, cases, order)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DatasetError
from data.brats import BraTS
from data.cache import SliceCache
from data.covid_ct import CovidCT
from data.synthetic_volumes import write_synthetic_brats, write_synthetic_covid_ct
from data.volumes import ordered_map, resize_labels
from helpers import kwargs_of

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 24, 12)


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_brats") / "brats"
    write_synthetic_brats(root, count=6, seed=0, shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_ct") / "ct"
    write_synthetic_covid_ct(root, count=8, seed=0, shape=(32, 32, 10))
    return root


def brats(root, cache, **kwargs) -> BraTS:
    data = BraTS(**kwargs_of("dataset", "brats", root=str(root), **{"image_size": 16, "cache_dir": str(cache), "workers": 1, **kwargs}))
    data.setup(0)
    return data


def cache_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


# -- built once, reused -----------------------------------------------------------------------------


def test_second_setup_reads_the_cache_and_builds_nothing(brats_root, tmp_path, caplog, monkeypatch):
    with caplog.at_level("INFO"):
        first = brats(brats_root, tmp_path)
    assert "building slice cache" in caplog.text and first.stats()["cache_hit"] == 0
    assert first.stats()["cache_build_seconds"] > 0
    folder = first.cache_folder
    assert folder.parent == tmp_path and folder.name.startswith("brats-")
    assert {p.name for p in folder.iterdir()} == {"images.bin", "labels.bin", "index.npz", "meta.json", "key.json"}

    def no_reading(self, case):
        raise AssertionError(f"{case.case_id} was read again")

    monkeypatch.setattr(BraTS, "_process", no_reading)
    caplog.clear()
    with caplog.at_level("INFO"):
        second = brats(brats_root, tmp_path)
    assert "slice cache hit" in caplog.text and "building slice cache" not in caplog.text
    assert second.stats()["cache_hit"] == 1 and second.stats()["cache_build_seconds"] == 0
    assert second.split_ids() == first.split_ids()
    for split in ("train", "val", "test"):
        a, b = first.dataset(split), second.dataset(split)
        assert a.ids == b.ids and a.cases == b.cases
        assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(0, len(a), 5))
    # serving settings do not touch the cache
    brats(brats_root, tmp_path, region="tumor_core", empty_slice_fraction=0.7, split_seed=3, rotate_limit=0.0)
    assert cache_folders(tmp_path) == [folder.name]


def test_the_cache_is_memory_mapped_and_pickles_small(brats_root, tmp_path):
    import pickle

    data = brats(brats_root, tmp_path)
    ds = data.dataset("train")
    assert isinstance(ds.images, np.memmap) and isinstance(ds.masks, np.memmap)
    assert ds.images.dtype == np.float16 and ds.images.shape[1:] == (16, 16, 4)
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker receives
    assert len(blob) < ds.images.nbytes / 4
    copy = pickle.loads(blob)
    assert isinstance(copy.images, np.memmap) and copy.ids == ds.ids
    assert all(torch.equal(a, b) for a, b in zip(copy[3], ds[3]))


@pytest.mark.parametrize("change", ["image_size", "modalities", "label_scheme", "already_normalized"])
def test_preprocessing_settings_give_another_cache(brats_root, tmp_path, change):
    brats(brats_root, tmp_path)
    value = {"image_size": 20, "modalities": ["flair", "t2"], "label_scheme": "brats2023", "already_normalized": True}[change]
    if change == "label_scheme":
        with pytest.raises(DatasetError, match="label value"):  # 2021 labels (4) are not 2023 labels
            brats(brats_root, tmp_path, label_scheme=value)
        assert len(cache_folders(tmp_path)) == 1  # the failed build left nothing behind
        return
    other = brats(brats_root, tmp_path, **{change: value})
    assert other.stats()["cache_hit"] == 0 and len(cache_folders(tmp_path)) == 2


def test_a_changed_file_gives_another_cache(brats_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(brats_root, tmp_path / "data"))
    brats(root, tmp_path / "cache")
    seg = next(root.glob("*/*_seg.nii.gz"))
    os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))
    assert brats(root, tmp_path / "cache").stats()["cache_hit"] == 0
    assert len(cache_folders(tmp_path / "cache")) == 2
    assert brats(root, tmp_path / "cache").stats()["cache_hit"] == 1


def test_cache_key_depends_on_kind_settings_and_files():
    a = SliceCache(Path("/x"), "brats", {"settings": {"s": 1}, "files": [["a", 1, 2]]})
    assert a.key == SliceCache(Path("/x"), "brats", {"settings": {"s": 1}, "files": [["a", 1, 2]]}).key
    assert a.key != SliceCache(Path("/x"), "covid_ct", {"settings": {"s": 1}, "files": [["a", 1, 2]]}).key
    assert a.key != SliceCache(Path("/x"), "brats", {"settings": {"s": 2}, "files": [["a", 1, 2]]}).key
    assert a.key != SliceCache(Path("/x"), "brats", {"settings": {"s": 1}, "files": [["a", 1, 3]]}).key


def test_a_killed_builder_leaves_nothing_that_is_read(brats_root, tmp_path):
    first = brats(brats_root, tmp_path)
    name = first.cache_folder.name
    import shutil

    shutil.rmtree(first.cache_folder)
    (tmp_path / f".{name}.tmp-killed").mkdir()  # what a job killed while building leaves
    (tmp_path / f".{name}.tmp-killed" / "images.bin").write_bytes(b"half")
    again = brats(brats_root, tmp_path)
    assert again.stats()["cache_hit"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f".{name}.lock"])


def test_without_cache_dir_a_private_folder_is_used_and_removed(brats_root):
    data = BraTS(**kwargs_of("dataset", "brats", root=str(brats_root), image_size=16, cache_dir=None, workers=1))
    data.setup(0)
    folder = data.cache_folder.parent
    assert folder.is_dir() and data.stats()["cache_hit"] == 0
    len(data.dataset("train"))
    del data
    import gc

    gc.collect()
    assert not folder.exists()


def test_a_cache_built_with_skip_still_fails_a_strict_run(tmp_path):
    root = tmp_path / "data"
    write_synthetic_brats(root, count=5, seed=0, shape=SHAPE)
    victim = next(root.glob("*/*_t2.nii.gz"))
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated: only decompressing finds it
    skipped = brats(root, tmp_path / "cache", on_missing="skip")
    assert skipped.stats()["cases_skipped"] == 1
    with pytest.raises(DatasetError, match="cannot be decompressed"):
        brats(root, tmp_path / "cache")  # same files, same cache: still an error without skip


# -- concurrency and memory -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_parallel_jobs_build_the_cache_once(ct_root, tmp_path):
    script = (
        "import sys, logging; logging.basicConfig(level=logging.INFO)\n"
        "from data.covid_ct import CovidCT\n"
        "from helpers import kwargs_of\n"
        "d = CovidCT(**kwargs_of('dataset', 'covid_ct', root=sys.argv[1], image_size=24, cache_dir=sys.argv[2], workers=1)); d.setup(0)\n"
        "print(int(d.stats()['cache_hit']), int(d.stats()['n_train']))\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(ct_root), str(tmp_path / "cache")], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    hits = [int(out.split()[0]) for out, _ in outs]
    assert sorted(hits) == [0, 1, 1], outs
    assert len({out.split()[1] for out, _ in outs}) == 1
    assert sum("building slice cache" in err for _, err in outs) == 1
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 2 and names[0].startswith(".covid_ct-") and names[0].endswith(".lock")


def test_building_holds_at_most_workers_volumes(ct_root, tmp_path, monkeypatch):
    """Volumes are streamed: never more cases in flight than workers, and results come back in order."""
    original = CovidCT._process
    active, peak, lock = [0], [0], threading.Lock()

    def tracked(self, case):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.02)
            return original(self, case)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(CovidCT, "_process", tracked)
    data = CovidCT(**kwargs_of("dataset", "covid_ct", root=str(ct_root), image_size=24, cache_dir=str(tmp_path), workers=2))
    data.setup(0)
    assert peak[0] == 2 and data.stats()["cases"] == 8
    meta = json.loads((data.cache_folder / "meta.json").read_text())
    starts = [c["start"] for c in meta["cases"]]
    assert starts == sorted(starts)


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    submitted, done = [], []

    def items():
        for i in range(10):
            submitted.append(i)
            yield i

    def slow(i):
        time.sleep(0.01 * (i % 3))
        return i * i

    for result in ordered_map(slow, items(), 2):
        done.append(result)
        assert len(submitted) - len(done) <= 2
    assert done == [i * i for i in range(10)]


def test_label_resizing_is_a_majority_vote():
    labels = np.zeros((8, 8), np.uint8)
    labels[:, :5] = 2
    labels[6:, 6:] = 4
    small = resize_labels(labels, 4)
    assert set(np.unique(small)) <= {0, 2, 4}
    assert (small[:, :2] == 2).all() and small[3, 3] == 4
    assert resize_labels(np.ones((5, 5), np.uint8), 3).tolist() == [[1] * 3] * 3


# -- splits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_seed", [0, 1, 2, 3])
def test_no_case_and_no_patient_is_in_two_splits(ct_root, tmp_path, split_seed):
    data = CovidCT(**kwargs_of("dataset", "covid_ct", root=str(ct_root), image_size=16, cache_dir=str(tmp_path), workers=1, split_seed=split_seed, offline_flips=True))
    data.setup(0)
    ids = data.split_ids()
    assert sorted(sum(ids.values(), [])) == sorted(e["id"] for e in data._cached.meta["cases"])
    served = {split: {c.split("#")[0] for c in data.dataset(split).cases} for split in ids}
    patients = {split: {data._patient(c) for c in cases} for split, cases in ids.items()}
    for a in ids:
        assert served[a] == set(ids[a])
        for b in ids:
            if a < b:
                assert not set(ids[a]) & set(ids[b]) and not patients[a] & patients[b]
                item_ids_a = {i.split("#")[0] for i in data.dataset(a).ids}
                assert not item_ids_a & {i.split("#")[0] for i in data.dataset(b).ids}


def test_split_seed_moves_the_split_and_the_run_seed_does_not(ct_root, tmp_path):
    def ids(split_seed=0, seed=0):
        data = CovidCT(**kwargs_of("dataset", "covid_ct", root=str(ct_root), image_size=16, cache_dir=str(tmp_path), workers=1, split_seed=split_seed))
        data.setup(seed)
        return data.split_ids()

    assert ids() == ids(seed=7)
    assert any(ids(split_seed=s) != ids() for s in (1, 2, 3))


def test_augmentation_is_reseeded_per_epoch(ct_root, tmp_path):
    data = CovidCT(**kwargs_of("dataset", "covid_ct", root=str(ct_root), image_size=16, cache_dir=str(tmp_path), workers=1))
    data.setup(0)
    ds = data.dataset("train", augment=True)

    def first(seed):
        ds.reseed(seed)
        return torch.stack([ds[i][0] for i in range(6)])

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))
