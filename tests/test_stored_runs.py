"""A run folder, and a run in MLflow, is data: `pipeline.evaluate` and `pipeline.predict` read its config without
running anything it names, score the folder's own networks, and check everything before an MLflow run opens.

Each attack is a config.yaml edited as an attacker (or a careless copy) would, given to both entries
(`pipeline.evaluate run=`, `pipeline.predict model=`) by folder and by MLflow run id (the run's config.yaml
artifact); a sentinel file the payload would create must never appear, a secret it would read never printed.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import TINY, mlflow_runs, run_pipeline

pytestmark = pytest.mark.integration

SECRET = "medprune-test-secret-4f1c"


class Touch:
    """A pickle that creates a file when it is loaded (what `joblib.load` of an attacker's file would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One finished tiny job, a held-out test set, images to predict, and a place for sentinels."""
    from data.synthetic import write_synthetic_isic

    base = tmp_path_factory.mktemp("stored")
    outputs = base / "outputs"
    run_pipeline(outputs, *TINY, "evaluate.runtimes=[]", "evaluate.mask_examples=0")
    (run,) = mlflow_runs(outputs)
    holdout = base / "holdout"
    write_synthetic_isic(holdout, count=4, seed=7, min_side=40, max_side=56)
    inputs = base / "inputs"
    inputs.mkdir()
    for image in sorted((holdout / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[:2]:
        shutil.copy(image, inputs)
    return {"outputs": outputs, "run": run, "run_dir": Path(run.data.tags["medprune.run_dir"]), "holdout": holdout,
            "inputs": inputs, "base": base}


def evaluate(job, ref, *extra, ok=True) -> str:
    return run_pipeline(job["outputs"], f"run={ref}", f"dataset.test_root={job['holdout']}", "evaluate.runtimes=[]",
                        "evaluate.mask_examples=0", *extra, ok=ok, module="pipeline.evaluate")


def predict(job, ref, out: Path, ok=True) -> str:
    return run_pipeline(job["outputs"], f"model={ref}", f"input={job['inputs']}", f"output={out}", ok=ok,
                        module="pipeline.predict")


def one_error(out: str, command: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(f"medprune {command}:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


def evaluations(job) -> int:
    return len(mlflow_runs(job["outputs"], **{"medprune.kind": "evaluation"}))


# -- 1. a stored config is data ---------------------------------------------------------------------------


def payloads(sentinel: Path, pickled: Path) -> dict[str, tuple]:
    """name -> (an edit of the config dict, or YAML text appended to it; what the one-line error must name)."""
    def edit(fn):
        return fn

    return {
        "nested target in a list (joblib.load)": (edit(lambda c: c["dataset"].__setitem__(
            "mean", [{"_target_": "joblib.load", "filename": str(pickled)}, 0.456, 0.406])), "dataset.mean[0]._target_"),
        "target that opens a file for writing": (edit(lambda c: c["dataset"].__setitem__(
            "mask_threshold", {"_target_": "builtins.open", "file": str(sentinel), "mode": "w"})), "dataset.mask_threshold._target_"),
        "interpolation reading a secret": (edit(lambda c: c["dataset"].__setitem__(
            "split_seed", "${oc.env:MEDPRUNE_TEST_SECRET}")), "dataset.split_seed"),
        "reader that is not medprune's": (edit(lambda c: c["dataset"].__setitem__("_target_", "pathlib.Path.touch")),
                                          "dataset._target_"),
        "target in the loss group": (edit(lambda c: c["loss"]["terms"][0].__setitem__("_target_", "os.system")),
                                     "loss.terms[0]._target_"),
        "target in the evaluate block": (edit(lambda c: c["evaluate"].__setitem__(
            "threshold", {"_target_": "pathlib.Path.touch", "self": str(sentinel)})), "evaluate.threshold._target_"),
        "Hydra's _args_": (edit(lambda c: c["dataset"].__setitem__("_args_", [str(sentinel)])), "dataset._args_"),
        "YAML aliases (a billion laughs)": ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                                            "c: [*b, *b, *b, *b, *b, *b, *b, *b]\n", "alias"),
    }


def write_payload(config_file: Path, original: dict, payload) -> None:
    if isinstance(payload, str):
        config_file.write_text(yaml.safe_dump(original) + payload)
        return
    config = yaml.safe_load(yaml.safe_dump(original))
    payload(config)
    config_file.write_text(yaml.safe_dump(config))


def test_a_stored_config_never_runs_code_by_folder_or_by_run_id(job, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDPRUNE_TEST_SECRET", SECRET)
    sentinel, pickled = tmp_path / "pwned", tmp_path / "evil.pkl"
    pickled.write_bytes(pickle.dumps(Touch(sentinel)))
    original = yaml.safe_load((job["run_dir"] / "config.yaml").read_text())
    folder = Path(shutil.copytree(job["run_dir"], tmp_path / "copy"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{job['outputs'] / 'mlflow.db'}")
    run_id = job["run"].info.run_id
    artifact = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "config.yaml"
    kept = {artifact: artifact.read_bytes(), folder / "config.yaml": (folder / "config.yaml").read_bytes()}
    aside = job["run_dir"].with_name(job["run_dir"].name + ".aside")
    job["run_dir"].rename(aside)  # the run id path then reads the run's artifacts
    before, checked = evaluations(job), 0
    try:
        for name, (payload, names) in payloads(sentinel, pickled).items():
            for target in (folder / "config.yaml", artifact):
                write_payload(target, original, payload)
                ref = folder if target.parent == folder else run_id
                for command, out in (("evaluate", evaluate(job, ref, ok=False)),
                                     ("predict", predict(job, ref, tmp_path / "masks", ok=False))):
                    line = one_error(out, command)
                    assert names in line, (name, command, ref, line)
                    assert not sentinel.exists(), (name, command, ref)
                    assert SECRET not in out, (name, command, ref)
                    checked += 1
                target.write_bytes(kept[target])
    finally:
        artifact.write_bytes(kept[artifact])
        aside.rename(job["run_dir"])
    assert checked == 8 * 2 * 2
    assert evaluations(job) == before and not (tmp_path / "masks").exists()  # nothing opened, nothing written


def test_the_plain_config_still_evaluates_and_predicts(job, tmp_path):
    """The same entries on the untouched run: the checks refuse payloads, not medprune's own configs."""
    before = evaluations(job)
    evaluate(job, job["run"].info.run_id)
    predict(job, job["run_dir"], tmp_path / "masks")
    assert evaluations(job) == before + 1 and len(list((tmp_path / "masks").glob("*.png"))) == 2


# -- 2. a run folder is scored on its own files ------------------------------------------------------------


def test_a_copied_run_folder_is_scored_on_its_own_networks(job, tmp_path):
    copy = Path(shutil.copytree(job["run_dir"], tmp_path / "copy"))
    state = yaml.safe_load((copy / "state.json").read_text())
    assert state["final"] == "final/model" and state["baseline"] == "baseline"  # stored relative to the folder
    for name in ("model.json", "model.safetensors"):  # the copy's final network is now its baseline
        shutil.copy(copy / "baseline" / name, copy / "final" / "model" / name)
    aside = job["run_dir"].with_name(job["run_dir"].name + ".aside")
    job["run_dir"].rename(aside)  # the original is gone: nothing may be read from it
    try:
        evaluate(job, copy)
    finally:
        aside.rename(job["run_dir"])
    latest = max(mlflow_runs(job["outputs"], **{"medprune.kind": "evaluation"}), key=lambda r: r.info.start_time)
    metrics = latest.data.metrics
    assert metrics["final/dice"] == metrics["baseline/dice"] and metrics["final/params_m"] == metrics["baseline/params_m"]


@pytest.mark.parametrize("where", ["absolute path of the original", "relative path out of the folder"])
def test_a_state_json_naming_files_elsewhere_is_refused_before_a_run_opens(job, tmp_path, where):
    copy = Path(shutil.copytree(job["run_dir"], tmp_path / "copy"))
    state = yaml.safe_load((copy / "state.json").read_text())
    state["final"] = str(job["run_dir"] / "final" / "model") if where.startswith("absolute") else "../../elsewhere/model"
    (copy / "state.json").write_text(json.dumps(state))
    before = evaluations(job)
    line = one_error(evaluate(job, copy, ok=False), "evaluate")
    assert "final=" in line and "outside the run folder" in line, line
    assert "outside the run folder" in one_error(predict(job, copy, tmp_path / "masks", ok=False), "predict")
    assert evaluations(job) == before and not (tmp_path / "masks").exists()


def test_a_damaged_network_or_test_set_is_refused_before_a_run_opens(job, tmp_path):
    copy = Path(shutil.copytree(job["run_dir"], tmp_path / "copy"))
    weights = copy / "pruned" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = evaluations(job)
    assert str(weights) in one_error(evaluate(job, copy, ok=False), "evaluate")
    source_root = yaml.safe_load((job["run_dir"] / "config.yaml").read_text())["dataset"]["root"]
    same_root = run_pipeline(job["outputs"], f"run={job['run_dir']}", f"dataset.test_root={source_root}", ok=False,
                             module="pipeline.evaluate")
    assert "is root itself" in one_error(same_root, "evaluate")
    runtimes = evaluate(job, job["run_dir"], "evaluate.runtimes={onnxruntime: 1}", ok=False)
    assert "evaluate.runtimes" in one_error(runtimes, "evaluate")
    assert evaluations(job) == before


def test_a_run_stored_before_the_readers_gained_a_key_is_read_as_it_was_trained(job, tmp_path):
    """dataset.folds / fold came later: a config without them reads its data as then (no folds)."""
    copy = Path(shutil.copytree(job["run_dir"], tmp_path / "copy"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    for key in ("folds", "fold"):
        config["dataset"].pop(key)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    predict(job, copy, tmp_path / "masks")
    assert len(list((tmp_path / "masks").glob("*.png"))) == 2
