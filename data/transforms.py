"""Per-item augmentation and normalisation for 2D RGB segmentation (albumentations 2.x).

Resizing is not here: images are resized once when a dataset is loaded, so each item costs only a
rotation, a flip and a normalisation.

Albumentations 2.x ignores the global numpy/python seeds: each Compose has its own generator. So the
generator is seeded from the run's seed (reproducible runs), and reseeded once inside each DataLoader
worker from the seed torch gives that worker; otherwise every forked worker would replay the same
copy of the generator and apply the same "random" augmentations. Nothing is reseeded per item.
"""
from __future__ import annotations

from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PairTransform:
    """(uint8 HxWxC image, uint8 HxW mask in {0,1}) -> (float32 CxHxW, float32 1xHxW in {0,1})."""

    def __init__(self, compose: A.Compose, seed: int = 0):
        self.compose = compose
        self.seed = int(seed)
        self._worker_seed: Optional[int] = None
        compose.set_random_seed(self.seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        info = get_worker_info()
        worker_seed = None if info is None else info.seed % 2**32
        if worker_seed != self._worker_seed:
            self._worker_seed = worker_seed
            self.compose.set_random_seed(self.seed if worker_seed is None else worker_seed)
        out = self.compose(image=image, mask=mask)
        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32))
        msk = torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=np.float32)).unsqueeze(0)
        return img, msk


def build_transform(
    augment: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    rotate_limit: float = 15.0,
    hflip_p: float = 0.5,
    seed: int = 0,
) -> PairTransform:
    steps: list = []
    if augment:
        if rotate_limit > 0:
            # Every train item gets an angle drawn from [-limit, limit]; mask stays nearest-neighbour (binary).
            steps.append(A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0))
        if hflip_p > 0:
            steps.append(A.HorizontalFlip(p=hflip_p))
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return PairTransform(A.Compose(steps), seed)
