"""3D UNet for volumes, assembled from MONAI's DynUNet blocks and laid out like an smp model.

The architecture is DynUNet's, i.e. nnU-Net's: per level two 3x3x3 convs, each followed by a norm and
LeakyReLU; the first conv of every level but the top has stride 2 (no pooling); the decoder up-samples
with a 2x2x2 transposed conv, concatenates the skip and runs two convs again; a 1x1x1 conv maps to one
channel per class. It is assembled here from MONAI's maintained blocks rather than taken as
``monai.networks.nets.DynUNet`` / ``UNet`` because the pruning code (``pipeline.pruning.in_scope``,
``HEAD``) relies on smp's module naming: ``encoder.`` / ``decoder.`` / ``segmentation_head``.

Input sides must be divisible by ``2**depth``: the stride-2 convs (padding 1) floor odd sides and the
transposed convs cannot restore them, so the skip concatenation would fail. The sliding-window patch
size takes care of that; nothing is padded here.

Nothing runs in place after a norm (MONAI's blocks use an in-place LeakyReLU and an in-place residual
add): ``instance_norm`` returns a view of a reshaped batch-norm output, and an in-place op on that view
leaves CopySlices / AsStrided nodes in the autograd graph that torch-pruning cannot follow. It then
loses track of the channels behind them: building the graph fails at the skip concatenation (in-place
LeakyReLU) or, worse, the residual add is not coupled and the pruned network breaks (in-place add).
The cost is one more activation tensor per norm during training.

:class:`AttentionUNet3D` is the same network with the additive attention gate of ``models/attention_unet.py``
(Oktay et al., 2018; MONAI's ``AttentionUnet``) on every skip: in decoder level ``decoder[i]`` the up-sampled
map ``g = transp_conv(inp)`` gates the skip ``x`` (C channels) as ``x * psi(relu(W_g g + W_x x))``, 1x1x1 convs
to F_int = max(1, C // 2) channels and a one-channel sigmoid psi, then ``conv_block(cat([g, x * psi]))``. The
gate always uses BatchNorm3d (as MONAI's AttentionBlock): an InstanceNorm would normalise the one-channel psi
map over its own voxels. The broadcast of psi to C channels is a ``ChannelBroadcast`` and psi is unprunable,
for the reasons models/attention_unet.py gives (torch-pruning issue #510): the skips stay prunable.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from models import model_factory
from models.attention_unet import ChannelBroadcast
from models.unet import EncoderDecoder

# MONAI norm names: affine InstanceNorm (DynUNet's default, so the norm has per-channel parameters).
NORMS = {"instance": ("instance", {"affine": True}), "batch": "batch"}
# DynUNet's activation, out of place (see the module docstring).
ACT = ("leakyrelu", {"inplace": False, "negative_slope": 0.01})


class ResBlock(UnetResBlock):
    """MONAI's UnetResBlock with its residual add out of place (see the module docstring)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))
        residual = self.norm3(self.conv3(inp)) if self.downsample else inp
        return self.lrelu(out + residual)


@model_factory
class UNet3D(EncoderDecoder):
    """``depth`` = number of down-samplings; level i has ``width * 2**i`` channels.

    ``norm``: "instance" or "batch"; ``res_block``: encoder levels are residual blocks (DynUNet's
    ``res_block``; the decoder blocks stay plain, as in DynUNet). Width 32, depth 3 (conf/model/unet3d.yaml)
    with 2 input channels and 3 classes: 5.60 M parameters (5.65 M with res_block), 112 GFLOPs per 64^3 patch
    (width 8: 0.351 M, 7.2 GFLOPs).
    """

    spatial_dims = 3

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int, norm: str, res_block: bool):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"{type(self).__name__} needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if norm not in NORMS:
            raise ValueError(f"{type(self).__name__} norm={norm!r}: expected one of {', '.join(NORMS)}")
        norm_name = NORMS[norm]
        block = ResBlock if res_block else UnetBasicBlock
        channels = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            [block(3, in_channels, channels[0], kernel_size=3, stride=1, norm_name=norm_name, act_name=ACT)]
            + [block(3, channels[i - 1], channels[i], kernel_size=3, stride=2, norm_name=norm_name, act_name=ACT)
               for i in range(1, depth + 1)]
        )
        self.decoder = nn.ModuleList([self.up_block(channels[i], channels[i - 1], norm_name) for i in range(depth, 0, -1)])
        self.segmentation_head = UnetOutBlock(3, channels[0], num_classes)

    @staticmethod
    def up_block(in_channels: int, out_channels: int, norm_name) -> nn.Module:
        """One decoder level: 2x2x2 transposed conv, concatenation with the skip, two 3x3x3 convs."""
        return UnetUpBlock(3, in_channels, out_channels, kernel_size=3, stride=1, upsample_kernel_size=2,
                           norm_name=norm_name, act_name=ACT)


def _conv1x1x1_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm3d(out_channels))


class AttentionGate3D(nn.Module):
    """Additive attention gate on volumes: ``x * sigmoid(psi(relu(W_g g + W_x x)))`` with a one-channel psi.

    The 3D counterpart of ``models.attention_unet.AttentionGate`` (same attribute names), BatchNorm3d throughout
    and an out-of-place ReLU.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.w_g = _conv1x1x1_bn(gate_channels, inter_channels)
        self.w_x = _conv1x1x1_bn(skip_channels, inter_channels)
        self.relu = nn.ReLU()
        self.psi = nn.Sequential(*_conv1x1x1_bn(inter_channels, 1), nn.Sigmoid())
        self.broadcast = ChannelBroadcast(skip_channels, spatial_dims=3)

    def attention(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention coefficients psi, shape (N, 1, D, H, W), in [0, 1]."""
        return self.psi(self.relu(self.w_g(g) + self.w_x(x)))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.broadcast(self.attention(g, x))


class AttentionUpBlock(UnetUpBlock):
    """MONAI's UnetUpBlock (``transp_conv``, ``conv_block``) with an attention gate (``gate``) on the skip."""

    def __init__(self, in_channels: int, out_channels: int, norm_name):
        super().__init__(3, in_channels, out_channels, kernel_size=3, stride=1, upsample_kernel_size=2,
                         norm_name=norm_name, act_name=ACT)
        self.gate = AttentionGate3D(out_channels, out_channels, max(1, out_channels // 2))

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = self.transp_conv(inp)
        return self.conv_block(torch.cat((g, self.gate(g, skip)), dim=1))


@model_factory
class AttentionUNet3D(UNet3D):
    """:class:`UNet3D` with an additive attention gate on every skip (see the module docstring).

    Width 32, depth 3 (conf/model/attention_unet3d.yaml) with 2 input channels and 3 classes: 5,623,897 parameters,
    113.4 GFLOPs per 64^3 patch (width 8: 352,477 parameters, 355,421 with res_block, 7.27 GFLOPs; the gates add
    1,490 parameters and 0.06 GFLOPs there).
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int, norm: str, res_block: bool):
        super().__init__(in_channels, num_classes, width=width, depth=depth, norm=norm, res_block=res_block)

    @staticmethod
    def up_block(in_channels: int, out_channels: int, norm_name) -> nn.Module:
        return AttentionUpBlock(in_channels, out_channels, norm_name)

    def unprunable_modules(self) -> list[nn.Module]:
        """The gates' psi branches (1x1x1 conv to one channel, BN, sigmoid): psi must keep its one channel."""
        return [level.gate.psi for level in self.decoder]
