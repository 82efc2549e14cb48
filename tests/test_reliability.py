"""Runs that can be trusted: safe loading, verified artifacts, resume after a kill, clear errors.

Each test reproduces one defect found by trying the pipeline as a new user and as an attacker would
(docs/RELIABILITY.md lists what is guaranteed and which test shows it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY as HELPER_TINY
from helpers import conf, kill_when, mlflow_runs, run_pipeline
from helpers import launch as launch_merged
from models import build_model
from models.io import ModelFileError, load_model, save_model
from pipeline import tracking

UNET = conf("model", "unet_tiny")
TINY = [*HELPER_TINY, "evaluate.runtimes=[]", "evaluate.mask_examples=0"]


def launch(outputs: Path, *overrides: str) -> subprocess.Popen:
    return launch_merged(outputs, *overrides, merge_stderr=False)


def run(outputs: Path, *overrides: str, rc: int = 0) -> tuple[str, str]:
    proc = launch(outputs, *overrides)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == rc, (out[-3000:], err[-3000:])
    return out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medprune:")]


# -- 1. a model folder is data ---------------------------------------------------------------------


def _model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    save_model(build_model(UNET, 3, 1), UNET, 3, 1, folder)
    return folder


@pytest.mark.unit
@pytest.mark.parametrize("model_cfg", [
    {"_target_": "argparse.Namespace", "x": {"_target_": "pathlib.Path.touch", "_args_": ["SENTINEL"]}},
    {"_target_": "models.unet.UNet", "width": {"_target_": "pathlib.Path.touch", "_args_": ["SENTINEL"]}, "depth": 2},
    {"_target_": "models.unet.UNet", "_args_": ["SENTINEL"], "width": 4, "depth": 2},
    {"_target_": "pathlib.Path.touch", "self": "SENTINEL"},
    {"_target_": "models.io.save_model", "directory": "SENTINEL"},
], ids=["unregistered-target", "nested-target", "args", "stdlib-callable", "project-function-not-a-builder"])
def test_model_json_cannot_run_code(tmp_path, model_cfg):
    folder = _model_dir(tmp_path)
    sentinel = tmp_path / "pwned"
    meta = json.loads((folder / "model.json").read_text())
    meta["model"] = json.loads(json.dumps(model_cfg).replace("SENTINEL", str(sentinel)))
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError) as err:
        load_model(folder)
    assert str(folder / "model.json") in str(err.value)
    assert not sentinel.exists()


# -- 2. every weights file is verified -------------------------------------------------------------


@pytest.mark.unit
def test_a_damaged_cached_baseline_is_moved_aside(tmp_path, caplog):
    from pipeline import baseline as baselines

    folder = baselines.cache_dir(tmp_path, "k1")
    save_model(build_model(UNET, 3, 1), UNET, 3, 1, folder)
    (folder / baselines.BASELINE_META).write_text(json.dumps({"key": "k1", "run_id": "r", "best_val_dice": 0.9}))
    assert baselines.cached(tmp_path, "k1")["run_id"] == "r"
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 1000] = bytes(1000)  # same size, middle overwritten
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert baselines.cached(tmp_path, "k1") is None
    assert not folder.exists()
    aside = list(folder.parent.glob("k1.corrupt-*"))
    assert len(aside) == 1 and "damaged" in caplog.text and str(aside[0]) in caplog.text


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_corrupted_cache_is_retrained_and_a_corrupted_baseline_folder_is_an_error(tmp_path):
    outputs = tmp_path / "out"
    run_pipeline(outputs, *TINY)
    (cached,) = [p for p in (outputs / "baselines").iterdir() if p.is_dir() and not p.name.startswith(".")]
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 2000] = bytes(2000)
    weights.write_bytes(bytes(data))
    first = mlflow_runs(outputs)[0]
    out = run_pipeline(outputs, *TINY)  # the store holds the baseline (the first run's artifact): restored from it
    assert "is damaged" in out and "found on the store" in out and "Training baseline" not in out
    assert list((outputs / "baselines").glob(f"{cached.name}.corrupt-*"))
    latest = max(mlflow_runs(outputs), key=lambda r: r.info.start_time)
    assert latest.info.status == "FINISHED" and latest.data.tags["medprune.baseline_run_id"] == first.info.run_id
    assert latest.data.tags["medprune.baseline_reused"] == "true"

    # damaged again, and no run of the store holds it (another store): trained again
    weights.write_bytes(bytes(data))
    out = run_pipeline(outputs, *TINY, f"tracking.uri=sqlite:///{tmp_path / 'other.db'}")
    assert "is damaged" in out and "Training baseline" in out

    # the same damage in a folder given by baseline=: an error naming the file, before a run is opened
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated this time
    before = len(mlflow_runs(outputs))
    out = run_pipeline(outputs, *TINY, "stages=[prune,finetune,evaluate]", f"baseline={cached}", ok=False)
    assert error_lines(out) == [line for line in out.splitlines() if str(weights) in line]
    assert len(error_lines(out)) == 1 and "Traceback" not in out
    assert len(mlflow_runs(outputs)) == before


# -- 3. a killed run is not left RUNNING -----------------------------------------------------------


@pytest.mark.unit
def test_runs_of_a_dead_process_are_ended_killed(tmp_path, caplog):
    uri = tracking.default_uri(tmp_path)
    client = tracking.client_for(uri)
    experiment = tracking.get_or_create_experiment(client, "e", uri)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = client.create_run(experiment, tags={**tracking.owner_tags(), "medprune.pid": str(dead.pid)}).info.run_id
    alive = client.create_run(experiment, tags=tracking.owner_tags()).info.run_id  # this very process
    elsewhere = client.create_run(experiment, tags={**tracking.owner_tags(), "medprune.host": "another-host",
                                                    "medprune.pid": str(dead.pid)}).info.run_id
    with caplog.at_level("WARNING"):
        assert tracking.end_dead_runs(client) == [gone]
    assert client.get_run(gone).info.status == "KILLED" and client.get_run(gone).info.end_time
    assert gone in caplog.text
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another host's processes are not ours to judge


@pytest.mark.unit
def test_sigterm_during_an_mlflow_write_waits_for_the_write(tmp_path):
    calls = []

    def write():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        calls.append("written")

    with pytest.raises(tracking.Terminated):
        with tracking.terminate_on_sigterm():
            tracking._retry(write)
    assert calls == ["written"]


# -- 6. errors a user can fix are one line, exit 2, and no run ------------------------------------


@pytest.mark.integration
def test_errors_are_one_line_before_any_run(tmp_path):
    outputs = tmp_path / "out"
    loop = tmp_path / "loop"
    from data.synthetic import write_synthetic_isic

    write_synthetic_isic(loop, count=6, seed=0, min_side=40, max_side=50)
    image = sorted((loop / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))[0]
    image.unlink()
    os.symlink(image, image)
    cases = {
        "dataset.root": ["dataset=isic2018"],
        "device=cuda": ["device=cuda"] if not torch.cuda.is_available() else ["device=cuda:99"],
        str(image): ["dataset=isic2018", f"dataset.root={loop}"],
        "baseline=": [f"baseline={tmp_path}"],
        "evaluate.batch_size": ["evaluate.batch_size=0"],
    }
    for needle, overrides in cases.items():
        out = run_pipeline(outputs, "debug=tiny", "model=unet_tiny", *overrides, ok=False)
        lines = error_lines(out)
        assert len(lines) == 1 and needle in lines[0], (needle, out[-2000:])
        assert "Traceback" not in out and "train 1/" not in out
    # what a shell sees: exit status 2, the one line on stderr, nothing on it but that line
    _, err = run(outputs, "debug=tiny", "model=unet_tiny", "dataset=isic2018", f"dataset.root={loop}", rc=2)
    assert err.strip().splitlines()[-1] == error_lines(err)[0] and str(image) in err
    assert "Traceback" not in err
    assert mlflow_runs(outputs) == []


@pytest.mark.integration
def test_pretrained_weights_neither_cached_nor_reachable_are_one_line_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import models.smp

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(models.smp, "hub_reachable", lambda timeout=3.0: False)  # this machine, offline
    outputs = tmp_path / "out"
    start = time.time()
    out = run_pipeline(outputs, *TINY, "model=smp_unet", "model.encoder_name=resnet18", "model.encoder_weights=imagenet",
                       ok=False)
    assert time.time() - start < 20, "the weights were looked up online, with retries"
    (line,) = error_lines(out)
    assert line.startswith("medprune: configuration error: model.encoder_weights=imagenet: the weights of encoder resnet18 "
                           "are not in this machine's Hugging Face cache")
    assert "Traceback" not in out and mlflow_runs(outputs) == []


@pytest.mark.integration
def test_a_ratio_that_removes_nothing_stops_before_training(tmp_path):
    # unet_tiny's layers have 4, 8 and 16 channels: a multiple of 16 keeps every one whole
    outputs = tmp_path / "out"
    out = run_pipeline(outputs, *TINY, "prune.ratio=0.9", "prune.round_to=16", ok=False)
    assert error_lines(out) == ["medprune: configuration error: prune.ratio=0.9 removes no channel of models.unet.UNet in "
                                "prune.scope=all: every in-scope layer has at most 16 channels, which prune.round_to=16 keeps "
                                "whole: set prune.round_to=null (exact rates) or a smaller multiple"]
    assert "train epoch" not in out and mlflow_runs(outputs) == []


@pytest.mark.integration
def test_a_prune_that_keeps_more_than_asked_says_so_and_marks_the_run(tmp_path):
    # per-layer ratios that conflict inside a residual group of the ResNet encoder (see test_pruning.py)
    outputs = tmp_path / "out"
    out = run_pipeline(outputs, *TINY, "stages=[train,score,prune]", "model=smp_unet", "model.encoder_name=resnet18",
                       "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "prune=per_layer", "prune.ratio=0",
                       "prune.round_to=null", "prune.round_to_high_res=null",
                       "++prune.layer_ratios={encoder.layer1.0.conv2:0.9,encoder.layer1.1.conv2:0.0,encoder.layer2.0.conv1:0.5}")
    warnings = [line for line in out.splitlines() if "kept more channels than prune.schedule=per_layer asks" in line]
    assert len(warnings) == 1 and "encoder.layer1.0.conv2 (64 -> 64, at most 6 asked)" in warnings[0], out[-3000:]
    (r,) = mlflow_runs(outputs)
    assert r.data.tags["medprune.prune_shortfall"].startswith("1 layer(s) kept more channels")
    assert r.data.metrics["prune/shortfall_layers"] == 1


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_sigterm_is_one_line_and_the_run_killed(tmp_path):
    outputs = tmp_path / "out"
    proc = launch(outputs, *TINY, "train.epochs=500")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(outputs.glob("baselines/.*.checkpoint/checkpoint.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert error_lines(err) == ["medprune: terminated by signal 15; rerun the same command to resume"]
    assert "Traceback" not in err and "database is locked" not in err
    # written to a file (as a SLURM log is): one line per epoch, no progress-bar frames
    assert "\r" not in out + err and "train epoch 1/500" in out + err
    (r,) = mlflow_runs(outputs)
    assert r.info.status == "KILLED" and r.info.end_time


# -- 7. the baseline key is the data's content and the training settings ---------------------------


@pytest.mark.unit
def test_baseline_key_follows_content_not_paths_or_serving_keys(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data import build_data
    from data.synthetic import write_synthetic_isic
    from pipeline import shell
    from pipeline.baseline import baseline_key
    from pipeline.paths import CONF_DIR

    shell.start()  # the schema and resolvers the composed config needs

    write_synthetic_isic(tmp_path / "a", count=8, seed=0, min_side=40, max_side=50)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")

    def key(root, *overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["dataset=isic2018", f"dataset.root={root}", "dataset.image_size=16", *overrides])
        OmegaConf.resolve(cfg)
        return baseline_key(cfg, build_data(cfg.dataset, cfg.seed))

    first = key(tmp_path / "a")
    assert key(tmp_path / "copy") == first  # moved or copied data: same key
    assert key(tmp_path / "a", "paths.outputs=/elsewhere") == first
    assert key(tmp_path / "a", "dataset.workers=1", "train.num_workers=3", "train.checkpoint_every=5") == first
    assert key(tmp_path / "a", "train.lr=0.01") != first
    assert key(tmp_path / "a", "loss=dice") != first and key(tmp_path / "a", "optimizer=sgd") != first
    assert key(tmp_path / "a", "seed=1") != first
    victim = sorted((tmp_path / "copy" / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[0]
    from PIL import Image

    Image.open(victim).rotate(90).save(victim, quality=70)  # another image, another size
    assert key(tmp_path / "copy") != first


# -- resume after SIGKILL --------------------------------------------------------------------------


def _weights(outputs: Path, pattern: str) -> dict[str, torch.Tensor]:
    (path,) = [p for p in outputs.glob(pattern) if ".corrupt" not in str(p)]
    return load_file(str(path))


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_job_killed_in_training_and_in_fine_tuning_resumes_to_the_same_weights(tmp_path):
    # fine-tuning at a rate that moves the pruned network: the kept weights are fine-tuning's, not the pruned ones
    args = [*TINY, "train.epochs=8", "finetune.epochs=6", "finetune.lr=0.01"]
    reference = tmp_path / "reference"
    run(reference, *args)
    pruned, final = _weights(reference, "runs/*/*/pruned/model/model.safetensors"), _weights(reference, "runs/*/*/final/model/model.safetensors")
    assert any(not torch.equal(pruned[k], final[k]) for k in final), "fine-tuning kept the pruned weights: it proves nothing"

    outputs = tmp_path / "killed"
    kill_when(outputs, args, "baselines/.*.checkpoint/checkpoint.json", 3)  # in training
    (interrupted,) = mlflow_runs(outputs)
    kill_when(outputs, args, "runs/*/*/final/checkpoint/checkpoint.json", 2)  # rerun: resumes, then killed in fine-tuning
    out, err = run(outputs, *args)
    log = out + err
    assert "Resuming the interrupted job" in log and "finetune: resuming after epoch" in log
    assert "marked KILLED" in log

    # one MLflow run, continued, FINISHED; the same weights as the run that was never interrupted
    (r,) = mlflow_runs(outputs)
    assert r.info.run_id == interrupted.info.run_id and r.info.status == "FINISHED"
    assert int(r.data.tags["medprune.resumed"]) == 2
    for pattern in ("baselines/*/model.safetensors", "runs/*/*/final/model/model.safetensors"):
        ours, theirs = _weights(outputs, pattern), _weights(reference, pattern)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), pattern
    ref = mlflow_runs(reference)[0]
    assert r.data.metrics["final/dice"] == ref.data.metrics["final/dice"]
    assert not list(outputs.glob("jobs/*.json")) and not list(outputs.glob("baselines/.*.checkpoint"))


# -- a killed sweep continues ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_killed_sweep_rerun_skips_its_finished_jobs_and_resumes_the_killed_one(tmp_path):
    """SIGKILL in the second job of a two-job sweep, then the same command: the same parent run, the finished job
    skipped (not rerun, its folder untouched), the killed one resumed from its checkpoint; every job once."""
    outputs = tmp_path / "out"
    args = ["-m", *TINY, "finetune.epochs=8", "prune.ratio=0.3,0.5"]
    kill_when(outputs, args, "multirun/*/*/1/final/checkpoint/checkpoint.json", 2)  # the second job, fine-tuning
    (parent,) = mlflow_runs(outputs, **{"medprune.kind": "sweep"})
    (first,) = [r for r in mlflow_runs(outputs, **{"mlflow.parentRunId": parent.info.run_id})
                if r.data.params["prune.ratio"] == "0.3"]
    assert first.info.status == "FINISHED"
    first_folder = Path(first.data.tags["medprune.run_dir"])
    written = (first_folder / "state.json").stat().st_mtime_ns

    out, err = run(outputs, *args)
    log = out + err
    assert "Continuing the interrupted sweep" in log and "Resuming the interrupted job" in log
    assert "finished before the sweep was interrupted" in log and "finetune: resuming after epoch" in log
    (again,) = mlflow_runs(outputs, **{"medprune.kind": "sweep"})  # the same parent, not a second one
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED" and again.info.end_time
    jobs = mlflow_runs(outputs, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(r.data.params["prune.ratio"] for r in jobs) == ["0.3", "0.5"]  # every job once
    assert all(r.info.status == "FINISHED" for r in jobs)
    (resumed,) = [r for r in jobs if r.data.params["prune.ratio"] == "0.5"]
    assert resumed.data.tags["medprune.resumed"] == "1"
    assert (first_folder / "state.json").stat().st_mtime_ns == written  # the finished job's folder untouched
    assert not list(outputs.glob("jobs/*.json")) and not list(outputs.glob("sweeps/*.json"))


# -- a full disk ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_resumes(tmp_path, monkeypatch):
    import models.io
    from safetensors import SafetensorError

    outputs = tmp_path / "out"
    args = [*TINY, "finetune.epochs=3"]
    real = models.io.save_file

    def full(state, path, metadata=None):
        if "final/checkpoint" in str(path) and "epoch-00002" in str(path):  # the second fine-tuning checkpoint
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        return real(state, path, metadata=metadata)

    monkeypatch.setattr(models.io, "save_file", full)
    out = run_pipeline(outputs, *args, ok=False)
    (line,) = error_lines(out)
    assert line.startswith("medprune: storage error: no space left on device while writing ") and "final/checkpoint" in line
    assert "rerun the same command to resume" in line and "Traceback" not in out
    monkeypatch.setattr(models.io, "save_file", real)
    out = run_pipeline(outputs, *args)
    assert "Resuming the interrupted job" in out and "finetune: resuming after epoch 1" in out
    (r,) = mlflow_runs(outputs)
    assert r.info.status == "FINISHED" and r.data.tags["medprune.resumed"] == "1"


# -- the UI and resumed runs ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_reopened_run_is_running_without_the_end_time_of_its_kill(tmp_path):
    uri = tracking.default_uri(tmp_path)
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.get_or_create_experiment(client, "e", uri)).info.run_id
    client.set_terminated(run_id, "KILLED")
    assert client.get_run(run_id).info.end_time
    tracking.reopen_run(client, client.get_run(run_id), tracking.owner_tags())
    reopened = client.get_run(run_id)
    assert reopened.info.status == "RUNNING" and reopened.info.end_time is None
    assert reopened.data.tags["medprune.resumed"] == "1" and reopened.data.tags["medprune.pid"] == str(os.getpid())


def _group_of(pid: int) -> list[int]:
    """The processes whose process group is `pid`'s (the server's workers with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_sigterm_to_the_ui_stops_its_mlflow_server_and_workers(tmp_path):
    import socket

    from helpers import ROOT, pipeline_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tracking", "ui", "--port", str(port), "--uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=ROOT, env=pipeline_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "MLflow UI for" in proc.stdout.readline()  # printed once the server answers /health
        (server,) = _children(proc.pid)
        assert len(_group_of(server)) >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        deadline = time.time() + 30
        while time.time() < deadline and _group_of(server):
            time.sleep(0.2)
        assert _group_of(server) == [], "the mlflow server (or a worker) outlived the UI command"
    finally:
        if proc.poll() is None:
            proc.kill()
