"""Data-free criteria besides the filter norms: random (a control), FPGM and BatchNorm scale."""
from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

from pipeline.criteria import Criterion, ScoringContext, example_input, model_preserved
from pipeline.criteria.magnitude import filter_norms
from pipeline.criteria.tracing import following_bn

log = logging.getLogger(__name__)


def filters(layer: nn.Module) -> torch.Tensor:
    """The layer's filters as rows (out_channels, fan-in); ConvTranspose weights are (in, out, *kernel)."""
    w = layer.weight.detach()
    if getattr(layer, "transposed", False):
        w = w.transpose(0, 1)
    return w.flatten(1).float()


class RandomCriterion(Criterion):
    """Uniform random scores: the control every real criterion must beat. Each layer draws from its own
    generator seeded by (seed, layer name), so a layer's scores do not depend on the other layers."""

    def __init__(self, *, name: str, seed: int):
        self.name, self.seed = name, int(seed)

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        scores = {}
        for name, layer in layers.items():
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            scores[name] = torch.rand(layer.out_channels, generator=g)
        return scores


def fpgm_scores(w: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Sum of Lp distances from each row (filter) to every other row of `w` (out_channels, fan-in)."""
    return torch.cdist(w[None], w[None], p=p)[0].sum(1)


class FPGMCriterion(Criterion):
    """Filter Pruning via Geometric Median (He et al., CVPR 2019).

    Score of filter i = sum_j ||w_i - w_j||_p over the other filters of the layer. A filter close to the
    geometric median of its layer (small sum) is the one best represented by the others, so it goes
    first; unlike L1 this can remove large-norm filters and keep small, distinctive ones."""

    def __init__(self, *, name: str, p: float):
        if p <= 0:
            raise ValueError(f"criterion.p={p}: expected > 0")
        self.name, self.p = name, float(p)

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        return {name: fpgm_scores(filters(layer), self.p).cpu() for name, layer in layers.items()}


class BNScaleCriterion(Criterion):
    """Network slimming (Liu et al., ICCV 2017): |gamma| of the BatchNorm that directly follows the layer.

    The BatchNorm is found structurally (nn.Sequential conv -> BN, smp Conv2dReLU) and otherwise by
    tracing one eval-mode forward (pipeline.criteria.tracing). A layer with no BatchNorm after it (e.g.
    UNet's ConvTranspose up-sampling, a conv with a bias feeding an add) falls back to the L1 norm of its
    filters (`fallback_p`), which is on another scale: see docs/CRITERIA.md."""

    def __init__(self, *, name: str, fallback_p: int):
        if fallback_p not in (1, 2):
            raise ValueError(f"criterion.fallback_p={fallback_p}: expected 1 or 2")
        self.name, self.fallback_p = name, fallback_p
        self.last_fallback: list[str] = []  # layers scored by the fallback in the last call (for logs/tests)

    @torch.no_grad()
    def score(self, model, layers, ctx: ScoringContext):
        with model_preserved(model):
            try:
                example = example_input(model, ctx)
            except (ValueError, StopIteration):
                example = None
            bns = following_bn(model, layers, example)
        scores, fallback = {}, []
        for name, layer in layers.items():
            bn = bns.get(name)
            if bn is not None and bn.weight is not None:
                scores[name] = bn.weight.detach().abs().float().cpu().clone()
            else:
                scores[name] = filter_norms(layer, self.fallback_p)
                fallback.append(name)
        self.last_fallback = fallback
        if fallback:
            log.info("bn_scale: %d of %d layers have no BatchNorm after them and use the L%d filter norm: %s",
                     len(fallback), len(layers), self.fallback_p, ", ".join(fallback[:8]) + ("..." if len(fallback) > 8 else ""))
        return scores
