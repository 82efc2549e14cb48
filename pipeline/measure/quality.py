"""How good a network is on the test split, case by case, and what it is made of (size, parameters, FLOPs).

Quality is per case (`casewise.score_cases`, docs/EVALUATION.md): Dice, IoU, HD95, surface Dice and ISIC's
thresholded Jaccard per image or volume, written to evaluate/cases_<network>.csv, their means as the
network's results, and a flag for a network that collapsed to all foreground or all background. An int8
network (an ONNX file of the quantize stage) is scored the same way under ONNX Runtime, beside how far its
probabilities stray from the float network it was made from.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from data.files import write_csv
from data.loader import make_loader
from models.io import model_size_mb
from pipeline import inference
from pipeline.measure import casewise, runtimes
from pipeline.measure.metrics import CaseRules, binarize, dice_iou
from pipeline.measure.profiling import count_flops, count_params
from pipeline.pruning import prunable_layers
from pipeline.state import DataSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSplit:
    """What quality is measured on and how: the run's data, the evaluate settings, the device, and the folder
    that receives the per-case tables and exported masks."""

    data: DataSource
    settings: DictConfig  # the evaluate block
    device: torch.device
    folder: Path
    seed: int


def score(split: TestSplit, model: torch.nn.Module, network: str, export: bool = True, warn: bool = True) -> dict:
    """Per-case metrics of `model` on the test split, written to cases_<network>.csv, and their means; a network
    that collapsed to all foreground / all background is flagged (`collapsed`)."""
    e = split.settings
    dataset = split.data.dataset("test")
    rules = CaseRules(ignore_empty=bool(e.ignore_empty), nsd_tolerance=float(e.nsd_tolerance),  # ISIC's rule on ISIC only
                      jaccard_threshold=e.jaccard_threshold if split.data.challenge == "isic2018" else None)
    results = casewise.score_cases(
        model, dataset, split.device, e.batch_size, e.threshold, rules, names=split.data.regions,
        spacing_of=split.data.case_spacing, export=int(e.export_masks) if export else 0,
        export_dir=split.folder / "masks" / network,
        originals=(lambda i: split.data.original_mask("test", i)) if e.original_resolution else None,
    )
    write_csv(results.rows, split.folder / f"cases_{network}.csv")
    out = casewise.headline(results, volumetric=getattr(dataset, "cases", None) is not None)  # slices of volumes
    collapsed = casewise.collapse(results, float(e.collapse_tolerance), float(e.collapse_margin))
    out["collapsed"] = collapsed or "no"
    if collapsed and warn:
        log.warning("The %s network COLLAPSED: it %s (%.1f%% of the test pixels foreground, truth %.1f%%); "
                    "its Dice is not a segmentation result", network, casewise.describe_collapse(collapsed),
                    100 * results.pred_foreground_fraction, 100 * results.true_foreground_fraction)
    return out


def aligned_fraction(model: torch.nn.Module, multiple: int = 8) -> float:
    """Fraction of the prunable layers whose output channel count is a multiple of `multiple`."""
    counts = [m.out_channels for m in prunable_layers(model).values()]
    return sum(c % multiple == 0 for c in counts) / len(counts) if counts else 1.0


def network(split: TestSplit, model: torch.nn.Module, model_dir: str, name: str, input_shape: tuple[int, ...],
            reduced: Optional[str] = None, windows: Optional[int] = None) -> dict:
    """Quality (also in the `reduced` precision, when given), size, parameters and FLOPs of one network (`model`,
    loaded from `model_dir`, on the split's device); with `windows` (3D data: the windows that tile the reference
    volume), its FLOPs per volume too."""
    e = split.settings
    model = model.eval()
    quality = score(split, model, name)
    extra = {}
    for other in e.extra_splits:
        loader = make_loader(split.data.dataset(other), e.batch_size, False, 0, split.seed, split.device)
        m = casewise.split_metrics(model, loader, split.device, e.threshold)
        extra.update({f"{other}_dice": m["dice"], f"{other}_iou": m["iou"]})
    if reduced:  # the torch deployed form in that type, on the same test split: what the precision costs
        folded = inference.prepare_for_inference(model, input_shape, fold_bn=bool(e.fold_bn)).model
        deployed = runtimes.deploy(folded, input_shape, "torch", reduced, channels_last=bool(e.channels_last))
        low = score(split, deployed.as_module(), f"{name}_{reduced}", export=False,
                    warn=quality["collapsed"] == "no")  # the fp32 pass has warned already
        extra.update({f"dice_{reduced}": low["dice"], f"iou_{reduced}": low["iou"]})
        log.info("%s network in %s: Dice %.4f (fp32 %.4f, %+.2f points)", name, reduced, low["dice"], quality["dice"],
                 100 * (low["dice"] - quality["dice"]))
    flops = count_flops(model, input_shape)
    if windows is not None:  # 3D: FLOPs above are per window (patch); a whole volume runs that many windows
        extra.update(windows_per_volume=windows, volume_flops_g=windows * flops / 1e9)
    aligned = aligned_fraction(model)  # the prune stage says what rounding would change (exact rates only)
    return {**quality, **extra, "params_m": count_params(model) / 1e6, "flops_g": flops / 1e9, "macs_g": flops / 2e9,
            "size_mb": model_size_mb(model_dir), "channels_aligned8": aligned}


@torch.no_grad()
def probability_deviation(split: TestSplit, quantized: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """How far `quantized`'s probabilities stray from `reference`'s on the test split: the largest and the mean
    absolute difference, and the fraction of pixels whose thresholded label differs."""
    e = split.settings
    loader = make_loader(split.data.dataset("test"), e.batch_size, False, 0, split.seed, split.device)
    largest, total, flips, count = 0.0, 0.0, 0, 0
    quantized, reference = inference.windowed(quantized, loader.dataset), inference.windowed(reference.eval(), loader.dataset)
    for images, _ in loader:
        images = images.to(split.device)
        p = torch.sigmoid(quantized(images).float())
        q = torch.sigmoid(reference(images).float())
        diff = (p - q).abs()
        largest = max(largest, float(diff.max()))
        total += float(diff.sum())
        flips += int(((p > e.threshold) != (q > e.threshold)).sum())
        count += diff.numel()
    return {"prob_max_abs_diff": largest, "prob_mean_abs_diff": total / max(count, 1),
            "label_flip_fraction": flips / max(count, 1)}


def int8_network(split: TestSplit, path: Path, name: str, reference: torch.nn.Module, reference_name: str,
                 reference_results: dict, openvino_shape: tuple[int, ...] | None = None) -> dict:
    """Quality of an int8 ONNX network under ONNX Runtime, its file's size and its deviation from the float
    network it was made from (parameters and FLOPs are that network's: the same operations, in int8). With
    `openvino_shape` (the network's input shape), also its Dice when OpenVINO runs the same file (`openvino_dice`,
    per case in cases_<name>_openvino.csv): the two runtimes compute int8 differently, and either may be deployed."""
    module = inference.OnnxModule(inference.onnx_session(path, split.settings.threads))
    quality = score(split, module, name)
    deviation = probability_deviation(split, module, reference)
    log.info("%s network (int8): Dice %.4f (%s %.4f, %+.2f points); probabilities within %.4f of the float network "
             "(mean %.5f), %.3f%% of the test pixels change label", name, quality["dice"], reference_name,
             reference_results["dice"], 100 * (quality["dice"] - reference_results["dice"]), deviation["prob_max_abs_diff"],
             deviation["prob_mean_abs_diff"], 100 * deviation["label_flip_fraction"])
    out = {**quality, **deviation, "size_mb": path.stat().st_size / 1e6,
           **{k: reference_results[k] for k in ("params_m", "flops_g", "macs_g")}}
    if openvino_shape:
        from pipeline.measure.runtimes import openvino_graph

        module = openvino_graph(path, openvino_shape, "fp32", split.settings.threads).as_module()
        out["openvino_dice"] = score(split, module, f"{name}_openvino", export=False)["dice"]
        log.info("%s network (int8) in OpenVINO: Dice %.4f", name, out["openvino_dice"])
    return out


@torch.no_grad()
def examples(split: TestSplit, models: dict[str, torch.nn.Module], count: int):
    """The first `count` test images, their true masks and each network's prediction with its Dice per image
    ({label: (masks, dice)}): what plots.masks_before_after draws. Volumes are shown by the axial slice with the
    most true foreground (the 3D network still sees the whole volume)."""
    dataset = split.data.dataset("test")
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    volumes = split.data.dims == 3
    picks = [int(mask.flatten(2).sum((0, 2)).argmax()) if volumes else None for _, mask in items]
    images = torch.stack([image[:, z] if volumes else image for (image, _), z in zip(items, picks)])
    masks = torch.stack([mask[:, z] if volumes else mask for (_, mask), z in zip(items, picks)])
    predictions = {}
    for label, model in models.items():
        if volumes:
            infer = inference.windowed(model.eval(), dataset)
            logits = torch.cat([infer(image.unsqueeze(0).to(split.device))[:, :, z].cpu() for (image, _), z in zip(items, picks)])
        else:
            logits = model.eval()(images.to(split.device)).cpu()
        pred = binarize(logits, split.settings.threshold)
        predictions[label] = (pred, dice_iou(pred, masks > 0.5)[0])
    return images, masks, predictions
