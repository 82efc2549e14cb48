"""int8 quantization of the final network for deployment with ONNX Runtime (pipeline/quantization.py).

The final network (BatchNorm folded) is exported to ONNX, then quantized statically: activation ranges
calibrated on the first `quantize.calibration_images` images of the TRAINING split, read without
augmentation (never validation or test images, which the evaluate stage scores it on). `quantize.dynamic`
adds a dynamically quantized copy for comparison. The files go to quantize/ in the run folder with their
sha256 in quantize.json (the evaluate stage verifies them before loading); the evaluate stage scores and
times them as the `quantized` (and `quantized_dynamic`) rows.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from data.files import atomic_write, sha256_file
from models.io import load_model
from pipeline import inference, quantization
from pipeline.quantization import FILES, FLOAT_FILE, MANIFEST
from pipeline.state import Context, RunState

log = logging.getLogger(__name__)



def calibration_batches(ctx: Context, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """The first `count` training images (no augmentation), preprocessed as the network sees them."""
    dataset = ctx.data.dataset("train", augment=False)
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        images = [dataset[i][0] for i in range(start, min(start + batch_size, count))]
        yield torch.stack(images).numpy()


def run(ctx: Context, state: RunState) -> RunState:
    cfg = ctx.cfg
    q = cfg.quantize
    source = state.final or state.pruned or state.baseline
    if not source:
        raise RuntimeError("quantize needs a network: add train (and prune, finetune) to stages or set baseline=<run id or path>")
    row = "final" if state.final else "pruned" if state.pruned else "baseline"
    folder = ctx.stage_dir("quantize")
    model = load_model(source).eval()
    shape = ctx.input_shape
    folded = inference.prepare_for_inference(model, shape, fold_bn=True).model
    float_path = inference.export_onnx(folded, folder / FLOAT_FILE, shape, opset=int(cfg.evaluate.onnx_opset))
    available = len(ctx.data.dataset("train", augment=False))
    if available < q.calibration_images:
        log.warning("quantize.calibration_images=%d but the training split has %d images: calibrating on all of them",
                    q.calibration_images, available)
    manifest = {"network": row, "source": str(source), "float": {"file": FLOAT_FILE, "sha256": sha256_file(float_path)}}
    done = quantization.quantize_static(float_path, folder / FILES["static"],
                                        calibration_batches(ctx, int(q.calibration_images), int(cfg.evaluate.batch_size)),
                                        str(q.calibration))
    manifest["static"] = {**done, "file": FILES["static"], "sha256": sha256_file(folder / FILES["static"])}
    log.info("Quantized the %s network to int8 (static, QDQ, per-channel weights; %s calibration on %d training "
             "images) in %.1f s: %.2f MB -> %.2f MB", row, done["calibration"], done["calibration_images"], done["seconds"],
             float_path.stat().st_size / 1e6, (folder / FILES["static"]).stat().st_size / 1e6)
    if q.dynamic:
        done = quantization.quantize_dynamic(float_path, folder / FILES["dynamic"])
        manifest["dynamic"] = {**done, "file": FILES["dynamic"], "sha256": sha256_file(folder / FILES["dynamic"])}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    ctx.tracker.log_results({"quantize/calibration_images": manifest["static"]["calibration_images"],
                             "quantize/seconds": manifest["static"]["seconds"]})
    ctx.tracker.log_artifact(folder, "quantize")
    return replace(state, quantized=str(folder))

