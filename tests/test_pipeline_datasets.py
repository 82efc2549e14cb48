"""The whole pipeline (`python -m pipeline.run ...`) on the volumetric and slice-folder datasets, tiny
settings: the synthetic Kaggle COVID-19 CT twin, and the real BraTS 2015 and COVID-SemiSeg subsets
(skipped where ../shared is absent). All jobs share one outputs folder, so the second job on the same
volumes finds the slice cache the first one built."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.files import read_csv
from mlflow.tracking import MlflowClient

from helpers import REAL, mlflow_runs, requires_real, run_pipeline

REAL_BRATS = REAL / "brats2015_subset"
REAL_SEMISEG = REAL / "covid_semiseg_subset"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


def run(outputs: Path, *overrides: str) -> str:
    return run_pipeline(outputs, "debug=tiny", "model=unet_tiny", "evaluate.latency_runs=2", "evaluate.latency_warmup=0", *overrides)


def latest_run(outputs: Path):
    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}"), mlflow_runs(outputs)[0]


def splits_of(client: MlflowClient, run) -> dict:
    path = client.download_artifacts(run.info.run_id, "data/splits.json")
    return json.loads(Path(path).read_text())


def test_synthetic_covid_ct_runs_and_the_second_run_hits_the_slice_cache(outputs):
    out = run(outputs, "dataset=synthetic_covid_ct", "dataset.synthetic.count=6")
    client, r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    assert "building slice cache" in out
    m, d = r.data.metrics, r.data.params
    assert int(r.data.tags["medprune.data.cache_hit"]) == 0 and int(d["data.cases"]) == 6 and int(d["data.volumes_hu"]) == 3
    assert int(d["data.slices_dropped_nan_mask"]) == 1 and int(d["data.slices_dropped_duplicate"]) == 1
    assert 0.0 <= m["final/dice"] <= 1.0
    splits = splits_of(client, r)
    assert sorted(sum(splits.values(), [])) and not set(splits["train"]) & set(splits["test"])

    out = run(outputs, "dataset=synthetic_covid_ct", "dataset.synthetic.count=6", "prune.ratio=0.25")
    assert "slice cache hit" in out and "building slice cache" not in out
    client, again = latest_run(outputs)
    assert again.info.status == "FINISHED" and int(again.data.tags["medprune.data.cache_hit"]) == 1
    assert splits_of(client, again) == splits


def test_brats_regions_are_scored_each_per_case_in_millimetres(outputs):
    """Three regions, one output channel each: every per-case metric per region, per volume, in mm."""
    run(outputs, "dataset=synthetic_brats", "dataset.synthetic.count=6", "evaluate.runtimes=[]",
        "dataset.region=[whole_tumor,tumor_core,enhancing_tumor]")
    client, r = latest_run(outputs)
    m, d = r.data.metrics, r.data.params
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert 0.0 <= m[f"final/dice_{region}"] <= 1.0 and m[f"final/hd95_{region}"] >= 0.0
    rows = read_csv(client.download_artifacts(r.info.run_id, "evaluate/cases_final.csv"))
    assert len(rows) == int(d["final.test_cases"]) == len(splits_of(client, r)["test"])
    assert all(float(row["hd95"]) <= 60 for row in rows)  # mm: at most the diagonal of the served grid (about 59 mm)


@requires_real(REAL_BRATS)
def test_pipeline_on_the_real_brats2015_subset(outputs):
    out = run(
        outputs, "dataset=brats", f"dataset.root={REAL_BRATS}", "dataset.modalities=[flair,t1ce]",
        "dataset.label_scheme=brats2015", "dataset.empty_slice_fraction=0", "dataset.eval_empty_slice_fraction=0.1",
    )
    client, r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    m, d = r.data.metrics, r.data.params
    assert int(d["data.cases"]) == 4 and int(d["data.cases_with_brainmask"]) == 4 and int(d["data.in_channels"]) == 2
    assert int(d["data.cases_train"]) + int(d["data.cases_val"]) + int(d["data.cases_test"]) == 4
    assert int(d["data.slices_dropped_no_brain"]) > 0 and 0.0 <= m["final/dice"] <= 1.0
    # volumes: the per-case 3D Dice (slices stacked back) is reported beside the per-slice mean
    assert 0.0 <= m["final/dice_3d"] <= 1.0 and int(d["final.test_cases"]) >= 1
    assert "building slice cache brats" in out


@requires_real(REAL_SEMISEG)
def test_pipeline_on_the_real_covid_semiseg_subset(outputs):
    run(outputs, "dataset=covid_semiseg", f"dataset.root={REAL_SEMISEG}")
    _, r = latest_run(outputs)
    assert r.info.status == "FINISHED"
    m, d = r.data.metrics, r.data.params
    assert int(d["data.n_train"]) + int(d["data.n_val"]) + int(d["data.n_test"]) == 50
    assert 0.0 <= m["final/dice"] <= 1.0
    assert "final/dice_3d" not in m  # 2D slices: no volumes to stack
