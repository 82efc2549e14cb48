"""MLflow tracking: one run per job, a fixed local store by default, FAILED on any error.

MLflow 3 would otherwise put `mlflow.db` in the working directory and artifacts relative to it, so the
store and the artifact root are both set explicitly: `tracking.uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///<outputs>/mlflow.db` with artifacts in `<outputs>/mlartifacts`.

`python -m pipeline.tracking ui` (`make ui`) serves the MLflow UI on 127.0.0.1 against that store.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.paths import outputs_dir

log = logging.getLogger(__name__)


def default_uri(outputs: Path | None = None) -> str:
    return f"sqlite:///{(outputs or outputs_dir()) / 'mlflow.db'}"


def resolve_uri(configured: str | None, outputs: Path | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(outputs)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) shared by every process on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time; parallel jobs retry a write that met "database is locked"."""
    delay = 0.2
    for attempt in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MLflow wraps the sqlite error in its own exception types
            if "database is locked" not in str(err) or attempt == 11:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


_PARAM_KEY = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a param name


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat `a.b.c` params (lists as JSON), so the MLflow compare view can use them.

    A mapping with keys MLflow cannot take as names (glob patterns like `encoder.*`) stays one JSON param."""
    out: dict[str, str] = {}
    if isinstance(node, Mapping) and not all(_PARAM_KEY.match(str(k)) for k in node):
        out[prefix[:-1]] = json.dumps(dict(node))
    elif isinstance(node, Mapping):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(node, (list, tuple)):
        out[prefix[:-1]] = json.dumps(list(node))
    else:
        out[prefix[:-1]] = "null" if node is None else str(node)
    return out


class Tracker:
    """Thin wrapper around one MLflow run (explicit run id, no global active run)."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str, experiment: str):
        self.client, self.run_id, self.uri, self.experiment = client, run_id, uri, experiment

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            _retry(self.client.log_batch, self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Creates the experiment with an explicit artifact root beside a SQLite store (under a lock)."""
    db = _sqlite_path(uri)
    lock = (db.parent if db else outputs_dir()) / ".mlflow.lock"
    with file_lock(lock):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (db.parent / "mlartifacts" / name).as_uri() if db else None
        # The UI then opens on the runs table (model training), not on the GenAI trace overview.
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})


def client_for(uri: str) -> MlflowClient:
    db = _sqlite_path(uri)
    if db:
        db.parent.mkdir(parents=True, exist_ok=True)
        # The first connection creates the schema (migrations); one process at a time.
        with file_lock(db.parent / ".mlflow.lock"):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        return client
    return MlflowClient(tracking_uri=uri)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, Any]) -> Iterator[Tracker]:
    """Yields a Tracker; the run ends FINISHED, or FAILED (KILLED on Ctrl-C) if the body raises.

    SIGTERM (a scheduler's time limit, a killed sweep) becomes SystemExit, so the run is still closed
    as FAILED instead of being left RUNNING.
    """
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    run = _retry(client.create_run, experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    tracker = Tracker(client, run.info.run_id, uri, experiment)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _retry(client.set_terminated, run.info.run_id, status)


def start_server(uri: str, port: int, artifacts: Path | None = None, timeout: float = 120) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 (its own process group), returned once /health answers."""
    import urllib.request

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--default-artifact-root", str(artifacts)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} (port {port} taken?)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer on port {port} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def ui(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking ui", description=__doc__)
    parser.add_argument("command", choices=["ui", "uri"])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri)
    if args.command == "uri":
        print(uri)
        return 0
    client_for(uri)  # create the store if it does not exist yet, so the UI has something to open
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}", flush=True)
    return subprocess.call(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    )


if __name__ == "__main__":
    sys.exit(ui())
