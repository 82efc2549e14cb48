"""A catalogue of damaged inputs, each checked the same way (issue: honest data checks).

For every case the input is damaged on disk (or a key is set out of range), then read the way a job
reads it before any training: the config check (`validate`), the dataset (`build_data`), a model, a
scores or a checkpoint folder. Each must give either an error a user can fix, whose one-line form
(`pipeline.shell.one_line`, what `medprune` prints) names the damaged file or key, or a documented skip
that is counted in the dataset's statistics. No case may pass silently or end in a traceback of
another type. `test_catalogue_counts` prints how many cases end which way.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data import build_data
from data.isic import MASK_SUFFIX, TRAIN_DIRS
from data.synthetic import write_synthetic_isic
from data.synthetic_volumes import write_synthetic_brats, write_synthetic_covid_ct, write_synthetic_slices
from helpers import compose_config, conf
from models import build_model
from models.io import load_model, save_model
from pipeline.checkpoint import Checkpoint
from pipeline.config import PRUNE_SCHEMAS, ConfigError, MedpruneConfig, validate
from pipeline.declared import BOUNDS
from pipeline.shell import one_line, user_errors
from pipeline import scoring

pytestmark = pytest.mark.unit
UNET = conf("model", "unet", width=4, depth=2)


class Case(NamedTuple):
    name: str
    kind: str  # the reader or file it damages
    damage: Callable[[Path], dict]  # damages files under the folder; returns what to read
    names: Callable[[Path], str]  # what the one-line error must name (a file or a key)
    skip_stat: Optional[str] = None  # a documented skip: this statistic counts it, and there is no error


# -- the inputs, undamaged ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pristine")
    write_synthetic_isic(base / "isic", count=12, seed=0, min_side=40, max_side=60)
    write_synthetic_slices(base / "slices", count=12, seed=0)
    write_synthetic_brats(base / "brats", count=4, seed=0, shape=(24, 24, 12))
    write_synthetic_covid_ct(base / "covid", count=4, seed=0, shape=(32, 32, 10))
    model = build_model(UNET, 3, 1)
    save_model(model, UNET, 3, 1, base / "model")
    scoring.save({"encoder.0": torch.rand(4)}, "l1", _mkdir(base / "scores"))
    ck = Checkpoint(base / "checkpoint", 1)
    ck.save(1, {"model": model.state_dict(), "history": [{"loss": 1.0}], "best_dice": 0.5})
    _write_run(base / "run", model)
    return {p.name: p for p in base.iterdir()}


def _write_run(folder: Path, model) -> None:
    """A run folder as pipeline.run leaves it: the resolved config.yaml, state.json (paths relative to the folder)
    and the networks it names."""
    from omegaconf import OmegaConf

    from pipeline.state import RunState

    cfg = compose_config("dataset=isic2018", f"dataset.root={folder / 'data'}")
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
    for name in ("baseline", "pruned/model", "final/model"):
        save_model(model, UNET, 3, 1, folder / name)
    RunState(baseline=str(folder / "baseline"), pruned=str(folder / "pruned/model"), final=str(folder / "final/model")).save(folder)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def isic_img(root: Path, i: int) -> Path:
    return root / TRAIN_DIRS[0] / f"ISIC_{i:07d}.jpg"


def isic_mask(root: Path, i: int) -> Path:
    return root / TRAIN_DIRS[1] / f"ISIC_{i:07d}{MASK_SUFFIX}"


def _truncate(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def _rewrite_mask(path: Path, fn) -> Path:
    Image.fromarray(fn(np.asarray(Image.open(path).convert("L"))).astype(np.uint8), "L").save(path)
    return path


def _flip_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(255 - b for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))
    return path


def _nifti(path: Path, fn) -> Path:
    img = nib.load(str(path), mmap=False)
    data = fn(np.asarray(img.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


def _brats_file(root: Path, suffix: str, case: int = 1) -> Path:
    return root / f"BraTS2021_{case:05d}" / f"BraTS2021_{case:05d}_{suffix}.nii.gz"


def _json_edit(path: Path, fn) -> Path:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return path


ISIC = conf("dataset", "isic2018", image_size=16, workers=1)
SLICES = conf("dataset", "covid_semiseg", image_size=16, workers=1)
BRATS = conf("dataset", "brats", image_size=16, workers=1, cache_dir=None)
COVID = conf("dataset", "covid_ct", image_size=16, workers=1, cache_dir=None)


def _damages(base: dict):
    """`damages(fn, **extra)`: a damage that runs fn on the copied data folder and points the dataset config `base` at it."""
    def damages(fn, **extra):
        def damage(root):
            fn(root)
            return {"dataset": {**base, "root": str(root), **extra}}
        return damage
    return damages


isic, slices, brats, covid = _damages(ISIC), _damages(SLICES), _damages(BRATS), _damages(COVID)


def folder(kind):
    def damage(fn):
        def inner(root):
            fn(root)
            return {kind: root}
        return inner
    return damage


def stored(edit):
    """A damage that edits the run folder's stored config.yaml (parsed, edited, written back as YAML)."""
    import yaml

    def inner(root):
        config = yaml.safe_load((root / "config.yaml").read_text())
        edit(config)
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        return {"run": root}
    return inner


def _symlink_loop(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.symlink(path, path)


def _empty_dir(root: Path) -> None:
    for p in (root / TRAIN_DIRS[0]).iterdir():
        p.unlink()


def _all_masks_empty(root: Path) -> None:
    for p in (root / TRAIN_DIRS[1]).glob("*.png"):
        _rewrite_mask(p, lambda a: np.zeros_like(a))


def _a_file(root: Path) -> Path:
    path = root.parent / "a_file"
    path.write_text("a file, not a folder")
    return path


CASES = [
    # ISIC 2018 layout
    Case("truncated JPEG", "isic", isic(lambda r: _truncate(isic_img(r, 3), 300)), lambda r: str(isic_img(r, 3))),
    Case("zero-byte JPEG", "isic", isic(lambda r: _truncate(isic_img(r, 4), 0)), lambda r: str(isic_img(r, 4))),
    Case("zero-byte mask", "isic", isic(lambda r: _truncate(isic_mask(r, 5), 0)), lambda r: str(isic_mask(r, 5))),
    Case("mask of another size", "isic",
         isic(lambda r: Image.open(isic_mask(r, 6)).resize((10, 10)).save(isic_mask(r, 6))), lambda r: str(isic_mask(r, 6))),
    Case("mask values 100/200", "isic",
         isic(lambda r: _rewrite_mask(isic_mask(r, 7), lambda a: np.where(a > 0, 200, 100))), lambda r: str(isic_mask(r, 7))),
    Case("mask values 0..254 (JPEG-like)", "isic",
         isic(lambda r: _rewrite_mask(isic_mask(r, 8), lambda a: np.clip(a.astype(int) - 1, 0, 254))), lambda r: str(isic_mask(r, 8))),
    Case("RGB mask with differing channels", "isic",
         isic(lambda r: Image.fromarray(np.dstack([np.asarray(Image.open(isic_mask(r, 2)))] * 2 + [np.zeros((np.asarray(Image.open(isic_mask(r, 2))).shape), np.uint8)]), "RGB").save(isic_mask(r, 2))),
         lambda r: str(isic_mask(r, 2))),
    Case("image without its mask", "isic", isic(lambda r: isic_mask(r, 9).unlink()), lambda r: str(isic_mask(r, 9))),
    Case("image that is a symlink loop", "isic", isic(lambda r: _symlink_loop(isic_img(r, 1))), lambda r: str(isic_img(r, 1))),
    Case("empty image folder", "isic", isic(_empty_dir), lambda r: str(r / TRAIN_DIRS[0])),
    Case("missing mask folder", "isic", isic(lambda r: shutil.rmtree(r / TRAIN_DIRS[1])), lambda r: str(r / TRAIN_DIRS[1])),
    Case("all masks empty", "isic", isic(_all_masks_empty), lambda r: str(r)),
    Case("root is a file", "isic", lambda r: {"dataset": {**ISIC, "root": str(_a_file(r))}}, lambda r: str(r.parent / "a_file")),
    # 2D slice folders
    Case("slice mask values 0/100", "slices",
         slices(lambda r: _rewrite_mask(r / "GT" / "3.png", lambda a: np.where(a > 0, 100, 0))), lambda r: str(r / "GT" / "3.png")),
    Case("slice mask folder missing", "slices", slices(lambda r: shutil.rmtree(r / "GT")), lambda r: str(r / "GT")),
    Case("no image matches the pattern", "slices", slices(lambda r: None, image_pattern="{id}.tif"), lambda r: str(r / "Imgs")),
    Case("truncated slice image", "slices", slices(lambda r: _truncate(r / "Imgs" / "2.jpg", 100)), lambda r: str(r / "Imgs" / "2.jpg")),
    # NIfTI volumes
    Case("truncated NIfTI", "brats", brats(lambda r: _truncate(_brats_file(r, "flair"), 2000)), lambda r: str(_brats_file(r, "flair"))),
    Case("NaN in a segmentation", "brats",
         brats(lambda r: _nifti(_brats_file(r, "seg", 2), lambda a: np.where(a > 0, np.nan, a))), lambda r: str(_brats_file(r, "seg", 2))),
    Case("segmentation of another shape", "brats",
         brats(lambda r: _nifti(_brats_file(r, "seg", 3), lambda a: a[:, :, :-2])), lambda r: str(_brats_file(r, "seg", 3))),
    Case("label value outside the scheme", "brats",
         brats(lambda r: _nifti(_brats_file(r, "seg", 0), lambda a: np.where(a > 0, 7.0, 0.0).astype(np.float32))), lambda r: str(_brats_file(r, "seg", 0))),
    Case("missing modality", "brats", brats(lambda r: _brats_file(r, "t1ce", 1).unlink()), lambda r: str(_brats_file(r, "t1ce", 1))),
    Case("missing modality, on_missing=skip", "brats", brats(lambda r: _brats_file(r, "t1ce", 1).unlink(), on_missing="skip"),
         lambda r: "", skip_stat="cases_skipped"),
    Case("4D volume where a 3D one belongs", "brats",
         brats(lambda r: _nifti(_brats_file(r, "t2", 2), lambda a: np.stack([a, a], axis=-1))), lambda r: str(_brats_file(r, "t2", 2))),
    Case("gzip that is not a NIfTI", "covid",
         covid(lambda r: (r / "ct_scans" / sorted(os.listdir(r / "ct_scans"))[0]).write_bytes(gzip.compress(b"not a volume"))),
         lambda r: str(r / "ct_scans" / sorted(os.listdir(r / "ct_scans"))[0])),
    # model, scores and checkpoint files
    Case("tampered model.json (not JSON)", "model", folder("model")(lambda r: (r / "model.json").write_text("{oops")),
         lambda r: str(r / "model.json")),
    Case("weights with flipped bytes", "model", folder("model")(lambda r: _flip_middle(r / "model.safetensors")),
         lambda r: str(r / "model.safetensors")),
    Case("truncated weights", "model", folder("model")(lambda r: _truncate(r / "model.safetensors", 500)),
         lambda r: str(r / "model.safetensors")),
    Case("model.json naming an unregistered target", "model",
         folder("model")(lambda r: _json_edit(r / "model.json", lambda m: {**m, "model": {"_target_": "os.system", "command": "true"}})),
         lambda r: "os.system"),
    Case("model.json with a nested _target_", "model",
         folder("model")(lambda r: _json_edit(r / "model.json", lambda m: {**m, "model": {**m["model"], "width": {"_target_": "pathlib.Path.touch"}}})),
         lambda r: str(r / "model.json")),
    Case("model.json with a shape attribute that is not one", "model",
         folder("model")(lambda r: _json_edit(r / "model.json", lambda m: {**m, "shapes": {"encoder.0.conv.0": {"forward": 1}}})),
         lambda r: str(r / "model.json")),
    Case("scores with flipped bytes", "scores", folder("scores")(lambda r: _flip_middle(r / "scores.safetensors")),
         lambda r: str(r / "scores.safetensors")),
    Case("checkpoint with flipped bytes", "checkpoint",
         folder("checkpoint")(lambda r: _flip_middle(next(r.glob("epoch-*.safetensors")))), lambda r: str(next(r.glob("epoch-*.safetensors")))),
    # a run folder read back (pipeline.evaluate run=<folder>, pipeline.predict model=<folder>): its config is data
    Case("stored config: a _target_ nested in a list (joblib.load)", "run",
         stored(lambda c: c["dataset"].__setitem__("mean", [{"_target_": "joblib.load", "filename": "evil.pkl"}, 0.4, 0.4])),
         lambda r: "dataset.mean[0]._target_"),
    Case("stored config: a _target_ that opens a file", "run",
         stored(lambda c: c["dataset"].__setitem__("mask_threshold", {"_target_": "builtins.open", "file": "x", "mode": "w"})),
         lambda r: "dataset.mask_threshold._target_"),
    Case("stored config: an interpolation reading the environment", "run",
         stored(lambda c: c["dataset"].__setitem__("split_seed", "${oc.env:HOME}")), lambda r: "dataset.split_seed"),
    Case("stored config: a reader that is not medprune's", "run",
         stored(lambda c: c["dataset"].__setitem__("_target_", "os.system")), lambda r: "dataset._target_"),
    Case("stored config: a target in the loss group", "run",
         stored(lambda c: c["loss"]["terms"][1].__setitem__("_target_", "subprocess.run")), lambda r: "loss.terms[1]._target_"),
    Case("stored config: Hydra's _args_", "run", stored(lambda c: c["model"].__setitem__("_args_", ["x"])), lambda r: "model._args_"),
    Case("stored config: a Python object tag", "run",
         folder("run")(lambda r: (r / "config.yaml").write_text("dataset: !!python/object/apply:os.system [true]\n")),
         lambda r: str(r / "config.yaml")),
    Case("stored config: nested YAML aliases", "run",
         folder("run")(lambda r: (r / "config.yaml").write_text("a: &a [1, 1]\nb: &b [*a, *a]\ndataset: {}\n")),
         lambda r: str(r / "config.yaml")),
    Case("state.json naming a network outside the folder", "run",
         folder("run")(lambda r: _json_edit(r / "state.json", lambda s: {**s, "final": "/etc"})), lambda r: "final=/etc"),
    Case("state.json naming a network up and out of the folder", "run",
         folder("run")(lambda r: _json_edit(r / "state.json", lambda s: {**s, "pruned": "../../elsewhere"})), lambda r: "pruned="),
    Case("state.json that is not JSON", "run", folder("run")(lambda r: (r / "state.json").write_text("{oops")),
         lambda r: str(r / "state.json")),
]


def _read(what: dict):
    """Reads what a job would read first; returns its result (or raises)."""
    if "dataset" in what:
        return build_data(what["dataset"], seed=0)
    if "model" in what:
        return load_model(what["model"])
    if "scores" in what:
        return scoring.load(what["scores"])
    if "run" in what:
        from pipeline.evaluate import from_folder

        return from_folder(what["run"])
    return Checkpoint(what["checkpoint"], 1).load()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damaged_input_is_a_one_line_error_naming_it_or_a_counted_skip(case, pristine, tmp_path):
    root = Path(shutil.copytree(pristine[case.kind], tmp_path / case.kind, symlinks=True))
    what = case.damage(root)
    if case.skip_stat:
        data = _read(what)
        assert data.stats()[case.skip_stat] >= 1
        return
    from pipeline.evaluate import SourceError  # what pipeline.evaluate and pipeline.predict report as one line

    with pytest.raises((*user_errors(), SourceError)) as err:
        _read(what)
    line = one_line(err.value)
    assert "\n" not in line
    assert case.names(root) in line, line


# -- every count, size, batch, worker and epoch key of every group --------------------------------


def _declared_counts(node, schema, prefix="") -> list[tuple[str, int]]:
    """The integer keys of the fixed groups with a declared minimum (pipeline/declared.py), prune's by its schedule."""
    import dataclasses
    import typing

    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value = f"{prefix}{f.name}", node.get(f.name)
        if key == "prune":
            out += _declared_counts(value, PRUNE_SCHEMAS[str(value.schedule)], "prune.")
        elif dataclasses.is_dataclass(hints[f.name]) and value is not None:
            out += _declared_counts(value, hints[f.name], key + ".")
        elif BOUNDS in f.metadata and f.metadata[BOUNDS].ge is not None and hints[f.name] in (int, typing.Optional[int]):
            out.append((key, int(f.metadata[BOUNDS].ge)))
    return out


GROUP_CHOICES = ["criterion=taylor", "criterion=se", "sensitivity=default", "prune=iterative", "prune=latency_budget"]
# The target groups' counts: their constructors (readers, criteria, the synthetic generator) are their ranges' home.
TARGET_COUNTS = [("dataset.image_size", 8, ""), ("dataset.limit", 1, ""), ("dataset.workers", 1, ""),
                 ("dataset.synthetic.count", 1, ""), ("criterion.calibration_batches", 1, "criterion=taylor"),
                 ("criterion.steps", 1, "criterion=se")]


def _all_count_keys() -> list[tuple[str, int, str]]:
    keys = {k: (low, choice) for k, low, choice in TARGET_COUNTS}
    for choice in ["", *GROUP_CHOICES]:
        cfg = compose_config(*([choice] if choice else []))
        for key, low in _declared_counts(cfg, MedpruneConfig):
            keys.setdefault(key, (low, choice))
    return [(k, low, choice) for k, (low, choice) in sorted(keys.items())]


COUNT_KEYS = _all_count_keys()


@pytest.mark.parametrize("key, low, choice", COUNT_KEYS, ids=[k for k, _, _ in COUNT_KEYS])
def test_out_of_range_count_is_rejected_at_start_up_naming_the_key(key, low, choice):
    cfg = compose_config(*([choice] if choice else []), f"{key}={low - 1}")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    line = one_line(err.value)
    group, _, leaf = key.rpartition(".")  # a reader's constructor names its key as "dataset (<reader>): image_size=7"
    assert key in line or (line.startswith(f"{group} (") and f" {leaf}={low - 1}" in line), line


def test_the_declared_ranges_cover_every_group():
    groups = {k.split(".")[0] for k, _, _ in COUNT_KEYS}
    assert {"dataset", "train", "finetune", "evaluate", "prune", "criterion", "sensitivity", "quantize", "sparsity"} <= groups
    assert {"prune.timing_runs", "prune.steps", "evaluate.latency_runs", "finetune.steps", "train.threads"} <= {k for k, _, _ in COUNT_KEYS}


def test_catalogue_counts():
    errors = sum(c.skip_stat is None for c in CASES)
    skips = len(CASES) - errors
    by_kind: dict[str, int] = {}
    for c in CASES:
        by_kind[c.kind] = by_kind.get(c.kind, 0) + 1
    print(f"\ndamaged inputs: {len(CASES)} ({errors} one-line errors, {skips} counted skips) by kind {by_kind}; "
          f"out-of-range keys: {len(COUNT_KEYS)}")
    assert by_kind["run"] == 11 and by_kind["isic"] == 13 and by_kind["model"] == 6
    assert errors == len(CASES) - 1 and len(COUNT_KEYS) >= 10
