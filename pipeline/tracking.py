"""MLflow tracking: one run per job, a fixed local store by default, FAILED on any error.

MLflow 3 would otherwise put `mlflow.db` in the working directory and artifacts relative to it, so the
store and the artifact root are both set explicitly: `tracking.uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///<outputs>/mlflow.db` with artifacts in `<outputs>/mlartifacts`.

`python -m pipeline.tracking ui` (`make ui`) serves the MLflow UI on 127.0.0.1 against that store.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from data.files import file_lock
from pipeline.paths import outputs_dir

log = logging.getLogger(__name__)


def default_uri(outputs: Path | None = None) -> str:
    return f"sqlite:///{(outputs or outputs_dir()) / 'mlflow.db'}"


def resolve_uri(configured: str | None, outputs: Path | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(outputs)


UI_PORT = 5000  # `make ui` (python -m pipeline.tracking ui --port)
EXPERIMENT_KIND = "mlflow.experimentKind"  # an experiment tag MLflow's UI reads
CLASSIC_KIND = "custom_model_development"  # its value for the UI's classic ML pages (runs, charts, compare)
CLASSIC_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens in its GenAI mode; this query opens the classic one


def where_to_look(tracker: "Tracker") -> str:
    """Where a finished run is seen: its page on a tracking server (http[s] URI), else `make ui` on this
    machine's store."""
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}?{CLASSIC_VIEW}"
    return f"make ui  (http://127.0.0.1:{UI_PORT}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}?{CLASSIC_VIEW})"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class Terminated(SystemExit):
    """SIGTERM (a scheduler's time limit, `kill`, a cancelled sweep) turned into an exception, so the
    run is closed as KILLED and the job exits with one line instead of vanishing RUNNING."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# A SIGTERM that arrives while an MLflow write is under way is held until the write has finished:
# interrupting SQLAlchemy mid-transaction leaves the SQLite file locked for the final status update.
_writes = {"depth": 0, "pending": None}


def _on_sigterm(signum, frame):
    if _writes["depth"]:
        _writes["pending"] = signum
        return
    raise Terminated(signum)


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time; parallel jobs retry a write that met "database is locked"."""
    delay = 0.2
    _writes["depth"] += 1
    try:
        for attempt in range(12):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow wraps the sqlite error in its own exception types
                # "locked": another writer holds SQLite; "UNIQUE constraint": a parallel job inserted the same
                # row (a dataset input) first, and the retry finds and reuses it
                if not any(m in str(err) for m in ("database is locked", "UNIQUE constraint failed")) or attempt == 11:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        _writes["depth"] -= 1
        pending = _writes["pending"]
        if pending is not None and _writes["depth"] == 0:
            _writes["pending"] = None
            raise Terminated(pending)


# -- sweeps (pipeline/sweep.py opens them; jobs and reports find them) ----------------------------------

SWEEP_FILE = ".medprune_sweep.json"  # in a multirun's folder: its parent run, sweep id, store, paper block
KIND_TAG = "medprune.kind"  # "sweep" on a sweep's parent run
SWEEP_TAG = "medprune.sweep_id"
PARENT_TAG = "mlflow.parentRunId"


def sweep_of(sweep_dir: Path) -> dict[str, Any] | None:
    """The parent run of the multirun whose folder is `sweep_dir`, if one was opened."""
    try:
        return json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None


def sweep_children(client: MlflowClient, parent) -> list:
    """The job runs of the sweep whose parent run is `parent` (every status)."""
    sweep_id = parent.data.tags[SWEEP_TAG]
    found = client.search_runs([parent.info.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}'", max_results=5000)
    return [r for r in found if r.info.run_id != parent.info.run_id]


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


# What a job logs as MLflow metrics: what a user compares across runs (about 25 per job, so that the UI's
# runs table, compare view and charts show the trade-off). Per network (<network>/<result>): its quality
# (a BraTS network's Dice per region too: dice_WT ...) and its cost; and the training curves. Every other
# result (measurement diagnostics: runs, CV, settled, peak, load; secondary scores) goes into the run's
# results.json artifact, which `pipeline.report` reads for a column that is not a metric, and every curve
# is in the history.csv beside its model.
COMPARED = ("dice", "iou", "hd95", "flops_g", "params_m", "size_mb", "latency_ms")
CURVES = ("train/loss", "train/val_dice", "finetune/loss", "finetune/val_dice")
RESULTS_FILE = "results.json"


def is_compared(key: str) -> bool:
    """Whether a result (<prefix>/<name>) is an MLflow metric of the job (COMPARED, CURVES, a region's Dice)."""
    from pipeline.precision import REDUCED

    prefix, _, name = key.partition("/")
    region = name.startswith("dice_") and name[len("dice_"):] not in ("orig", "3d", *REDUCED)  # dice_WT, not dice_bf16
    return key in CURVES or ("/" not in name and (name in COMPARED or region))


class Tracker:
    """Thin wrapper around one MLflow run (explicit run id, no global active run)."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str, experiment: str, experiment_id: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.experiment, self.experiment_id = experiment, experiment_id  # its name, and its id (UI pages, logged models)
        self._results: dict[str, float] | None = None  # results.json as logged so far (read back on a resumed run)

    def log_results(self, results: Mapping[str, float | str], compared: Callable[[str], bool] = is_compared) -> None:
        """A job's results: all into the run's results.json artifact, those a user compares (`compared`, by default
        `is_compared`) also as MLflow metrics."""
        if self._results is None:
            self._results = self.read_results(self.client, self.run_id)
        self._results.update({k: v if isinstance(v, str) else float(v) for k, v in results.items()})  # a form's name too
        self.log_metrics({k: v for k, v in results.items() if compared(k) and not isinstance(v, str)})
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / RESULTS_FILE
            path.write_text(json.dumps(dict(sorted(self._results.items())), indent=1) + "\n")
            _retry(self.client.log_artifact, self.run_id, str(path))

    def log_curve(self, points: Mapping[str, float], step: int) -> None:
        """One step of a training curve: the compared curves (CURVES) as MLflow metrics; the others are in the
        history.csv beside the model."""
        self.log_metrics({k: v for k, v in points.items() if k in CURVES}, step)

    @staticmethod
    def read_results(client: MlflowClient, run_id: str) -> dict[str, float | str]:
        """A run's results.json ({} where it has none: a run logged before it existed holds them as metrics)."""
        import tempfile

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, RESULTS_FILE, tmp)
            except (MlflowException, OSError):
                return {}
            return json.loads(Path(path).read_text())

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

    def log_datasets(self, name: str, root: str, splits: Mapping[str, list], content: str) -> None:
        """The data as MLflow dataset inputs, one per split (context = the split): the UI's Dataset column,
        and `search_runs` by dataset. The digest is of the split's case ids and the data's content."""
        import hashlib

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for split, ids in splits.items():
            digest = hashlib.sha256(json.dumps([content, sorted(ids)]).encode()).hexdigest()[:16]
            dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": root, "split": split}),
                              profile=json.dumps({"cases": len(ids)}))
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", split)]))
        _retry(self.client.log_inputs, self.run_id, datasets=inputs)

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
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: CLASSIC_KIND})


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


# -- which process owns a run: ended KILLED by the next job when its process is gone ----------------


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def git_tags() -> dict[str, str]:
    """Where the code came from: the MLflow source tags (user, entry point, git commit) and whether the
    checkout had uncommitted changes (`medprune.git_dirty`)."""
    import getpass

    from pipeline.paths import PROJECT_ROOT

    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "medprune"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags["medprune.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    return tags


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {"medprune.host": socket.gethostname(), "medprune.pid": str(pid), "medprune.pid_start": _proc_start(pid) or ""}


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _proc_start(pid)
    return not (start and now is not None and now != start)


def end_dead_runs(client: MlflowClient) -> list[str]:
    """Ends as KILLED (with an end time) every run of this store left RUNNING by a process of this host
    that no longer exists (SIGKILL, a crashed node, a power cut); returns their ids."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(
        experiments, filter_string=f"attributes.status = 'RUNNING' and tags.`medprune.host` = '{host}'", max_results=5000
    )
    ended = []
    for run in running:
        tags = run.data.tags
        try:
            pid = int(tags.get("medprune.pid", ""))
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid, tags.get("medprune.pid_start", "")):
            continue
        _retry(client.set_terminated, run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %d on %s, which is gone: marked KILLED",
                    run.info.run_id, run.info.run_name, pid, host)
        ended.append(run.info.run_id)
    return ended


def reopen_run(client: MlflowClient, run, tags: Mapping[str, str]) -> None:
    """A run continued after a kill (a resumed job, a resumed sweep's parent): this process's tags (owner pid)
    first, so that `end_dead_runs` leaves it alone, `medprune.resumed` counted up, RUNNING again, without the
    end time of its KILLED marking."""
    resumed = int(run.data.tags.get("medprune.resumed", "0")) + 1
    _retry(client.log_batch, run.info.run_id, tags=[RunTag(k, str(v)) for k, v in {**tags, "medprune.resumed": str(resumed)}.items()])
    _retry(client.update_run, run.info.run_id, status="RUNNING")
    _retry(_clear_end_time, client, run.info.run_id)


def _clear_end_time(client: MlflowClient, run_id: str) -> None:
    """MLflow's API can set a run's end time but not unset it (`update_run` keeps the old one). A SQL store
    (SQLite, PostgreSQL, ...) is updated directly; through a tracking server the end time stays until the run
    ends again (MLflow 3.17, pinned)."""
    from mlflow.store.tracking.dbmodels.models import SqlRun
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    if not isinstance(store, SqlAlchemyStore):
        return
    with store.ManagedSessionMaker(read_only=False) as session:
        session.query(SqlRun).filter(SqlRun.run_uuid == run_id).update({"end_time": None})


@contextmanager
def start_run(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, Any], resume_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Tracker]:
    """Yields a Tracker; the run ends FINISHED, FAILED if the body raises, KILLED on SIGTERM or Ctrl-C.

    Runs of this store that a dead process of this host left RUNNING are ended as KILLED first.
    `resume_run_id` reopens that run (an interrupted job continued by `pipeline.journal`) instead of
    creating one.
    """
    client = client_for(uri)
    end_dead_runs(client)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    tags = {**git_tags(), **{k: str(v) for k, v in tags.items()}, **owner_tags()}
    run = None
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as err:  # deleted, or another store: start a new run instead
            log.warning("cannot continue MLflow run %s (%s): starting a new run", resume_run_id, err)
    if run is not None:
        reopen_run(client, run, tags)
    else:
        run = _retry(client.create_run, experiment_id, run_name=run_name, tags=tags)
    tracker = Tracker(client, run.info.run_id, uri, experiment, run.info.experiment_id)
    monitor = None
    if system_metrics:  # CPU, memory, disk, network (and GPU) as system/* metrics, sampled every 10 s
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.info.run_id, resume_logging=resume_run_id is not None, tracking_uri=uri)
        monitor.start()
    status = "FAILED"
    try:
        with terminate_on_sigterm():
            yield tracker
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        try:
            _retry(client.set_terminated, run.info.run_id, status)
        except Exception as err:  # the job's own error matters more; the next job ends the run as KILLED
            log.error("could not mark MLflow run %s %s (%s: %s)", run.info.run_id, status, type(err).__name__, err)


def _die_with_parent() -> None:
    """In the server's process (before exec): SIGTERM when the process that started it dies, however it dies
    (Linux's PR_SET_PDEATHSIG), so a killed `make ui` leaves no server behind. Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def start_server(uri: str, port: int, artifacts: Path | None = None, timeout: float = 120) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 (its own process group), returned once /health answers. It serves the
    artifacts itself (`--serve-artifacts`, kept in `artifacts`): an experiment created through it stores them at
    `mlflow-artifacts:/...`, which clients upload to and download from over HTTP, as a team's server does."""
    import urllib.request

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--serve-artifacts"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)
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


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's whole process group (its workers too, even once the server itself is gone),
    SIGKILL to whatever is left after `grace` seconds."""
    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            break
        os.killpg(proc.pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and (proc.poll() is None or alive()):
            time.sleep(0.1)
    proc.wait(timeout=10)


def ui(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking ui", description=__doc__)
    parser.add_argument("command", choices=["ui", "uri"])
    parser.add_argument("--port", type=int, default=UI_PORT)
    parser.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.uri)
    if args.command == "uri":
        print(uri)
        return 0
    client = client_for(uri)  # create the store if it does not exist yet, so the UI has something to open
    for experiment in client.search_experiments():  # the UI opens an experiment of no kind on its GenAI pages
        if EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, CLASSIC_KIND)
    db = _sqlite_path(uri)
    proc = start_server(uri, args.port, (db.parent / "mlartifacts") if db else None)  # one worker; waits for /health
    print(f"MLflow UI for {uri}: http://127.0.0.1:{args.port}/#/experiments?{CLASSIC_VIEW}  (Ctrl-C stops it)", flush=True)
    try:
        with terminate_on_sigterm():  # `kill`, or make forwarding a SIGTERM: the server and its workers go too
            return proc.wait()
    except (KeyboardInterrupt, Terminated):
        return 0
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(ui())
