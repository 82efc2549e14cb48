"""Baseline reuse: a trained baseline is keyed by what determines it, and found again by that key.

The key hashes what changes the trained weights: the data's content (`content_digest`: each split's
case ids, every file's path relative to the dataset root and its size), the dataset settings except
those that only serve the data (`SERVING_KEYS`: root, workers, cache folder, evaluation-only slice
sampling), the model settings, the train settings except `TRAIN_SERVING_KEYS`, the optimizer, lr
scheduler and loss, and the seed. So a moved
or copied dataset or outputs folder reuses its baselines, and every job of a sweep over pruning
settings shares one (`outputs/baselines/<key>/`); a file lock makes a second concurrent job with the
same key wait for the first instead of training it again.

Every cached model is verified (sha256 recorded in its model.json) before it is reused: a damaged
entry is moved aside as `<key>.corrupt-<time>` and trained again.

`baseline=<ref>` starts from an earlier run instead: a model folder, a run folder (its state.json), or
an MLflow run id (its run folder if it is on this machine, else its logged baseline artifact); a
damaged model there is an error naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from data.files import move_aside
from models.io import ModelFileError, read_json, verify_model
from pipeline.state import RunState

log = logging.getLogger(__name__)

MODEL_FILES = ("model.json", "model.safetensors")
BASELINE_META = "baseline.json"
# Train keys that do not change the trained weights (threads: at most in the last float bits, from the order
# of parallel sums; a cached baseline stays valid on a machine with other cores).
TRAIN_SERVING_KEYS = ("num_workers", "checkpoint_every", "threads")


class BaselineError(RuntimeError):
    """A baseline reference that cannot be used."""


def baseline_key(cfg, data) -> str:
    """The cache key of the baseline this job's settings and data would train (see the module doc)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    serving = set(type(data).SERVING_KEYS)
    train = OmegaConf.to_container(cfg.train, resolve=True)
    parts = {
        "dataset": {k: v for k, v in dataset.items() if k not in serving},
        "content": data.content_digest(),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": {k: v for k, v in train.items() if k not in TRAIN_SERVING_KEYS},
        "recipe": {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("optimizer", "scheduler", "loss")},
        "seed": int(cfg.seed),
    }
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(outputs: Path, key: str) -> Path:
    return Path(outputs) / "baselines" / key


def cached(outputs: Path, key: str) -> dict | None:
    """The cached baseline's metadata once its model is verified, or None when no usable baseline has
    this key. A damaged entry (weights or json not as written) is moved aside, with a warning."""
    return verified_entry(cache_dir(outputs, key), BASELINE_META, "baseline")


def verified_entry(folder: Path, meta_file: str, what: str) -> dict | None:
    """A cached model folder's metadata (`meta_file`) once the model is verified; None when there is none. A damaged
    entry is moved aside as `<folder>.corrupt-<time>`, with a warning, so it is trained again."""
    if not (folder / meta_file).exists():
        return None
    try:
        meta = read_json(folder / meta_file, f"{what} cache file")
        verify_model(folder)
        return meta
    except ModelFileError as err:
        aside = move_aside(folder, "corrupt")
        log.warning("The cached %s %s is damaged (%s): moved it to %s; it will be trained again", what, folder.name, err, aside)
        return None


def is_model_dir(path: Path) -> bool:
    return all((path / f).exists() for f in MODEL_FILES)


def _checked(path: Path, ref: str) -> Path:
    try:
        verify_model(path)
    except ModelFileError as err:
        raise BaselineError(f"baseline={ref}: {err}") from err
    return path


def _from_run_dir(run_dir: Path, ref: str) -> RunState:
    state = RunState.load(run_dir)
    if not state.baseline or not is_model_dir(Path(state.baseline)):
        raise BaselineError(f"run folder {run_dir} has no usable baseline model (state.json: baseline={state.baseline})")
    _checked(Path(state.baseline), ref)
    return RunState(**{**state.__dict__, "metrics": {}, "done": []})


def resolve(ref: str, uri: str, download_to: Path) -> RunState:
    """A RunState seeded from `ref`; later stages then run on what it holds (the MLflow store is only
    opened when `ref` is not a path)."""
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if is_model_dir(path):
            _checked(path, ref)
            meta = json.loads((path / BASELINE_META).read_text()) if (path / BASELINE_META).exists() else {}
            return RunState(baseline=str(path), baseline_key=meta.get("key"), baseline_run_id=meta.get("run_id"))
        if (path / "state.json").exists():
            return _from_run_dir(path, ref)
        raise BaselineError(
            f"baseline={ref}: the folder holds neither a model ({', '.join(MODEL_FILES)}) nor a run's state.json"
        )
    return _from_mlflow(ref, uri, download_to)


def _from_mlflow(run_id: str, uri: str, download_to: Path) -> RunState:
    from pipeline.tracking import client_for

    client: MlflowClient = client_for(uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise BaselineError(
            f"baseline={run_id} is neither an existing path nor an MLflow run id in {uri} ({type(err).__name__})"
        ) from err
    tags = run.data.tags
    run_dir = Path(tags.get("medprune.run_dir", ""))
    if run_dir.is_dir() and (run_dir / "state.json").exists():
        log.info("baseline=%s: using that run's folder %s", run_id, run_dir)
        return _from_run_dir(run_dir, run_id)
    trained_by = tags.get("medprune.baseline_run_id", run_id)
    try:
        local = client.download_artifacts(trained_by, "baseline", str(download_to))
    except Exception as err:
        raise BaselineError(
            f"baseline={run_id}: its run folder is not on this machine and the run {trained_by} has no "
            f"'baseline' artifact to download ({type(err).__name__})"
        ) from err
    if not is_model_dir(Path(local)):
        raise BaselineError(f"baseline={run_id}: the downloaded 'baseline' artifact holds no model files")
    _checked(Path(local), run_id)
    return RunState(baseline=str(local), baseline_key=tags.get("medprune.baseline_key"), baseline_run_id=trained_by)
