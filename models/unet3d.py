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
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from models import model_factory
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
    ``res_block``; the decoder blocks stay plain, as in DynUNet). Width 8, depth 3 (conf/model/unet3d.yaml)
    with 2 input channels and 3 classes: 0.351 M parameters (0.354 M with res_block), 7.2 GFLOPs per 64^3 patch.
    """

    spatial_dims = 3

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int, norm: str, res_block: bool):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"UNet3D needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if norm not in NORMS:
            raise ValueError(f"UNet3D norm={norm!r}: expected one of {', '.join(NORMS)}")
        norm_name = NORMS[norm]
        block = ResBlock if res_block else UnetBasicBlock
        channels = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            [block(3, in_channels, channels[0], kernel_size=3, stride=1, norm_name=norm_name, act_name=ACT)]
            + [block(3, channels[i - 1], channels[i], kernel_size=3, stride=2, norm_name=norm_name, act_name=ACT)
               for i in range(1, depth + 1)]
        )
        self.decoder = nn.ModuleList(
            [UnetUpBlock(3, channels[i], channels[i - 1], kernel_size=3, stride=1, upsample_kernel_size=2,
                         norm_name=norm_name, act_name=ACT)
             for i in range(depth, 0, -1)]
        )
        self.segmentation_head = UnetOutBlock(3, channels[0], num_classes)
