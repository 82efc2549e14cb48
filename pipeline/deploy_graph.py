"""The graph a logged 2D network runs: the reader's preprocessing and the way back, around the network.

A deployed model takes what its user has: images as read from a file (uint8, channels last, any height and
width) and gives masks at the image's own size. So the exported graph is

    uint8 [N, H, W, C] -> resize to the training size (PIL's bilinear filter, bit for bit) -> normalise
    as albumentations does ((x - 255 mean) / (255 std), in its float32 steps) -> network -> logits resized back to H x W (bilinear, align_corners=False)
    -> sigmoid > threshold -> uint8 [N, K, H, W] in {0, 1}

which is what the dataset readers (data/isic.py, data/slices.py: `Image.resize(..., BILINEAR)`, then
albumentations' Normalize) and `pipeline.predict` / the evaluate stage's original-size scoring
(`F.interpolate(..., "bilinear")`, `binarize`) do. ONNX's own Resize (linear, antialias) differs from PIL
by one grey level on about 8 % of the pixels, so PIL's resampling is written here (the one hand-written
part): PIL resizes in two passes, horizontal then vertical, each a weighted sum with triangle-filter
weights in 22-bit fixed point, rounded to uint8 between the passes; as float64 matrix products the sums
are exact integers, so the graph gives PIL's pixels exactly (tests/test_deploy_graph.py checks it on real
images). One difference no graph can remove: PIL decodes a large JPEG at a reduced DCT scale when the
reader asks (`draft`), which a graph given decoded pixels cannot reproduce; docs/PREDICT.md says what
that changes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.base import ImageInput

PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling (libImaging/Resample.c)


def _weights(in_size: int | torch.SymInt, out_size: int) -> torch.Tensor:
    """PIL's bilinear resampling of `in_size` samples to `out_size` as a dense [out, in] float64 matrix of
    fixed-point weights (integers; libImaging/Resample.c: precompute_coeffs, normalize_coeffs_8bpc)."""
    source = torch.arange(in_size, dtype=torch.float64)
    length = torch.full((), 1.0, dtype=torch.float64) * in_size  # a tensor: the size may be a dynamic axis of the graph
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)  # the triangle's half width, in input samples (1 when enlarging)
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = torch.clamp(torch.floor(center - support + 0.5), min=0)
    last = torch.minimum(torch.floor(center + support + 0.5), length)
    taps = torch.clamp(1 - torch.abs((source[None, :] - center[:, None] + 0.5) / support), min=0)
    inside = (source[None, :] >= first[:, None]) & (source[None, :] < last[:, None])
    taps = torch.where(inside, taps, torch.zeros_like(taps))
    taps = taps / taps.sum(dim=1, keepdim=True)
    return torch.floor(0.5 + taps * (1 << PRECISION_BITS))


def _to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """PIL's clip8: fixed-point sums (with the rounding half already added) -> 0..255, still float64."""
    return torch.clamp(torch.floor(sums / (1 << PRECISION_BITS)), 0, 255)


def pil_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """float64 [N, C, H, W] of integers 0..255 -> [N, C, size, size]: `Image.resize((size, size), BILINEAR)`."""
    half = float(1 << (PRECISION_BITS - 1))
    rows = _to_uint8(images @ _weights(images.shape[-1], size).T + half)  # horizontal pass: [N, C, H, size]
    return _to_uint8(_weights(images.shape[-2], size) @ rows + half)  # vertical pass: [N, C, size, size]


class ImageMasks(nn.Module):
    """uint8 images [N, H, W, C] -> uint8 masks [N, K, H, W]: the reader's preprocessing, the network, the
    logits resized back to each image's size and thresholded (see the module's docstring)."""

    def __init__(self, network: nn.Module, image: ImageInput, threshold: float):
        super().__init__()
        self.network, self.size, self.threshold = network, int(image.size), float(threshold)
        # albumentations' Normalize of uint8 pixels, in its float32 steps: (x - mean * 255) * (1 / (std * 255))
        mean = np.asarray(image.mean, np.float32) * np.float32(255)
        scale = np.reciprocal(np.asarray(image.std, np.float32) * np.float32(255))
        self.register_buffer("offset", torch.from_numpy(mean).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.from_numpy(scale).view(1, -1, 1, 1))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, C] -> the network's inputs [N, C, S, S], as the reader serves them."""
        pixels = pil_bilinear(images.permute(0, 3, 1, 2).to(torch.float64), self.size).to(torch.float32)
        return (pixels - self.offset) * self.scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1], images.shape[2]
        logits = self.network(self.inputs(images))
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        return (torch.sigmoid(logits) > self.threshold).to(torch.uint8)


def example_images(image: ImageInput, shape: Sequence[int] = (2, 150, 200)) -> torch.Tensor:
    """A seeded uint8 batch [N, H, W, C] at a size other than the training size: the export's sample input and
    the logged model's input example (no patient data)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (*shape, image.channels), generator=generator, dtype=torch.uint8)


def io_spec(image: ImageInput | None, input_shape: Sequence[int], labels: Sequence[str], threshold: float,
            normalisation: str) -> dict:
    """What the logged model takes and gives, in words and shapes: the MLmodel's metadata and the model card's
    input and output sections (one home for both). `input_shape` is one network input (batch 1),
    `normalisation` what the reader does to intensities (for graphs that take preprocessed inputs)."""
    rule = f"sigmoid(logits) > {threshold:g}, one channel per label ({', '.join(labels)})"
    if image is not None:
        return {
            "input": {"name": "image", "dtype": "uint8", "shape": [-1, -1, -1, image.channels], "layout": "NHWC",
                      "channels": image.channels,
                      "preprocessing": (f"in the graph: resized to {image.size}x{image.size} (PIL bilinear, as the dataset "
                                        f"reader), normalised per channel (x / 255 - mean) / std with mean "
                                        f"{list(image.mean)}, std {list(image.std)}"),
                      "note": (f"pixels as read from an image file ({'grey' if image.channels == 1 else 'RGB'}, channels "
                               f"last), any height and width; the images of one call share their size")},
            "output": {"name": "mask", "dtype": "uint8", "shape": [-1, len(labels), -1, -1], "layout": "NCHW",
                       "values": "{0, 1}", "threshold": float(threshold),
                       "rule": f"{rule}, at the input's height and width (logits resized back bilinearly)"},
        }
    channels, spatial = int(input_shape[1]), [int(s) for s in input_shape[2:]]
    layout = "NCDHW" if len(spatial) == 3 else "NCHW"
    window = ("; a whole volume is tiled by windows of this size outside the graph (pipeline.predict does it: "
              "inference.SlidingWindow)" if len(spatial) == 3 else "")
    return {
        "input": {"name": "image", "dtype": "float32", "shape": [-1, channels, *spatial], "layout": layout,
                  "channels": channels, "preprocessing": f"not in the graph: {normalisation}",
                  "note": (f"preprocessed as the dataset reader serves its items, exactly {'x'.join(map(str, spatial))}"
                           f"{window}; another shape or dtype is refused")},
        "output": {"name": "mask", "dtype": "uint8", "shape": [-1, len(labels), *spatial], "layout": layout,
                   "values": "{0, 1}", "threshold": float(threshold), "rule": rule},
    }
