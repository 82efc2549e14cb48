"""A network as an MLflow model: `mlflow.pyfunc.load_model(uri).predict(images)` gives its masks.

The model is logged in MLflow's ONNX flavour (an MLmodel file, an .onnx graph, the signature and an
input example): loading it reads the graph with ONNX Runtime and unpickles nothing, and no code travels
with it. For 2D image data the graph takes what a user has, uint8 images [N, H, W, C] of any size as
read from files, and does the reader's preprocessing, the network and the way back inside
(pipeline/deploy_graph.py): masks [N, K, H, W] uint8 in {0, 1} at the images' size, as the output named
`mask`, the same masks `pipeline.predict` writes. Other data (3D volumes, whose sliding window stays
outside; CT crops) is taken preprocessed, at the network's input size; the signature and the MLmodel's
metadata (`medprune`: input, output) say what, and an input of another shape or dtype is refused.

Each network is an MLflow 3 logged model bound to the run (`client.search_logged_models` finds it, its
headline metrics linked to it; `models:/<model id>` loads it) and carries its model card (MODEL_CARD.md,
model_card.json: pipeline/model_card.py). `tracking.register_as=<name>` registers the final network in the
model registry as a new version of `<name>` made from that logged model, tagged with the run's headline
metrics, its description the card.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.io import load_model
from pipeline import model_card
from pipeline.deploy_graph import ImageInput, ImageMasks, example_images, io_spec
from pipeline.inference import export_onnx
from pipeline.tracking import is_compared

log = logging.getLogger(__name__)

OUTPUT = "mask"  # the graph's output: predict() gives {"mask": masks}


class MaskHead(nn.Module):
    """network -> uint8 mask (sigmoid(logits) > threshold, as pipeline.measure.metrics.binarize)."""

    def __init__(self, network: nn.Module, threshold: float):
        super().__init__()
        self.network, self.threshold = network, float(threshold)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(self.network(images)) > self.threshold).to(torch.uint8)


def requirements() -> list[str]:
    """What serving the model needs, pinned to the versions it was made with: MLflow, numpy and its ONNX flavour's
    own (onnx, onnxruntime): what MLflow infers for it, given outright because MLflow infers it by importing the
    model's loader in a subprocess (1.8 s per logged model)."""
    import mlflow
    import mlflow.onnx

    return sorted([f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", *mlflow.onnx.get_default_pip_requirements()])


def save(network: nn.Module, threshold: float, example: torch.Tensor, folder: Path, spec: dict,
         image: ImageInput | None = None) -> Path:
    """Writes the MLflow model of `network` into `folder` (which must not exist); returns it. With `image` (2D
    image data) the graph is `deploy_graph.ImageMasks`: uint8 images of any size in, masks at their size out;
    otherwise it takes inputs preprocessed and shaped like `example` (3D patches, CT crops). `spec` (what
    `deploy_graph.io_spec` says of the input and output) goes into the MLmodel's metadata."""
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    network = network.cpu().eval()
    if image is not None:
        graph, sample = ImageMasks(network, image, threshold).eval(), example_images(image, (1, 48, 64))
    else:
        graph, sample = MaskHead(network, threshold).eval(), example.cpu()
    inputs, outputs = spec["input"], spec["output"]
    signature = ModelSignature(Schema([TensorSpec(np.dtype(inputs["dtype"]), tuple(inputs["shape"]), inputs["name"])]),
                               Schema([TensorSpec(np.dtype(outputs["dtype"]), tuple(outputs["shape"]), OUTPUT)]))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(graph, Path(tmp) / "model.onnx", tuple(sample.shape), output_name=OUTPUT, example=sample,
                           dynamic_sizes=image is not None)
        mlflow.onnx.save_model(onnx.load(str(path)), str(folder), signature=signature, input_example=sample.numpy(),
                               save_as_external_data=False, metadata={"medprune": spec},
                               onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=requirements())
    return folder


def log_model(tracker, network: nn.Module, threshold: float, example: torch.Tensor, name: str, spec: dict,
              image: ImageInput | None = None, card: Callable[[str], dict] | None = None,
              metrics: Mapping[str, float] | None = None) -> str:
    """Logs the network as an MLflow 3 logged model `name` bound to the tracker's run (what the UI's "Logged
    models" and `search_logged_models` show; `save` says what the graph takes), with `metrics` (<network>/<result>) linked to it and, from
    `card(model_id)`, MODEL_CARD.md and model_card.json in its folder; returns its model id (load it by
    `models:/<model id>`, or by `runs:/<run id>/<name>`, which MLflow 3 resolves to the same model)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    client = tracker.client
    model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id, model_type="onnx",
                                       params={"threshold": f"{threshold:g}", "input_shape": json.dumps(spec["input"]["shape"]),
                                               "input_dtype": spec["input"]["dtype"]})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = save(network, threshold, example, Path(tmp) / name, spec, image)
            mlmodel = Model.load(str(folder))  # as MLflow's own log_model writes it: the MLmodel names its logged model
            mlmodel.model_id = model.model_id
            mlmodel.save(str(folder / "MLmodel"))
            if card is not None:
                facts = card(model.model_id)
                model_card.write(folder, facts)
                client.set_logged_model_tags(model.model_id, {"medprune.card": model_card.CARD_MD})
            client.log_model_artifacts(model.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, step=0)])
    if metrics:  # the same names and values the run has, linked to the model (its metrics in the UI and search)
        now = int(time.time() * 1000)
        client.log_batch(tracker.run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()])
    log.info("Logged %s as MLflow model models:/%s (run %s)", name, model.model_id, tracker.run_id)
    return model.model_id


def register(client, name: str, run_id: str, model_id: str, metrics: dict[str, float], description: str | None = None,
             tracking_uri: str | None = None) -> str:
    """A new version of registered model `name` made from logged model `model_id` (source `models:/<model id>`),
    tagged with `metrics`, its description the model card. A local (SQLite) registry looks the logged model up
    in MLflow's global tracking URI, not the client's (MLflow's own TODO), so `tracking_uri` is made that for
    the one call."""
    import contextlib

    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    try:
        client.create_registered_model(name)
    except MlflowException:  # it exists already: add a version
        pass
    with _use_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                              tags={k: f"{v:.6g}" for k, v in metrics.items()}, description=description)
    log.info("Registered models:/%s (run %s) as version %s of model %r", model_id, run_id, version.version, name)
    return version.version


def headline(metrics: Mapping[str, Any], network: str) -> dict[str, float]:
    """The network's results a user compares (<network>/<result>, numbers only; the run's metrics of it):
    what its logged model and its registered version carry."""
    return {k: float(v) for k, v in metrics.items() if k.startswith(f"{network}/") and is_compared(k)
            and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def log_networks(tracker, networks: dict[str, str], threshold: float, example: torch.Tensor,
                 register_as: str | None, metrics: dict[str, float], image: ImageInput | None = None,
                 regions: Sequence[str] | None = None, cases: Path | None = None) -> dict[str, str]:
    """The final network (and the baseline, when `networks` has it: in the run that trained it) as MLflow logged
    models (`final_mlflow_model`, `baseline_mlflow_model`) with their model cards; the final one registered as
    a version of `register_as` with the run's headline metrics (`metrics`: <network>/<result>) and its card as
    the description. `image`: the 2D reader's preprocessing, put into the graph (None: the graph takes inputs
    preprocessed and shaped like `example`); `regions` names the output channels (None: one foreground),
    `cases` is the folder of the per-case CSVs (cases_<network>.csv) the card's intervals come from. Returns
    network -> model id."""
    run = tracker.client.get_run(tracker.run_id)
    datasets = list(run.inputs.dataset_inputs) if run.inputs else []
    labels = list(regions) if regions else ["foreground"]
    spec = io_spec(image, tuple(example.shape), labels, threshold, model_card.normalisation(run.data.params))
    logged, cards = {}, {}
    for network in ("final", "baseline"):
        if not networks.get(network):
            continue
        name = f"{network}_mlflow_model"
        results = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{network}/")}

        def card(model_id: str, network=network, name=name, results=results) -> dict:
            cards[network] = model_card.build(run, datasets, network, results, spec, labels,
                                              Path(cases) / f"cases_{network}.csv" if cases else None, model_id, name)
            return cards[network]

        logged[network] = log_model(tracker, load_model(networks[network]), threshold, example, name, spec, image, card,
                                    headline(metrics, network))
    if register_as and "final" in logged:
        version = register(tracker.client, register_as, tracker.run_id, logged["final"], headline(metrics, "final"),
                           model_card.markdown(cards["final"]), tracker.uri)
        tracker.set_tags({"medprune.registered_model": f"{register_as}/{version}"})
    return logged


def predict_masks(model_uri: str, images: np.ndarray) -> np.ndarray:
    """Masks of a logged model (what `mlflow.pyfunc.load_model(uri).predict(images)` returns, as an array):
    `images` as its signature says (2D image data: uint8 [N, H, W, C] as read from files)."""
    import mlflow.pyfunc

    out = mlflow.pyfunc.load_model(model_uri).predict(images)
    return np.asarray(out[OUTPUT] if isinstance(out, dict) else out)
