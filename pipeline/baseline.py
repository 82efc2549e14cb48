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

The cache is this machine's; the MLflow store may be another (a team's tracking server). So each cached
baseline remembers which run holds it on each store it was used with (`stores.json`: store URI -> run
id), and a job tags the run on its own store: the one that trained the baseline or logged it there. A
cached baseline that no run of the store in use holds is logged there by the job that reuses it (its
`baseline` artifact, metrics and logged model); a key this machine has not trained is first looked for on
the store (a run tagged `medprune.baseline_holder` with that key, FINISHED: another machine's job) and
downloaded into the cache, verified, instead of being trained again.

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
STORES = ".stores.json"  # <key>.stores.json beside a cached baseline: store URI -> the run holding it there
HOLDER_TAG = "medprune.baseline_holder"  # "true" on the run whose `baseline` artifact is the baseline of its key
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


def _exists(client: MlflowClient, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def holder_on_store(folder: Path, meta: dict, client: MlflowClient, uri: str) -> str | None:
    """The run that holds the cached baseline in `folder` on the store `uri` (it trained or logged it there),
    or None when no run of that store does."""
    stores = _stores(folder)
    for run_id in (stores.get(uri), meta.get("run_id")):  # a cache written before stores.json: its trainer's run
        if _exists(client, run_id):
            return run_id
    return None


def _stores(folder: Path) -> dict[str, str]:
    """Beside the entry, not in it: the entry is what a holder logs as its `baseline` artifact."""
    path = folder.parent / f"{folder.name}{STORES}"
    try:
        stores = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in stores.items()} if isinstance(stores, dict) else {}


def record_holder(folder: Path, uri: str, run_id: str, fresh: bool = False) -> None:
    """Remembers that `run_id` holds the cached baseline in `folder` on the store `uri`; `fresh`: the entry was
    just written (trained, downloaded), so no other store's run holds these weights (call with the key's lock)."""
    from data.files import atomic_write

    stores = {} if fresh else _stores(folder)
    atomic_write(folder.parent / f"{folder.name}{STORES}", json.dumps({**stores, uri: run_id}, indent=2, sort_keys=True))


def download_from_store(client: MlflowClient, key: str, target: Path) -> str | None:
    """The baseline of `key` from the store (the first FINISHED run that holds it), verified, as the cache
    entry `target`; returns that run's id, or None when the store has none (call with the key's lock)."""
    import shutil
    import tempfile

    from data.files import atomic_folder

    query = f"tags.`medprune.baseline_key` = '{key}' and tags.`{HOLDER_TAG}` = 'true' and attributes.status = 'FINISHED'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, query, order_by=["attributes.start_time ASC"], max_results=1) if experiments else []
    if not found:
        return None
    run_id = found[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, "baseline", tmp))
            verify_model(local)
            meta = read_json(local / BASELINE_META, "baseline cache file")
        except Exception as err:  # a run whose artifact is missing or damaged: trained here instead
            log.warning("The baseline %s of run %s on the store cannot be used (%s: %s): it is trained here", key,
                        run_id, type(err).__name__, err)
            return None
        if meta.get("key") != key:
            log.warning("Run %s holds the baseline %s, not %s: it is trained here", run_id, meta.get("key"), key)
            return None
        with atomic_folder(target) as folder:
            shutil.copytree(local, folder, dirs_exist_ok=True)
    log.info("Baseline %s found on the store (run %s): downloaded to %s", key, run_id, target)
    return run_id


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
