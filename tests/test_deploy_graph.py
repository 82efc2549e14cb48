"""The logged model's graph: the reader's preprocessing bit for bit (PIL's bilinear resize, albumentations'
Normalize), the way back to each image's size, and a 3D model that states its input and refuses others."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REAL, compose_config, requires_real
from mlflow.exceptions import MlflowException
from PIL import Image

from data.base import ImageInput
from pipeline import inference
from pipeline.deploy_graph import ImageMasks, io_spec, pil_bilinear

REAL_ISIC = REAL / "isic2018_subset" / "ISIC2018_Task1-2_Training_Input"
ISIC_INPUT = ImageInput(128, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Inputs(torch.nn.Module):
    """The graph's preprocessing alone (what the network is given), to export and compare."""

    def __init__(self, image: ImageInput):
        super().__init__()
        self.graph = ImageMasks(torch.nn.Identity(), image, 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph.inputs(images)


def pil_resized(pixels: np.ndarray, size: int) -> np.ndarray:
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    out = np.asarray(Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).resize((size, size), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


@pytest.mark.parametrize("channels", [1, 3])
def test_the_resize_is_pils_bilinear_bit_for_bit_shrinking_and_enlarging(channels):
    rng = np.random.default_rng(0)
    for height, width, size in [(300, 211, 32), (767, 1022, 128), (31, 200, 64), (20, 17, 64), (128, 128, 128), (1, 5, 8)]:
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        ours = pil_bilinear(torch.from_numpy(pixels).permute(2, 0, 1)[None].double(), size)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, pil_resized(pixels, size)), (height, width, size)


def test_the_exported_graph_prepares_any_size_as_the_reader_does(tmp_path):
    """One ONNX graph, images of several sizes (a batch of two, then one of another size): the network inputs
    albumentations' Normalize gives for PIL's resized pixels, exactly."""
    from data.transforms import build_transform

    image = ImageInput(32, 3, ISIC_INPUT.mean, ISIC_INPUT.std)
    normalize = build_transform(False, image.mean, image.std, 0.0, 0.0)
    sample = torch.zeros((1, 40, 50, 3), dtype=torch.uint8)
    session = inference.onnx_session(inference.export_onnx(Inputs(image), tmp_path / "inputs.onnx", tuple(sample.shape),
                                                           example=sample, dynamic_sizes=True))
    rng = np.random.default_rng(1)
    for shape in [(2, 90, 70, 3), (1, 33, 400, 3)]:
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        got = session.run(None, {"image": batch})[0]
        for pixels, served in zip(batch, got):
            expected = normalize(pil_resized(pixels, 32), np.zeros((32, 32), np.uint8))[0].numpy()
            assert np.array_equal(served, expected), shape


@requires_real(REAL_ISIC)
def test_on_real_isic_images_at_their_size_the_graph_gives_the_readers_inputs_and_predicts_masks(tmp_path):
    """Real dermoscopy JPEGs as a user reads them (full size, RGB): the graph's network inputs are the ISIC reader's
    `read_image` + `network_input` (what pipeline.predict serves) bit for bit, and the whole graph (a network, the
    way back) gives masks at each image's own size equal to predict's rule (resize back, threshold)."""
    import torch.nn.functional as F

    from data import build_reader
    from pipeline.measure.metrics import binarize

    files = sorted(REAL_ISIC.glob("*.jpg"))[:4]
    cfg = compose_config("dataset=isic2018", f"dataset.root={REAL.resolve() / 'isic2018_subset'}", "dataset.image_size=128")
    reader = build_reader(cfg.dataset)
    assert reader.image_input() == ISIC_INPUT
    network = torch.nn.Conv2d(3, 1, 3, padding=1).eval()  # darker than the mean colour (a lesion, mostly): foreground
    torch.nn.init.constant_(network.weight, -1.0 / 27)
    torch.nn.init.zeros_(network.bias)
    graph = ImageMasks(network, ISIC_INPUT, 0.5).eval()
    sample = torch.zeros((1, 40, 50, 3), dtype=torch.uint8)
    session = inference.onnx_session(inference.export_onnx(graph, tmp_path / "graph.onnx", tuple(sample.shape), example=sample,
                                                           dynamic_sizes=True, output_name="mask"))
    for path in files:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        pixels, size = reader.read_image(path)
        served = reader.network_input(pixels)
        assert torch.equal(graph.inputs(torch.from_numpy(rgb.copy())[None])[0], served), path
        with torch.no_grad():
            logits = F.interpolate(network(served[None]), size=size, mode="bilinear", align_corners=False)
        expected = binarize(logits, 0.5).numpy()
        masks = session.run(None, {"image": rgb[None]})[0]
        assert masks.shape == (1, 1, *rgb.shape[:2]) == expected.shape
        assert 0.01 < expected.mean() < 0.99, path  # a mask with an outline, so that agreement means something
        assert (masks.astype(bool) == expected).mean() > 0.9999, path  # float sums of two runtimes: a pixel at most


def test_a_3d_model_states_its_input_and_refuses_another_shape_or_dtype(tmp_path):
    """3D: the sliding window stays outside the graph; the signature and the MLmodel's metadata say what the
    model takes (a preprocessed patch) and an input outside it is an error, not a silent mask."""
    import mlflow.pyfunc
    import yaml

    from models.unet3d import UNet3D
    from pipeline.mlflow_model import save

    network = UNet3D(2, 3, width=2, depth=2, norm="instance", res_block=False).eval()
    example = torch.randn(1, 2, 16, 16, 16)
    spec = io_spec(None, tuple(example.shape), ["WT", "TC", "ET"], 0.5, "intensities z-scored inside the brain")
    folder = save(network, 0.5, example, tmp_path / "model", spec)
    meta = yaml.safe_load((folder / "MLmodel").read_text())["metadata"]["medprune"]
    assert meta["input"]["shape"] == [-1, 2, 16, 16, 16] and "sliding" not in json.dumps(meta["output"])
    assert "windows of this size outside the graph" in meta["input"]["note"]
    model = mlflow.pyfunc.load_model(str(folder))
    masks = model.predict(example.numpy())["mask"]
    assert masks.shape == (1, 3, 16, 16, 16) and masks.dtype == np.uint8
    for wrong in (np.zeros((1, 2, 8, 8, 8), np.float32), np.zeros((1, 2, 16, 16, 16), np.uint8)):
        with pytest.raises(MlflowException, match="(-1, 2, 16, 16, 16)"):
            model.predict(wrong)
