"""Dice and IoU for binary masks, per image, then averaged.

Convention for an image whose true and predicted masks are both empty: Dice = IoU = 1 (a correct
"nothing here"); if only one of them is empty the score is 0. Multi-channel outputs (one binary mask
per class, sigmoid) are scored per channel and averaged per image.
"""
from __future__ import annotations

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
    """Accumulates per-image scores over batches."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.dice: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        d, i = dice_iou(binarize(logits, self.threshold), target > 0.5)
        self.dice.append(d.cpu())
        self.iou.append(i.cpu())

    def compute(self) -> dict[str, float]:
        if not self.dice:
            raise ValueError("no images were scored")
        dice, iou = torch.cat(self.dice), torch.cat(self.iou)
        return {"dice": float(dice.mean()), "iou": float(iou.mean()), "images": int(dice.numel())}
