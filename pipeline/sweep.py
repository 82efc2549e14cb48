"""One MLflow parent run per Hydra multirun (a Hydra callback), its jobs nested under it.

`on_multirun_start` opens the parent run in the sweep's experiment (tags `medprune.kind=sweep`,
`medprune.sweep_id`, the overrides the user typed, the sweep's parameters) and writes
`<sweep dir>/.medprune_sweep.json`. A sweep that was killed (its journal entry, pipeline/journal.py, is left)
is continued by the same command instead: the same parent run, reopened, and the same sweep id, so each job
that finished in it is skipped (`finished_job`, by its job key) and the killed one resumes through its own
journal entry; the parent then ends FINISHED with every job once. Every job finds that file through its own Hydra sweep dir, which
works for the basic, joblib and submitit launchers alike (on SLURM the sweep dir is on the shared file
system and the jobs log to a tracking server), and tags its run `mlflow.parentRunId` and
`medprune.sweep_id`. `on_multirun_end` counts the jobs by status, logs the sweep's report (table, CSV,
LaTeX, Pareto plots) onto the parent as artifacts with its headline metrics, and ends the parent run.
"""
from __future__ import annotations

import atexit
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from data.files import atomic_write
from pipeline.journal import JOB_KEY_TAG, Journal, sweep_key
from pipeline.search import STUDY_TAG, SearchError, preflight, settings_of
from pipeline.tracking import KIND_TAG, SWEEP_FILE, SWEEP_TAG, sweep_children, sweep_of

log = logging.getLogger(__name__)


def _sweep_params(config: DictConfig) -> dict[str, str]:
    """The sweep as the user gave it: the command line's overrides and the sweeper's params (presets)."""
    task = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params")
    sweeper = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})
    return {"sweep.overrides": json.dumps(task), "sweep.params": json.dumps(sweeper)}


def finished_job(sweep: dict, key: str) -> Optional[Any]:
    """The FINISHED run of the job with this key in `sweep` (its SWEEP_FILE info) when the sweep was continued
    after a kill: that job is skipped, not run again."""
    if not sweep.get("resumed"):
        return None
    from pipeline.tracking import client_for

    client = client_for(sweep["uri"])
    parent = client.get_run(sweep["parent_run_id"])
    done = [r for r in sweep_children(client, parent) if r.data.tags.get(JOB_KEY_TAG) == key and r.info.status == "FINISHED"]
    return done[0] if done else None


# How the sweep of this process ended, when it did not reach on_multirun_end (pipeline.run.main sets it before
# it exits on a user error or a signal): the parent run is closed with it rather than left RUNNING.
ENDING = {"status": "FAILED"}


class SweepCallback(Callback):
    def __init__(self) -> None:
        self._journal: Optional[Journal] = None
        self._open: Optional[tuple[str, str]] = None  # (store uri, parent run id) until the sweep ends

    def __getstate__(self) -> dict:
        """The joblib and submitit launchers pickle the callbacks with each job: the sweep's journal (its lock)
        and open parent run stay with the process that started the sweep."""
        return {}

    def __setstate__(self, state: dict) -> None:
        from pipeline import shell

        shell.start()  # a launcher's job process (joblib, submitit) unpickles this first: it starts up as the entry did
        self.__init__()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.entities import Param

        from pipeline.tracking import client_for, get_or_create_experiment, git_tags, owner_tags, reopen_run, resolve_uri

        ENDING["status"] = "FAILED"
        if settings_of(config.hydra) is not None:  # a search: its settings, before a parent run is opened
            try:
                preflight(config)
            except SearchError as err:
                print(f"medprune: configuration error: {err}", file=sys.stderr)
                raise SystemExit(2)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        outputs = Path(config.paths.outputs)
        uri = resolve_uri(config.tracking.uri, outputs)
        client = client_for(uri)
        experiment = str(config.tracking.experiment)
        paper = OmegaConf.to_container(config.paper, resolve=True) if config.get("paper") is not None else None
        self._journal = Journal(outputs, sweep_key(config), "sweeps") if config.resume else None
        entry = self._journal.read() if self._journal is not None and self._journal.claim() else None
        parent = self._interrupted(client, entry, uri) if entry else None
        if parent is not None:
            reopen_run(client, parent, {**owner_tags(), "medprune.sweep_dir": str(sweep_dir)})
            run_id, sweep_id = parent.info.run_id, entry["sweep_id"]
            log.info("Continuing the interrupted sweep %s (parent MLflow run %s): jobs that finished are skipped",
                     sweep_id, run_id)
        else:
            sweep_id = uuid.uuid4().hex[:12]
            tags = {KIND_TAG: "sweep", SWEEP_TAG: sweep_id, "medprune.sweep_dir": str(sweep_dir), **git_tags(), **owner_tags(),
                    "mlflow.note.content": f"Hydra multirun {' '.join(config.hydra.overrides.task)} ({sweep_dir})"}
            run = client.create_run(get_or_create_experiment(client, experiment, uri), run_name=f"sweep-{sweep_dir.name}",
                                    tags=tags)
            run_id = run.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in _sweep_params(config).items()])
        info = {"parent_run_id": run_id, "sweep_id": sweep_id, "uri": uri, "experiment": experiment, "paper": paper,
                "resumed": parent is not None}
        atomic_write(sweep_dir / SWEEP_FILE, json.dumps(info, indent=1) + "\n")
        if parent is None:
            client.log_artifact(run_id, str(sweep_dir / SWEEP_FILE), "sweep")
        if self._journal is not None:
            self._journal.write({"run_id": run_id, "sweep_id": sweep_id, "uri": uri})
        self._open = (uri, run_id)
        atexit.register(self._abandoned)
        log.info("Sweep %s: parent MLflow run %s in experiment %s", sweep_id, run_id, experiment)

    @staticmethod
    def _interrupted(client, entry: dict, uri: str):
        """The parent run of the interrupted sweep `entry` names, when it can be continued here."""
        if entry.get("uri") != uri or not isinstance(entry.get("sweep_id"), str):
            return None
        try:
            parent = client.get_run(entry["run_id"])
        except Exception as err:  # deleted, or another store
            log.warning("cannot continue sweep parent run %s (%s): starting a new sweep", entry["run_id"], err)
            return None
        if parent.info.status == "FINISHED" or parent.info.lifecycle_stage != "active":
            return None
        return parent

    def _abandoned(self) -> None:
        """At exit without on_multirun_end (a job's error or a signal stopped the sweep): the parent run is closed
        as pipeline.run.main said (KILLED on a signal, FAILED on an error), not left RUNNING; the journal entry
        stays, so the same command continues the sweep."""
        if self._open is None:
            return
        from pipeline.tracking import _retry, client_for

        uri, run_id = self._open
        self._open = None
        try:
            _retry(client_for(uri).set_terminated, run_id, ENDING["status"])
        except Exception as err:  # exiting anyway: the next job's end_dead_runs ends it
            log.error("could not close sweep parent run %s (%s)", run_id, err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.entities import Param

        from pipeline.report import ReportError, report_sweep
        from pipeline.tracking import client_for

        info = sweep_of(Path(config.hydra.sweep.dir))
        if info is None:
            return
        client = client_for(info["uri"])
        parent = client.get_run(info["parent_run_id"])
        children = sweep_children(client, parent)
        counts = {status: sum(r.info.status == status for r in children) for status in ("FINISHED", "FAILED", "KILLED")}
        summary = {"sweep.jobs": len(children), **{f"sweep.jobs_{s.lower()}": n for s, n in counts.items()}}
        try:
            client.log_batch(parent.info.run_id, params=[Param(k, str(v)) for k, v in summary.items()])
        except Exception as err:  # a continued sweep whose first attempt was killed after logging them
            log.warning("sweep %s: job counts not logged as params (%s)", info["sweep_id"], str(err).splitlines()[0])
        try:
            folder = Path(config.paths.outputs) / "reports" / info["sweep_id"]  # = report_sweep's default
            if STUDY_TAG in parent.data.tags:  # a search (pipeline/search.py): its study's Pareto front
                from pipeline.front import report_front

                report_front(client, parent, folder)
            else:
                report_sweep(client, parent, folder)
        except ReportError as err:  # a sweep that cannot be tabulated still ends; the log says why
            log.warning("no report for sweep %s: %s", info["sweep_id"], err)
        # a search ends FINISHED when it reached its budget: its failed trials were told Optuna, they are results
        searched = STUDY_TAG in parent.data.tags
        status = "FINISHED" if searched or (counts["FINISHED"] == len(children) and children) else "FAILED"
        client.set_terminated(parent.info.run_id, status)
        self._open = None
        if self._journal is not None:
            self._journal.close(finished=True)
        log.info("Sweep %s: %d jobs (%d finished, %d failed); parent run %s %s", info["sweep_id"], len(children),
                 counts["FINISHED"], counts["FAILED"], parent.info.run_id, status)
