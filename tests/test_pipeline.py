"""The whole pipeline, run as users run it (`python -m pipeline.run ...`), on tiny settings.

The jobs of this module share one outputs folder (MEDPRUNE_OUTPUTS), so the MLflow store and the
baseline cache are shared the way they are in a real sweep; a test that needs an earlier run asks for
the `default_run` fixture, so each test also passes alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REAL, ROOT, TINY, launch, mlflow_runs, requires_real, run_pipeline

pytestmark = pytest.mark.integration

REQUIRED_METRICS = [  # what a user compares (tracking.COMPARED), and the curves
    f"{row}/{m}" for row in ("baseline", "final") for m in ("dice", "iou", "hd95", "params_m", "flops_g", "latency_ms", "size_mb")
] + ["pruned/dice", "pruned/params_m", "train/loss", "train/val_dice", "finetune/loss"]
REQUIRED_RESULTS = [f"{row}/{m}" for row in ("baseline", "final") for m in ("macs_g", "achieved_gflops", "peak_fraction")] + [
    "evaluate/peak_gflops"]  # results.json


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def default_run(outputs):
    """One default job at ratio 0.5 (seed 0), with the machine's peak (one small convolution shape: its path, not
    its seconds): its printed output and its MLflow run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipeline.measure.peak.SHAPES", ((8, 8, 32),))
        out = run_pipeline(outputs, *TINY, "prune.ratio=0.5", "evaluate.machine_peak=true")
    (run,) = [r for r in mlflow_runs(outputs) if r.data.params.get("seed") == "0" and r.data.params.get("prune.ratio") == "0.5"]
    return out, run


def test_default_pipeline_end_to_end(outputs, default_run):
    from mlflow.tracking import MlflowClient

    out, r = default_run
    assert all(f"| {row} " in out for row in ("baseline", "pruned", "fine-tuned"))  # a collapsed row is marked "⚠"
    assert r.info.status == "FINISHED"
    missing = [m for m in REQUIRED_METRICS if m not in r.data.metrics]
    assert not missing, missing
    from pipeline.tracking import Tracker

    results = Tracker.read_results(MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}"), r.info.run_id)
    assert not [m for m in REQUIRED_RESULTS if m not in results] and r.data.params["data.distance_unit"] == "px"
    assert r.data.metrics["final/params_m"] < 0.5 * r.data.metrics["baseline/params_m"]
    assert r.data.metrics["final/flops_g"] < 0.5 * r.data.metrics["baseline/flops_g"]
    assert r.data.params["prune.ratio"] == "0.5" and r.data.params["criterion.name"] == "l1"
    assert r.data.params["optimizer._target_"] == "torch.optim.Adam" and r.data.params["scheduler.step_fraction"] == "0.8"
    assert r.data.tags["medprune.baseline_reused"] == "false"
    assert r.data.tags["medprune.baseline_run_id"] == r.info.run_id
    assert r.data.tags["medprune.rates_source"] == "config"
    assert r.data.tags["medprune.cpu_bf16"] in ("native", "emulated") and r.data.tags["medprune.cpu_capability"]
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "pruning", "pruned_model", "final_model", "scores", "evaluate", "baseline"} <= artifacts
    pruning = {a.path for a in client.list_artifacts(r.info.run_id, "pruning")}
    assert {"pruning/channels.csv", "pruning/channels.png", "pruning/rates.json"} <= pruning
    assert r.data.metrics["prune/shortfall_layers"] == 0 and "medprune.prune_shortfall" not in r.data.tags
    # the synthetic twin writes LICENSE and ATTRIBUTION files, as the archive has: each one named, not just counted
    ignored = Path(client.download_artifacts(r.info.run_id, "data/ignored_files.txt", str(outputs / "dl"))).read_text()
    assert ignored.count("LICENSE.txt") == 2 and len(ignored.splitlines()) == int(r.data.params["data.files_ignored"])
    run_dir = Path(r.data.tags["medprune.run_dir"])  # the folder holds its baseline; state.json names it relative
    assert yaml.safe_load((run_dir / "state.json").read_text())["baseline"] == "baseline"
    assert (run_dir / "baseline" / "model.safetensors").is_file()
    curve = client.get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in curve] == [1]
    # the store and artifacts live in the outputs folder, not in the working directory
    assert (outputs / "mlflow.db").exists() and (outputs / "mlartifacts").is_dir()
    assert not (ROOT / "mlflow.db").exists() and not (ROOT / "mlruns").exists()


def test_multirun_over_ratios_trains_the_baseline_once(outputs):
    out = run_pipeline(outputs, "-m", *TINY, "seed=1", "prune.ratio=0.25,0.5")
    seed1 = [r for r in mlflow_runs(outputs) if r.data.params.get("seed") == "1"]
    assert len(seed1) == 2 and all(r.info.status == "FINISHED" for r in seed1)
    assert sorted(r.data.tags["medprune.baseline_reused"] for r in seed1) == ["false", "true"]
    assert "Reusing baseline" in out
    assert len({r.data.tags["medprune.baseline_key"] for r in seed1}) == 1


def test_a_later_stage_starts_from_an_earlier_run(outputs, default_run):
    _, source = default_run
    run_pipeline(outputs, *TINY, "stages=[prune,finetune,evaluate]", f"baseline={source.info.run_id}", "prune.ratio=0.75")
    r = mlflow_runs(outputs)[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["medprune.baseline_run_id"] == source.info.run_id
    assert r.data.metrics["final/params_m"] < 0.6 * r.data.metrics["baseline/params_m"]
    # the same from the run folder on disk
    run_pipeline(outputs, *TINY, "stages=[evaluate]", f"baseline={source.data.tags['medprune.run_dir']}")
    r = mlflow_runs(outputs)[0]
    assert r.info.status == "FINISHED"
    assert r.data.metrics["baseline/dice"] == pytest.approx(source.data.metrics["baseline/dice"])


@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_concurrent_jobs_with_one_key_train_it_once(outputs):
    procs = [launch(outputs, *TINY, "seed=2", f"prune.ratio={ratio}") for ratio in (0.3, 0.6)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    seed2 = [r for r in mlflow_runs(outputs) if r.data.params.get("seed") == "2"]
    assert len(seed2) == 2 and all(r.info.status == "FINISHED" for r in seed2)
    assert sorted(r.data.tags["medprune.baseline_reused"] for r in seed2) == ["false", "true"]


def test_bad_data_fails_before_training_and_no_run_is_opened(outputs, tmp_path):
    from data.synthetic import write_synthetic_isic

    root = tmp_path / "isic"
    write_synthetic_isic(root, count=8, seed=0)
    victim = sorted((root / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    before = len(mlflow_runs(outputs))
    out = run_pipeline(outputs, "debug=tiny", "model=unet_tiny", "dataset=isic2018", f"dataset.root={root}", ok=False)
    (line,) = [line for line in out.splitlines() if line.startswith("medprune: data error:")]
    assert str(victim) in line
    assert "train 1/" not in out and "Traceback" not in out  # nothing was trained
    assert len(mlflow_runs(outputs)) == before


def test_a_bad_config_fails_at_start_up_naming_the_key(outputs):
    out = run_pipeline(outputs, "prune.ratio=1.0", ok=False)
    assert "medprune: configuration error: prune.ratio=1.0 is out of range" in out
    out = run_pipeline(outputs, "prune.scpoe=all", ok=False)
    assert "scpoe" in out


@requires_real(REAL / "isic2018_subset")
def test_pipeline_on_real_isic_pairs(outputs):
    run_pipeline(outputs, "debug=tiny", "model=unet_tiny", "dataset=isic2018", f"dataset.root={REAL / 'isic2018_subset'}", "dataset.limit=16",
                 "evaluate.latency_runs=2", "evaluate.latency_warmup=0")
    r = mlflow_runs(outputs)[0]
    assert r.info.status == "FINISHED"
    p = r.data.params  # data statistics are params (counts, not measurements)
    assert int(p["data.n_train"]) + int(p["data.n_val"]) + int(p["data.n_test"]) == 16
    assert 0.0 <= r.data.metrics["final/dice"] <= 1.0


def test_sensitivity_stage_writes_rates_that_meet_the_flops_budget(outputs):
    run_pipeline(outputs, *TINY, "model.width=8", "seed=3", "stages=[train,sensitivity,prune,finetune,evaluate]",
                 "prune=sensitivity", "sensitivity.target_flops=0.6", "sensitivity.ratios=[0.25,0.5,0.75]")
    r = mlflow_runs(outputs)[0]
    assert r.info.status == "FINISHED"
    assert r.data.metrics["sensitivity/flops_kept"] <= 0.6
    assert r.data.metrics["final/flops_g"] <= 0.6 * r.data.metrics["baseline/flops_g"] + 1e-12
    assert r.data.tags["medprune.rates_source"].startswith("sensitivity stage")
    run_dir = Path(r.data.tags["medprune.run_dir"])
    rates = yaml.safe_load((run_dir / "sensitivity" / "prune_rates.yaml").read_text())
    assert rates["schedule"] == "per_layer" and rates["layer_ratios"]
    assert set(rates["layer_ratios"].values()) <= {0.25, 0.5, 0.75}
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}").list_artifacts(r.info.run_id, "sensitivity")}
    assert {"sensitivity/sensitivity.csv", "sensitivity/sensitivity.png", "sensitivity/prune_rates.yaml"} <= artifacts


def test_iterative_schedule_fine_tunes_between_steps(outputs):
    run_pipeline(outputs, *TINY, "model.width=8", "prune=iterative", "prune.steps=2", "prune.epochs_between=1")
    r = mlflow_runs(outputs)[0]
    assert r.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")  # the fine-tuning between the two steps: its curve
    assert "pruning/step1_history.csv" in {a.path for a in client.list_artifacts(r.info.run_id, "pruning")}
    assert r.data.metrics["prune/channels_kept"] == pytest.approx(0.5, abs=0.02)


def test_per_layer_pattern_matching_nothing_fails_before_training(outputs):
    out = run_pipeline(outputs, *TINY, "prune=per_layer", "++prune.layer_ratios={down4.*:0.5}", ok=False)
    assert "down4.*" in out and "matches no prunable layer" in out
    assert "train 1/" not in out


def _artifact_csv(outputs: Path, run_id: str, path: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from data.files import read_csv

    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    return read_csv(client.download_artifacts(run_id, path, str(outputs / f"dl-{run_id}")))


def test_per_case_results_have_a_row_per_test_case(outputs, default_run):
    _, run = default_run
    test_ids = yaml.safe_load((Path(run.data.tags["medprune.run_dir"]) / "splits.json").read_text())["test"]
    for network in ("baseline", "pruned", "final"):
        rows = _artifact_csv(outputs, run.info.run_id, f"evaluate/cases_{network}.csv")
        assert [r["case"] for r in rows] == test_ids
        assert {"dice", "iou", "hd95", "nsd", "thresholded_jaccard", "true_px", "pred_px", "dice_orig", "iou_orig"} <= set(rows[0])
        assert "hd95_orig" not in rows[0] and "nsd_orig" not in rows[0]  # pixels of each image's own size: not averageable
    assert run.data.metrics["final/hd95"] >= 0 and 0 <= run.data.metrics["final/nsd"] <= 1
    assert run.data.params["final.collapsed"] in ("no", "all foreground", "all background")  # 1 tiny epoch may well collapse


def test_an_evaluate_only_job_scores_a_finished_run_on_a_test_set_with_its_settings(outputs, default_run, tmp_path):
    from data.synthetic import write_synthetic_isic

    _, source = default_run
    holdout = tmp_path / "holdout"
    write_synthetic_isic(holdout, count=9, seed=11, min_side=40, max_side=64)
    run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={holdout}", "evaluate.runtimes=[]",
                 module="pipeline.evaluate")
    (run,) = mlflow_runs(outputs, **{"medprune.kind": "evaluation"})
    tags, params = run.data.tags, run.data.params
    assert tags["medprune.source_run_id"] == tags["mlflow.parentRunId"] == source.info.run_id
    assert len(tags["medprune.test_digest"]) == 64 and tags["medprune.test_root"] == str(holdout)
    changed = ("dataset.test_root", "evaluate.", "tracking.log_models", "tracking.register_as", "data.", "baseline.",
               "pruned.", "final.")
    settings = {k: v for k, v in source.data.params.items() if not k.startswith(changed)}
    assert settings and {k: params.get(k) for k in settings} == settings  # the source's ratio, criterion, model...
    assert params["dataset.test_root"] == str(holdout) and params["data.test_only"] == "1"
    rows = _artifact_csv(outputs, run.info.run_id, "evaluate/cases_final.csv")
    assert len(rows) == 9  # every case of the test set, nothing of the training data
    assert {"baseline/dice", "pruned/dice", "final/dice"} <= set(run.data.metrics)

    out = run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={holdout}", "prune.ratio=0.3", ok=False,
                       module="pipeline.evaluate")
    assert "prune.ratio cannot be changed for an evaluate-only job" in out
    out = run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={holdout}", "hydra.run.dir=/tmp/x", ok=False,
                       module="pipeline.evaluate")
    assert "an evaluate-only job writes its folder to <outputs>/evaluations/" in out and "MEDPRUNE_OUTPUTS" in out

    # the same test set in another layout (images/ + masks/<id>_segmentation.png), read by the slice-folder reader
    # with the source run's preprocessing: the same per-case scores, no symlink tree in the ISIC layout
    import shutil

    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "masks").mkdir()
    for image in (holdout / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"):
        shutil.copy(image, other / "images" / image.name)
        shutil.copy(holdout / "ISIC2018_Task1_Training_GroundTruth" / f"{image.stem}_segmentation.png",
                    other / "masks" / f"{image.stem}_segmentation.png")
    layout = ["dataset.reader=slice_folders", "dataset.image_dir=images", "dataset.mask_dir=masks",
              "dataset.image_pattern={id}.jpg", "dataset.mask_pattern={id}_segmentation.png"]
    run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={other}", "evaluate.runtimes=[]", *layout,
                 module="pipeline.evaluate")
    latest = mlflow_runs(outputs, **{"medprune.kind": "evaluation"})[0]
    assert latest.data.params["dataset._target_"] == "data.slices.SliceFolders" and latest.data.params["dataset.channels"] == "3"
    again = _artifact_csv(outputs, latest.info.run_id, "evaluate/cases_final.csv")
    assert [(r["case"], r["dice"], r["hd95"], r["dice_orig"]) for r in again] == [
        (r["case"], r["dice"], r["hd95"], r["dice_orig"]) for r in rows]
    out = run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={other}", "dataset.image_dir=images", ok=False,
                       module="pipeline.evaluate")
    assert "expected dataset.reader=slice_folders with it" in out


def test_an_evaluate_only_job_over_a_sweep_is_a_reportable_sweep_of_its_own(outputs, tmp_path):
    from data.synthetic import write_synthetic_isic

    run_pipeline(outputs, "-m", *TINY, "seed=2", "evaluate.runtimes=[]", "prune.ratio=0.25,0.5")
    (source,) = [r for r in mlflow_runs(outputs) if r.data.tags.get("medprune.kind") == "sweep"
                 and "seed=2" in r.data.params.get("sweep.overrides", "")]
    holdout = tmp_path / "holdout"
    write_synthetic_isic(holdout, count=6, seed=12, min_side=40, max_side=64)
    out = run_pipeline(outputs, f"run={source.info.run_id}", f"dataset.test_root={holdout}", "evaluate.runtimes=[]",
                       module="pipeline.evaluate")
    (parent,) = mlflow_runs(outputs, **{"medprune.kind": "sweep", "medprune.source_run_id": source.info.run_id})
    assert parent.info.status == "FINISHED" and parent.info.run_id in out
    jobs = mlflow_runs(outputs, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(r.data.params["prune.ratio"] for r in jobs) == ["0.25", "0.5"]
    assert all(r.data.tags["medprune.kind"] == "evaluation" for r in jobs)
    text = run_pipeline(outputs, parent.info.run_id, "--no-log", module="pipeline.report")
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| 0.")] == ["0.25", "0.5"]
