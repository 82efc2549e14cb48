"""Channel-attention criteria: learn a gate per channel on the frozen network, keep the mean gate.

One `AttentionCriterion`, parameterised by `kind`:

    se    Squeeze-and-Excitation (Hu et al., CVPR 2018): GAP -> FC(C->h) -> ReLU -> FC(h->C) -> sigmoid
    eca   Efficient Channel Attention (Wang et al., CVPR 2020): GAP -> 1-D conv over channels with the
          adaptive odd kernel k = |(log2 C + 1) / 2|_odd, no bias -> sigmoid
    cbam  CBAM's channel module (Woo et al., ECCV 2018): sigmoid(MLP(GAP) + MLP(GMP)), shared MLP
    saca  sub-sampled attention: adaptive-average-pool the map to a grid x grid map, per-channel learned
          weights over the grid cells (initialised to the plain average) -> MLP -> sigmoid
    sbca  self-attention between channels: A = softmax_j(tau * cos(F_i, F_j)) over the channels' maps
          F (sub-sampled to at most 64 x 64), descriptor z = GAP(F) + gamma * A GAP(F)
          (= GAP(F + gamma * A F), DANet's channel module), -> MLP -> sigmoid

On volumes (3D networks) saca's grid is grid x grid x grid cells and sbca sub-samples to at most
16 x 16 x 16 (the same 4096 positions, so the affinity costs the same); the other gates only average
or max over all positions and do not depend on the number of spatial axes.

Every gate is g = sigmoid(a(x) + logit(init_gate)) with a(x) the module above without its sigmoid;
the last layer of a(x) starts at zero, so every gate starts at exactly `init_gate` (0.9: the network
starts close to the function it was trained as) and what it learns comes from the data, not from its
random initialisation. MLPs have h = max(4, C // reduction) hidden units.

Procedure (`score`): trace each prunable layer's channel-wise chain (its BatchNorm and activation,
pipeline.criteria.tracing) and hook a gate at the chain's end, where it multiplies what the next layer
receives (gate 0 there = the channel removed); freeze the network (eval mode, no parameter requires
grad); train only the gates for `steps` Adam steps (`lr`) on the training batches, minimising
the training loss + sparsity * (mean gate, averaged over layers): the penalty closes every gate that the
loss does not hold open, so a gate's value says how much the loss needs its channel. The importance of
a channel is its gate averaged over the images of `calibration_batches` batches. The gates live
outside the model and every hook is removed afterwards: the model (weights, buffers, modules, modes,
requires_grad) is exactly as before and the pruned network has no extra cost.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.criteria import (Criterion, ScoringContext, calibration_batches, cycled_batches, example_input, model_preserved,
                               training_loss)
from pipeline.criteria.tracing import ChainEndHooks, trace_chains

log = logging.getLogger(__name__)

KINDS = ("se", "eca", "cbam", "saca", "sbca")


def hidden_units(channels: int, reduction: int) -> int:
    return max(4, channels // reduction)


def _mlp(channels: int, reduction: int) -> nn.Sequential:
    h = hidden_units(channels, reduction)
    mlp = nn.Sequential(nn.Linear(channels, h), nn.ReLU(inplace=True), nn.Linear(h, channels))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1)


class SEGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.mlp = _mlp(channels, reduction)

    def forward(self, x):
        return self.mlp(_gap(x))


def eca_kernel(channels: int, gamma: int = 2, b: int = 1) -> int:
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECAGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        k = eca_kernel(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x):
        return self.conv(_gap(x)[:, None, :])[:, 0]


class CBAMChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.mlp = _mlp(channels, reduction)

    def forward(self, x):
        flat = x.flatten(2)
        return self.mlp(flat.mean(-1)) + self.mlp(flat.amax(-1))


def _pool(x: torch.Tensor, size) -> torch.Tensor:
    """Adaptive average pooling of an image [B, C, H, W] or a volume [B, C, D, H, W]."""
    return (F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d)(x, size)


class SACAGate(nn.Module):
    """Channel attention from a sub-sampled map: a grid x grid (x grid on volumes) average-pooled map, a
    learned per-channel weighting of the grid cells (a spatially aware descriptor, equal to GAP at
    initialisation), MLP. `spatial_dims`: 2 for images, 3 for volumes (the number of cells)."""

    def __init__(self, channels: int, reduction: int = 4, grid: int = 4, spatial_dims: int = 2):
        super().__init__()
        self.grid = grid
        cells = grid**spatial_dims
        self.cells = nn.Parameter(torch.full((channels, cells), 1.0 / cells))
        self.mlp = _mlp(channels, reduction)

    def forward(self, x):
        sub = _pool(x, self.grid).flatten(2)  # [B, C, grid^spatial_dims]
        return self.mlp((sub * self.cells).sum(-1))


class SBCAGate(nn.Module):
    """Channel attention from self-attention between channels (DANet-style channel affinity)."""

    max_side = {2: 64, 3: 16}  # maps larger than this (per axis, by spatial dims) are average-pooled first:
                               # the affinity costs C^2 * N, N <= 4096 positions either way

    def __init__(self, channels: int, reduction: int = 4, temperature: float = 10.0):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.mlp = _mlp(channels, reduction)

    def forward(self, x):
        side = self.max_side[x.dim() - 2]
        if any(s > side for s in x.shape[2:]):
            x = _pool(x, tuple(min(s, side) for s in x.shape[2:]))
        f = x.flatten(2)  # [B, C, N]
        unit = F.normalize(f, dim=-1, eps=1e-6)
        affinity = torch.softmax(self.log_tau.exp() * unit @ unit.transpose(1, 2), dim=-1)  # [B, C, C]
        m = f.mean(-1)
        z = m + self.gamma * (affinity @ m[..., None])[..., 0]
        return self.mlp(z)


def break_ties(scores: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """`scores` with exactly equal values (saturated gates: float32 cannot tell sigmoid(20) from
    sigmoid(25)) moved apart by one float32 step each, in the order of `key` (the mean logit), so the
    ranking is the one the gates learned. Values move by a few ulps at most, towards the open interval."""
    out = scores.clone()
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    for group in (counts > 1).nonzero().flatten().tolist():
        members = (inverse == group).nonzero().flatten()
        members = members[key[members].argsort(stable=True)]  # ascending logit
        value = values[group].reshape(1)
        if float(value) >= 1.0:  # spread downwards, the largest logit keeps 1.0
            members, toward = members.flip(0), torch.tensor([-1.0])
        else:
            toward = torch.tensor([2.0])
        for m in members.tolist():
            out[m] = value
            value = torch.nextafter(value, toward)
    return out


def make_gate(kind: str, channels: int, reduction: Optional[int], grid: Optional[int], spatial_dims: int) -> nn.Module:
    if kind == "se":
        return SEGate(channels, reduction)
    if kind == "eca":
        return ECAGate(channels)
    if kind == "cbam":
        return CBAMChannelGate(channels, reduction)
    if kind == "saca":
        return SACAGate(channels, reduction, grid, spatial_dims)
    if kind == "sbca":
        return SBCAGate(channels, reduction)
    raise ValueError(f"criterion.kind={kind!r}: expected one of {', '.join(KINDS)}")


class AttentionCriterion(Criterion):
    """Mean learned channel-attention gate (see the module docstring and docs/CRITERIA.md).

    Keys: `kind` (se | eca | cbam | saca | sbca), `steps` Adam steps at learning rate `lr` training only
    the gates, `calibration_batches` batches averaged for the score, `reduction` (MLP hidden units
    max(4, C // reduction); unused by eca), `grid` (saca's sub-sampled map side), `seed` (gate init),
    `init_gate` (every gate's starting value), `sparsity` (weight of the mean-gate penalty)."""

    def __init__(self, *, name: str, kind: str, steps: int, lr: float, calibration_batches: int,
                 reduction: Optional[int], grid: Optional[int], seed: int, init_gate: float, sparsity: float):
        if kind not in KINDS:
            raise ValueError(f"criterion.kind={kind!r}: expected one of {', '.join(KINDS)}")
        uses = {"reduction": kind != "eca", "grid": kind == "saca"}  # what each kind's gate takes
        for key, value in (("reduction", reduction), ("grid", grid)):
            if uses[key] and value is None:
                raise ValueError(f"criterion.{key} must be set for kind={kind}")
            if not uses[key] and value is not None:
                raise ValueError(f"criterion.{key}={value} is not used by kind={kind}: set it to null")
        for key, value, low in (("steps", steps, 1), ("calibration_batches", calibration_batches, 1),
                                ("reduction", reduction, 1), ("grid", grid, 1)):
            if value is not None and int(value) < low:
                raise ValueError(f"criterion.{key}={value}: expected >= {low}")
        if not lr > 0:
            raise ValueError(f"criterion.lr={lr}: expected > 0")
        if not 0 < init_gate < 1:
            raise ValueError(f"criterion.init_gate={init_gate}: expected in (0, 1)")
        if sparsity < 0:
            raise ValueError(f"criterion.sparsity={sparsity}: expected >= 0")
        self.offset, self.sparsity = math.log(init_gate / (1 - init_gate)), float(sparsity)
        self.name, self.kind, self.steps, self.lr = name, kind, int(steps), float(lr)
        self.calibration_batches, self.reduction, self.grid, self.seed = int(calibration_batches), reduction, grid, int(seed)
        self.losses: list[float] = []  # training loss per step of the last call (for logs/tests)

    def build_gates(self, layers: dict[str, nn.Module], device: torch.device) -> nn.ModuleDict:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            gates = {n: make_gate(self.kind, l.out_channels, self.reduction, self.grid, l.weight.dim() - 2)
                     for n, l in layers.items()}
        # ModuleDict keys cannot contain "."; index by position instead.
        return nn.ModuleDict({str(i): gates[n] for i, n in enumerate(layers)}).to(device)

    def score(self, model, layers, ctx: ScoringContext):
        if not layers:
            return {}
        device = next(model.parameters()).device
        index = {n: str(i) for i, n in enumerate(layers)}
        gates = self.build_gates(layers, device)
        sums = {n: torch.zeros(l.out_channels, dtype=torch.float64) for n, l in layers.items()}
        logit_sums = {n: torch.zeros(l.out_channels, dtype=torch.float64) for n, l in layers.items()}
        counts = {n: 0 for n in layers}
        recording = False
        penalties = None

        def gate(layer: str, out: torch.Tensor) -> torch.Tensor:
            logit = gates[index[layer]](out) + self.offset  # [B, C]
            g = torch.sigmoid(logit)
            if penalties is not None:
                penalties.append(g.mean())
            if recording:
                sums[layer] += g.detach().double().sum(0).cpu()
                logit_sums[layer] += logit.detach().double().sum(0).cpu()
                counts[layer] += g.shape[0]
            return out * g.to(out.dtype).view(*g.shape, *([1] * (out.dim() - 2)))

        with model_preserved(model):
            chains = trace_chains(model, layers, example_input(model, ctx))
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            with ChainEndHooks(model, chains, gate):
                gates.train()
                self.losses = []
                if self.steps:
                    optimizer = torch.optim.Adam(gates.parameters(), lr=self.lr)
                    batches = cycled_batches(ctx, self.name)
                    for _ in range(self.steps):
                        images, masks = next(batches)
                        penalties = []
                        loss = training_loss(ctx, self.name)(model(images).float(), masks)
                        if self.sparsity and penalties:
                            loss = loss + self.sparsity * torch.stack(penalties).mean()
                        penalties = None
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        self.losses.append(float(loss.detach()))
                gates.eval()
                recording = True
                with torch.no_grad():
                    for images, _ in calibration_batches(ctx, self.calibration_batches, self.name):
                        model(images)
        unused = [n for n in layers if counts[n] == 0]
        if unused:
            log.warning("%s: layers %s never ran in the forward; they score 0", self.name, unused)
        if self.losses:
            log.info("%s: gates trained %d steps, loss %.4f -> %.4f", self.name, self.steps, self.losses[0], self.losses[-1])
        scores, tied = {}, 0
        for n in layers:
            mean_gate = (sums[n] / max(counts[n], 1)).float()
            tied += mean_gate.numel() - mean_gate.unique().numel()
            scores[n] = break_ties(mean_gate, logit_sums[n] / max(counts[n], 1))
        if tied:
            log.info("%s: %d channels' mean gates saturated to the same float32 value as another channel's of "
                     "their layer; ordered by their mean gate logit (lower criterion.lr or steps to saturate less)",
                     self.name, tied)
        return scores
