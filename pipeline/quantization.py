"""int8 quantization of an exported network with ONNX Runtime (the quantize stage's tool).

Static quantization (`static`): ONNX Runtime's `quantize_static` in QDQ format: weights int8 per output
channel, activations uint8 with ranges calibrated on real images (ONNX Runtime's CPU default, U8S8, which
its x86 kernels run with VNNI where the CPU has it). Dynamic quantization (`dynamic`): weights int8, activation
ranges computed at run time; for convolutional networks it is the slower, rougher one, offered only for
comparison. Both are what ONNX Runtime ships (pinned in constraints.txt); nothing here is written by hand
but the calibration reader over the dataset's images.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.enums import ConfigEnum
from pipeline.inference import quiet

log = logging.getLogger(__name__)


class Calibration(ConfigEnum):
    """quantize.calibration: how ONNX Runtime turns the calibration activations into ranges (the schema's type)."""

    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


CALIBRATION_METHODS = tuple(m.value for m in Calibration)
# The quantize stage's folder: the files and quantize.json, which records each file's sha256
MANIFEST = "quantize.json"
FILES = {"static": "model_int8.onnx", "dynamic": "model_int8_dynamic.onnx"}
FLOAT_FILE = "model_fp32.onnx"


class _Images:
    """ONNX Runtime's calibration reader protocol (`get_next` until None) over an iterator of batches."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]):
        self.input_name, self.batches, self.seen = input_name, batches, 0

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.seen += len(batch)
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self):  # not needed by quantize_static's single pass; part of the reader interface
        raise RuntimeError("calibration images are read once")


def input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def quantize_static(float_path: Path, out_path: Path, batches: Iterable[np.ndarray], method: str = "minmax") -> dict:
    """`float_path` (a float ONNX graph) quantized to int8 at `out_path`, activation ranges calibrated on
    `batches` (N, C, H, W float32 arrays, preprocessed as the network sees them). Returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no calibration images: the quantized network would have no activation ranges")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    start = time.perf_counter()
    with quiet(""):  # ONNX Runtime's quantizer logs a line per tensor to the root logger
        # graph optimisation + ONNX shape inference, as ORT recommends (its symbolic shape inference, meant for
        # dynamic transformer shapes, gives up on smp's UNet++)
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        reader = _Images(input_name(prepared), itertools.chain([first], batches))
        ort_quantize_static(
            str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
        )
    prepared.unlink(missing_ok=True)
    return {"method": "static", "calibration": method, "calibration_images": reader.seen,
            "seconds": time.perf_counter() - start}


def quantize_dynamic(float_path: Path, out_path: Path) -> dict:
    """`float_path` with int8 weights and activation ranges computed per run (no calibration)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    start = time.perf_counter()
    with quiet(""):
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        ort_quantize_dynamic(str(prepared), str(out_path), per_channel=True, weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)
    return {"method": "dynamic", "seconds": time.perf_counter() - start}


def quantized_files(folder: str | Path) -> dict[str, Path]:
    """{row: verified int8 ONNX file} of a quantize folder: `quantized` (static) and `quantized_dynamic`."""
    from models.io import read_json, verify_file

    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "quantize manifest")
    out = {}
    for method, row in (("static", "quantized"), ("dynamic", "quantized_dynamic")):
        entry = manifest.get(method)
        if entry:
            path = folder / Path(entry["file"]).name  # a name, never a path out of the folder
            verify_file(path, entry.get("sha256"), "quantized network")
            out[row] = path
    return out
