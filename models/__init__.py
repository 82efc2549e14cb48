"""Segmentation networks for medprune, built from a ``model`` config by one factory.

``compat.ensure_torchvision()`` runs first, before anything can import torchvision / smp / timm,
so a torchvision whose C++ extension does not match the installed torch still imports.

A model config names its builder in ``_target_``. That name is never handed to Hydra's
``instantiate``: it must be a builder this package marks with ``@model_factory`` (the allow-list), and
every other value must be a plain keyword value (a number, string, bool, null or a list of those).
The same rule serves the composed config and a ``model.json`` read from disk or MLflow, so a model
folder is data: it cannot make this process import or call anything else.
"""

from __future__ import annotations

from models import compat

compat.ensure_torchvision()

import importlib  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any, Callable, TypeVar  # noqa: E402

from torch import nn  # noqa: E402

from data.checks import plain_values  # noqa: E402

# Set by the dataset, never by the model config (a value there would be silently overridden).
_INJECTED = ("in_channels", "num_classes")
_MARK = "__medprune_model_factory__"
# `models.<module>.<builder>`: only builders of this package's own modules can be named.
_TARGET = re.compile(r"^models\.[a-z_][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")

__all__ = ["build_model", "model_factory", "model_kwargs_check", "ModelConfigError", "PretrainedWeightsUnavailable", "compat"]

F = TypeVar("F", bound=Callable[..., nn.Module])


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained encoder weights were asked for but are neither in the local cache nor downloadable."""


class ModelConfigError(ValueError):
    """A model config (composed, or read from a model folder) that names no registered builder or
    holds values that are not plain keyword values."""


def model_factory(builder: F) -> F:
    """Registers a class or function as a model builder that a config's ``_target_`` may name."""
    setattr(builder, _MARK, True)
    return builder


def _as_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - hydra always brings omegaconf
        pass
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"model config must be a mapping with _target_, got {type(cfg).__name__}")
    return dict(cfg)


def resolve_factory(target: Any, where: str = "model") -> Callable[..., nn.Module]:
    """The registered builder `target` names; ModelConfigError (naming `where`) for anything else."""
    if not target:
        raise ModelConfigError(f"{where} has no _target_ (e.g. models.unet.UNet or models.smp.build_smp)")
    if not isinstance(target, str) or not _TARGET.match(target):
        raise ModelConfigError(
            f"{where}: _target_={target!r} is not a medprune model builder: expected models.<module>.<builder> "
            f"marked @model_factory (e.g. models.unet.UNet, models.attention_unet.AttentionUNet, models.smp.build_smp)"
        )
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelConfigError(f"{where}: _target_={target!r} cannot be imported: {exc}") from exc
    builder = getattr(module, attr, None)
    if builder is None or not getattr(builder, _MARK, False):
        raise ModelConfigError(
            f"{where}: _target_={target!r} is not a registered model builder (only builders marked "
            f"@model_factory in models/ may be named)"
        )
    return builder


def model_kwargs_check(cfg: Any, where: str = "model") -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """Fails naming ``model.<key>`` on any key the builder would reject; returns (builder, kwargs)."""
    d = _as_dict(cfg)
    builder = resolve_factory(d.get("_target_"), where)
    kwargs = plain_values(d, where, ModelConfigError)
    for key in kwargs:
        if key in _INJECTED:
            raise ModelConfigError(f"{where}.{key} must not be set in the model config: it comes from the dataset")
    hook = getattr(builder, "accepted_kwargs", None)
    if callable(hook):
        accepted = set(hook(d))
    else:
        params = inspect.signature(builder).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return builder, kwargs
        accepted = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL}
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        valid = sorted(accepted - set(_INJECTED))
        raise ModelConfigError(
            f"unknown model config key(s) {', '.join(where + '.' + k for k in unknown)} for "
            f"{d['_target_']}; valid keys: {', '.join(valid)}"
        )
    return builder, kwargs


def build_model(cfg: Any, in_channels: int, num_classes: int, where: str = "model") -> nn.Module:
    """Calls the registered builder the config names with its keys and the dataset's channel / class counts."""
    builder, kwargs = model_kwargs_check(cfg, where)
    return builder(**kwargs, in_channels=int(in_channels), num_classes=int(num_classes))
