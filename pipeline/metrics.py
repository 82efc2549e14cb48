"""Dice and IoU for binary masks, per image, then averaged.

Convention for an image whose true and predicted masks are both empty: Dice = IoU = 1 (a correct
"nothing here"); if only one of them is empty the score is 0. Multi-channel outputs (one binary mask
per class, sigmoid) are scored per channel and averaged per image.

For volumetric datasets (whose Dataset carries `cases`, the case id of each slice) the meter also
stacks the slices of each case back and reports the per-case 3D Dice (`dice_3d`, mean over cases),
with the same empty convention per case: a case with no tumour that is predicted empty scores 1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.sigmoid(logits.float()) > threshold


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks shaped (B, C, H, W); returns two (B,) tensors."""
    pred, target = pred.bool().flatten(2), target.bool().flatten(2)
    inter = (pred & target).sum(-1).double()
    p, t = pred.sum(-1).double(), target.sum(-1).double()
    union = p + t - inter
    both_empty = (p + t) == 0
    dice = torch.where(both_empty, torch.ones_like(inter), 2 * inter / (p + t).clamp_min(1))
    iou = torch.where(both_empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice.mean(1), iou.mean(1)


class SegmentationMeter:
    """Accumulates per-image scores over batches (and per-case volumes when `cases` is given).

    `cases` lists the case of each image in the order the batches arrive (an unshuffled loader)."""

    def __init__(self, threshold: float = 0.5, cases: Optional[Sequence[str]] = None):
        self.threshold = threshold
        self.dice: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []
        self.cases = list(cases) if cases is not None else None
        self.seen = 0
        self.volumes: dict[str, torch.Tensor] = {}  # case -> (classes, 3): intersection, predicted, true voxels

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred, true = binarize(logits, self.threshold), target > 0.5
        d, i = dice_iou(pred, true)
        self.dice.append(d.cpu())
        self.iou.append(i.cpu())
        if self.cases is not None:
            n = pred.shape[0]
            if self.seen + n > len(self.cases):
                raise ValueError(f"more images ({self.seen + n}) than case ids ({len(self.cases)})")
            p, t = pred.flatten(2), true.flatten(2)
            counts = torch.stack([(p & t).sum(-1), p.sum(-1), t.sum(-1)], dim=-1).double().cpu()  # (B, C, 3)
            for case, c in zip(self.cases[self.seen : self.seen + n], counts):
                self.volumes[case] = self.volumes.get(case, 0) + c
            self.seen += n

    def compute(self) -> dict[str, float]:
        if not self.dice:
            raise ValueError("no images were scored")
        dice, iou = torch.cat(self.dice), torch.cat(self.iou)
        out = {"dice": float(dice.mean()), "iou": float(iou.mean()), "images": int(dice.numel())}
        if self.volumes:
            per_case = []
            for c in self.volumes.values():
                inter, p, t = c[:, 0], c[:, 1], c[:, 2]
                per_case.append(torch.where(p + t == 0, torch.ones_like(inter), 2 * inter / (p + t).clamp_min(1)).mean())
            out["dice_3d"] = float(torch.stack(per_case).mean())
            out["cases"] = len(per_case)
        return out
