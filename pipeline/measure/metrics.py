"""Dice and IoU for binary masks, per image, then averaged; and the per-case metrics of the evaluate stage.

Convention for an image whose true and predicted masks are both empty: Dice = IoU = 1 (a correct
"nothing here"); if only one of them is empty the score is 0. Multi-channel outputs (one binary mask
per class, sigmoid) are scored per channel and averaged per image.

For volumetric datasets (whose Dataset carries `cases`, the case id of each slice) the meter also
stacks the slices of each case back and reports the per-case 3D Dice (`dice_3d`, mean over cases),
with the same empty convention per case: a case with no tumour that is predicted empty scores 1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
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


# -- per-case metrics -------------------------------------------------------------------------------
#
# What the field reports per image (2D) or per case (volumes): Dice, IoU, the 95th-percentile Hausdorff
# distance and the normalised surface Dice, from MONAI's implementations (monai.metrics), in the units of
# the grid's spacing (mm for volumes that record it, pixels otherwise). MONAI leaves an empty mask to the
# caller (it returns nan or inf); the rules here, stated once:
#   both masks empty        Dice = IoU = NSD = 1, HD95 = 0      (a correct "nothing here")
#   only the truth empty    Dice = IoU = NSD = 0, HD95 = the grid's diagonal (the worst distance it has)
#   only the prediction empty   the same as above
# With `ignore_empty` (MONAI's DiceMetric(ignore_empty=True) semantics) a case whose truth is empty is
# left out of every mean (its row keeps NaN), whatever was predicted.

CASE_METRICS = ("dice", "iou", "hd95", "nsd")


@dataclass(frozen=True)
class CaseRules:
    """How per-case metrics are scored (evaluate.ignore_empty, nsd_tolerance, jaccard_threshold)."""

    ignore_empty: bool
    nsd_tolerance: float  # surface Dice tolerance, in the grid's spacing unit (mm, or pixels)
    jaccard_threshold: Optional[float] = None  # ISIC 2018's thresholded Jaccard: IoU below it counts 0


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing))))


def case_metrics(pred: np.ndarray, true: np.ndarray, rules: CaseRules, spacing: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Metrics of one case: boolean masks shaped (C, *spatial), one channel per class/region.

    Returns the channel means (`dice`, `iou`, `hd95`, `nsd`, `thresholded_jaccard`), the foreground sizes
    (`true_px`, `pred_px`, summed over channels) and, with several channels, each channel's metrics as
    `<metric>_<name>`."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape}: expected the same shape")
    dims = pred.ndim - 1
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * dims))
    names = list(names) if names is not None else [str(c) for c in range(pred.shape[0])]
    per_channel: list[dict[str, float]] = []
    for p, t in zip(pred, true):
        inter, np_, nt = float((p & t).sum()), float(p.sum()), float(t.sum())
        if nt == 0 and rules.ignore_empty:
            scores = dict.fromkeys(CASE_METRICS, math.nan)
        elif np_ == 0 and nt == 0:
            scores = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
        elif np_ == 0 or nt == 0:
            scores = {"dice": 0.0, "iou": 0.0, "hd95": _diagonal(p.shape, spacing), "nsd": 0.0}
        else:
            yp, yt = torch.from_numpy(p[None, None]), torch.from_numpy(t[None, None])
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing)
                nsd = compute_surface_dice(yp, yt, [rules.nsd_tolerance], include_background=True, spacing=spacing)
            scores = {"dice": 2 * inter / (np_ + nt), "iou": inter / (np_ + nt - inter),
                      "hd95": float(hd.item()), "nsd": float(nsd.item())}
        per_channel.append(scores)
    out: dict[str, float] = {}
    for metric in CASE_METRICS:
        values = [s[metric] for s in per_channel]
        out[metric] = math.nan if all(math.isnan(v) for v in values) else float(np.nanmean(values))
        if len(per_channel) > 1:
            out.update({f"{metric}_{name}": v for name, v in zip(names, values)})
    if rules.jaccard_threshold is not None:
        iou = out["iou"]
        out["thresholded_jaccard"] = iou if math.isnan(iou) or iou >= rules.jaccard_threshold else 0.0
    out["true_px"] = int(true.sum())
    out["pred_px"] = int(pred.sum())
    return out


def summarize_cases(rows: Sequence[dict]) -> dict[str, float]:
    """Means over cases of every metric column (NaN cells, i.e. ignored empty cases, left out), and how
    many cases were left out (`cases_ignored_empty`)."""
    if not rows:
        raise ValueError("no case was scored")
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(np.nanmean(values)) if (~np.isnan(values)).any() else math.nan
    out["cases_ignored_empty"] = int(sum(math.isnan(r["dice"]) for r in rows))
    return out
