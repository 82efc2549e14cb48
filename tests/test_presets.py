"""Every experiment preset composes, runs end to end on tiny settings and reports in the paper's shape.

Each preset runs as one job (its sweep is exercised by tests/test_sweeps.py) on synthetic data in the
preset's own dataset layout, with a tiny version of the preset's model.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.paths import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
REAL_ISIC = ROOT.parent / "shared" / "realdata" / "isic2018_subset"
COMMON = ["debug=tiny", "evaluate.latency_warmup=0", "evaluate.latency_runs=2", "evaluate.mask_examples=0"]
TINY_UNET = ["model=unet_tiny"]
ISIC = ["dataset=synthetic_isic", "dataset.synthetic.count=24"]
pytestmark = pytest.mark.integration
PRESETS = {
    "lwunet_isic": ISIC + TINY_UNET,
    "lwunet_table2": ISIC + TINY_UNET,
    "lwunet_table4": ISIC + TINY_UNET + ["prune.scope=decoder"],
    "lwunet_table5": ISIC + TINY_UNET + ["criterion=l2"],
    "lwunet_table6": ISIC + TINY_UNET + ["finetune.epochs=0"],
    "lwunet_table3": ["dataset=synthetic_brats", "model.encoder_name=resnet18",
                      "model.encoder_depth=3", "model.decoder_channels=[16,8,4]"],
    "lung_custom_unet": ["dataset=synthetic_covid_ct", "model.width=2",
                         "prune=custom003_deep", "evaluate.extra_splits=[train]"],
    "channel_attention": ["model=deeplabv3plus", "model.encoder_name=resnet18",
                          "model.decoder_channels=32", "criterion=se", "criterion.steps=3", "criterion.calibration_batches=2"],
    "real_isic_mini": ["dataset.limit=16"] + TINY_UNET,
}


def test_every_preset_is_covered():
    assert set(PRESETS) == {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}


def medprune(tmp_path: Path, *args: str, module: str = "pipeline.run") -> str:
    env = {**os.environ, "MEDPRUNE_OUTPUTS": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_end_to_end_and_reports(preset, tmp_path):
    overrides = list(PRESETS[preset])
    if preset == "real_isic_mini" and not REAL_ISIC.is_dir():
        pytest.skip(f"real ISIC subset not found at {REAL_ISIC}")
    if preset == "channel_attention":
        from data.synthetic_volumes import write_synthetic_slices

        write_synthetic_slices(tmp_path / "semiseg", count=24)
        overrides.append(f"dataset.root={tmp_path / 'semiseg'}")
    if overrides[0].startswith("dataset=synthetic"):
        overrides.append(f"dataset.root={tmp_path / 'data'}")
    medprune(tmp_path, f"experiment={preset}", *overrides, *COMMON)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = [e.name for e in client.search_experiments() if e.name != "Default"]
    assert len(names) == 1
    runs = client.search_runs([client.get_experiment_by_name(names[0]).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    text = medprune(tmp_path, preset, "--no-log", module="pipeline.report")
    assert "| 1 |" in text  # our run landed in a row of the table
    if preset != "lwunet_isic":  # the shared setting has no table of its own
        assert "(paper)" in text or preset == "channel_attention"
    assert (tmp_path / "reports" / names[0] / "report.md").exists()
