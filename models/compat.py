"""Make ``import torchvision`` survive a torchvision whose C++ extension cannot load.

A torchvision wheel built for another torch (e.g. the CUDA build next to a CPU torch) fails to load
``torchvision/_C``; its ``_meta_registrations`` then still calls ``register_fake("torchvision::nms")``
on an op that was never defined, and the whole import (and so smp and timm, which import it) dies
with ``RuntimeError: operator torchvision::nms does not exist``. Nothing in medprune needs the
detection ops, so on exactly that failure we define the missing op schemas (no kernels) and import
again: the models work, and calling ``torchvision.ops.nms`` raises torchvision's own "Couldn't load
custom C++ ops" error instead of the import crashing. A working torchvision is left untouched.
"""

from __future__ import annotations

import logging
import re
import sys

import torch

log = logging.getLogger(__name__)

#: True once ensure_torchvision() had to define the missing op schemas.
APPLIED: bool = False

# Schemas exactly as torchvision/csrc/ops/*.cpp declares them (TORCH_SELECTIVE_SCHEMA). Only the ops
# that torchvision registers fake kernels for unconditionally need to exist.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

# Kept alive on purpose: a torch.library.Library removes its definitions when collected.
_LIB: torch.library.Library | None = None


def _has_schema(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        return True
    except RuntimeError:
        return False


def _drop_half_imported() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Import torchvision, patching around a broken C++ extension; return whether it had to act."""
    global APPLIED, _LIB
    if APPLIED:
        return True
    try:
        import torchvision  # noqa: F401
        return False
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise
        return False  # not installed: let whoever needs it fail with the usual message
    except RuntimeError as exc:
        match = _MISSING_OP.search(str(exc))
        if match is None or match.group(1) not in _SCHEMAS:
            raise
        original = exc

    _drop_half_imported()
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        if not _has_schema(op):
            _LIB.define(schema)
    try:
        import torchvision  # noqa: F401,F811
    except RuntimeError as exc:
        raise exc from original
    APPLIED = True
    # INFO, not WARNING: it happens on every start here and needs no action unless a detection op is called.
    log.info(
        "torchvision C++ extension did not load (torch %s, torchvision %s): "
        "defined placeholder op schemas so it imports; torchvision ops (nms, roi_align, ...) are unavailable",
        torch.__version__,
        getattr(sys.modules.get("torchvision"), "__version__", "?"),
    )
    return True
