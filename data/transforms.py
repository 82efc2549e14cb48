"""Per-item augmentation and normalisation for 2D segmentation (albumentations 2.x).

Images are HxWxC uint8 (RGB photographs, grayscale CT slices) or float16/float32 (MRI slices already
z-scored per modality, which skip `Normalize`). Masks are HxW: {0,1} for a binary target, or a label
map that `target` turns into one binary channel per class after augmentation (rotations use nearest
neighbour on masks, so label values survive).

Resizing is not here: images are resized once when a dataset is loaded, so each item costs only a
rotation, a flip and a normalisation.

Albumentations 2.x ignores the global numpy/python seeds: each Compose has its own generator. It is
seeded from torch's seed when the transform is made, reseeded by the training loop at the start of each
epoch (`ArrayDataset.reseed`, so an epoch's augmentations depend only on (seed, epoch), and a resumed
run draws what an uninterrupted one drew), and reseeded once inside each DataLoader worker from the seed
torch gives that worker; otherwise every forked worker would replay the same copy of the generator and
apply the same "random" augmentations. Nothing is reseeded per item.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info



class PairTransform:
    """(HxWxC image, HxW mask) -> (float32 CxHxW, float32 KxHxW in {0,1}).

    Without `target` the mask is binary {0,1} and K = 1; with it, `target(mask)` maps the augmented
    label map to K binary channels (K x H x W).
    """

    def __init__(self, compose: A.Compose, target: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.compose = compose
        self.target = target
        self._worker_seed: Optional[int] = None
        self.reseed(torch.initial_seed())

    def reseed(self, seed: int) -> None:
        self.compose.set_random_seed(int(seed) % 2**32)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.reseed(info.seed)
        image = np.asarray(image)
        if image.dtype == np.float16:  # stored compactly; OpenCV and albumentations want float32
            image = image.astype(np.float32)
        if image.ndim == 2:
            image = image[..., None]
        out = self.compose(image=image, mask=np.asarray(mask))
        result = out["image"]
        if result.ndim == 2:
            result = result[..., None]
        img = torch.from_numpy(np.ascontiguousarray(result.transpose(2, 0, 1), dtype=np.float32))
        if self.target is None:
            msk = torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=np.float32)).unsqueeze(0)
        else:
            msk = torch.from_numpy(np.ascontiguousarray(self.target(out["mask"]), dtype=np.float32))
        return img, msk


def build_transform(
    augment: bool,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    rotate_limit: float,
    hflip_p: float,
    vflip_p: float = 0.0,
    target: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> PairTransform:
    """Rotation and flips when `augment`, then `Normalize(mean, std)` of uint8 pixels (skipped when
    `mean` is None: float images that are already normalised)."""
    steps: list = []
    if augment:
        if rotate_limit > 0:
            # Every train item gets an angle drawn from [-limit, limit]; mask stays nearest-neighbour (binary).
            steps.append(A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0))
        if hflip_p > 0:
            steps.append(A.HorizontalFlip(p=hflip_p))
        if vflip_p > 0:
            steps.append(A.VerticalFlip(p=vflip_p))
    if mean is not None:
        steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return PairTransform(A.Compose(steps), target)
