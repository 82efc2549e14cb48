"""Criteria that read calibration data with the frozen network: first-order Taylor and mean activation.

Both run `calibration_batches` batches of `ScoringContext.batches()` (the training split, no
augmentation) through the network in eval mode, so BatchNorm running statistics, weights and `.grad`
stay untouched; see docs/CRITERIA.md for the formulas and the cost.
"""
from __future__ import annotations

import logging

import torch

from pipeline.criteria import (Criterion, ScoringContext, calibration_batches, example_input, model_preserved, out_dim_sum,
                               per_channel, training_loss)
from pipeline.criteria.tracing import ChainEndHooks, trace_chains

log = logging.getLogger(__name__)


def _check_batches(n: int) -> int:
    if int(n) < 1:
        raise ValueError(f"criterion.calibration_batches={n}: expected >= 1")
    return int(n)


class TaylorCriterion(Criterion):
    """First-order Taylor importance (Molchanov et al., CVPR 2019).

    For output channel c of a layer with weight W: per batch, |sum over the filter of w * dL/dw| with L
    the run's training loss (conf/loss), i.e. the first-order estimate of the loss change if the filter
    were zeroed; averaged over `calibration_batches` batches. Gradients are taken with
    torch.autograd.grad, so no parameter's `.grad` is written."""

    def __init__(self, *, name: str, calibration_batches: int):
        self.name, self.calibration_batches = name, _check_batches(calibration_batches)

    def score(self, model, layers, ctx: ScoringContext):
        if not layers:
            return {}
        total = {n: torch.zeros(l.out_channels, dtype=torch.float64) for n, l in layers.items()}
        names, weights = list(layers), [layers[n].weight for n in layers]
        count = 0
        with model_preserved(model):
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            for images, masks in calibration_batches(ctx, self.calibration_batches, self.name):
                loss = training_loss(ctx, self.name)(model(images).float(), masks)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for name, w, g in zip(names, weights, grads):
                    if g is not None:
                        total[name] += out_dim_sum(layers[name], w.detach() * g).abs().double().cpu()
                count += 1
        return {n: (t / count).float() for n, t in total.items()}


class ActivationCriterion(Criterion):
    """Mean absolute activation of each output channel, measured *after* the layer's channel-wise chain
    (its BatchNorm and activation, found by tracing): the tensor the next layer receives, which is what
    pruning the channel removes. Pre-BN magnitudes are undone by the BatchNorm's 1/sigma and carry no
    importance; post-ReLU means also see dead (never-positive) channels as zero. A layer with nothing
    channel-wise after it (a ConvTranspose before a concatenation) is measured at its own output."""

    def __init__(self, *, name: str, calibration_batches: int):
        self.name, self.calibration_batches = name, _check_batches(calibration_batches)

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        sums = {n: torch.zeros(l.out_channels, dtype=torch.float64) for n, l in layers.items()}
        counts = {n: 0 for n in layers}

        def record(layer: str, out: torch.Tensor):
            sums[layer] += per_channel(out.detach().abs().double()).cpu()
            counts[layer] += out.numel() // out.shape[1]

        with model_preserved(model):
            chains = trace_chains(model, layers, example_input(model, ctx))
            model.eval()
            with ChainEndHooks(model, chains, record):
                for images, _ in calibration_batches(ctx, self.calibration_batches, self.name):
                    model(images)
        unused = [n for n in layers if counts[n] == 0]
        if unused:
            log.warning("activation: layers %s never ran in the forward; they score 0", unused)
        return {n: (sums[n] / max(counts[n], 1)).float() for n in layers}
