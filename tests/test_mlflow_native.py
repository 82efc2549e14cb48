"""MLflow as its users expect it: a parent run per sweep, sweep-scoped reports, logged models that load
through MLflow, dataset inputs, source tags, params vs metrics, the installed `medprune` command."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import ROOT, TINY, mlflow_runs, run_cli, run_pipeline

pytestmark = pytest.mark.integration


def client_of(outputs: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")


@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_joblib_sweep_is_one_parent_run_and_its_report_ignores_other_runs(tmp_path):
    outputs = tmp_path / "out"
    run_pipeline(outputs, *TINY, "prune.ratio=0.5", "evaluate.runtimes=[]")  # a job outside the sweep, before it
    run_cli(outputs, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", *TINY, "evaluate.runtimes=[]",
            "prune.ratio=0.25,0.5,0.75", timeout=900)
    runs = mlflow_runs(outputs, results=False)
    (parent,) = [r for r in runs if r.data.tags.get("medprune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["medprune.sweep_id"] for r in children} == {parent.data.tags["medprune.sweep_id"]}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.jobs"] == "3" and parent.data.params["sweep.jobs_finished"] == "3"
    assert "prune.ratio=0.25,0.5,0.75" in parent.data.params["sweep.overrides"]
    artifacts = {a.path for a in client_of(outputs).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.csv", "report/dice_vs_flops.png"} <= artifacts
    assert "row/0.5/dice" in parent.data.metrics

    # the report of the latest sweep: its three jobs, in order, not the job made outside it
    text = run_pipeline(outputs, "--no-log", module="pipeline.report")
    table = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert [line.split("|")[1].strip() for line in table] == ["0.25", "0.5", "0.75"]
    assert all(line.split("|")[2].strip() == "1" for line in table)  # the outside job would make 0.5 a 2-run row
    assert "Δ" not in text  # no paper columns, no difference footer
    # the uncertainty columns, from the jobs' per-case files: an interval around each row's mean Dice
    header = next(line for line in text.splitlines() if line.startswith("| prune.ratio"))
    assert "Dice 95% CI (cases)" in header and "p vs baseline" in header
    for line in table:
        cells = [c.strip() for c in line.split("|")]
        low, high = (float(v) for v in cells[header.split("|").index(" Dice 95% CI (cases) ")].strip("[]").split(","))
        assert low <= float(cells[3]) <= high
    # the same sweep named by its parent run id and by its multirun folder
    def table_rows(text):
        return [line for line in text.splitlines() if line.startswith("| 0.")]

    assert table_rows(run_pipeline(outputs, parent.info.run_id, "--no-log", module="pipeline.report")) == table
    sweep_dir = parent.data.tags["medprune.sweep_dir"]
    assert table_rows(run_pipeline(outputs, sweep_dir, "--no-log", module="pipeline.report")) == table
    # another network's metrics: the jobs share one baseline, so every row shows its Dice
    baseline = run_pipeline(outputs, parent.info.run_id, "--no-log", "--network", "baseline", module="pipeline.report")
    assert "Ours: baseline/<metric>" in baseline
    (trained,) = [r for r in runs if r not in children and r != parent]  # the job outside the sweep trained the baseline
    assert {line.split("|")[3].strip() for line in table_rows(baseline)} == {f"{trained.data.metrics['baseline/dice']:.4f}"}
    # the baseline's metrics are on the run that trained it; the sweep's jobs chart their own networks (its results
    # in their results.json, where the report found them)
    assert not [k for r in children for k in r.data.metrics if k.startswith("baseline/")]
    assert {"final/dice", "final/latency_ms", "final/flops_g"} <= set(children[0].data.metrics)


def test_a_report_refuses_rows_that_mix_settings(tmp_path):
    from pipeline.report import ReportError, report_sweep

    outputs = tmp_path / "out"
    run_pipeline(outputs, "-m", *TINY, "evaluate.runtimes=[]", "prune.ratio=0.5", "train.lr=0.001,0.002")
    client = client_of(outputs)
    (parent,) = [r for r in mlflow_runs(outputs) if r.data.tags.get("medprune.kind") == "sweep"]
    with pytest.raises(ReportError, match=r"differ in .*train\.lr"):
        report_sweep(client, parent, tmp_path / "report", log=False)


def test_a_job_logs_its_models_datasets_sources_and_only_measurements_as_metrics(tmp_path, monkeypatch):
    from data import build_reader
    from models.io import load_model
    from pipeline.measure.metrics import binarize
    from pipeline.mlflow_model import predict_masks

    outputs = tmp_path / "out"
    run_pipeline(outputs, *TINY, "evaluate.runtimes=[]")
    (run,) = mlflow_runs(outputs, results=False)
    client = client_of(outputs)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    for tag in ("mlflow.user", "mlflow.source.name", "mlflow.source.git.commit", "medprune.git_dirty", "mlflow.note.content"):
        assert tags.get(tag), tag
    assert "l1 uniform pruning (ratio 0.5" in tags["mlflow.note.content"]
    # counters and flags are params; the run's metrics are measurements and curves
    assert "final.latency_threads" in params and "data.n_train" in params
    assert not [k for k in metrics if k.startswith(("data/", "score/")) or k.endswith(("latency_threads", "test_images"))]
    assert {"final/dice", "final/iou", "final/params_m", "final/flops_g", "final/size_mb", "final/latency_ms"} <= set(metrics)
    # metrics are what a user compares (the UI's charts and compare view open on the trade-off); the rest is in results.json
    assert len(metrics) <= 30 and not [k for k in metrics if k.endswith(("_cv", "_runs", "p90_ms")) or k.startswith("evaluate/")]
    from pipeline.tracking import Tracker

    results = Tracker.read_results(client, run.info.run_id)
    assert {"final/latency_cv", "final/dice_orig", "baseline/val_dice"} <= set(results)
    assert all(results[k] == pytest.approx(v) for k, v in metrics.items() if "/" in k and not k.startswith(("train/", "finetune/")))
    # what the user typed and Hydra's settings, beside the resolved config
    assert {"hydra/overrides.yaml", "hydra/hydra.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    # the data as MLflow dataset inputs, one per split
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value for i in inputs}
    assert contexts == {"train", "val", "test"} and {i.dataset.name for i in inputs} == {"synthetic_isic"}

    # the final network is an MLflow 3 logged model bound to the run, its headline metrics linked to it
    experiment = run.info.experiment_id
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[experiment])}
    assert set(models) == {"final_mlflow_model", "baseline_mlflow_model"}  # the baseline was trained here
    final = models["final_mlflow_model"]
    assert final.source_run_id == run.info.run_id and str(final.status) in ("READY", "LoggedModelStatus.READY")
    linked = {m.key: m.value for m in final.metrics}
    assert linked["final/dice"] == pytest.approx(metrics["final/dice"]) and linked["final/flops_g"] == pytest.approx(metrics["final/flops_g"])
    assert final.model_id in {o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs}

    # it loads back through MLflow (no unpickling) and gives the pipeline's masks
    import mlflow.artifacts

    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what models:/ and runs:/ URIs are looked up in
    local = mlflow.artifacts.download_artifacts(f"models:/{final.model_id}", dst_path=str(tmp_path / "download"))
    assert f"model_id: {final.model_id}" in (Path(local) / "MLmodel").read_text() and not list(Path(local).rglob("*.pkl"))
    # its model card: the run's Dice (with an interval over the test cases), FLOPs, the data and how to load it
    card = json.loads((Path(local) / "model_card.json").read_text())
    text = (Path(local) / "MODEL_CARD.md").read_text()
    assert card["model_id"] == final.model_id and card["run_id"] == run.info.run_id
    assert card["metrics"]["dice"]["value"] == pytest.approx(metrics["final/dice"])
    low, high = card["metrics"]["dice"]["ci95"]
    assert low <= card["metrics"]["dice"]["case_mean"] <= high
    assert card["cost"]["flops_g"] == pytest.approx(metrics["final/flops_g"])
    assert card["training_data"]["dataset"] == "synthetic_isic" and card["training_data"]["splits"]["test"]["cases"] > 0
    assert card["task"]["labels"] == ["foreground"] and card["output"]["dtype"] == "uint8"
    assert f"{metrics['final/dice']:.4g}" in text and f"models:/{final.model_id}" in text and "no patient data" in text
    # it takes what a user has (uint8 RGB images as read from the files, each at its own size) and gives the masks
    # pipeline.predict gives: the reader's preprocessing and the way back are in the graph (tests/test_deploy_graph.py)
    run_dir = Path(tags["medprune.run_dir"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    reader = build_reader(config["dataset"])
    network = load_model(run_dir / "final" / "model").eval()
    images = Path(config["dataset"]["root"]) / "ISIC2018_Task1-2_Training_Input"
    files = [images / f"{case}.jpg" for case in json.loads((run_dir / "splits.json").read_text())["test"]]
    for path in files:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        masks = predict_masks(local, rgb[None])
        pixels, size = reader.read_image(path)
        with torch.no_grad():
            logits = F.interpolate(network(reader.network_input(pixels)[None]), size=size, mode="bilinear", align_corners=False)
        expected = binarize(logits, config["evaluate"]["threshold"]).numpy()
        assert masks.shape == (1, 1, *rgb.shape[:2]) == expected.shape and masks.dtype == np.uint8
        assert (masks.astype(bool) == expected).mean() > 0.9995, path  # ONNX Runtime's float sums may flip a boundary pixel
    # what it does not take is refused, naming the signature (it used to give empty masks for [0, 1] floats)
    with pytest.raises(MlflowException, match=r"uint8.*\(-1, -1, -1, 3\)|\(-1, -1, -1, 3\).*uint8"):
        predict_masks(local, np.zeros((1, 3, 32, 32), np.float32))
    # models:/<id> and the run's URI (MLflow 3 resolves runs:/<run>/<name> to the logged model) load the same model
    for model_uri in (f"models:/{final.model_id}", f"runs:/{run.info.run_id}/final_mlflow_model"):
        assert np.array_equal(predict_masks(model_uri, rgb[None]), masks)


def test_register_as_adds_a_model_version_with_the_runs_metrics(tmp_path):
    outputs = tmp_path / "out"
    run_pipeline(outputs, *TINY, "evaluate.runtimes=[]", "tracking.register_as=tiny-unet")
    (run,) = mlflow_runs(outputs)
    client = client_of(outputs)
    (version,) = client.search_model_versions("name='tiny-unet'")
    assert version.run_id == run.info.run_id and float(version.tags["final/dice"]) == pytest.approx(run.data.metrics["final/dice"], rel=1e-5)
    assert run.data.tags["medprune.registered_model"] == f"tiny-unet/{version.version}"
    # made from the run's logged model, its description the model card
    (final,) = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id]) if m.name == "final_mlflow_model"]
    assert version.source == f"models:/{final.model_id}"
    assert version.description.startswith("# final_mlflow_model") and f"models:/{final.model_id}" in version.description
    assert "## Metrics (test split)" in version.description and "FLOPs" in version.description


def test_the_installed_medprune_command_works_from_any_folder_and_has_its_own_help(tmp_path):
    script = ROOT / ".venv" / "bin" / "medprune"
    if not script.exists():
        pytest.skip(f"no installed script at {script} (make setup installs it)")
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("train -> [sensitivity] -> score -> prune -> finetune -> [quantize] -> evaluate", "prune: budget", "experiment:",
                 "python -m pipeline.report"):
        assert text in proc.stdout, text
    assert "schema/" not in proc.stdout and "\nshared:" not in proc.stdout  # internal folders of conf/ are not choices
