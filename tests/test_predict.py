"""`python -m pipeline.predict`: masks for new images and volumes, from a run's network, a model folder or an
ONNX file, prepared by the run's own reader and thresholded as the evaluate stage thresholds."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import TINY, conf, mlflow_runs, run_cli, run_pipeline
from PIL import Image

from data.base import read_mask
from data.synthetic_volumes import stored
from pipeline.measure.metrics import CaseRules, case_metrics

# Long enough that the tiny network segments (Dice about 0.9, not collapsed): equal masks then mean something.
# Images under twice the 32 px training size: the reader decodes them at full scale for its splits too (a larger
# JPEG it decodes at reduced scale, which predict and the logged model do not: docs/PREDICT.md), so predict's
# masks are exactly the evaluate stage's.
ISIC_JOB = [*TINY, "train.epochs=6", "train.lr=0.01", "prune.ratio=0.25", "finetune.lr=0.003",
            "+dataset.synthetic.min_side=40", "+dataset.synthetic.max_side=60"]
SCORED = ("dice", "iou")  # at original size (distances in each image's own pixels are not scored there)


def predict(outputs: Path, *args: str, ok: bool = True) -> str:
    return run_pipeline(outputs, *args, ok=ok, module="pipeline.predict")


@pytest.fixture(scope="module")
def isic_job(tmp_path_factory):
    """A tiny ISIC job (train, prune, fine-tune, evaluate), its test images copied to a folder of their own, and
    the final network's masks of them predicted with model=<the MLflow run id>."""
    outputs = tmp_path_factory.mktemp("outputs")
    run_pipeline(outputs, *ISIC_JOB)
    (run,) = mlflow_runs(outputs)
    run_dir = Path(run.data.tags["medprune.run_dir"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    images = Path(config["dataset"]["root"]) / "ISIC2018_Task1-2_Training_Input"
    masks = images.parent / "ISIC2018_Task1_Training_GroundTruth"
    inputs = tmp_path_factory.mktemp("inputs")
    for case in yaml.safe_load((run_dir / "splits.json").read_text())["test"]:
        shutil.copy(images / f"{case}.jpg", inputs)
    predicted = tmp_path_factory.mktemp("predicted")
    out = predict(outputs, f"model={run.info.run_id}", f"input={inputs}", f"output={predicted}")
    return {"outputs": outputs, "run": run, "run_dir": run_dir, "config": config, "inputs": inputs, "masks": masks,
            "predicted": predicted, "printed": out}


def read_png(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels)) <= {0, 255}, path
    return pixels == 255


@pytest.mark.integration
def test_predicting_the_test_split_gives_the_masks_the_evaluate_stage_scored(isic_job, tmp_path):
    """The evaluate stage scores each test prediction resized back to its image's size (the `_orig` columns of
    cases_<network>.csv); predict's masks, scored the same way against the same ground truth, give the same
    Dice, IoU, HD95 and surface Dice for every case: same foreground, same overlap, same outline."""
    run, run_dir, config = isic_job["run"], isic_job["run_dir"], isic_job["config"]
    assert run.data.params["final.collapsed"] == "no" and run.data.params["baseline.collapsed"] == "no"
    e = config["evaluate"]
    rules = CaseRules(ignore_empty=e["ignore_empty"], nsd_tolerance=e["nsd_tolerance"], jaccard_threshold=e["jaccard_threshold"])
    baseline = tmp_path / "baseline"  # another reference (the run folder) and another of its networks
    predict(isic_job["outputs"], f"model={run_dir}", "network=baseline", f"input={isic_job['inputs']}", f"output={baseline}")
    assert "4 of 4 input(s) predicted by the final network" in isic_job["printed"]
    for network, folder in (("final", isic_job["predicted"]), ("baseline", baseline)):
        with open(run_dir / "evaluate" / f"cases_{network}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r['case']}.png" for r in rows)
        for row in rows:
            pred = read_png(folder / f"{row['case']}.png")
            with Image.open(isic_job["inputs"] / f"{row['case']}.jpg") as image:
                assert pred.shape == (image.height, image.width)  # the image's own size, not the served 32 px
            assert 0 < pred.mean() < 0.5  # a real segmentation, not an empty or a full mask
            truth = read_mask(isic_job["masks"] / f"{row['case']}_segmentation.png", None)
            scores = case_metrics(pred[None], truth, rules, None, None)
            for metric in SCORED:
                assert scores[metric] == pytest.approx(float(row[f"{metric}_orig"]), rel=1e-9, abs=1e-12), (network, row["case"], metric)


@pytest.mark.integration
def test_the_logged_model_gives_predicts_masks_for_the_image_files_as_read(isic_job, monkeypatch):
    """The run's logged model, given each test image as a user reads it (uint8 RGB at its own size), returns the
    masks predict wrote for that file: the preprocessing and the way back are in its graph."""
    from pipeline.mlflow_model import predict_masks

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{isic_job['outputs'] / 'mlflow.db'}")
    for path in sorted(isic_job["inputs"].iterdir()):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        masks = predict_masks(f"runs:/{isic_job['run'].info.run_id}/final_mlflow_model", rgb[None])
        expected = read_png(isic_job["predicted"] / f"{path.stem}.png")
        assert masks.shape == (1, 1, *expected.shape)
        assert (masks[0, 0].astype(bool) == expected).mean() > 0.999, path  # ONNX Runtime's sums may flip a boundary pixel


@pytest.mark.integration
def test_a_model_folder_or_onnx_file_takes_its_settings_from_config(isic_job, tmp_path):
    run_dir, outputs, inputs = isic_job["run_dir"], isic_job["outputs"], isic_job["inputs"]
    reference = {p.name: read_png(p) for p in isic_job["predicted"].iterdir()}
    final = run_dir / yaml.safe_load((run_dir / "state.json").read_text())["final"]

    folder = tmp_path / "folder"  # the same network from its model folder: the same masks, bit for bit
    predict(outputs, f"model={final}", f"config={run_dir}", f"input={inputs}", f"output={folder}")
    assert all(np.array_equal(read_png(folder / name), mask) for name, mask in reference.items())

    onnx = tmp_path / "onnx"  # the evaluate stage's final.onnx (BatchNorm folded) under ONNX Runtime
    predict(outputs, f"model={run_dir / 'evaluate' / 'final.onnx'}", f"config={run_dir / 'config.yaml'}",
            f"input={inputs}", f"output={onnx}")
    for name, mask in reference.items():
        assert (read_png(onnx / name) == mask).mean() > 0.995, name  # float differences may flip a boundary pixel

    out = predict(outputs, f"model={final}", f"input={inputs}", f"output={tmp_path / 'none'}", ok=False)
    assert f"model={final} is a model folder, without dataset settings: expected config=" in out
    out = predict(outputs, f"model={run_dir}", f"config={run_dir}", f"input={inputs}", f"output={tmp_path / 'none'}", ok=False)
    assert "config= is for a model folder or an .onnx file" in out
    out = predict(outputs, f"model={final}", f"config={run_dir / '.hydra' / 'config.yaml'}", f"input={inputs}",
                  f"output={tmp_path / 'none'}", ok=False)
    assert "is Hydra's own copy, which holds unresolved ${...} interpolations" in out
    out = predict(outputs, f"model={run_dir}", f"input={inputs}", f"output={tmp_path / 'none'}", "dataset.image_size=64", ok=False)
    assert "unknown key 'dataset.image_size'" in out
    assert not (tmp_path / "none").exists()  # nothing is written before the command is checked


@pytest.mark.integration
def test_bad_inputs_are_skipped_naming_the_file_and_the_rest_are_written(isic_job, tmp_path):
    run_dir, outputs = isic_job["run_dir"], isic_job["outputs"]
    inputs = tmp_path / "inputs"
    good = sorted(isic_job["inputs"].iterdir())[:2]
    inputs.mkdir()
    for path in good:
        shutil.copy(path, inputs)
    (inputs / "notes.txt").write_text("not an image\n")
    (inputs / "cut.jpg").write_bytes(good[0].read_bytes()[:300])  # a truncated JPEG
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(inputs / "scan.nii.gz"))
    out_dir = tmp_path / "out"
    out = predict(outputs, f"model={run_dir}", f"input={inputs}", f"output={out_dir}")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{p.stem}.png" for p in good)
    assert "2 of 5 input(s) predicted" in out and "3 skipped" in out
    lines = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3
    for name, why in (("notes.txt", "cannot be read"), ("cut.jpg", "cannot be read"), ("scan.nii.gz", "is a NIfTI volume")):
        (line,) = [line for line in lines if str(inputs / name) in line]
        assert why in line

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.move(inputs / "notes.txt", only_bad)
    out = predict(outputs, f"model={run_dir}", f"input={only_bad}", f"output={tmp_path / 'empty'}", ok=False)
    assert "0 of 1 input(s) predicted" in out and not list((tmp_path / "empty").iterdir())


@pytest.mark.integration
@pytest.mark.timeout(300)  # a FIFO read would block forever
def test_only_regular_files_are_inputs_a_fifo_or_device_is_skipped_unread(isic_job, tmp_path):
    run_dir, outputs = isic_job["run_dir"], isic_job["outputs"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted(isic_job["inputs"].iterdir())[0]
    shutil.copy(good, inputs)
    os.mkfifo(inputs / "pipe.jpg")
    os.symlink("/dev/zero", inputs / "zero.jpg")
    os.symlink(tmp_path / "gone.jpg", inputs / "dangling.jpg")
    out = predict(outputs, f"model={run_dir}", f"input={inputs}", f"output={tmp_path / 'out'}")
    assert "1 of 4 input(s) predicted" in out and "3 skipped" in out
    lines = [line for line in out.splitlines() if line.startswith("  - ")]
    for name, why in (("pipe.jpg", "is a FIFO (named pipe): only regular files are inputs"),
                      ("zero.jpg", "is a device (through a symlink)"), ("dangling.jpg", "is a dangling symlink")):
        (line,) = [line for line in lines if str(inputs / name) in line]
        assert why in line, line
    out = predict(outputs, f"model={run_dir}", f"input={inputs / 'pipe.jpg'}", f"output={tmp_path / 'one'}", ok=False)
    assert [line for line in out.splitlines() if line.startswith("medprune predict:")] == [
        f"medprune predict: configuration error: input={inputs / 'pipe.jpg'} is a FIFO (named pipe): expected an image, "
        f"a NIfTI volume or a case folder, or a folder of them"]


@pytest.mark.integration
def test_an_onnx_network_that_cannot_run_is_one_line(isic_job, tmp_path):
    """A graph that asks for a tensor beyond any memory at run time (its Tile would be terabytes): one line naming the
    file, not ONNX Runtime's traceback and log."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = isic_job["config"]["dataset"]["image_size"]
    graph = helper.make_graph(
        [helper.make_node("Tile", ["input", "reps"], ["logits"])], "huge",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([1, 1, 1 << 14, 1 << 14], np.int64), "reps")])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    out = run_cli(isic_job["outputs"], f"model={path}", f"config={isic_job['run_dir']}", f"input={isic_job['inputs']}",
                  f"output={tmp_path / 'out'}", ok=False, module="pipeline.predict")  # a process: ORT's own log would show
    errors = [line for line in out.splitlines() if line.startswith("medprune predict:")]
    assert len(errors) == 1 and f"model={path} failed in ONNX Runtime" in errors[0], out[-2000:]
    assert "Traceback" not in out and "ONNXRuntimeError" in errors[0] and "[E:onnxruntime" not in out


# -- volumes ------------------------------------------------------------------------------------------

SPACING = (1.0, 1.2, 2.0)


def thresholder(path: Path, size: int) -> Path:
    """An ONNX network whose logit is 10 x (flair - 2): foreground exactly where the flair voxel is 3, not 1."""
    from pipeline.inference import export_onnx

    net = torch.nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([10.0, 0.0]).view(1, 2, 1, 1))
        net.bias.fill_(-20.0)
    return export_onnx(net, path, (1, 2, size, size))


def write_case(folder: Path, flair_ras: np.ndarray, names=("flair", "t2")) -> tuple[np.ndarray, np.ndarray]:
    """A BraTS 2018-layout case stored oblique, axes permuted and flipped (P, I, L): (stored flair, affine)."""
    folder.mkdir(parents=True)
    flair, affine = stored(flair_ras, SPACING, "oblique")
    t2, _ = stored((flair_ras > 0).astype(np.float32), SPACING, "oblique")
    for name in names:
        nib.save(nib.Nifti1Image(flair if name == "flair" else t2, affine), str(folder / f"{folder.name}_{name}.nii.gz"))
    return flair, affine


def test_a_nifti_volume_round_trip_keeps_affine_shape_and_orientation(tmp_path):
    """Volumes stored oblique and permuted are predicted slice by slice in the canonical orientation and written
    back in their own: each voxel's label lands on the voxel it was predicted for, under the input's affine and
    header. Intensities are whole numbers (`already_normalized`) and slices are image_size wide, so the expected
    mask is exact; a case with non-square slices (resized to 16 and back) keeps its shape and affine."""
    rng = np.random.default_rng(0)
    ras = np.where(rng.random((16, 16, 10)) < 0.5, 3.0, 1.0).astype(np.float32)
    ras[:, :, :2] = 0  # two slices without brain: not predicted, background
    ras[0], ras[:, -1] = 0, 0  # background in the corners
    expected = stored((ras == 3).astype(np.float32), SPACING, "oblique")[0]
    inputs = tmp_path / "inputs"
    flair, affine = write_case(inputs / "BraTS2021_00001", ras)
    t2 = stored((ras > 0).astype(np.float32), SPACING, "oblique")[0]
    header = nib.Nifti1Image(np.stack([flair, t2], -1), affine)
    header.header.set_xyzt_units("mm", "sec")
    nib.save(header, str(inputs / "stacked.nii.gz"))  # one file, the modalities along a 4th axis
    nib.save(nib.Nifti1Image(np.stack([flair, t2, t2], -1), affine), str(inputs / "three.nii.gz"))
    write_case(inputs / "BraTS2021_00002", ras, names=("flair",))  # t2 missing
    x, y, z = np.meshgrid(np.arange(20), np.arange(12), np.arange(8), indexing="ij")
    ball = ((x - 8) / 6.0) ** 2 + ((y - 5) / 4.0) ** 2 + ((z - 4) / 3.0) ** 2 <= 1
    body = ((x - 9.5) / 9.0) ** 2 + ((y - 5.5) / 5.5) ** 2 + ((z - 3.5) / 3.5) ** 2 <= 1
    wide = np.where(ball, 3.0, np.where(body, 1.0, 0.0)).astype(np.float32)  # 20 x 12 axial slices
    write_case(inputs / "BraTS2021_00003", wide)
    wide_expected, wide_affine = stored(ball.astype(np.float32), SPACING, "oblique")

    config = {"dataset": conf("dataset", "brats", outputs=str(tmp_path), root=str(tmp_path / "unused"),
                              modalities=["flair", "t2"], image_size=16, already_normalized=True),
              "evaluate": {"threshold": 0.5, "batch_size": 4, "threads": 1}, "device": "cpu"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "out"
    out = predict(tmp_path, f"model={thresholder(tmp_path / 'net.onnx', 16)}", f"config={tmp_path / 'config.yaml'}",
                  f"input={inputs}", f"output={out_dir}", "overlay=true")

    assert "3 of 5 input(s) predicted" in out
    assert f"{inputs / 'three.nii.gz'} holds 3 modalities (shape 16x10x16x3): expected 2 (flair, t2)" in out
    assert f"modality t2 is missing: expected {inputs / 'BraTS2021_00002' / 'BraTS2021_00002_t2'}.nii.gz" in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{n}{s}" for n in ("BraTS2021_00001", "stacked", "BraTS2021_00003") for s in (".nii.gz", "_overlay.png"))
    for name, source in (("BraTS2021_00001", inputs / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"),
                         ("stacked", inputs / "stacked.nii.gz")):
        mask, original = nib.load(str(out_dir / f"{name}.nii.gz")), nib.load(str(source))
        labels = np.asanyarray(mask.dataobj)
        assert labels.dtype == np.uint8 and labels.shape == flair.shape
        assert np.array_equal(labels, expected.astype(np.uint8)), name
        assert np.allclose(mask.affine, original.affine) and not np.allclose(mask.affine[:3, :3], np.diag(SPACING))
        assert mask.header.get_zooms() == original.header.get_zooms()[:3]
        assert mask.header.get_xyzt_units() == original.header.get_xyzt_units()
        assert int(mask.header["sform_code"]) == int(original.header["sform_code"])
    wide_mask = nib.load(str(out_dir / "BraTS2021_00003.nii.gz"))
    assert wide_mask.shape == wide_expected.shape and np.allclose(wide_mask.affine, wide_affine)
    assert (np.asanyarray(wide_mask.dataobj) == wide_expected).mean() > 0.97  # resized to 16 x 16 and back


@pytest.mark.integration
def test_a_3d_network_predicts_whole_volumes_written_back_on_their_own_grid(tmp_path):
    """A 3D network (dataset=brats3d) gets each case's kept slices as one volume, tiled by sliding windows of the
    patch; each voxel's label lands on the voxel it was predicted for, as in 2D (the voxel-wise thresholder makes
    the expected mask exact whatever the tiling)."""
    from data.nifti import axial
    from pipeline.inference import export_onnx

    rng = np.random.default_rng(1)
    ras = np.where(rng.random((16, 16, 10)) < 0.5, 3.0, 1.0).astype(np.float32)
    ras[:, :, :2] = 0  # no brain: not part of the volume, background
    ras[0], ras[:, -1] = 0, 0
    expected = stored((ras == 3).astype(np.float32), SPACING, "oblique")[0]
    inputs = tmp_path / "inputs"
    flair, affine = write_case(inputs / "BraTS2021_00001", ras)
    assert axial(ras).shape[0] - 2 == 8  # kept slices: the volume is 8 deep, one window along z
    net = torch.nn.Conv3d(2, 1, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([10.0, 0.0]).view(1, 2, 1, 1, 1))
        net.bias.fill_(-20.0)
    onnx = export_onnx(net, tmp_path / "net3d.onnx", (1, 2, 8, 8, 8))
    from helpers import compose_config
    from omegaconf import OmegaConf

    dataset = OmegaConf.to_container(compose_config(
        "dataset=brats3d", f"paths.outputs={tmp_path}", f"dataset.root={tmp_path / 'unused'}",
        "dataset.modalities=[flair,t2]", "dataset.image_size=16", "dataset.patch_size=8",
        "dataset.already_normalized=true").dataset, resolve=True)
    config = {"dataset": dataset, "evaluate": {"threshold": 0.5, "batch_size": 4, "threads": 1}, "device": "cpu"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "out"
    out = predict(tmp_path, f"model={onnx}", f"config={tmp_path / 'config.yaml'}", f"input={inputs}", f"output={out_dir}")
    assert "1 of 1 input(s) predicted" in out
    mask = nib.load(str(out_dir / "BraTS2021_00001.nii.gz"))
    assert np.array_equal(np.asanyarray(mask.dataobj), expected.astype(np.uint8)) and np.allclose(mask.affine, affine)
    wrong = export_onnx(net, tmp_path / "net3d_16.onnx", (1, 2, 16, 16, 16))
    out = predict(tmp_path, f"model={wrong}", f"config={tmp_path / 'config.yaml'}", f"input={inputs}",
                  f"output={tmp_path / 'out2'}", ok=False)
    assert "takes inputs shaped" in out and "2, 16, 16, 16]" in out and "[batch, 2, 8, 8, 8]" in out
