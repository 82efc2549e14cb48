"""Save / load (possibly pruned) models as safetensors + JSON, never pickle.

A structurally pruned network no longer matches its config, and pickling the whole module would
tie the file to the code that made it (and run arbitrary code on load). So we store the config,
the per-module shape attributes torch-pruning changes, and the weights; loading rebuilds the
unpruned model, shrinks it to the stored shapes, then loads the weights strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models import _as_dict, build_model

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
    """Write ``model.safetensors`` + ``model.json`` into ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = _as_dict(model_cfg)
    for key in ("in_channels", "num_classes"):
        cfg.pop(key, None)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "model": cfg,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "shapes": _shapes(model),
    }
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return directory


def read_meta(directory) -> dict[str, Any]:
    """The model.json of a saved model, format-checked."""
    path = Path(directory) / META
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_model(directory, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_model (pruned or not); returned in train mode like any new module."""
    directory = Path(directory)
    meta = read_meta(directory)
    cfg = dict(meta["model"])
    for key, value in _NO_DOWNLOAD.items():
        if key in cfg:
            cfg[key] = value
    model = build_model(cfg, in_channels=meta["in_channels"], num_classes=meta["num_classes"])

    for name, attrs in meta["shapes"].items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)

    with safe_open(str(directory / WEIGHTS), framework="pt", device="cpu") as f:
        saved_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    # Every tensor whose saved shape differs gets an empty one of the saved shape, so that
    # load_state_dict(strict=True) still catches missing / unexpected keys.
    for key, shape in saved_shapes.items():
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # unexpected key: load_state_dict reports it
        if attr in module._parameters and module._parameters[attr] is not None:
            old = module._parameters[attr]
            if tuple(old.shape) != shape:
                module._parameters[attr] = nn.Parameter(
                    torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad
                )
        elif attr in module._buffers and module._buffers[attr] is not None:
            old = module._buffers[attr]
            if tuple(old.shape) != shape:
                module._buffers[attr] = torch.empty(shape, dtype=old.dtype)
    model.load_state_dict(state, strict=True)
    return model.to(map_location)


def model_size_mb(directory) -> float:
    """Size of the saved weights in MB (1e6 bytes), the number reported for compression."""
    return (Path(directory) / WEIGHTS).stat().st_size / 1e6
