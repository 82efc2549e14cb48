"""Segmentation networks for medprune, built from a Hydra ``model`` config.

``compat.ensure_torchvision()`` runs first, before anything can import torchvision / smp / timm,
so a torchvision whose C++ extension does not match the installed torch still imports.
"""

from __future__ import annotations

from models import compat

compat.ensure_torchvision()

import inspect  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

from torch import nn  # noqa: E402

# Set by the dataset, never by the model config (a value there would be silently overridden).
_INJECTED = ("in_channels", "num_classes")

__all__ = ["build_model", "model_kwargs_check", "compat"]


def _as_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - hydra always brings omegaconf
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config must be a mapping with _target_, got {type(cfg).__name__}")
    return dict(cfg)


def _target(cfg: Mapping[str, Any]):
    from hydra.utils import get_object

    target = cfg.get("_target_")
    if not target:
        raise ValueError("model config has no _target_ (e.g. models.unet.UNet or models.smp.build_smp)")
    try:
        return get_object(str(target))
    except Exception as exc:
        raise ValueError(f"model._target_={target!r} cannot be imported: {exc}") from exc


def model_kwargs_check(cfg: Any) -> None:
    """Fail at start-up, naming ``model.<key>``, on any key the target would reject."""
    d = _as_dict(cfg)
    target = _target(d)
    keys = [k for k in d if not (k.startswith("_") and k.endswith("_"))]
    for key in keys:
        if key in _INJECTED:
            raise ValueError(f"model.{key} must not be set in the model config: it comes from the dataset")
    hook = getattr(target, "accepted_kwargs", None)
    if callable(hook):
        accepted = set(hook(d))
    else:
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return  # target takes anything; it will complain itself
        accepted = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL}
    unknown = [k for k in keys if k not in accepted]
    if unknown:
        valid = sorted(accepted - set(_INJECTED))
        raise ValueError(
            f"unknown model config key(s) {', '.join('model.' + k for k in unknown)} for "
            f"{d['_target_']}; valid keys: {', '.join(valid)}"
        )


def build_model(cfg: Any, in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate the model config's ``_target_`` with the dataset's channel / class counts."""
    from hydra.utils import instantiate

    model_kwargs_check(cfg)
    return instantiate(cfg, in_channels=in_channels, num_classes=num_classes, _convert_="all")
