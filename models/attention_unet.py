"""Attention U-Net (Oktay et al., 2018, "Attention U-Net: Learning Where to Look for the Pancreas").

The classic UNet of ``models/unet.py`` (same blocks, same ``encoder`` / ``decoder`` /
``segmentation_head`` layout) with an additive attention gate on every skip connection. In decoder
level ``decoder[i]`` (attributes ``up``, ``gate``, ``conv``) the up-sampled decoder map ``g`` gates
the encoder skip ``x`` (C channels)::

    a   = ReLU(BN(W_g g) + BN(W_x x))          W_g, W_x: 1x1 convs to F_int = C // 2 channels
    psi = Sigmoid(BN(psi a))                   psi: 1x1 conv to ONE channel (a spatial mask)
    out = conv(cat([x * psi, g]))

As in the common 2D re-implementations, ``g`` is the up-sampled decoder map at the skip's resolution
(the paper's 3D gate takes the coarser map and resamples psi); batch norm and dropout are optional.

Dropout: ``dropout > 0`` puts a channel dropout (``nn.Dropout2d``) at the end of the two deepest
encoder levels (the bottleneck and the level above it), i.e. "at the end of the contracting path" as
in Ronneberger et al.; shallow levels and the decoder have none. It is parameter-free and an
identity in eval mode, so it changes nothing for pruning.

Pruning the gate
----------------
``x * psi`` multiplies C channels by a one-channel map. torch-pruning 1.6.1 records every op it does
not know (mul, add, sigmoid, ...) as an ``_ElementWiseOp`` whose inputs and output are coupled
index-for-index, whatever broadcasting does (torch-pruning issue #510). Written plainly, what it does
with this UNet (checked; ``test_plain_broadcast_multiply_would_freeze_the_skips``):

* the group of the skip's producer (``encoder[i].conv.3``) also holds "remove output channels
  {k, ...}" of the one-channel psi conv and its BN;
* the concatenation's split is mis-inferred (shape inference reads the mul's channel count from its
  last input, psi: 1), so the concat gets no index mapping and the decoder's transposed conv ``up``
  lands in the same group;
* ``BasePruner._check_pruning_ratio`` rejects every group holding a one-channel layer, so all of these
  groups are skipped without a word: the skips and the up-convs keep every channel (listing psi as an
  ignored layer has the same effect: a group containing an ignored layer's outputs is skipped).

``psi.expand_as(x)`` does not help: the tracer records it as an ``_ExpandOp``, whose pruner is a no-op
and which only gets an index mapping for the 5-D grouped-query-attention case, so it couples the
same way.

The right dependency is: the skip's channels are coupled to the gated map, the decoder conv's input
and ``W_x``'s input; psi's single channel is coupled to nothing on the skip side. So the broadcast is
made explicit with :class:`ChannelBroadcast`: ``psi.expand(-1, C, -1, -1)`` in a module that
torch-pruning sees as a convolution from 1 to C channels (a ``_ConvNd`` with an empty ``(C, 1, 0, 0)``
weight: no parameters, no FLOPs, the expand is a view). A conv is where torch-pruning stops
coupling: its C output channels join the skip's group (and are removed with it, keeping the
broadcast as wide as the skip), its one input channel belongs to psi's group. The psi conv is listed
in :meth:`AttentionUNet.unprunable_modules` so ``pipeline.pruning`` leaves it alone and does not score
it. What is pruned in a gate, then:

* the skip's channels (the encoder conv that makes them, ``W_x``'s input, the gated map, the
  decoder conv's input) -- together, as one group;
* ``g``'s channels (the transposed conv, ``W_g``'s input, the decoder conv's input) -- as in the UNet;
* F_int (``W_g`` / ``W_x`` outputs, coupled by their sum, their BNs, psi's input) -- its own group;
* never psi's single output channel.

``ChannelBroadcast`` is not an ``nn.Conv2d``, so ``pipeline.pruning.prunable_layers`` neither scores
it nor lists it in the channel table; ``models.io`` records its shape like any conv.
"""

from __future__ import annotations

import torch
from torch import nn

from models import model_factory
from models.unet import Down, EncoderDecoder, Up


class ChannelBroadcast(nn.modules.conv._ConvNd):
    """Broadcast a one-channel map to ``channels`` channels (a view), visible to torch-pruning as a conv.

    Mathematically the 1x1 convolution with an all-ones ``(channels, 1, 1, 1)`` kernel; implemented as
    ``expand`` and given an empty ``(channels, 1, 0, 0)`` weight so it has no parameters (``spatial_dims=3``:
    ``(channels, 1, 0, 0, 0)``, for the volumes of ``models.unet3d.AttentionUNet3D``). torch-pruning
    prunes its output channels with the tensor it multiplies and never couples them to its input.
    """

    def __init__(self, channels: int, spatial_dims: int = 2):
        zeros, ones = (0,) * spatial_dims, (1,) * spatial_dims  # 3: an empty (channels, 1, 0, 0, 0) weight
        super().__init__(
            1, channels, kernel_size=zeros, stride=ones, padding=zeros, dilation=ones,
            transposed=False, output_padding=zeros, groups=1, bias=False, padding_mode="zeros",
        )
        self.weight.requires_grad_(False)

    def reset_parameters(self) -> None:  # the weight is empty: nothing to initialise
        pass

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi.expand(-1, self.out_channels, *([-1] * (psi.dim() - 2)))  # (N, 1, *spatial), 2D or 3D

    def extra_repr(self) -> str:
        return f"1 -> {self.out_channels}"


def _conv1x1(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not batch_norm)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if batch_norm else nn.Sequential(conv)


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(psi(relu(W_g g + W_x x)))`` with a one-channel psi."""

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int, batch_norm: bool = True):
        super().__init__()
        self.w_g = _conv1x1(gate_channels, inter_channels, batch_norm)
        self.w_x = _conv1x1(skip_channels, inter_channels, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.psi = nn.Sequential(*_conv1x1(inter_channels, 1, batch_norm), nn.Sigmoid())
        self.broadcast = ChannelBroadcast(skip_channels)

    def attention(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention coefficients psi, shape (N, 1, H, W), in [0, 1]."""
        return self.psi(self.relu(self.w_g(g) + self.w_x(x)))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.broadcast(self.attention(g, x))


class AttentionUp(Up):
    """Decoder level: transposed conv (``up``), gate on the skip (``gate``), double conv (``conv``)."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__(in_channels, out_channels, batch_norm=batch_norm, dropout=dropout)
        self.gate = AttentionGate(in_channels // 2, out_channels, max(1, out_channels // 2), batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = self.upsample(x, skip)
        return self.conv(torch.cat([self.gate(g, skip), g], dim=1))


@model_factory
class AttentionUNet(EncoderDecoder):
    """``depth`` = number of down-samplings; level i has ``width * 2**i`` channels, F_int = half a skip's.

    Width 64, depth 4 (conf/model/attention_unet.yaml) is the classic UNet plus four gates: about 31.4 M parameters.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int, dropout: float, batch_norm: bool):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"AttentionUNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AttentionUNet dropout={dropout}: expected 0 <= dropout < 1")
        channels = [width * 2**i for i in range(depth + 1)]
        self.depth = depth

        def drop(level: int) -> float:  # the two deepest encoder levels (bottleneck included)
            return dropout if level >= depth - 1 else 0.0

        self.encoder = nn.ModuleList(
            [Down(in_channels, channels[0], pool=False, batch_norm=batch_norm, dropout=drop(0))]
            + [
                Down(channels[i - 1], channels[i], pool=True, batch_norm=batch_norm, dropout=drop(i))
                for i in range(1, depth + 1)
            ]
        )
        self.decoder = nn.ModuleList(
            [AttentionUp(channels[i], channels[i - 1], batch_norm=batch_norm) for i in range(depth, 0, -1)]
        )
        self.segmentation_head = nn.Conv2d(channels[0], num_classes, kernel_size=1)

    def unprunable_modules(self) -> list[nn.Module]:
        """The gates' psi branches (1x1 conv to one channel, BN, sigmoid): psi must keep its one channel."""
        return [level.gate.psi for level in self.decoder]

