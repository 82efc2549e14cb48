"""segmentation-models-pytorch networks behind one Hydra-friendly builder.

smp models already expose ``encoder`` / ``decoder`` / ``segmentation_head``, the names the pruning
code relies on. Three things are handled here rather than left to smp: its decoders want exactly
one decoder channel count per encoder stage (so a shallower encoder would need the list spelled
out); it keeps encoder modules its forward never runs, which pruning cannot shrink; and an offline
pretrained-weights download fails deep inside huggingface_hub with a message that does not say
which config key caused it. (models/__init__ has already run compat.ensure_torchvision().)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from models import PretrainedWeightsUnavailable, model_factory

# Exceptions from these packages (anywhere in the chain) mean "could not fetch the weights".
_DOWNLOAD_MODULES = ("huggingface_hub", "requests", "urllib", "urllib3", "httpx", "httpcore", "socket", "ssl")


@contextlib.contextmanager
def hub_offline():
    """Within the block the Hugging Face hub is offline: weights come from the local cache or fail at once
    (huggingface_hub reads its offline flag at each call; online, a missing file costs ~25 s of retries)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def architectures() -> dict[str, type[nn.Module]]:
    """smp architectures by lower-case name."""
    return dict(smp.MODEL_ARCHITECTURES_MAPPING)


def _arch_class(arch: str) -> type[nn.Module]:
    try:
        return architectures()[str(arch).lower()]
    except KeyError:
        valid = ", ".join(cls.__name__ for cls in architectures().values())
        raise ValueError(f"model.arch={arch!r} is not an smp architecture; valid: {valid}") from None


def _is_download_failure(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__ or ""
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.split(".")[0] in _DOWNLOAD_MODULES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@model_factory
def build_smp(
    arch: str,
    in_channels: int,
    num_classes: int,
    *,
    encoder_name: str,
    encoder_weights: str | None,
    encoder_depth: int,
    decoder_channels: Sequence[int] | None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``smp.<arch>``; extra ``kwargs`` go to the architecture's constructor.

    ``decoder_channels=None`` takes the arch's default, cut to ``encoder_depth`` entries where it
    is a per-stage list (Unet, UnetPlusPlus, MAnet), so a shallower encoder needs no extra key.
    """
    cls = _arch_class(arch)
    params = inspect.signature(cls.__init__).parameters
    default_channels = getattr(params.get("decoder_channels"), "default", None)
    if decoder_channels is not None:
        kwargs["decoder_channels"] = (
            list(decoder_channels)
            if isinstance(decoder_channels, Sequence) and not isinstance(decoder_channels, str)
            else decoder_channels
        )
    elif isinstance(default_channels, Sequence) and not isinstance(default_channels, str):
        kwargs["decoder_channels"] = list(default_channels)[:encoder_depth]
    if "encoder_depth" in params:
        kwargs["encoder_depth"] = encoder_depth
    elif encoder_depth != 5:
        raise ValueError(f"smp {cls.__name__} does not take encoder_depth; drop model.encoder_depth")
    try:
        model = cls(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes,
            **kwargs,
        )
    except Exception as exc:
        if encoder_weights is None or not _is_download_failure(exc):
            raise
        raise PretrainedWeightsUnavailable(
            f"could not download pretrained weights {encoder_weights!r} for encoder {encoder_name!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Either pre-populate "
            "the Hugging Face cache (HF_HOME, e.g. run once with network access) / the torch hub cache "
            "(TORCH_HOME) on this machine, or train from scratch with model.encoder_weights=null."
        ) from exc
    _drop_unused_encoder_modules(model, in_channels, encoder_depth)
    return model


def _drop_unused_encoder_modules(model: nn.Module, in_channels: int, depth: int) -> None:
    """Replace encoder modules the forward never uses with nn.Identity.

    smp keeps stages beyond ``encoder_depth`` (e.g. ResNet ``layer4`` at depth 4, 8.4 M parameters
    for resnet18) and some encoders' classifier convs (EfficientNet's ``_conv_head``). torch-pruning
    never sees them, so they would stay full size and inflate parameter counts and file sizes.
    A module counts as unused when it is never called and none of its parameters gets a gradient.
    """
    encoder = model.encoder
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: called.add(id(m))) for m in encoder.modules()]
    was_training = encoder.training
    size = max(64, 4 * 2**depth)
    try:
        encoder.eval()
        with torch.enable_grad():
            features = encoder(torch.randn(1, in_channels, size, size))
            torch.stack([f.float().sum() for f in features]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)

    def unused(m: nn.Module) -> bool:
        return all(id(s) not in called for s in m.modules()) and all(p.grad is None for p in m.parameters())

    dropped: list[str] = []
    for name, module in list(encoder.named_modules()):  # parents come before their children
        if not name or any(name.startswith(d + ".") for d in dropped):
            continue
        if any(True for _ in module.parameters()) and unused(module):
            parent_name, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, nn.Identity())
            dropped.append(name)
    for p in encoder.parameters():
        p.grad = None


def accepted_kwargs(cfg: Mapping[str, Any]) -> set[str]:
    """Config keys build_smp accepts for this cfg's arch (used by models.model_kwargs_check)."""
    own = {
        name
        for name, p in inspect.signature(build_smp).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    arch = cfg.get("arch")
    if arch is None:
        return own
    cls_params = inspect.signature(_arch_class(arch).__init__).parameters
    extra = {
        name
        for name, p in cls_params.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    return own | (extra - {"classes"})


build_smp.accepted_kwargs = accepted_kwargs  # type: ignore[attr-defined]
