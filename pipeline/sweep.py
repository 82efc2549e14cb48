"""One MLflow parent run per Hydra multirun (a Hydra callback), its jobs nested under it.

`on_multirun_start` opens the parent run in the sweep's experiment (tags `medprune.kind=sweep`,
`medprune.sweep_id`, the overrides the user typed, the sweep's parameters) and writes
`<sweep dir>/.medprune_sweep.json`. Every job finds that file through its own Hydra sweep dir, which
works for the basic, joblib and submitit launchers alike (on SLURM the sweep dir is on the shared file
system and the jobs log to a tracking server), and tags its run `mlflow.parentRunId` and
`medprune.sweep_id`. `on_multirun_end` counts the jobs by status, logs the sweep's report (table, CSV,
LaTeX, Pareto plots) onto the parent as artifacts with its headline metrics, and ends the parent run.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from data.files import atomic_write
from pipeline.tracking import KIND_TAG, SWEEP_FILE, SWEEP_TAG, sweep_children, sweep_of

log = logging.getLogger(__name__)


def _sweep_params(config: DictConfig) -> dict[str, str]:
    """The sweep as the user gave it: the command line's overrides and the sweeper's params (presets)."""
    task = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params")
    sweeper = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})
    return {"sweep.overrides": json.dumps(task), "sweep.params": json.dumps(sweeper)}


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.entities import Param

        from pipeline.tracking import client_for, get_or_create_experiment, git_tags, owner_tags, resolve_uri

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri = resolve_uri(config.tracking.uri, Path(config.paths.outputs))
        client = client_for(uri)
        experiment = str(config.tracking.experiment)
        sweep_id = uuid.uuid4().hex[:12]
        paper = OmegaConf.to_container(config.paper, resolve=True) if config.get("paper") is not None else None
        tags = {KIND_TAG: "sweep", SWEEP_TAG: sweep_id, "medprune.sweep_dir": str(sweep_dir), **git_tags(), **owner_tags(),
                "mlflow.note.content": f"Hydra multirun {' '.join(config.hydra.overrides.task)} ({sweep_dir})"}
        run = client.create_run(get_or_create_experiment(client, experiment, uri), run_name=f"sweep-{sweep_dir.name}",
                                tags=tags)
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in _sweep_params(config).items()])
        info = {"parent_run_id": run.info.run_id, "sweep_id": sweep_id, "uri": uri, "experiment": experiment, "paper": paper}
        atomic_write(sweep_dir / SWEEP_FILE, json.dumps(info, indent=1) + "\n")
        client.log_artifact(run.info.run_id, str(sweep_dir / SWEEP_FILE), "sweep")
        log.info("Sweep %s: parent MLflow run %s in experiment %s", sweep_id, run.info.run_id, experiment)

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
        client.log_batch(parent.info.run_id, params=[Param(k, str(v)) for k, v in summary.items()])
        try:
            report_sweep(client, parent, Path(config.paths.outputs) / "reports" / info["sweep_id"])
        except ReportError as err:  # a sweep that cannot be tabulated still ends; the log says why
            log.warning("no report for sweep %s: %s", info["sweep_id"], err)
        status = "FINISHED" if counts["FINISHED"] == len(children) and children else "FAILED"
        client.set_terminated(parent.info.run_id, status)
        log.info("Sweep %s: %d jobs (%d finished, %d failed); parent run %s %s", info["sweep_id"], len(children),
                 counts["FINISHED"], counts["FAILED"], parent.info.run_id, status)
