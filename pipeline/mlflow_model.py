"""A network as an MLflow model: `mlflow.pyfunc.load_model(uri).predict(images)` gives its masks.

The model is logged in MLflow's ONNX flavour (an MLmodel file, an .onnx graph, the signature and an
input example): loading it reads the graph with ONNX Runtime and unpickles nothing, and no code travels
with it. The graph is the network with its output turned into the mask the pipeline scores
(sigmoid, > `evaluate.threshold`), with a dynamic batch: images [N, C, H, W] float32, normalised as the
dataset serves them, give masks [N, K, H, W] uint8 in {0, 1}, as the output named `mask`.

`tracking.register_as=<name>` registers the final network in the model registry as a new version of
`<name>`, tagged with the run's headline metrics.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.io import load_model
from pipeline.inference import export_onnx

log = logging.getLogger(__name__)

OUTPUT = "mask"  # the graph's output: predict() gives {"mask": masks}


class MaskHead(nn.Module):
    """network -> uint8 mask (sigmoid(logits) > threshold, as pipeline.measure.metrics.binarize)."""

    def __init__(self, network: nn.Module, threshold: float):
        super().__init__()
        self.network, self.threshold = network, float(threshold)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(self.network(images)) > self.threshold).to(torch.uint8)


def save(network: nn.Module, threshold: float, example: torch.Tensor, folder: Path) -> Path:
    """Writes the MLflow model of `network` into `folder` (which must not exist); returns it."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(MaskHead(network, threshold).eval(), Path(tmp) / "model.onnx", tuple(example.shape),
                           output_name=OUTPUT)
        graph = onnx.load(str(path))
        with torch.no_grad():
            masks = MaskHead(network.cpu().eval(), threshold)(example.cpu()).numpy()
        signature = infer_signature(example.numpy(), masks)
        mlflow.onnx.save_model(graph, str(folder), signature=signature, input_example=example.numpy(),
                               save_as_external_data=False)
    return folder


def log_model(tracker, network: nn.Module, threshold: float, example: torch.Tensor, artifact_path: str) -> str:
    """Logs the MLflow model under `artifact_path` of the tracker's run; returns its `runs:/` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(network, threshold, example, Path(tmp) / artifact_path)
        tracker.log_artifact(folder, artifact_path)
    return f"runs:/{tracker.run_id}/{artifact_path}"


def register(client, name: str, run_id: str, artifact_path: str, metrics: dict[str, float]) -> str:
    """A new version of registered model `name` from the run's `artifact_path`, tagged with `metrics`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:  # it exists already: add a version
        pass
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags={k: f"{v:.6g}" for k, v in metrics.items()})
    log.info("Registered runs:/%s/%s as version %s of model %r", run_id, artifact_path, version.version, name)
    return version.version


def log_networks(tracker, networks: dict[str, str], threshold: float, example: torch.Tensor,
                 register_as: str | None, metrics: dict[str, float]) -> None:
    """The final network (and the baseline, when `networks` has it: in the run that trained it) as MLflow models
    (`final_mlflow_model`, `baseline_mlflow_model`); the final one registered as a version of `register_as`
    with the run's headline metrics (`metrics`: <network>/<result>)."""
    logged = {}
    for name in ("final", "baseline"):
        if networks.get(name):
            logged[name] = log_model(tracker, load_model(networks[name]), threshold, example, f"{name}_mlflow_model")
    if register_as and "final" in logged:
        headline = {k: v for k, v in metrics.items() if k.startswith("final/") and k.rsplit("/", 1)[1] in
                    ("dice", "iou", "params_m", "flops_g", "latency_ms")}
        version = register(tracker.client, register_as, tracker.run_id, "final_mlflow_model", headline)
        tracker.set_tags({"medprune.registered_model": f"{register_as}/{version}"})


def predict_masks(model_uri: str, images: np.ndarray) -> np.ndarray:
    """Masks of a logged model (what `mlflow.pyfunc.load_model(uri).predict(images)` returns, as an array)."""
    import mlflow.pyfunc

    out = mlflow.pyfunc.load_model(model_uri).predict(images.astype(np.float32))
    return np.asarray(out[OUTPUT] if isinstance(out, dict) else out)
