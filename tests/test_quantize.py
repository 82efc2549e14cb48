"""int8 quantization (stage `quantize`, pipeline/quantization.py) and its rows in the evaluate stage."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from helpers import TINY, compose_config, mlflow_runs, run_pipeline
from pipeline import inference, quantization
from pipeline.config import ConfigError, validate

from test_pruning import small_unet

STAGES = "stages=[train,score,prune,finetune,quantize,evaluate]"


def _float_onnx(tmp_path: Path, size: int = 32) -> tuple[torch.nn.Module, Path]:
    model = small_unet(width=8, depth=2)
    return model, inference.export_onnx(model, tmp_path / "float.onnx", (1, 3, size, size))


def test_static_quantization_stores_int8_weights_and_stays_close_to_the_float_network(tmp_path):
    model, path = _float_onnx(tmp_path)
    rng = np.random.default_rng(0)
    done = quantization.quantize_static(path, tmp_path / "int8.onnx", (rng.standard_normal((4, 3, 32, 32), dtype=np.float32)
                                                                        for _ in range(3)))
    assert done["calibration_images"] == 12 and done["method"] == "static"
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ format
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in int8) > 0.9 * sum(p.numel() for n, p in model.named_parameters() if "weight" in n and p.dim() == 4)
    assert (tmp_path / "int8.onnx").stat().st_size < 0.5 * path.stat().st_size
    x = rng.standard_normal((2, 3, 32, 32), dtype=np.float32)
    p_float = torch.sigmoid(torch.from_numpy(inference.onnx_run(inference.onnx_session(path, 1), x)))
    p_int8 = torch.sigmoid(torch.from_numpy(inference.onnx_run(inference.onnx_session(tmp_path / "int8.onnx", 1), x)))
    assert 0 < float((p_float - p_int8).abs().max()) < 0.1


def test_no_calibration_images_is_an_error_and_leaves_no_file(tmp_path):
    _, path = _float_onnx(tmp_path)
    with pytest.raises(ValueError, match="no calibration images"):
        quantization.quantize_static(path, tmp_path / "int8.onnx", iter([]))
    assert not (tmp_path / "int8.onnx").exists()


def test_calibration_reads_the_training_split_without_augmentation():
    from pipeline.stages.quantize import calibration_batches

    asked = []

    class Data:
        def dataset(self, split, augment=False):
            asked.append((split, augment))
            return [(torch.full((3, 8, 8), float(i)), torch.zeros(1, 8, 8)) for i in range(5)]

    batches = list(calibration_batches(SimpleNamespace(data=Data()), count=4, batch_size=3))
    assert asked == [("train", False)]
    assert [b.shape[0] for b in batches] == [3, 1] and batches[1][0, 0, 0, 0] == 3.0


def test_a_calibration_outside_its_enum_fails_at_compose_time_naming_the_key():
    """quantize.calibration is typed Calibration (its values: CALIBRATION_METHODS, one home)."""
    from hydra.errors import ConfigCompositionException

    from pipeline.shell import one_line

    with pytest.raises(ConfigCompositionException) as err:
        compose_config("quantize.calibration=kl")
    assert "quantize.calibration" in one_line(err.value) and "minmax, entropy, percentile" in str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [("quantize.calibration_images=0", "quantize.calibration_images")])
def test_bad_quantize_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(override))


def test_quantize_after_evaluate_is_out_of_order():
    with pytest.raises(ConfigError, match="out of order"):
        validate(compose_config("stages=[train,score,prune,finetune,evaluate,quantize]"))


@pytest.mark.integration
def test_the_int8_network_is_scored_timed_and_kept(tmp_path):
    out = run_pipeline(tmp_path, *TINY, STAGES, "quantize.dynamic=true", "quantize.calibration_images=6",
                       "evaluate.runtimes=[onnxruntime,openvino]")
    assert "| int8 (ONNX Runtime)" in out and "| int8 dynamic (ONNX Runtime)" in out  # "⚠" when collapsed
    (run,) = mlflow_runs(tmp_path)
    m = run.data.metrics
    for row in ("quantized", "quantized_dynamic"):
        assert {f"{row}/{k}" for k in ("dice", "iou", "size_mb", "onnx_latency_ms", "prob_max_abs_diff",
                                       "label_flip_fraction")} <= set(m), row
        assert abs(m[f"{row}/dice"] - m["final/dice"]) < 0.05
        assert 0 < m[f"{row}/prob_max_abs_diff"] < 0.2
        # the same int8 file in OpenVINO: timed in its pass and scored (the runtimes compute int8 apart)
        assert m[f"{row}/openvino_latency_ms"] > 0 and abs(m[f"{row}/openvino_dice"] - m[f"{row}/dice"]) < 0.05
    assert m["quantize/calibration_images"] == 6
    run_dir = Path(run.data.tags["medprune.run_dir"])
    manifest = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    assert manifest["network"] == "final" and manifest["static"]["calibration_images"] == 6
    assert m["quantized/size_mb"] == pytest.approx((run_dir / "quantize" / "model_int8.onnx").stat().st_size / 1e6)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "quantize/model_int8.onnx" in {a.path for a in client.list_artifacts(run.info.run_id, "quantize")}


@pytest.mark.integration
def test_a_damaged_int8_file_is_refused_naming_it(tmp_path):
    run_pipeline(tmp_path, *TINY, "stages=[train,score,prune,finetune,quantize]")
    (run,) = mlflow_runs(tmp_path)
    run_dir = Path(run.data.tags["medprune.run_dir"])
    int8 = run_dir / "quantize" / "model_int8.onnx"
    int8.write_bytes(int8.read_bytes()[:-16] + bytes(16))
    from pipeline.state import RunState
    from pipeline.quantization import quantized_files
    from models.io import ModelFileError

    with pytest.raises(ModelFileError, match="model_int8.onnx is damaged"):
        quantized_files(RunState.load(run_dir).quantized)
