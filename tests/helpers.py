"""What the test modules share: the real composed config, and the pipeline run as a user runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"

# The tiny pipeline settings (conf/debug/tiny.yaml), the tiny UNet, a small synthetic ISIC twin.
TINY = ["debug=tiny", "model=unet_tiny", "dataset.synthetic.count=24"]


def compose_config(*overrides: str):
    """conf/ composed as `python -m pipeline.run <overrides>` composes it (schema and resolvers included)."""
    from hydra import compose, initialize_config_dir

    from pipeline import shell

    shell.start()  # the schema and the resolvers, as every entry registers them (idempotent)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def pipeline_env(outputs: Path) -> dict[str, str]:
    env = {**os.environ, "MEDPRUNE_OUTPUTS": str(outputs), "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def launch(outputs: Path, *overrides: str, module: str = "pipeline.run", merge_stderr: bool = True) -> subprocess.Popen:
    """`python -m <module> <overrides>` with its own outputs folder (MLflow store, caches, runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *overrides], cwd=ROOT, env=pipeline_env(outputs), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
    )


def conf(group: str, name: str, outputs="/tmp/medprune-test-outputs", **overrides) -> dict:
    """conf/<group>/<name>.yaml with `overrides`, resolved (`${paths.outputs}` = `outputs`): the YAML is
    where every default lives, so tests build datasets, models and criteria from it, as the pipeline does."""
    from omegaconf import OmegaConf

    from pipeline import shell

    shell.start()  # the resolvers the YAML uses (idempotent)

    node = OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")
    if "defaults" in node:
        raise ValueError(f"conf/{group}/{name}.yaml extends another option: use compose_config")
    tree = OmegaConf.create({"paths": {"outputs": str(outputs)}, group: node})
    tree[group] = OmegaConf.merge(tree[group], OmegaConf.create(overrides))
    return OmegaConf.to_container(tree[group], resolve=True)


def from_conf(group: str, name: str, **overrides):
    """The object conf/<group>/<name>.yaml builds (its `_target_`), with `overrides`."""
    from hydra.utils import instantiate

    return instantiate(conf(group, name, **overrides), _convert_="all")


def model_from_conf(name: str, in_channels: int = 3, num_classes: int = 1, **overrides):
    from models import build_model

    return build_model(conf("model", name, **overrides), in_channels, num_classes)


def kwargs_of(group: str, name: str, **overrides) -> dict:
    """The constructor keywords conf/<group>/<name>.yaml gives its `_target_` (without it), with overrides."""
    return {k: v for k, v in conf(group, name, **overrides).items() if k != "_target_"}


# Data-driven and attention criteria in tests: a few batches, not the YAML's full calibration.
FAST_CRITERION = {"steps": 3, "calibration_batches": 2}


def fast_criterion(name: str):
    """conf/criterion/<name>.yaml built with FAST_CRITERION's keys where it has them."""
    from omegaconf import OmegaConf

    from pipeline.criteria import build_criterion

    cfg = OmegaConf.load(ROOT / "conf" / "criterion" / f"{name}.yaml")
    for key, value in FAST_CRITERION.items():
        if key in cfg:
            cfg[key] = value
    return build_criterion(cfg, seed=0)  # the job's seed, as the score stage passes it


def training_loss():
    """The default training loss (conf/loss/dice_bce.yaml)."""
    return from_conf("loss", "dice_bce")


def run_cli(outputs: Path, *overrides: str, ok: bool = True, module: str = "pipeline.run", timeout: int = 600) -> str:
    """`python -m <module>` in a subprocess, to the end (for what needs a process of its own: exit codes seen
    by a shell, signals, parallel jobs); asserts it succeeded (or failed, `ok=False`); returns stdout+stderr."""
    proc = launch(outputs, *overrides, module=module)
    out, _ = proc.communicate(timeout=timeout)
    assert (proc.returncode == 0) == ok, out[-4000:]
    return out


def run_pipeline(outputs: Path, *overrides: str, ok: bool = True, module: str = "pipeline.run") -> str:
    """`python -m <module> <overrides>` in this process: the same entry point (`pipeline.run.main` with
    Hydra's command line, or `pipeline.report.main`) without paying the imports again. Returns what it
    printed (stdout and stderr)."""
    import contextlib
    import importlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    entry = importlib.import_module(module).main

    buffer = io.StringIO()
    saved_argv, saved_env = sys.argv, os.environ.get("MEDPRUNE_OUTPUTS")
    os.environ["MEDPRUNE_OUTPUTS"] = str(outputs)
    sys.argv = ["medprune", *overrides]
    code = 0
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                code = (entry() if module == "pipeline.run" else entry(list(overrides))) or 0
                code = code if isinstance(code, int) else 0  # pipeline.run.main returns the final Dice
            except SystemExit as stop:
                code = stop.code or 0
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("MEDPRUNE_OUTPUTS", None)
        else:
            os.environ["MEDPRUNE_OUTPUTS"] = saved_env
        GlobalHydra.instance().clear()
        _reset_logging()
    out = buffer.getvalue()
    assert (code == 0) == ok, out[-4000:]
    return out


def _reset_logging() -> None:
    """Hydra configures the root logger for each job; drop its handlers so the next job starts clean."""
    import logging

    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)


def mlflow_runs(outputs: Path, experiment: str | None = None, results: bool = True, **tags: str) -> list:
    """The runs of the SQLite store in `outputs` (of one experiment, or all), newest first, filtered by tags. With
    `results`, each run's `data.metrics` also holds the results of its results.json that are not MLflow metrics
    (pipeline.tracking.COMPARED says which are), as the tests read them; else the MLflow metrics alone."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    if not (outputs / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if experiment in (None, e.name)]
    if not experiments:
        return []
    found = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"], max_results=1000)
    found = [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]
    if results:
        for run in found:
            metrics = run.data.metrics  # RunData's own dict
            metrics.update({k: v for k, v in Tracker.read_results(client, run.info.run_id).items() if k not in metrics})
    return found


def requires_real(path: Path):
    """Marks a test `realdata` and skips it, saying why, when ../shared/realdata is not beside the checkout."""
    import pytest

    return lambda test: pytest.mark.realdata(pytest.mark.skipif(
        not path.exists(), reason=f"real data not found at {path} (../shared/realdata is beside the dev checkout only)")(test))


def kill_when(outputs: Path, args: list[str], pattern: str, epoch: int) -> None:
    """Runs the command and SIGKILLs it once a checkpoint matching `pattern` has reached `epoch`."""
    proc = launch(outputs, *args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        for meta in outputs.glob(pattern):
            try:
                if json.loads(meta.read_text())["epoch"] >= epoch:
                    proc.send_signal(signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(0.02)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
