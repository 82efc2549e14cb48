"""Importance criteria: each gives one score per output channel of every prunable layer.

A criterion is built from `conf/criterion/<name>.yaml` (`_target_` + its keys) and returns
`{layer name: 1-D tensor of scores}`. Scores are persisted by the score stage and reduced over
torch-pruning's dependency groups by `pipeline.pruning` (coupled layers share one score), so a new
criterion is one class here and one YAML, nothing else.

Modules: `magnitude` (l1, l2), `weights` (random, fpgm, bn_scale: data-free), `datadriven` (taylor,
activation), `attention` (se, eca, cbam, saca, sbca), `tracing` (which BatchNorm / activation follows
each layer). The helpers below are shared by every data-driven criterion: calibration batches and the
guarantee that scoring leaves the model as it found it. docs/CRITERIA.md has the formulas.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ScoringContext:
    """What a criterion may use: data-driven criteria read calibration batches from `batches`, and the
    gradient-based ones differentiate the run's training loss (`loss`, from conf/loss)."""

    device: torch.device
    batches: Optional[Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]] = None
    loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None


def training_loss(ctx: Optional[ScoringContext], who: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if ctx is None or ctx.loss is None:
        raise ValueError(f"criterion {who} differentiates the training loss, but the ScoringContext has no loss")
    return ctx.loss


# Constructor keywords the job supplies, not the criterion's YAML: `seed` is the job's seed (cfg.seed), one home,
# so a seed sweep varies the attention gates' initialisation and the random control's draw (and no param of its
# own makes the runs of one report row differ).
JOB_KEYS = ("seed",)


def build_criterion(node, seed: int) -> "Criterion":
    """The criterion `node` (conf/criterion/<name>.yaml) names, given the job's `seed` where its constructor takes
    one; ValueError naming the key for a value its constructor rejects, or a `criterion.seed` set by hand."""
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    for key in JOB_KEYS:
        if key in node:
            raise ValueError(f"criterion.{key} is the job's {key}: set {key}=<n> instead")
    params = inspect.signature(get_object(str(node["_target_"]))).parameters
    try:
        return instantiate(node, **({"seed": int(seed)} if "seed" in params else {}))
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


class Criterion:
    name: str = "criterion"

    def score(self, model: nn.Module, layers: dict[str, nn.Module], ctx: ScoringContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _require_batches(ctx: Optional[ScoringContext], who: str) -> Callable[[], Iterable[Batch]]:
    if ctx is None or ctx.batches is None:
        raise ValueError(f"criterion {who} needs calibration data, but the ScoringContext has no batches")
    return ctx.batches


def calibration_batches(ctx: Optional[ScoringContext], limit: int, who: str) -> Iterator[Batch]:
    """The first `limit` batches of `ctx.batches()` (fewer if the split is shorter; none is an error)."""
    if limit < 1:
        raise ValueError(f"criterion {who}: calibration_batches={limit}, expected >= 1")
    source = _require_batches(ctx, who)
    seen = 0
    for batch in source():
        yield batch
        seen += 1
        if seen >= limit:
            return
    if seen == 0:
        raise ValueError(f"criterion {who}: the calibration data yielded no batch")


def cycled_batches(ctx: Optional[ScoringContext], who: str) -> Iterator[Batch]:
    """`ctx.batches()` over and over (for criteria that train something for a number of steps)."""
    source = _require_batches(ctx, who)
    while True:
        seen = 0
        for batch in source():
            yield batch
            seen += 1
        if seen == 0:
            raise ValueError(f"criterion {who}: the calibration data yielded no batch")


def example_input(model: nn.Module, ctx: Optional[ScoringContext], size: int = 64) -> torch.Tensor:
    """Input for a tracing forward: two images of the first calibration batch, else random noise shaped
    for the model's first convolution (`size` along each of its spatial axes: an image or a volume)."""
    if ctx is not None and ctx.batches is not None:
        for images, _ in ctx.batches():
            return images[:2]
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise ValueError("cannot build an example input: the model has no convolution")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    shape = (1, first.in_channels, *[size] * (first.weight.dim() - 2))
    return torch.randn(shape, generator=generator).to(param.device, param.dtype)


@contextmanager
def model_preserved(model: nn.Module):
    """Restores every module's train/eval mode and every parameter's requires_grad on exit.

    Criteria run their forwards in eval mode (BatchNorm running statistics are buffers in the
    state_dict: a train-mode forward would change them) and never touch weights or `.grad`."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but 1 (the channel dimension of an activation [B, C, ...])."""
    dims = [d for d in range(t.dim()) if d != 1]
    return t.sum(dim=dims) if dims else t


def out_dim_sum(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum of a weight-shaped tensor over everything but the output-channel dimension
    (dim 0 for a convolution, dim 1 for a transposed one, whose weight is (in, out, *kernel))."""
    if getattr(layer, "transposed", False):
        t = t.transpose(0, 1)
    return t.flatten(1).sum(1)
