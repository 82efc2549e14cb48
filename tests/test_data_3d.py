"""The 3D path's data and inference: volumes from the slice cache, the patch sampler, sliding-window reassembly,
and per-case 3D metrics (data/volumes3d.py, pipeline/inference.py, pipeline/measure/metrics.py), on synthetic twins
written in the real BraTS and Kaggle COVID-19 CT layouts."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data import build_data
from data.brats import BraTS, BraTS3D
from data.volumes3d import PatchDataset, Window, crop, patch_start
from pipeline.config import ConfigError, validate
from pipeline.inference import SlidingWindow, window_count
from pipeline.measure.metrics import CaseRules, case_metrics

from helpers import compose_config


def dataset_conf(name: str, outputs: Path, *overrides: str) -> dict:
    """conf/dataset/<name>.yaml as the pipeline composes it (it extends the 2D reader's YAML)."""
    from omegaconf import OmegaConf

    cfg = compose_config(f"dataset={name}", f"paths.outputs={outputs}", "dataset.workers=1", *overrides)
    return OmegaConf.to_container(cfg.dataset, resolve=True)


@pytest.fixture(scope="module")
def brats3d(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("brats3d")
    return build_data(dataset_conf("synthetic_brats3d", outputs, "dataset.region=[wt,tc,et]"), seed=0)


def test_volumes_are_the_cached_slices_stacked(brats3d):
    """A 3D case is its 2D reader's cached slices in slice order: the same arrays, read in place."""
    volumes = brats3d._volumes["test"]
    cached = brats3d._source["test"]
    entry = next(c for c in cached.meta["cases"] if c["id"] == volumes[0].case_id)
    slices = cached.slice[entry["start"]:entry["stop"]]
    assert volumes[0].image.shape[0] == slices[-1] - slices[0] + 1
    np.testing.assert_array_equal(volumes[0].labels, cached.labels[entry["start"]:entry["stop"]])
    image, target = brats3d.dataset("test")[0]
    assert image.shape == (4, len(slices), 32, 32) and target.shape == (3, len(slices), 32, 32)
    assert brats3d.dataset("test").ids == brats3d.split_ids()["test"]
    assert brats3d.stats()["slices_missing_3d"] == 0


def test_a_gap_in_a_brats_case_is_filled_with_zeros(brats3d, monkeypatch):
    """BraTS zeroes the slices it drops (no brain, no tumour): a dropped slice inside a case's range comes back as zeros."""
    cached = brats3d._source["train"]
    case = cached.meta["cases"][0]
    stored = cached.slice.copy()
    monkeypatch.setattr(cached, "slice", np.where(np.arange(len(stored)) >= case["start"] + 2, stored + 1, stored))
    volumes, missing = brats3d._split_volumes("train")
    volume = next(v for v in volumes if v.case_id == case["id"])
    assert missing == 0 and volume.image.shape[0] == case["stop"] - case["start"] + 1
    assert not np.asarray(volume.image[2], dtype=np.float32).any() and not volume.labels[2].any()
    np.testing.assert_array_equal(volume.labels[3], cached.labels[case["start"] + 2])


@pytest.mark.parametrize("fraction", [0.0, 0.33, 1.0])
def test_the_patch_sampler_centres_the_asked_fraction_on_the_target(brats3d, fraction):
    """floor(fraction x patches per case) patches of every case are centred on a target voxel, each holding
    target; the others are drawn anywhere (on this small synthetic set most hold none)."""
    train = brats3d.dataset("train")
    patches = PatchDataset(train.volumes, 16, 12, fraction, brats3d.transform(False), seed=3)
    centred = [i for i in range(len(patches)) if patches.centred_on_foreground(i)]
    cases = len(train.volumes)
    assert len(centred) == cases * math.floor(12 * fraction)
    assert {i % cases for i in centred} == (set(range(cases)) if fraction else set())
    for i in centred:
        image, target = patches[i]
        assert image.shape == (4, 16, 16, 16) and target.shape == (3, 16, 16, 16) and target[0].any()
    with_target = sum(bool(patches[i][1].any()) for i in range(len(patches)))
    assert with_target >= len(centred)


def test_patches_depend_only_on_the_epoch_seed(brats3d):
    train = brats3d.dataset("train", augment=True)
    train.reseed(5)
    first = [train[i] for i in (0, 7)]
    train.reseed(6)
    other = train[0]
    train.reseed(5)
    again = [train[i] for i in (0, 7)]
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(first[0][0], other[0])
    assert set(torch.unique(first[0][1]).tolist()) <= {0.0, 1.0}  # labels stay binary through the affine


def test_a_patch_at_the_border_stays_inside_and_a_small_volume_is_padded():
    assert patch_start(1, 16, 40) == 0 and patch_start(39, 16, 40) == 24 and patch_start(20, 16, 40) == 12
    assert patch_start(5, 16, 10) == 0
    block = crop(np.ones((10, 40, 40), np.uint8), (0, 3, 24), 16)
    assert block.shape == (16, 16, 16) and block[:10].all() and not block[10:].any()


@pytest.mark.parametrize("shape", [(1, 2, 40, 36, 28), (1, 1, 10, 20, 12)])
def test_sliding_window_reassembles_a_volume_exactly_with_an_identity_network(shape):
    """Gaussian-weighted overlapping windows of an identity network give the volume back, also one smaller
    than a window (padded, then cropped back)."""
    volume = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = SlidingWindow(nn.Identity(), Window((16, 16, 16), 0.5))(volume)
    assert out.shape == volume.shape
    torch.testing.assert_close(out, volume, rtol=1e-5, atol=1e-5)


def test_windows_per_volume_are_counted():
    assert window_count((1, 1, 32, 32, 32), Window((16, 16, 16), 0.5)) == 27
    assert window_count((1, 1, 32, 32, 32), Window((16, 16, 16), 0.0)) == 8
    assert window_count((1, 3, 10, 10, 10), Window((16, 16, 16), 0.5)) == 1


def test_per_case_3d_metrics_per_region_in_millimetres():
    """A cube shifted by 2 voxels along x at 1.5 mm: Dice and IoU from the overlap, HD95 3 mm, per region."""
    true = np.zeros((2, 12, 12, 12), bool)
    true[:, 3:9, 3:9, 3:9] = True
    pred = np.zeros_like(true)
    pred[0, 3:9, 3:9, 5:11] = True
    pred[1] = true[1]
    rules = CaseRules(ignore_empty=False, nsd_tolerance=1.0)
    m = case_metrics(pred, true, rules, spacing=(1.0, 1.0, 1.5), names=["whole_tumor", "tumor_core"])
    assert m["dice_whole_tumor"] == pytest.approx(2 * 144 / 432) and m["iou_whole_tumor"] == pytest.approx(144 / 288)
    assert m["hd95_whole_tumor"] == pytest.approx(3.0) and m["hd95_tumor_core"] == 0.0
    assert m["dice_tumor_core"] == 1.0 and m["dice"] == pytest.approx((2 * 144 / 432 + 1) / 2)


def test_covid_ct3d_refuses_per_slice_crops(tmp_path):
    from data.covid_ct import CovidCT3D

    keys = dataset_conf("covid_ct3d", tmp_path, f"dataset.root={tmp_path}")
    keys.pop("_target_")
    CovidCT3D(**keys)  # crop: volume
    with pytest.raises(ValueError, match="crop='slice' is invalid for a 3D dataset"):
        CovidCT3D(**{**keys, "crop": "slice"})


def test_synthetic_covid_ct3d_serves_volumes_and_patches(tmp_path):
    data = build_data(dataset_conf("synthetic_covid_ct3d", tmp_path), seed=0)
    image, target = data.dataset("val")[0]
    assert image.dim() == 4 and image.shape[0] == 1 and target.shape[1:] == image.shape[1:]
    assert abs(float(image.mean())) < 5  # normalised (mean / std of x / 255), not raw 0-255
    patch, _ = data.dataset("train", augment=True)[0]
    assert patch.shape == (1, 16, 16, 16) and data.input_size == (16, 16, 16)


def test_a_2d_model_on_a_3d_dataset_fails_before_any_work(tmp_path):
    cfg = compose_config("dataset=synthetic_brats3d", "model=unet_tiny", f"paths.outputs={tmp_path}")
    with pytest.raises(ConfigError, match=r"2D network .* serves 3D items: expected a 3D model \(model=unet3d, attention_unet3d\)"):
        validate(cfg)
    cfg = compose_config("dataset=synthetic_brats3d", "model=unet3d", "dataset.patch_size=20", f"paths.outputs={tmp_path}")
    with pytest.raises(ConfigError, match="dataset.patch_size=20 is invalid for model.depth=3: expected a multiple of 8"):
        validate(cfg)
    cfg = compose_config("dataset=synthetic_brats", "model=unet3d", f"paths.outputs={tmp_path}")
    with pytest.raises(ConfigError, match="is a 3D network but dataset._target_=data.brats.BraTS serves 2D items"):
        validate(cfg)


def test_the_3d_reader_shares_the_2d_readers_slice_cache(brats3d, tmp_path):
    assert issubclass(BraTS3D, BraTS)
    flat = build_data(dataset_conf("synthetic_brats", Path(brats3d.root).parents[1]), seed=0)
    assert flat.stats()["cache_hit"] == 1.0 and flat.cache_folder == brats3d.cache_folder
    stats, ids = brats3d.stats(), brats3d.split_ids()
    assert math.isclose(stats["patches_train"], len(ids["train"]) * brats3d.patches_per_case)
    # n_* count the items served (patches per epoch, whole volumes), not the shared cache's 2D slices
    assert (stats["n_train"], stats["n_val"], stats["n_test"]) == (stats["patches_train"], len(ids["val"]), len(ids["test"]))
    assert stats["slices_train"] == flat.stats()["slices_train"] > stats["n_val"] + stats["n_test"]


def test_the_latency_budget_is_refused_for_3d_networks(tmp_path):
    cfg = compose_config("dataset=synthetic_brats3d", "model=unet3d", "prune=latency_budget", "prune.target_ms=5",
                         f"paths.outputs={tmp_path}")
    with pytest.raises(ConfigError, match="prune=latency_budget times 2D convolutions only"):
        validate(cfg)


def test_the_window_batch_does_not_retrain_the_baseline_and_the_patch_size_does(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.baseline import baseline_key

    def key(*overrides):
        cfg = compose_config("dataset=synthetic_brats3d", "model=unet3d", f"paths.outputs={tmp_path}", *overrides)
        OmegaConf.resolve(cfg)
        return baseline_key(cfg, build_data(cfg.dataset, cfg.seed))

    first = key()
    assert key("dataset.window_batch=4") == first
    assert key("dataset.patch_size=24") != first and key("dataset.window_overlap=0.25") != first
