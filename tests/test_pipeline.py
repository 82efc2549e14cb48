"""The whole pipeline, run as users run it (`python -m pipeline.run ...`), on tiny settings.

All jobs of this module share one outputs folder (MEDPRUNE_OUTPUTS), so the MLflow store and the
baseline cache are shared the way they are in a real sweep.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
REAL_ISIC = ROOT.parent / "shared" / "realdata" / "isic2018_subset"

TINY = [
    "dataset.synthetic.count=24",
    "dataset.image_size=32",
    "model.width=4",
    "model.depth=2",
    "train.epochs=1",
    "train.batch_size=4",
    "finetune.epochs=1",
    "evaluate.latency_warmup=1",
    "evaluate.latency_runs=3",
]

REQUIRED_METRICS = [
    f"{row}/{m}"
    for row in ("baseline", "final")
    for m in ("dice", "iou", "params_m", "flops_g", "macs_g", "latency_ms", "size_mb")
] + ["pruned/dice", "pruned/params_m", "train/loss", "train/val_dice", "finetune/loss"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


def launch(outputs: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "MEDPRUNE_OUTPUTS": str(outputs), "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def run(outputs: Path, *overrides: str, ok: bool = True) -> str:
    proc = launch(outputs, *overrides)
    out, _ = proc.communicate(timeout=600)
    if ok:
        assert proc.returncode == 0, out[-4000:]
    else:
        assert proc.returncode != 0, out[-4000:]
    return out


def client(outputs: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")


def runs(outputs: Path, **tags: str):
    c = client(outputs)
    found = c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=500)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def latest_run(outputs: Path):
    c = client(outputs)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], order_by=["attributes.start_time DESC"], max_results=1)[0]


def test_default_pipeline_end_to_end(outputs):
    out = run(outputs, *TINY, "prune.ratio=0.5")
    assert "| baseline |" in out and "| pruned |" in out and "| fine-tuned |" in out
    r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    missing = [m for m in REQUIRED_METRICS if m not in r.data.metrics]
    assert not missing, missing
    assert r.data.metrics["final/params_m"] < 0.5 * r.data.metrics["baseline/params_m"]
    assert r.data.metrics["final/flops_g"] < 0.5 * r.data.metrics["baseline/flops_g"]
    assert r.data.params["prune.ratio"] == "0.5" and r.data.params["criterion.name"] == "l1"
    assert r.data.tags["medprune.baseline_reused"] == "false"
    assert r.data.tags["medprune.baseline_run_id"] == r.info.run_id
    artifacts = {a.path for a in client(outputs).list_artifacts(r.info.run_id)}
    assert {"config.yaml", "pruning", "pruned_model", "final_model", "scores", "evaluate", "baseline"} <= artifacts
    pruning = {a.path for a in client(outputs).list_artifacts(r.info.run_id, "pruning")}
    assert {"pruning/channels.csv", "pruning/channels.png"} <= pruning
    curve = client(outputs).get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in curve] == [1]
    # the store and artifacts live in the outputs folder, not in the working directory
    assert (outputs / "mlflow.db").exists() and (outputs / "mlartifacts").is_dir()
    assert not (ROOT / "mlflow.db").exists() and not (ROOT / "mlruns").exists()


def test_multirun_over_ratios_trains_the_baseline_once(outputs):
    out = run(outputs, "-m", *TINY, "seed=1", "prune.ratio=0.25,0.5")
    trained = runs(outputs, **{"medprune.baseline_reused": "false"})
    seed1 = [r for r in runs(outputs) if r.data.params.get("seed") == "1"]
    assert len(seed1) == 2 and all(r.info.status == "FINISHED" for r in seed1)
    assert sum(r.data.tags["medprune.baseline_reused"] == "false" for r in seed1) == 1
    assert "Reusing baseline" in out
    assert len({r.data.tags["medprune.baseline_key"] for r in seed1}) == 1
    assert len(trained) >= 2  # seed 0 (first test) and seed 1 each trained once


def test_a_later_stage_starts_from_an_earlier_run(outputs):
    source = [r for r in runs(outputs) if r.data.params.get("seed") == "0"][0]
    run(outputs, *TINY, "stages=[prune,finetune,evaluate]", f"baseline={source.info.run_id}", "prune.ratio=0.75")
    r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    assert r.data.tags["medprune.baseline_run_id"] == source.info.run_id
    assert r.data.metrics["final/params_m"] < r.data.metrics["baseline/params_m"]
    # the same from the run folder on disk
    run(outputs, *TINY, "stages=[evaluate]", f"baseline={source.data.tags['medprune.run_dir']}")
    r = latest_run(outputs)
    assert r.info.status == "FINISHED" and "final/dice" in r.data.metrics


def test_concurrent_jobs_with_one_key_train_it_once(outputs):
    procs = [launch(outputs, *TINY, "seed=2", f"prune.ratio={ratio}") for ratio in (0.3, 0.6)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    seed2 = [r for r in runs(outputs) if r.data.params.get("seed") == "2"]
    assert len(seed2) == 2 and all(r.info.status == "FINISHED" for r in seed2)
    assert sorted(r.data.tags["medprune.baseline_reused"] for r in seed2) == ["false", "true"]


def test_bad_data_fails_before_training_and_no_run_is_opened(outputs, tmp_path):
    from data.synthetic import write_synthetic_isic

    root = tmp_path / "isic"
    write_synthetic_isic(root, count=8, seed=0)
    victim = sorted((root / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    before = len(runs(outputs))
    out = run(outputs, "dataset=isic2018", f"dataset.root={root}", "dataset.image_size=32", "model.width=4", ok=False)
    (line,) = [line for line in out.splitlines() if line.startswith("medprune: data error:")]
    assert str(victim) in line
    assert "train 1/" not in out and "Traceback" not in out  # nothing was trained
    assert len(runs(outputs)) == before


def test_a_bad_config_fails_at_start_up_naming_the_key(outputs):
    out = run(outputs, "prune.ratio=1.0", ok=False)
    assert "prune.ratio" in out
    out = run(outputs, "prune.scpoe=all", ok=False)
    assert "scpoe" in out


@pytest.mark.skipif(not REAL_ISIC.is_dir(), reason=f"real ISIC subset not found at {REAL_ISIC} (only beside the dev checkout)")
def test_pipeline_on_real_isic_pairs(outputs):
    run(
        outputs, "dataset=isic2018", f"dataset.root={REAL_ISIC}", "dataset.limit=16", "dataset.image_size=32",
        "model.width=4", "model.depth=2", "train.epochs=1", "train.batch_size=4", "finetune.epochs=1",
        "evaluate.latency_runs=2", "evaluate.latency_warmup=0",
    )
    r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    assert r.data.metrics["data/n_train"] + r.data.metrics["data/n_val"] + r.data.metrics["data/n_test"] == 16
    assert 0.0 <= r.data.metrics["final/dice"] <= 1.0


def test_sensitivity_stage_writes_rates_that_meet_the_flops_budget(outputs):
    import yaml

    run(outputs, *TINY, "model.width=8", "seed=3", "stages=[train,sensitivity,prune,finetune,evaluate]",
        "sensitivity.target_flops=0.6", "sensitivity.ratios=[0.25,0.5,0.75]")
    r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    assert r.data.metrics["sensitivity/flops_kept"] <= 0.6
    assert r.data.metrics["final/flops_g"] <= 0.6 * r.data.metrics["baseline/flops_g"] + 1e-12
    run_dir = Path(r.data.tags["medprune.run_dir"])
    rates = yaml.safe_load((run_dir / "sensitivity" / "prune_rates.yaml").read_text())
    assert rates["schedule"] == "per_layer" and rates["layer_ratios"]
    assert set(rates["layer_ratios"].values()) <= {0.25, 0.5, 0.75}
    artifacts = {a.path for a in client(outputs).list_artifacts(r.info.run_id, "sensitivity")}
    assert {"sensitivity/sensitivity.csv", "sensitivity/sensitivity.png", "sensitivity/prune_rates.yaml"} <= artifacts


def test_iterative_schedule_fine_tunes_between_steps(outputs):
    run(outputs, *TINY, "model.width=8", "prune=iterative", "prune.steps=2", "prune.epochs_between=1")
    r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    assert "prune_step1/loss" in r.data.metrics  # the fine-tuning between the two steps
    assert r.data.metrics["prune/channels_kept"] == pytest.approx(0.5, abs=0.02)


def test_per_layer_pattern_matching_nothing_fails_before_training(outputs):
    out = run(outputs, *TINY, "prune=per_layer", "++prune.layer_ratios={down4.*:0.5}", ok=False)
    assert "down4.*" in out and "matches no prunable layer" in out
    assert "train 1/" not in out
