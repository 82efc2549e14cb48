"""Datasets for medprune: each reads and checks all its files in `setup(seed)`, then serves splits.

ISIC 2018 (`data.isic`), BraTS (`data.brats`) and Kaggle COVID-19 CT volumes (`data.covid_ct`) served as
slices from an on-disk slice cache (`data.volumes`, `data.cache`), and generic 2D slice folders
(`data.slices`). Synthetic data is a generation step that writes the real layouts (`data.synthetic`,
`data.synthetic_volumes`) for the real readers. See docs/DATASETS.md.

`data` never imports `pipeline` or `models`; the pipeline only sees `build_data` and `SegmentationData`.
"""
from __future__ import annotations

from data.base import DatasetError, SegmentationData
from data.readers import READERS, ReaderSettingsError

__all__ = ["DatasetError", "READERS", "ReaderSettingsError", "SegmentationData", "build_data", "build_reader"]


def build_reader(cfg) -> SegmentationData:
    """The reader a dataset config names (`_target_` on the allow-list `data.readers.READERS`, plain keyword
    values; data/readers.py), its keys checked, nothing read yet: what `pipeline.predict` preprocesses new
    images with. A `synthetic:` block is ignored."""
    from omegaconf import DictConfig, OmegaConf

    from data import readers
    from data.synthetic import split_synthetic

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg, _ = split_synthetic(cfg)
    return readers.build_reader(cfg)


def build_data(cfg, seed: int, test_only: bool = False) -> SegmentationData:
    """Builds the dataset a config names (`_target_` plus keys) and loads it; fails before any training.

    A `synthetic:` block first generates the data in the reader's layout under `root` (data/synthetic.py).
    `test_only` (an evaluate-only job) reads `dataset.test_root` alone: `root` is neither generated nor read."""
    from omegaconf import DictConfig, OmegaConf

    from data.synthetic import ensure_generated, split_synthetic

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg, synthetic = split_synthetic(cfg)
    generated = ensure_generated(cfg["root"], synthetic) if synthetic and not test_only else None
    data = build_reader(cfg)
    try:
        data.setup(seed, test_only=test_only)
    except OSError as err:  # a symlink loop, a permission, a vanished file: name the path, not a traceback
        where = cfg.get("test_root") if test_only else cfg.get("root")
        raise DatasetError(f"{err.filename or where}: {err.strerror or err} (while reading the dataset)") from err
    if generated is not None:
        data._stats["synthetic_generated"] = float(generated)
    return data
