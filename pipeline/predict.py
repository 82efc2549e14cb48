"""Masks for new images and volumes, from a trained network applied the way the evaluate stage applies it.

    python -m pipeline.predict model=<MLflow run id | run folder | model folder | .onnx file> input=<file or folder>
                               output=<folder> [network=baseline|pruned|final] [config=<run folder | config YAML>]
                               [device=cpu] [batch_size=N] [threshold=0.5] [overlay=true]

Each input is read and preprocessed by the run's own dataset reader (data/: the decoding, resize,
normalisation, modality order and canonical orientation its test split went through), predicted in
batches of the run's `evaluate.batch_size` with its `evaluate.threads`, and thresholded at
`evaluate.threshold` after the logits are resized back to the input's own grid (bilinear), which is how
the evaluate stage scores a prediction at original resolution: predicting a run's test images gives
the masks its evaluate stage scored, and the run's logged model gives the same masks for the same file
(images are decoded at full scale, as the logged model is given them; the splits decode a JPEG of twice
the training size at reduced scale, which changes a few boundary pixels: docs/PREDICT.md).

- 2D data (ISIC, slice folders): a 0/255 PNG per image at its original size, `<name>.png`
  (`<name>_<k>.png` per output channel when the network has several).
- BraTS volumes (a case folder in the BraTS layout, or one NIfTI file holding every modality: 3D for one,
  4D with the modalities along the last axis otherwise): the axial slices of the canonical (RAS+) volume
  are predicted, put back in the file's own axis order and directions, and written as `<name>.nii.gz`
  with the input's affine and header (uint8: 0 background, k + 1 for the network's k-th region).
- `overlay=true`: also `<name>_overlay.png`, the mask over the image (a volume: over its axial slice with
  the most foreground).

`model=` a run uses that run's config; a model folder or ONNX file has no dataset settings, so `config=`
names them (a run folder, or its config YAML). The config is data: its reader must be one of medprune's
(a `_target_` of conf/dataset/, as for `pipeline.evaluate`) and nothing else it names is built; model
folders are loaded with their checksums verified. Only device, batch_size, threshold, overlay and the paths
can be set here (keys and defaults: conf/predict.yaml).

An input that cannot be used (unreadable, another format, another modality count) is skipped with one line
naming it and nothing is written for it; the others are written, each file atomically, and the counts are
printed at the end. Exit status: 0 when a mask was written, 1 when none was, 2 when the command cannot
work (a key, the model or its config; nothing is read before those are checked).
"""
from __future__ import annotations

import gzip
import io
import logging
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import shell
from pipeline.config import ConfigError
from pipeline.paths import outputs_dir
from pipeline.state import NETWORKS

log = logging.getLogger("medprune.predict")

PATH_KEYS = ("model", "input", "output", "config")  # taken as typed, never parsed as YAML (a run id may look like a number)
REQUIRED = "???"
COLOURS = ((255, 0, 0), (0, 200, 0), (0, 96, 255), (255, 200, 0))  # overlay colour of output channel k


class Skip(Exception):
    """One input that cannot be used; the message names it."""


# -- the command line -------------------------------------------------------------------------------------

def check_keys(given: list[str]) -> None:
    """The keys of conf/predict.yaml, each given once (the dataset settings are the run's, not the command's)."""
    keys = list(shell.compose("predict", [], alone=True))
    seen: set[str] = set()
    for key in given:
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}: expected one of {', '.join(keys)} (conf/predict.yaml); the "
                              f"dataset settings are the run's")
        if key in seen:
            raise ConfigError(f"{key}= is given twice")
        seen.add(key)


def check_settings(cfg: DictConfig, given: list[str]) -> tuple[dict[str, Any], set[str]]:
    """conf/predict.yaml composed with the `key=value` arguments (by Hydra; the paths as typed), checked; and
    the keys that were given."""
    settings = OmegaConf.to_container(cfg, resolve=False)  # the paths as typed: nothing in them is interpolated
    for key, value in settings.items():
        if value == "":
            settings[key] = None  # `key=`: null, as YAML reads it
    for key, value in settings.items():
        if value == REQUIRED or (key in ("model", "input", "output") and not value):
            raise ConfigError(f"{key}= is missing: expected {key}=<...> (python -m pipeline.predict --help)")
    if settings["network"] not in NETWORKS:
        raise ConfigError(f"network={settings['network']!r}: expected one of {', '.join(NETWORKS)}")
    size = settings["batch_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"batch_size={size!r}: expected an integer >= 1 (or null: the run's evaluate.batch_size)")
    threshold = settings["threshold"]
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold < 1):
        raise ConfigError(f"threshold={threshold!r}: expected a probability strictly between 0 and 1 (or null: the "
                          f"run's evaluate.threshold)")
    if not isinstance(settings["overlay"], bool):
        raise ConfigError(f"overlay={settings['overlay']!r}: expected true or false")
    if settings["device"] is not None and not isinstance(settings["device"], str):
        raise ConfigError(f"device={settings['device']!r}: expected auto, cpu, cuda or cuda:N")
    return settings, set(given)


# -- the network and the settings it was evaluated with ---------------------------------------------------

@dataclass
class Source:
    """The network to apply and the run config that says how its inputs were prepared."""

    config: dict
    where: str  # the config's file, for messages
    network: Path
    onnx: bool
    label: str  # what the network is, for the summary


def read_config(ref: str) -> tuple[dict, str]:
    """`config=`: a run folder (its config.yaml) or that config.yaml, read as data (pipeline/stored_config.py:
    plain values, nothing resolved, no code named)."""
    from pipeline.stored_config import StoredConfigError, read

    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"config={ref}: the folder holds no config.yaml: expected a medprune run folder (its "
                              f"config.yaml is written resolved when the run starts)")
    elif not path.is_file():
        raise ConfigError(f"config={ref} does not exist: expected a run folder or its config.yaml")
    if path.parent.name == ".hydra":
        raise ConfigError(f"config={ref} is Hydra's own copy, which holds unresolved ${{...}} interpolations: expected the "
                          f"run folder or its config.yaml (written resolved; a stored config is never resolved)")
    try:
        return read(path), str(path.resolve())
    except StoredConfigError as err:
        raise ConfigError(f"config={ref}: {err}") from err


def find_source(settings: dict[str, Any], given: set[str], download_to: Path) -> Source:
    """What `model=` names: a bare network (model folder, .onnx) with `config=`, or a run's network and config."""
    from pipeline.baseline import is_model_dir
    from pipeline.evaluate import SourceError, from_folder, sources

    ref, network = settings["model"], settings["network"]
    path = Path(ref).expanduser()
    onnx = path.is_file() and path.suffix.lower() == ".onnx"
    if onnx or (path.is_dir() and is_model_dir(path)):
        what = "an ONNX file" if onnx else "a model folder"
        if "network" in given:
            raise ConfigError(f"network= picks one of a run's networks: model={ref} is {what}, a single network")
        if not settings["config"]:
            raise ConfigError(f"model={ref} is {what}, without dataset settings: expected config=<its run folder or "
                              f"config YAML> (image size, modalities, normalisation, threshold)")
        config, where = read_config(settings["config"])
        return Source(config, where, path.resolve(), onnx, str(path.resolve()))
    if settings["config"]:
        raise ConfigError(f"config= is for a model folder or an .onnx file: model={ref} is a run, and its own config is used")
    if path.is_file():
        raise SourceError(f"model={ref} is a file but not an .onnx model: expected an MLflow run id, a run folder, a model "
                          f"folder or an .onnx file")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise SourceError(f"model={ref}: the folder holds neither a model (model.json, model.safetensors) nor a run "
                              f"(config.yaml, state.json)")
        run = from_folder(path.resolve())
        where = str(path.resolve() / "config.yaml")
    else:
        if not re.fullmatch(r"[0-9a-f]{32}", ref):
            raise SourceError(f"model={ref}: no such file or folder, nor a 32-character MLflow run id: expected an MLflow "
                              f"run id, a run folder, a model folder or an .onnx file")
        from pipeline.tracking import client_for, resolve_uri

        try:
            found, sweep = sources(ref, client_for(resolve_uri(None, outputs_dir())), download_to)
        except SourceError as err:  # worded for pipeline.evaluate's run= key
            raise SourceError(str(err).replace(f"run={ref}", f"model={ref}")) from err
        if sweep is not None:
            raise SourceError(f"model={ref} is a sweep: expected one of its runs")
        run = found[0]
        where = f"the config of run {ref}"
    chosen = getattr(run.state, network)
    if not chosen:
        present = [n for n in NETWORKS if getattr(run.state, n)]
        raise SourceError(f"model={ref}: the run has no {network} network (it has: {', '.join(present) or 'none'}); "
                          f"set network=")
    return Source(run.config, where, Path(chosen), False, f"the {network} network of {run.name}")


@dataclass
class Settings:
    dataset: dict
    threshold: float
    batch_size: int
    threads: Optional[int]
    device: str


def run_settings(source: Source, settings: dict[str, Any]) -> Settings:
    """The run config's dataset, evaluate.threshold / batch_size / threads and device (plain values: the config
    was checked as data and nothing in it is resolved), with the command line's device, batch_size and
    threshold over them."""
    from pipeline.evaluate import SourceError

    evaluate = source.config.get("evaluate")
    evaluate = evaluate if isinstance(evaluate, dict) else {}
    for key in ("threshold", "batch_size"):
        if key not in evaluate:
            raise SourceError(f"{source.where} has no evaluate.{key}: expected a medprune run's config")
    pick = {key: settings[key] if settings[key] is not None else evaluate[key] for key in ("threshold", "batch_size")}
    threshold, size, threads = pick["threshold"], pick["batch_size"], evaluate.get("threads")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise SourceError(f"{source.where}: evaluate.threshold is not a probability strictly between 0 and 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SourceError(f"{source.where}: evaluate.batch_size is not an integer >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SourceError(f"{source.where}: evaluate.threads is not an integer >= 1 (or null)")
    device = settings["device"] if settings["device"] is not None else source.config.get("device", "auto")
    if not isinstance(device, str):
        raise SourceError(f"{source.where}: device is not a string (auto, cpu, cuda or cuda:N)")
    return Settings(dict(source.config["dataset"]), float(threshold), int(size), threads, device)


def make_reader(dataset: dict, where: str):
    """The run's dataset reader, built from its config's plain values (data.build_reader: an allow-listed reader,
    nothing else built), nothing read."""
    from data import ReaderSettingsError, build_reader
    from data.brats import BraTS
    from pipeline.evaluate import SourceError

    target = dataset.get("_target_")
    try:
        reader = build_reader(dataset)
    except ReaderSettingsError as err:
        raise SourceError(f"{where}: {err}") from err
    if getattr(reader, "dims", 2) == 3 and not isinstance(reader, BraTS):
        raise SourceError(f"{where}: predict applies 3D networks to BraTS volumes, not {target}'s data (the COVID-19 CT "
                          f"reader crops each scan to its lung mask, which a new scan does not have)")
    if not isinstance(reader, BraTS) and not hasattr(reader, "read_image"):
        raise SourceError(f"{where}: predict reads 2D images (ISIC, slice folders) and BraTS volumes, not {target}'s data "
                          f"(the COVID-19 CT reader crops each slice to the scan's lung mask, which a new scan does not have)")
    return reader


def load_network(source: Source, reader, device: torch.device, threads: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """batch [B, C, S, S] (CPU) -> logits [B, K, S, S]: the model folder's network in eval mode on `device`, or
    an ONNX Runtime session (CPU); either must take the reader's inputs. A 3D network takes whole volumes
    [1, C, D, S, S], tiled by sliding windows of the reader's patch (`inference.SlidingWindow`)."""
    from pipeline import inference

    network = _load_network(source, reader, device, threads)
    window = getattr(reader, "window", None)
    if window is None:
        return network
    tiles = inference.SlidingWindow(network, window)  # type: ignore[arg-type]
    return lambda x: tiles(x.to(device) if not source.onnx else x)


def _load_network(source: Source, reader, device: torch.device, threads: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    from pipeline import inference
    from pipeline.evaluate import SourceError

    expected = [reader.in_channels, *reader.input_size]
    if source.onnx:
        try:
            with inference.quiet("onnxruntime"):
                session = inference.onnx_session(source.network, threads)
        except Exception as err:  # ONNX Runtime raises its own Fail / InvalidGraph / ... on a bad file
            raise SourceError(f"model={source.network} cannot be loaded by ONNX Runtime ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
        shape = list(session.get_inputs()[0].shape)
        if len(shape) != len(expected) + 1 or any(isinstance(s, int) and s != e for s, e in zip(shape[1:], expected)):
            raise SourceError(f"model={source.network} takes inputs shaped {shape}, but {source.where} serves "
                              f"[batch, {', '.join(map(str, expected))}] (channels, the input size): expected the "
                              f"network trained with that config")
        if device.type != "cpu":
            log.info("device=%s: an ONNX model runs on the CPU (ONNX Runtime's CPU provider)", device)

        def run(x: torch.Tensor) -> torch.Tensor:
            try:
                return torch.from_numpy(inference.onnx_run(session, x))
            except Exception as err:  # ONNX Runtime's own types: a graph that cannot run (a tensor beyond memory, ...)
                if not type(err).__module__.startswith("onnxruntime"):
                    raise
                first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                raise SourceError(f"model={source.network} failed in ONNX Runtime on a batch shaped {list(x.shape)} "
                                  f"({type(err).__name__}: {first[:300]})") from err

        return run
    from models.io import load_model, read_meta

    channels = read_meta(source.network)["in_channels"]
    if channels != reader.in_channels:
        raise SourceError(f"model={source.network} takes {channels} input channel(s), but {source.where} serves "
                          f"{reader.in_channels}: expected the network trained with that config")
    model = load_model(source.network).to(device).eval()
    return lambda x: model(x.to(device))


# -- inputs and outputs -----------------------------------------------------------------------------------

def list_inputs(input_ref: str, output: Path, reader) -> list[Path]:
    """`input=`: one file or case folder, or a folder whose entries (files, case folders) are the inputs."""
    from data.brats import BraTS

    path = Path(input_ref).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"input={input_ref} does not exist: expected an image, a NIfTI volume or a case folder, or a "
                          f"folder of them")
    if output == path:
        raise ConfigError(f"output={output} is the input folder: expected a folder of its own for the masks")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={output} is a file: expected a folder")
    if not (path.is_file() or path.is_dir()):
        raise ConfigError(f"input={input_ref} is {not_regular(path)}: expected an image, a NIfTI volume or a case folder, "
                          f"or a folder of them")
    if path.is_file() or (isinstance(reader, BraTS) and reader.case_files(path)[0] is not None):
        return [path]
    entries = sorted(p for p in path.iterdir() if p != output)
    if not entries:
        raise ConfigError(f"input={input_ref} is an empty folder: expected images, NIfTI volumes or case folders")
    names: dict[str, Path] = {}
    for entry in entries:
        name = output_stem(entry)
        if name in names:
            raise ConfigError(f"inputs {names[name]} and {entry} would both be written as {name}: expected one input "
                              f"per name (move one aside)")
        names[name] = entry
    return entries


def not_regular(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is (after symlinks), for a message."""
    import stat

    if not path.exists():
        return "a dangling symlink" if path.is_symlink() else "missing"
    mode = path.stat().st_mode
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return kind + (" (through a symlink)" if path.is_symlink() else "")


def output_stem(path: Path) -> str:
    """The output name of an input: its file name less the extension (.nii.gz whole), a case folder's name."""
    from data.nifti import strip_nifti

    return path.name if path.is_dir() else strip_nifti(path.name) or path.stem


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`rgb` (H x W x 3 uint8) tinted with the colour of each label (H x W: 0 none, k + 1 channel k)."""
    out = rgb.astype(np.float32)
    for k in range(int(labels.max(initial=0))):
        where = labels == k + 1
        out[where] = 0.55 * out[where] + 0.45 * np.asarray(COLOURS[k % len(COLOURS)], np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def label_map(mask: np.ndarray) -> np.ndarray:
    """Boolean channels [K, ...] -> uint8 labels: 0 background, k + 1 where channel k is set (later ones win), as
    the evaluate stage exports volumes."""
    labels = np.zeros(mask.shape[1:], np.uint8)
    for k, channel in enumerate(mask):
        labels[channel] = k + 1
    return labels


@dataclass
class Tally:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Predictor:
    """Applies one network to inputs the run's reader prepares, and writes their masks."""

    def __init__(self, reader, forward: Callable[[torch.Tensor], torch.Tensor], settings: Settings, output: Path,
                 with_overlay: bool):
        self.reader, self.forward, self.settings = reader, forward, settings
        self.output, self.with_overlay = output, with_overlay
        self.tally = Tally()

    def skip(self, reason: str) -> None:
        reason = " ".join(str(reason).split())  # one line
        log.warning("skipped: %s", reason)
        self.tally.skipped.append(reason)

    def write(self, name: str, data: bytes) -> None:
        from data.files import atomic_write

        self.tally.written.append(atomic_write(self.output / name, data))

    def masks_at(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Logits [B, K, S, S] -> boolean masks [B, K, *size]: resized back (bilinear), then thresholded."""
        import torch.nn.functional as F

        from pipeline.measure.metrics import binarize

        up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return binarize(up, self.settings.threshold).cpu().numpy()

    # -- 2D images --

    def read_image(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        from data import DatasetError
        from data.nifti import strip_nifti

        kind = type(self.reader).__name__
        if not (path.is_file() or path.is_dir()):  # a FIFO would block the read forever; a device never ends
            raise Skip(f"{path} is {not_regular(path)}: only regular files are inputs")
        if path.is_dir():
            raise Skip(f"{path} is a folder: expected an image file (the network's dataset, {kind}, is 2D images)")
        if strip_nifti(path.name):
            raise Skip(f"{path} is a NIfTI volume: expected an image file (the network's dataset, {kind}, is 2D images)")
        try:
            pixels, original = self.reader.read_image(path)
        except DatasetError as err:
            raise Skip(str(err)) from err
        return self.reader.network_input(pixels), original

    @torch.no_grad()
    def images(self, paths: list[Path], bar) -> None:
        batch: list[tuple[Path, torch.Tensor, tuple[int, int]]] = []
        for i, path in enumerate(paths):
            try:
                batch.append((path, *self.read_image(path)))
            except Skip as reason:
                self.skip(str(reason))
                bar.update(1)
            if batch and (len(batch) == self.settings.batch_size or i == len(paths) - 1):
                logits = self.forward(torch.stack([x for _, x, _ in batch]))
                for j, (item, _, size) in enumerate(batch):  # one item at a time, as the evaluate stage does
                    self.write_image(item, self.masks_at(logits[j : j + 1], size)[0])
                bar.update(len(batch))
                batch = []

    def write_image(self, path: Path, mask: np.ndarray) -> None:
        from PIL import Image

        stem = output_stem(path)
        for k, channel in enumerate(mask):
            suffix = f"_{k}" if len(mask) > 1 else ""
            self.write(f"{stem}{suffix}.png", png_bytes(channel.astype(np.uint8) * 255))
        if self.with_overlay:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            self.write(f"{stem}_overlay.png", png_bytes(overlay(rgb, label_map(mask))))

    # -- volumes --

    def read_volume(self, path: Path):
        from data.nifti import VolumeProblem, strip_nifti
        from data.volumes import FILE_ERRORS

        if not (path.is_file() or path.is_dir()):
            raise Skip(f"{path} is {not_regular(path)}: only regular files and case folders are inputs")
        try:
            if path.is_dir():
                volumes, brain, image = self.reader.read_case(path)
            elif strip_nifti(path.name):
                (volumes, image), brain = self.reader.read_stacked(path), None
            else:
                raise Skip(f"{path} is neither a NIfTI volume (.nii, .nii.gz) nor a BraTS case folder: the network's "
                           f"dataset is MRI volumes ({', '.join(self.reader.modalities)})")
            slices, keep, _ = self.reader.preprocess(volumes, brain)
        except (VolumeProblem, *FILE_ERRORS) as err:
            raise Skip(str(err) if isinstance(err, VolumeProblem) else f"{path} cannot be read ({type(err).__name__}: "
                       f"{err})") from err
        return volumes, slices, keep, image

    @torch.no_grad()
    def volume(self, path: Path) -> None:
        """The canonical volume's kept axial slices predicted in batches; the rest are background."""
        from data.nifti import axial, from_axial, from_canonical

        try:
            volumes, slices, keep, image = self.read_volume(path)
        except Skip as reason:
            self.skip(str(reason))
            return
        depth, rows, cols = axial(volumes[0]).shape
        labels = np.zeros((depth, rows, cols), np.uint8)
        if getattr(self.reader, "dims", 2) == 3:  # the kept slices as one volume (gaps: zeros), predicted whole
            from data.volumes3d import fill_gaps

            first = keep[0]
            stacked = fill_gaps(slices, keep)
            x = self.reader.transform(False)(stacked, np.zeros(stacked.shape[:3], np.uint8))[0]
            logits = self.forward(x[None])[0]  # [K, D, S, S]
            for z in keep:
                labels[z] = label_map(self.masks_at(logits[:, z - first][None], (rows, cols))[0])
        else:
            size = self.settings.batch_size
            for start in range(0, len(keep), size):
                x = torch.stack([self.reader.network_input(s) for s in slices[start : start + size]])
                for z, mask in zip(keep[start : start + size], self.masks_at(self.forward(x), (rows, cols))):
                    labels[z] = label_map(mask)
        stem = output_stem(path)
        stored = from_canonical(from_axial(labels), image.affine)
        self.write(f"{stem}.nii.gz", nifti_bytes(stored, image))
        if self.with_overlay:
            z = int(np.argmax((labels > 0).sum(axis=(1, 2)))) if labels.any() else depth // 2
            gray = axial(volumes[0])[z]
            low, high = float(gray.min()), float(gray.max())
            gray = np.rint(255 * (gray - low) / (high - low if high > low else 1.0)).astype(np.uint8)
            self.write(f"{stem}_overlay.png", png_bytes(overlay(np.repeat(gray[..., None], 3, axis=2), labels[z])))


def nifti_bytes(labels: np.ndarray, image) -> bytes:
    """A label volume as a gzipped NIfTI with `image`'s affine and header (its own type: NIfTI-1 or -2): uint8,
    unscaled, its display range the labels'."""
    out = type(image)(labels, image.affine, image.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, max(int(labels.max(initial=0)), 1)
    return gzip.compress(out.to_bytes(), compresslevel=6, mtime=0)


# -- running ----------------------------------------------------------------------------------------------

def predict(settings: dict[str, Any], given: set[str]) -> Tally:
    """Checks the command (model, config, input, output) before any input is read, then predicts every input."""
    from tqdm import tqdm

    from data.brats import BraTS
    from pipeline.measure.profiling import cpu_threads
    from pipeline.state import pick_device

    output = Path(settings["output"]).expanduser().resolve()
    outputs = outputs_dir()
    scratch = outputs if outputs.exists() else None
    with tempfile.TemporaryDirectory(prefix="medprune-predict-", dir=scratch) as tmp:
        source = find_source(settings, given, Path(tmp))
        chosen = run_settings(source, settings)
        try:
            device = pick_device(chosen.device)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        reader = make_reader(chosen.dataset, source.where)
        paths = list_inputs(settings["input"], output, reader)
        volumetric = isinstance(reader, BraTS)
        with cpu_threads(chosen.threads):
            forward = load_network(source, reader, device, chosen.threads)
            output.mkdir(parents=True, exist_ok=True)
            predictor = Predictor(reader, forward, chosen, output, bool(settings["overlay"]))
            log.info("Predicting %d input(s) with %s (threshold %g, batch %d, %s) into %s", len(paths), source.label,
                     chosen.threshold, chosen.batch_size, "onnxruntime" if source.onnx else device, output)
            with tqdm(total=len(paths), desc="predict", unit="volume" if volumetric else "img", disable=None) as bar:
                if volumetric:
                    for path in paths:
                        predictor.volume(path)
                        bar.update(1)
                else:
                    predictor.images(paths, bar)
    tally = predictor.tally
    masks = sum(1 for p in tally.written if not p.name.endswith("_overlay.png"))
    done = len(paths) - len(tally.skipped)
    print(f"\n{done} of {len(paths)} input(s) predicted by {source.label}: {masks} mask file(s) written to {output}"
          + (f"; {len(tally.skipped)} skipped:" if tally.skipped else ""))
    for reason in tally.skipped:
        print(f"  - {reason}")
    if not done:
        log.error("no mask was written: every input was skipped")
    return tally


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.evaluate import SourceError

    def body(cfg: DictConfig, given: list[str]) -> int:
        return 0 if predict(*check_settings(cfg, given)).written else 1

    return shell.command("predict", __doc__, "predict", argv, body, {SourceError: "model error"}, check=check_keys,
                         as_typed_keys=PATH_KEYS, alone=True)


if __name__ == "__main__":
    sys.exit(main())
