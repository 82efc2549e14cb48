"""The whole stage chain in 3D (`python -m pipeline.run dataset=synthetic_brats3d model=unet3d ...`), tiny settings:
patch training, L1 pruning of the 3D UNet, fine-tuning, and the evaluate stage's sliding-window inference with
per-region 3D metrics, FLOPs and latency per window and per volume. The real BraTS 2015 subset runs the same chain
(tests/test_presets.py runs the preset brats3d_prune on it, tiny; the full-size run is in the README)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.files import read_csv
from mlflow.tracking import MlflowClient

from helpers import mlflow_runs, run_pipeline

REGIONS = ("whole_tumor", "tumor_core", "enhancing_tumor")
TINY_3D = ["debug=tiny", "model=unet3d", "model.width=4", "model.depth=2", "evaluate.latency_runs=2",
           "evaluate.latency_warmup=0", "evaluate.mask_examples=1", "prune.ratio=0.5", "train.batch_size=2"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs3d")


def latest(outputs: Path):
    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}"), mlflow_runs(outputs)[0]


def test_the_stage_chain_runs_in_3d_on_the_synthetic_brats_twin(outputs):
    out = run_pipeline(outputs, *TINY_3D, "dataset=synthetic_brats3d", "dataset.region=[wt,tc,et]",
                       "evaluate.runtimes=[onnxruntime,openvino]")
    client, r = latest(outputs)
    m, p = r.data.metrics, r.data.params
    assert r.info.status == "FINISHED" and "Latency / volume (ms)" in out and "OpenVINO / volume (ms)" in out
    for row in ("baseline", "final"):
        for region in REGIONS:
            assert 0.0 <= m[f"{row}/dice_{region}"] <= 1.0 and m[f"{row}/hd95_{region}"] >= 0.0
        assert m[f"{row}/volume_latency_ms"] > m[f"{row}/latency_ms"] > 0  # a volume runs several windows
        assert m[f"{row}/onnx_volume_latency_ms"] > m[f"{row}/onnx_latency_ms"] > 0
        assert m[f"{row}/openvino_volume_latency_ms"] > m[f"{row}/openvino_latency_ms"] > 0
        assert int(p[f"{row}.latency_channels_last"]) == 0  # volumes stay NCDHW (NDHWC slowed the unpruned 3D UNet)
        windows = int(p[f"{row}.windows_per_volume"])
        assert windows > 1 and m[f"{row}/volume_flops_g"] == pytest.approx(windows * m[f"{row}/flops_g"])
    assert m["final/params_m"] < 0.6 * m["baseline/params_m"] and m["final/flops_g"] < 0.6 * m["baseline/flops_g"]
    test_cases = int(p["data.cases_test"])
    rows = read_csv(client.download_artifacts(r.info.run_id, "evaluate/cases_final.csv"))
    assert len(rows) == test_cases and all(float(row["hd95"]) < 60 for row in rows)  # mm, within the grid
    masks = Path(client.download_artifacts(r.info.run_id, "evaluate/masks/final"))
    assert len(list(masks.glob("*.nii.gz"))) == test_cases


def test_distillation_and_int8_run_in_3d_on_the_synthetic_covid_ct_twin(outputs):
    """The 3D Attention UNet fine-tuned with a teacher (its feature adapter a 1x1x1 convolution) and its int8
    network, scored on whole volumes window by window like the float one."""
    run_pipeline(outputs, *TINY_3D, "model=attention_unet3d", "dataset=synthetic_covid_ct3d", "finetune.distill.enabled=true",
                 "finetune.distill.feature_weight=0.5", "stages=[train,score,prune,finetune,quantize,evaluate]",
                 "quantize.calibration_images=4")
    _, r = latest(outputs)
    m = r.data.metrics
    assert r.info.status == "FINISHED" and 0.0 <= m["final/dice"] <= 1.0 and m["final/volume_latency_ms"] > 0
    assert 0.0 <= m["quantized/dice"] <= 1.0 and m["quantized/prob_max_abs_diff"] < 0.5
    from data.files import read_csv  # the per-epoch curves: the fine-tuning's history.csv

    history = read_csv(Path(r.data.tags["medprune.run_dir"]) / "final" / "history.csv")
    assert all(float(row["distill_loss"]) >= 0 for row in history)


def test_the_sensitivity_schedule_a_data_driven_criterion_and_bf16_run_in_3d(outputs):
    """The sensitivity stage scores its trial prunings on whole validation volumes (window by window), taylor
    scores on patches, and the bf16 form is scored on whole volumes too (where the CPU has bf16; else a notice)."""
    tiny = [o for o in TINY_3D if not o.startswith("prune.ratio")]  # the sensitivity schedule derives its rates
    run_pipeline(outputs, *tiny, "dataset=synthetic_brats3d", "prune=sensitivity", "criterion=taylor",
                 "stages=[train,sensitivity,prune,finetune,evaluate]", "evaluate.precision=bf16", "evaluate.runtimes=[]")
    _, r = latest(outputs)
    m = r.data.metrics
    assert r.info.status == "FINISHED" and 0.0 <= m["final/dice"] <= 1.0 and "sensitivity/base_val_dice" in m
