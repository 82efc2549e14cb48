"""The DataLoader every pass over a split uses (training, validation, scoring, evaluation): seeded shuffling,
whole volumes one at a time, no partial last training batch."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    if getattr(dataset, "window", None) is not None:
        batch_size = 1  # whole volumes (3D val / test): each its own size, each inferred window by window
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=device.type == "cuda",
        # New workers every epoch: their seeds then come from the loader's generator, which fit reseeds
        # per epoch, so an epoch's augmentations do not depend on the epochs before it (resume).
        persistent_workers=False,
        # training drops a last partial batch: a batch of one breaks BatchNorm (e.g. DeepLabV3+'s ASPP pooling)
        drop_last=shuffle and len(dataset) > batch_size,
    )
