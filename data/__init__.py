"""Datasets for medprune: each reads and checks all its files in `setup(seed)`, then serves splits.

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
