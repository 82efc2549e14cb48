"""Per-case results of one network on the test split, as researchers report them.

One pass over the split gives: a row per case (an image for 2D data; a volume, its served slices stacked,
for volumetric data) with Dice, IoU, HD95, normalised surface Dice, ISIC's thresholded Jaccard and the
true/predicted foreground sizes (pipeline.measure.metrics.case_metrics states the empty-mask rules); the
image-level means the results table has always shown (SegmentationMeter, unchanged); the totals the
collapse check reads; and, for the first `export` cases, the predicted masks as files.

Volumes are scored in 3D on the served grid (slices resized to image_size) in millimetres where the reader
records the case's voxel spacing (`case_spacing`), in voxels otherwise: a 2D network's slices stacked back, or
a 3D network's whole-volume prediction (sliding-window inference, `inference.windowed`), one item per case.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.loader import make_loader
from pipeline.inference import windowed
from pipeline.measure.metrics import CaseRules, SegmentationMeter, binarize, case_metrics, summarize_cases


@dataclass
class CaseResults:
    rows: list[dict] = field(default_factory=list)  # one per case, in the split's order
    image_means: dict = field(default_factory=dict)  # SegmentationMeter.compute(): dice, iou, images (+ dice_3d, cases)
    pixels: int = 0  # pixels (voxels) scored, all channels
    true_px: int = 0
    pred_px: int = 0
    trivial: list[tuple[float, float]] = field(default_factory=list)  # per case: Dice of all foreground, all background

    @property
    def means(self) -> dict[str, float]:
        return summarize_cases(self.rows)

    @property
    def pred_foreground_fraction(self) -> float:
        return self.pred_px / max(self.pixels, 1)

    @property
    def true_foreground_fraction(self) -> float:
        return self.true_px / max(self.pixels, 1)


def trivial_dice(true: np.ndarray, ignore_empty: bool) -> tuple[float, float]:
    """The Dice of the two trivial predictors on one case (boolean (C, *spatial)): all foreground, all background,
    by case_metrics' empty rules (an empty truth scores 1 when predicted empty, 0 otherwise; NaN, left out, with
    `ignore_empty`), averaged over the channels."""
    true = np.asarray(true, bool).reshape(len(true), -1)
    t, n = true.sum(1).astype(float), float(true.shape[1])
    fg = np.where(t == 0, 0.0, 2 * t / (t + n))
    bg = np.where(t == 0, 1.0, 0.0)
    if ignore_empty:
        fg, bg = np.where(t == 0, np.nan, fg), np.where(t == 0, np.nan, bg)
    if np.isnan(fg).all():
        return math.nan, math.nan
    return float(np.nanmean(fg)), float(np.nanmean(bg))


def collapse(results: CaseResults, tolerance: float, margin: Optional[float] = None) -> Optional[str]:
    """'all foreground' when the network marks (almost) every pixel of the split as foreground,
    'all background' when it marks (almost) none of the true foreground's worth, 'no better than all
    <foreground | background> (...)' when its mean Dice is within `margin` of what that trivial predictor scores on
    the same cases; None otherwise.

    `tolerance` (evaluate.collapse_tolerance): all foreground = at least (1 - tolerance) of the pixels
    while the truth is not; all background = at most tolerance x the true foreground pixels. `margin`
    (evaluate.collapse_margin): a network that beats guessing by less than this has not learnt the task (the
    60 % COVID network at Dice 0.290 against the all-foreground guess's 0.262 had not), whatever its pixels."""
    if results.pixels == 0:
        return None
    if results.pred_px >= (1 - tolerance) * results.pixels and results.true_px < (1 - tolerance) * results.pixels:
        return "all foreground"
    if results.true_px > 0 and results.pred_px <= tolerance * results.true_px:
        return "all background"
    if margin is None or not results.trivial:
        return None
    dice = results.means.get("dice", math.nan)
    kept = [(fg, bg) for (fg, bg), row in zip(results.trivial, results.rows) if not math.isnan(row.get("dice", math.nan))]
    if not kept or math.isnan(dice):
        return None
    guesses = {"foreground": statistics.fmean(fg for fg, _ in kept), "background": statistics.fmean(bg for _, bg in kept)}
    which = max(guesses, key=guesses.get)
    if dice <= guesses[which] + margin:
        return f"no better than all {which} (Dice {dice:.3f} vs {guesses[which]:.3f})"
    return None


def describe_collapse(flag: str) -> str:
    """A `collapse` flag as a phrase: "predicts all background", "is no better than all foreground (...)"."""
    return f"is {flag}" if flag.startswith("no better") else f"predicts {flag}"


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name)


def _export(pred: np.ndarray, case: str, folder: Path, spacing: Optional[Sequence[float]]) -> None:
    """A 2D prediction as a 0/255 PNG (one per channel when several); a volume as NIfTI on the served grid."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if pred.ndim == 3:  # (C, H, W)
        for c, channel in enumerate(pred):
            suffix = f"_{c}" if len(pred) > 1 else ""
            Image.fromarray(channel.astype(np.uint8) * 255, "L").save(folder / f"{_safe(case)}{suffix}.png")
        return
    import nibabel as nib

    labels = np.zeros(pred.shape[1:], np.uint8)  # (slices, H, W); channel c is label c + 1 (later ones win)
    for c, channel in enumerate(pred):
        labels[channel] = c + 1
    affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{_safe(case)}.nii.gz"))


@torch.no_grad()
def score_cases(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    threshold: float,
    rules: CaseRules,
    names: Optional[Sequence[str]] = None,
    spacing_of: Optional[Callable[[str], Optional[Sequence[float]]]] = None,
    export: int = 0,
    export_dir: Optional[Path] = None,
    originals: Optional[Callable[[int], Optional[np.ndarray]]] = None,
) -> CaseResults:
    """Scores `model` on every case of `dataset` (an unshuffled pass); see the module docstring.

    `originals` (2D data): item index -> its true mask at the image's original resolution; the prediction's
    probabilities are then also resized back to that size (bilinear), thresholded and scored, as the
    challenges score: the same metrics with an `_orig` suffix."""
    model.eval()
    infer = windowed(model, dataset)  # whole volumes (3D data): window by window (make_loader: one per batch)
    case_of = getattr(dataset, "cases", None)
    ids = list(getattr(dataset, "ids"))
    meter = SegmentationMeter(threshold, case_of)
    out = CaseResults()
    current: Optional[str] = None  # volumes: the case whose slices are being gathered (they come contiguous)
    slices: list[tuple[np.ndarray, np.ndarray]] = []  # its (pred, true) slices, in order
    seen = 0

    def finish(case: str, pred: np.ndarray, true: np.ndarray) -> None:
        spacing = spacing_of(case) if spacing_of is not None else None
        row = {"case": case, **case_metrics(pred, true, rules, spacing, names)}
        if case_of is not None:
            row["slices"] = pred.shape[1]
        out.rows.append(row)
        out.trivial.append(trivial_dice(true, rules.ignore_empty))
        out.pixels += pred.size
        out.true_px += row["true_px"]
        out.pred_px += row["pred_px"]
        if len(out.rows) <= export and export_dir is not None:
            _export(pred, case, export_dir, spacing)

    def finish_volume() -> None:
        finish(current, np.stack([p for p, _ in slices], 1), np.stack([t for _, t in slices], 1))
        slices.clear()

    for images, masks in make_loader(dataset, batch_size, False, 0, 0, device):
        logits = infer(images.to(device))
        meter.update(logits, masks.to(device))
        preds = binarize(logits, threshold).cpu().numpy()
        trues = (masks > 0.5).numpy()
        for i, (pred, true) in enumerate(zip(preds, trues)):
            if case_of is None:
                finish(ids[seen], pred, true)
                original = originals(seen) if originals is not None else None
                if original is not None:
                    out.rows[-1].update(_at_original(logits[i : i + 1], original, threshold, rules, names))
            else:
                if slices and case_of[seen] != current:
                    finish_volume()
                current = case_of[seen]
                slices.append((pred, true))
            seen += 1
    if slices:
        finish_volume()
    out.image_means = meter.compute()
    return out


def _at_original(logits: torch.Tensor, original: np.ndarray, threshold: float, rules: CaseRules,
                 names: Optional[Sequence[str]]) -> dict[str, float]:
    """The case's Dice and IoU (and thresholded Jaccard) with its prediction resized back to the original mask's
    size. Not HD95 and surface Dice: in pixels of each original image (576x768 to 3072x2304 for ISIC), they
    could not be averaged across images."""
    import torch.nn.functional as F

    up = F.interpolate(logits.float(), size=original.shape[-2:], mode="bilinear", align_corners=False)
    pred = binarize(up, threshold)[0].cpu().numpy()
    scores = case_metrics(pred, original, rules, None, names)
    return {f"{k}_orig": v for k, v in scores.items() if k in ("dice", "iou", "thresholded_jaccard")}


def headline(results: CaseResults, volumetric: bool) -> dict[str, float]:
    """The network's numbers for the table and MLflow: 2D data reports the per-image means of the case
    rows; volumes keep the per-slice Dice/IoU and add the per-case (3D) means with a `_3d` suffix where the
    name is ambiguous (dice_3d, iou_3d)."""
    means = results.means
    out = {k: v for k, v in means.items() if k not in ("dice", "iou")}
    if volumetric:
        out.update(dice=results.image_means["dice"], iou=results.image_means["iou"],
                   dice_3d=means["dice"], iou_3d=means["iou"], test_cases=len(results.rows))
    else:
        out.update(dice=means["dice"], iou=means["iou"])
    out["test_images"] = results.image_means["images"]
    out["pred_foreground_fraction"] = results.pred_foreground_fraction
    out["true_foreground_fraction"] = results.true_foreground_fraction
    return out


@torch.no_grad()
def split_metrics(model: nn.Module, loader: DataLoader, device: torch.device, threshold: float = 0.5) -> dict[str, float]:
    """Per-image Dice/IoU; also per-case 3D Dice when the dataset carries `cases` (slices of volumes). Whole
    volumes (3D data) are inferred window by window (inference.windowed): their Dice is per case."""
    model.eval()
    meter = SegmentationMeter(threshold, getattr(loader.dataset, "cases", None))
    infer = windowed(model, loader.dataset)
    for images, masks in loader:
        meter.update(infer(images.to(device, non_blocking=True)), masks.to(device, non_blocking=True))
    return meter.compute()
