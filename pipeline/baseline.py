"""Baseline reuse: a trained baseline is keyed by what determines it, and found again by that key.

The key hashes the resolved dataset, model and train settings and the seed, so every job of a sweep
over pruning settings shares one baseline (`outputs/baselines/<key>/`); a file lock makes a second
concurrent job with the same key wait for the first instead of training it again.

`baseline=<ref>` starts from an earlier run instead: a model folder, a run folder (its state.json), or
an MLflow run id (its run folder if it is on this machine, else its logged baseline artifact).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.state import Context, RunState

log = logging.getLogger(__name__)

MODEL_FILES = ("model.json", "model.safetensors")
BASELINE_META = "baseline.json"


class BaselineError(RuntimeError):
    """A baseline reference that cannot be used."""


def baseline_key(cfg) -> str:
    parts = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("dataset", "model", "train")}
    parts["seed"] = int(cfg.seed)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(outputs: Path, key: str) -> Path:
    return Path(outputs) / "baselines" / key


def cached(outputs: Path, key: str) -> dict | None:
    """The cached baseline's metadata, or None when no finished baseline has this key."""
    meta = cache_dir(outputs, key) / BASELINE_META
    return json.loads(meta.read_text()) if meta.exists() else None


def is_model_dir(path: Path) -> bool:
    return all((path / f).exists() for f in MODEL_FILES)


def _from_run_dir(run_dir: Path) -> RunState:
    state = RunState.load(run_dir)
    if not state.baseline or not is_model_dir(Path(state.baseline)):
        raise BaselineError(f"run folder {run_dir} has no usable baseline model (state.json: baseline={state.baseline})")
    return RunState(**{**state.__dict__, "metrics": {}})


def resolve(ref: str, ctx: Context) -> RunState:
    """A RunState seeded from `ref`; later stages then run on what it holds."""
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if is_model_dir(path):
            meta = json.loads((path / BASELINE_META).read_text()) if (path / BASELINE_META).exists() else {}
            return RunState(baseline=str(path), baseline_key=meta.get("key"), baseline_run_id=meta.get("run_id"))
        if (path / "state.json").exists():
            return _from_run_dir(path)
        raise BaselineError(
            f"baseline={ref}: the folder holds neither a model ({', '.join(MODEL_FILES)}) nor a run's state.json"
        )
    return _from_mlflow(ref, ctx)


def _from_mlflow(run_id: str, ctx: Context) -> RunState:
    client: MlflowClient = ctx.tracker.client
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise BaselineError(
            f"baseline={run_id} is neither an existing path nor an MLflow run id in {ctx.tracker.uri} ({err})"
        ) from err
    tags = run.data.tags
    run_dir = Path(tags.get("medprune.run_dir", ""))
    if run_dir.is_dir() and (run_dir / "state.json").exists():
        log.info("baseline=%s: using that run's folder %s", run_id, run_dir)
        return _from_run_dir(run_dir)
    trained_by = tags.get("medprune.baseline_run_id", run_id)
    target = ctx.run_dir / "baseline_download"
    try:
        local = client.download_artifacts(trained_by, "baseline", str(target))
    except Exception as err:
        raise BaselineError(
            f"baseline={run_id}: its run folder is not on this machine and the run {trained_by} has no "
            f"'baseline' artifact to download ({err})"
        ) from err
    if not is_model_dir(Path(local)):
        raise BaselineError(f"baseline={run_id}: the downloaded 'baseline' artifact holds no model files")
    return RunState(baseline=str(local), baseline_key=tags.get("medprune.baseline_key"), baseline_run_id=trained_by)
