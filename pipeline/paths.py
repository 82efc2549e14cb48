"""Where outputs live: one fixed place, whatever the working directory.

`MEDPRUNE_OUTPUTS` wins; otherwise `outputs/` beside the source checkout (the package is installed
editable by `make setup`), so `make run` from any folder writes to the same MLflow store.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def outputs_dir() -> Path:
    env = os.environ.get("MEDPRUNE_OUTPUTS")
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / "outputs"


def register_resolvers() -> None:
    """Resolvers used by conf/: `${medprune.outputs:}`, `${medprune.root:}` (the checkout),
    `${mul:a,b}` (fine-tune lr = train lr x 0.1) and `${round:x}` (StepLR's step, 80% into training)."""
    if not OmegaConf.has_resolver("medprune.outputs"):
        OmegaConf.register_new_resolver("medprune.outputs", lambda: str(outputs_dir()))
    if not OmegaConf.has_resolver("medprune.root"):
        OmegaConf.register_new_resolver("medprune.root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))
    if not OmegaConf.has_resolver("round"):
        OmegaConf.register_new_resolver("round", lambda x: int(round(float(x))))


register_resolvers()
