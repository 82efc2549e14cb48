"""The MLflow store: fixed location, explicit artifact root, runs end FINISHED or FAILED."""
from __future__ import annotations

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.resolve_uri(None, tmp_path) == "http://127.0.0.1:9"
    assert tracking.resolve_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"


def test_default_store_does_not_depend_on_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDPRUNE_OUTPUTS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.resolve_uri(None)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(None) == first
    assert first.endswith("/outputs/mlflow.db")


def test_flatten_gives_dotted_params():
    flat = tracking.flatten({"prune": {"ratio": 0.5, "scope": "all"}, "stages": ["train", "prune"], "baseline": None})
    assert flat == {"prune.ratio": "0.5", "prune.scope": "all", "stages": '["train", "prune"]', "baseline": "null"}
    # glob patterns are not valid MLflow param names: such a mapping stays one JSON param
    assert tracking.flatten({"prune": {"layer_ratios": {"encoder.*": 0.5}}}) == {"prune.layer_ratios": '{"encoder.*": 0.5}'}


def test_run_is_finished_and_artifacts_stay_beside_the_store(tmp_path, monkeypatch):
    store = tmp_path / "store"
    uri = tracking.default_uri(store)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with tracking.start_run(uri, "exp", "ok-run", {"k": "v"}) as tracker:
        tracker.log_params({"prune.ratio": 0.5})
        tracker.log_metrics({"final/dice": 0.9})
        note = tmp_path / "note.txt"
        note.write_text("hello")
        tracker.log_artifact(note, "notes")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["prune.ratio"] == "0.5"
    assert run.data.metrics["final/dice"] == 0.9
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert (store / "mlartifacts").is_dir() and not list(elsewhere.iterdir())


def test_a_failing_job_marks_the_run_failed(tmp_path):
    uri = tracking.default_uri(tmp_path)
    with pytest.raises(RuntimeError):
        with tracking.start_run(uri, "exp", "bad-run", {}) as tracker:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


def test_a_terminated_job_is_marked_killed_not_left_running(tmp_path):
    uri = tracking.default_uri(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        with tracking.start_run(uri, "exp", "killed-run", {}) as tracker:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([signal.SIGTERM], 5)  # not reached: the handler raises first
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # the job's handler is removed again


def test_interrupt_marks_the_run_killed(tmp_path):
    uri = tracking.default_uri(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(uri, "exp", "interrupted", {}) as tracker:
            raise KeyboardInterrupt
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


def test_a_finished_job_points_to_its_run_on_a_tracking_server_or_to_make_ui_locally():
    from pipeline.tracking import where_to_look

    from pipeline.tracking import Tracker

    remote = Tracker(None, "abc", "http://mlflow.lab:5000/", "medprune", "7")
    assert where_to_look(remote) == "http://mlflow.lab:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    local = Tracker(None, "abc", "sqlite:////tmp/x/mlflow.db", "medprune", "7")
    assert where_to_look(local) == "make ui  (http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning)"


def test_the_metrics_are_what_a_user_compares_and_the_rest_are_results():
    from pipeline.tracking import is_compared

    compared = ["final/dice", "pruned/latency_ms", "baseline/flops_g", "final/hd95", "final/dice_whole_tumor", "train/loss",
                "finetune/val_dice", "quantized/dice"]
    results = ["final/dice_orig", "final/dice_bf16", "final/dice_3d", "final/latency_cv", "final/onnx_latency_ms",
               "baseline/val_dice", "evaluate/peak_gflops", "prune/channels_kept", "train/lr", "prune_step1/loss"]
    assert [k for k in compared if not is_compared(k)] == [] and [k for k in results if is_compared(k)] == []
