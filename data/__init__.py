"""Datasets for medprune: each reads and checks all its files in `setup(seed)`, then serves splits.

ISIC 2018 (`data.isic`), BraTS (`data.brats`) and Kaggle COVID-19 CT volumes (`data.covid_ct`) served as
slices from an on-disk slice cache (`data.volumes`, `data.cache`), generic 2D slice folders
(`data.slices`), and synthetic twins written in the real layouts (`data.synthetic`,
`data.synthetic_volumes`). See docs/DATASETS.md.

`data` never imports `pipeline` or `models`; the pipeline only sees `build_data` and `SegmentationData`.
"""
from __future__ import annotations

from data.base import DatasetError, SegmentationData

__all__ = ["DatasetError", "SegmentationData", "build_data"]


def build_data(cfg, seed: int) -> SegmentationData:
    """Builds the dataset a config names (`_target_` plus keys) and loads it; fails before any training."""
    from hydra.utils import instantiate

    data = instantiate(cfg, _convert_="all")
    if not isinstance(data, SegmentationData):
        target = cfg.get("_target_") if hasattr(cfg, "get") else None
        raise TypeError(f"dataset._target_={target!r} built a {type(data).__name__}, not a data.SegmentationData")
    data.setup(seed)
    return data
