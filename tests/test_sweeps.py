"""Sweeps as users launch them: parallel local jobs, a tracking server, paper presets and reports."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import TINY as HELPER_TINY
from helpers import mlflow_runs, pipeline_env, run_cli, run_pipeline
from pipeline.tracking import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
TINY = [*HELPER_TINY, "evaluate.mask_examples=0"]
pytestmark = pytest.mark.integration


def medprune(outputs: Path, *args: str, module: str = "pipeline.run") -> str:
    """In this process, except for the launchers that start jobs of their own (joblib, submitit): those run
    as users run them, from a shell."""
    if any(a.startswith("hydra/launcher=") for a in args):
        return run_cli(outputs, *args, module=module, timeout=900)
    return run_pipeline(outputs, *args, module=module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 against a SQLite store, for the length of a test."""

    def __init__(self, store: Path):
        store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(f"sqlite:///{store / 'server.db'}", self.port, store / "artifacts")

    def rest(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def rest_get(self, path: str, query: dict) -> dict:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{path}?{urlencode(query)}", timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        stop_server(self.proc)


@pytest.mark.slow  # make test covers parallel joblib jobs with tests/test_mlflow_native.py's 3-job sweep
def test_four_parallel_joblib_jobs_are_all_recorded_in_one_sqlite_store(tmp_path):
    out = medprune(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *TINY,
                   "prune.ratio=0.1,0.2,0.3,0.4")
    assert "database is locked" not in out
    runs = [r for r in mlflow_runs(tmp_path, "medprune") if r.data.tags.get("medprune.kind") != "sweep"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.params["prune.ratio"] for r in runs) == ["0.1", "0.2", "0.3", "0.4"]
    assert sorted(r.data.tags["medprune.baseline_reused"] for r in runs) == ["false", "true", "true", "true"]


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_four_parallel_jobs_repeatedly(tmp_path, attempt):
    test_four_parallel_joblib_jobs_are_all_recorded_in_one_sqlite_store(tmp_path)


@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_team_server_is_a_first_class_store_for_submitit_jobs_their_artifacts_and_the_baseline(tmp_path):
    """A real `mlflow server` on 127.0.0.1 serving its artifacts, and a two-job submitit sweep against it, after
    a job on this machine's own store trained the baseline into the local cache: the jobs nest under the sweep,
    upload their artifacts through the server (`mlflow-artifacts:`), tag a baseline run that exists on the
    server (the first job logs the cached baseline there), and print the server's run page. Then a job from
    another outputs folder (another machine: no cache) finds that baseline on the server instead of training."""
    medprune(tmp_path, *TINY, "prune.ratio=0.25")  # the local store: trains the baseline into outputs/baselines
    server = Server(tmp_path / "server")
    try:
        out = medprune(tmp_path, "-m", "hydra/launcher=submitit_local", f"tracking.uri={server.url}", *TINY,
                       "prune.ratio=0.25,0.5")
        exps = server.rest("experiments/search", {"max_results": 10})["experiments"]
        experiment = next(e for e in exps if e["name"] == "medprune")
        assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # uploaded through the server
        every = server.rest("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 10})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in every]
        (parent,) = [r for r, t in zip(every, tags) if t.get("medprune.kind") == "sweep"]
        found = [(r, t) for r, t in zip(every, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
        assert len(found) == 2 and parent["info"]["status"] == "FINISHED"  # the SLURM-style jobs nest under the sweep
        assert all(r["info"]["status"] == "FINISHED" for r, _ in found)
        ratios = sorted(p["value"] for r, _ in found for p in r["data"]["params"] if p["key"] == "prune.ratio")
        assert ratios == ["0.25", "0.5"]
        names = sorted(r["info"]["run_name"] for r, _ in found)
        assert names == ["unet_tiny-synthetic_isic-l1-r0.25-s0", "unet_tiny-synthetic_isic-l1-r0.5-s0"]
        metrics = [{m["key"] for m in r["data"]["metrics"]} for r, _ in found]
        assert all({"final/dice", "final/flops_g", "final/latency_ms"} <= m for m in metrics)
        # the baseline: reused from this machine's cache (not trained again), held by a run of the server
        assert all(t["medprune.baseline_reused"] == "true" for _, t in found)
        (holder,) = [(r, t) for r, t in found if t.get("medprune.baseline_holder") == "true"]
        assert {t["medprune.baseline_run_id"] for _, t in found} == {holder[0]["info"]["run_id"]}
        assert "baseline/dice" in {m["key"] for m in holder[0]["data"]["metrics"]}
        listed = server.rest_get("artifacts/list", {"run_id": holder[0]["info"]["run_id"]})
        assert {"baseline", "results.json", "evaluate"} <= {f["path"] for f in listed.get("files", [])}
        assert f"{server.url}/#/experiments/{experiment['experiment_id']}/runs/" in out and "make ui" not in out

        # another machine (its own outputs, no cache) finds the baseline on the server
        elsewhere = tmp_path / "elsewhere"
        text = medprune(elsewhere, f"tracking.uri={server.url}", *TINY, "prune.ratio=0.5")
        assert "found on the store" in text and "Training baseline" not in text
        client = MlflowClient(server.url)
        (latest,) = client.search_runs([experiment["experiment_id"]], order_by=["attributes.start_time DESC"], max_results=1)
        assert latest.data.tags["medprune.baseline_run_id"] == holder[0]["info"]["run_id"]
        assert latest.data.tags["medprune.baseline_reused"] == "true" and "medprune.baseline_holder" not in latest.data.tags
    finally:
        server.stop()


def test_a_paper_preset_sweeps_and_reports_in_the_papers_shape(tmp_path):
    synthetic = ["dataset=synthetic_isic", f"dataset.root={tmp_path / 'data'}"]
    medprune(tmp_path, "-m", "experiment=lwunet_table5", *synthetic, *TINY, "seed=0,1")
    runs = [r for r in mlflow_runs(tmp_path, "lwunet_table5") if r.data.tags.get("medprune.kind") != "sweep"]
    assert len(runs) == 4 and {r.data.params["criterion.name"] for r in runs} == {"l1", "l2"}
    text = medprune(tmp_path, "lwunet_table5", module="pipeline.report")
    assert "Table 5" in text and "Dice (%) (paper)" in text and "Δ IoU (%)" in text
    l1_row = next(line for line in text.splitlines() if line.startswith("| l1 |"))
    cells = [c.strip() for c in l1_row.strip("|").split("|")]
    assert cells[1] == "2"  # two seeds in one row
    assert "±" in cells[2] and cells[3] == "88.3"  # mean ± std over seeds, the paper's Dice beside it
    (parent,) = mlflow_runs(tmp_path, "lwunet_table5", **{"medprune.kind": "sweep"})
    report_dir = tmp_path / "reports" / parent.data.tags["medprune.sweep_id"]
    for name in ("report.md", "report.csv", "report.tex", "dice_vs_flops.png", "dice_vs_latency.png"):
        assert (report_dir / name).exists(), name
    assert r"\begin{tabular}" in (report_dir / "report.tex").read_text()
    assert "Δ = ours - paper" in text  # paper columns: the difference is explained
    logged = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged  # the report lives with its sweep's parent run


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_the_mlflow_ui_shows_a_sweeps_runs_in_a_headless_browser(tmp_path):
    medprune(tmp_path, "-m", *TINY, "prune.ratio=0.25,0.5")
    out = tmp_path / "ui.png"
    proc = subprocess.run([sys.executable, "scripts/ui_screenshot.py", "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "--out", str(out)], cwd=ROOT, env={**pipeline_env(tmp_path), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 20_000  # a rendered page, not a blank one


@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_two_sweeps_started_together_keep_their_own_folders_and_jobs(tmp_path):
    """Sweep folders are named to the microsecond: two sweeps launched in the same second once shared one
    folder, and with it the sweep file that tells each job its parent run, and the jobs' run folders."""
    from helpers import launch

    outputs = tmp_path / "out"
    run_pipeline(outputs, *TINY, "stages=[train]", "seed=4")  # the store exists before the two start together
    procs = [launch(outputs, "-m", *TINY, "stages=[train]", f"seed={seed}", "tracking.experiment=together") for seed in (5, 6)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    parents = [r for r in mlflow_runs(outputs, "together") if r.data.tags.get("medprune.kind") == "sweep"]
    assert len(parents) == 2 and len({p.data.tags["medprune.sweep_dir"] for p in parents}) == 2
    for parent in parents:
        (job,) = mlflow_runs(outputs, **{"mlflow.parentRunId": parent.info.run_id})
        assert f"seed={job.data.params['seed']}" in parent.data.params["sweep.overrides"]
