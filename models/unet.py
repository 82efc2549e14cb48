"""Classic UNet (Ronneberger et al., 2015), with BatchNorm, laid out like an smp model.

The attribute names (``encoder`` / ``decoder`` / ``segmentation_head``) match segmentation-models-
pytorch so the pruning code can treat both families alike (e.g. ignore ``segmentation_head``).
The forward uses plain ``torch.cat`` / ``F.pad`` so torch-pruning can trace the skip connections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import model_factory


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2; no conv bias since BN follows.

    ``batch_norm=False`` drops the BNs (the convs get a bias instead); ``dropout > 0`` appends a
    channel dropout (``nn.Dropout2d``) after the block. The defaults give the classic layout
    (``conv.0`` / ``conv.3`` are the convs), so saved classic UNets keep their keys.
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Down(nn.Module):
    """One encoder level; the first level has no pooling so every level has the same layout."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.conv = DoubleConv(in_channels, out_channels, batch_norm=batch_norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 transposed conv halving the channels, concatenation with the skip, double conv."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels, batch_norm=batch_norm, dropout=dropout)

    def upsample(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The transposed conv, padded to the skip's size."""
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # input size not divisible by 2**depth: pooling floored, so pad back
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return x

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.upsample(x, skip)], dim=1))


class EncoderDecoder(nn.Module):
    """The forward pass UNet-style networks share: encoder levels keep their outputs as skips, the deepest
    is the bottleneck, each decoder level takes the next skip, the head maps to one channel per class."""

    encoder: nn.ModuleList
    decoder: nn.ModuleList
    segmentation_head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()  # bottleneck
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.segmentation_head(x)


@model_factory
class UNet(EncoderDecoder):
    """``depth`` = number of down-samplings; level i has ``width * 2**i`` channels.

    Width 64, depth 4 (conf/model/unet.yaml) is the paper's network: about 31.04 M parameters.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"UNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        channels = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            [Down(in_channels, channels[0], pool=False)]
            + [Down(channels[i - 1], channels[i], pool=True) for i in range(1, depth + 1)]
        )
        self.decoder = nn.ModuleList([Up(channels[i], channels[i - 1]) for i in range(depth, 0, -1)])
        self.segmentation_head = nn.Conv2d(channels[0], num_classes, kernel_size=1)
