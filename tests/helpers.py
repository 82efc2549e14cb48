"""What the test modules share: the real composed config, and the pipeline run as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"

# The tiny pipeline settings (conf/debug/tiny.yaml) on a small synthetic ISIC twin.
TINY = ["debug=tiny", "dataset.synthetic.count=24"]


def compose_config(*overrides: str):
    """conf/ composed as `python -m pipeline.run <overrides>` composes it (schema and resolvers included)."""
    from hydra import compose, initialize_config_dir

    import pipeline.run  # noqa: F401  (registers the schema and the resolvers)

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
