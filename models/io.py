"""Save / load (possibly pruned) models as safetensors + JSON, never pickle; every file checksummed.

A structurally pruned network no longer matches its config, and pickling the whole module would
tie the file to the code that made it (and run arbitrary code on load). So we store the config,
the per-module shape attributes torch-pruning changes, and the weights; loading rebuilds the
unpruned model through the registered builder (`models.build_model`: an allow-list, plain keyword
values, nothing instantiated from the file), shrinks it to the stored shapes, then loads the weights
strictly. `model.json` records the sha256 of `model.safetensors` when it is written; every load
verifies it, so a damaged or swapped weights file is an error naming the file, never a silently wrong
network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from data.files import atomic_write, sha256_file, storage_full
from models import ModelConfigError, _as_dict, build_model, model_kwargs_check

FORMAT = "medprune-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"

# Module types whose shape attributes torch-pruning rewrites, and which attributes to record.
_SHAPE_ATTRS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.LayerNorm, ("normalized_shape",)),
)
# Model config keys that must not trigger work on load (the weights come from the file).
_NO_DOWNLOAD = {"encoder_weights": None}


class ModelFileError(ValueError):
    """A model folder or tensor file that cannot be used; the message names the file."""


# -- checksummed tensor files (weights, scores, checkpoints) ---------------------------------------


def save_tensors(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[dict[str, str]] = None) -> str:
    """Writes a safetensors file atomically; returns its sha256 (to be recorded by the caller's json)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        save_file(state, str(tmp), metadata=metadata)
    except (SafetensorError, OSError) as err:
        tmp.unlink(missing_ok=True)
        full = storage_full(err, path)
        if full is not None:
            raise full from err
        raise ModelFileError(f"cannot write {path} ({type(err).__name__}: {err})") from err
    digest = sha256_file(tmp)
    tmp.replace(path)
    return digest


def verify_file(path, expected: Optional[str], what: str) -> None:
    """Raises ModelFileError unless `path` exists and its sha256 is `expected`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {path} is missing")
    if not expected:
        raise ModelFileError(f"{what} {path} has no recorded sha256 (written by an older medprune?): cannot verify it")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelFileError(
            f"{what} {path} is damaged: its sha256 is {actual[:16]}..., recorded {expected[:16]}... when it was "
            f"written ({path.stat().st_size} bytes now)"
        )


def load_tensors(path, expected_sha256: Optional[str], what: str = "tensor file") -> dict[str, torch.Tensor]:
    """Reads a safetensors file after checking its sha256; errors name the file."""
    verify_file(path, expected_sha256, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{what} {path} cannot be read ({type(err).__name__}: {err})") from err


def read_json(path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{what} {path} is not valid JSON ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ModelFileError(f"{what} {path} holds a {type(data).__name__}: expected a JSON object")
    return data


# -- model folders ---------------------------------------------------------------------------------


def _shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for cls, attrs in _SHAPE_ATTRS:
            if isinstance(module, cls):
                entry = {}
                for a in attrs:
                    v = getattr(module, a)
                    entry[a] = list(v) if isinstance(v, tuple) else v
                shapes[name] = entry
                break
    return shapes


def save_model(model: nn.Module, model_cfg: Any, in_channels: int, num_classes: int, directory) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (with the weights' sha256) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = _as_dict(model_cfg)
    for key in ("in_channels", "num_classes"):
        cfg.pop(key, None)
    digest = save_tensors(model.state_dict(), directory / WEIGHTS, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "model": cfg,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "sha256": digest,
        "shapes": _shapes(model),
    }
    atomic_write(directory / META, json.dumps(meta, indent=2) + "\n")
    return directory


def read_meta(directory) -> dict[str, Any]:
    """The model.json of a saved model, format-checked."""
    path = Path(directory) / META
    meta = read_json(path, "model file")
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    for key in ("in_channels", "num_classes"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ModelFileError(f"{path}: {key}={meta.get(key)!r}: expected a positive integer")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("shapes", {}), dict):
        raise ModelFileError(f"{path}: expected 'model' and 'shapes' objects")
    return meta


def verify_model(directory) -> dict[str, Any]:
    """Checks model.json (a registered builder with plain values) and the weights' sha256 without
    building anything; returns the metadata."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        model_kwargs_check(meta["model"], where=f"{directory / META} model")
    except ModelConfigError as err:
        raise ModelFileError(str(err)) from err
    verify_file(directory / WEIGHTS, meta.get("sha256"), "weights file")
    return meta


def _shape_value(value: Any, where: str) -> Any:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ModelFileError(f"{where}={value!r}: expected a non-negative integer or a list of integers")


def load_model(directory, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_model (pruned or not); returned in train mode like any new module."""
    directory = Path(directory)
    meta = verify_model(directory)
    meta_path = directory / META
    cfg = dict(meta["model"])
    for key, value in _NO_DOWNLOAD.items():
        if key in cfg:
            cfg[key] = value
    try:
        model = build_model(cfg, in_channels=meta["in_channels"], num_classes=meta["num_classes"], where=f"{meta_path} model")
    except ModelConfigError as err:
        raise ModelFileError(str(err)) from err
    allowed = {a for _, attrs in _SHAPE_ATTRS for a in attrs}
    for name, attrs in meta.get("shapes", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelFileError(f"{meta_path}: shapes names a layer {name!r} that the model does not have") from None
        if not isinstance(attrs, dict) or not set(attrs) <= allowed:
            raise ModelFileError(f"{meta_path}: shapes[{name!r}] = {attrs!r}: expected only {', '.join(sorted(allowed))}")
        for attr, value in attrs.items():
            setattr(module, attr, _shape_value(value, f"{meta_path}: shapes[{name!r}].{attr}"))

    state = load_tensors(directory / WEIGHTS, meta["sha256"], "weights file")
    # Every tensor whose saved shape differs gets an empty one of the saved shape, so that
    # load_state_dict(strict=True) still catches missing / unexpected keys.
    for key, tensor in state.items():
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # unexpected key: load_state_dict reports it
        if attr in module._parameters and module._parameters[attr] is not None:
            old = module._parameters[attr]
            if tuple(old.shape) != tuple(tensor.shape):
                module._parameters[attr] = nn.Parameter(torch.empty(tensor.shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif attr in module._buffers and module._buffers[attr] is not None:
            old = module._buffers[attr]
            if tuple(old.shape) != tuple(tensor.shape):
                module._buffers[attr] = torch.empty(tensor.shape, dtype=old.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{directory / WEIGHTS} does not fit {meta_path}: {str(err).splitlines()[0]}") from err
    return model.to(map_location)


def model_size_mb(directory) -> float:
    """Size of the saved weights in MB (1e6 bytes), the number reported for compression."""
    return (Path(directory) / WEIGHTS).stat().st_size / 1e6
