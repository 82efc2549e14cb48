"""Where the configuration and the outputs live, whatever the working directory and however medprune is installed.

From a checkout (`make setup` installs it editable) the configuration is the checkout's `conf/` and the outputs
go to the checkout's `outputs/`, so `make run` from any folder writes to the same MLflow store. From a wheel
(a non-editable install) `conf/` is shipped inside the package (`pipeline/conf`, setup.py) and the outputs go
to `./outputs` of the working directory. `MEDPRUNE_OUTPUTS` wins over both.

Importing this module changes nothing: the resolvers `conf/` uses are registered by `register_resolvers()`,
which the start-up call (pipeline/shell.py `start()`) makes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def _checkout() -> Optional[Path]:
    """The source checkout this package runs from (editable install or `python -m` in it), if it is one."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


CHECKOUT = _checkout()
PROJECT_ROOT = CHECKOUT or PACKAGE_DIR.parent  # `${medprune.root:}` and the git tags: the checkout, when there is one
CONF_DIR = CHECKOUT / "conf" if CHECKOUT else PACKAGE_DIR / "conf"


def outputs_dir() -> Path:
    """`MEDPRUNE_OUTPUTS`, else the checkout's `outputs/`, else `./outputs` (a non-editable install has no checkout)."""
    env = os.environ.get("MEDPRUNE_OUTPUTS")
    if env:
        return Path(env).expanduser().resolve()
    return CHECKOUT / "outputs" if CHECKOUT else Path.cwd().resolve() / "outputs"


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
    if not OmegaConf.has_resolver("medprune.groups"):
        OmegaConf.register_new_resolver("medprune.groups", config_groups)


INTERNAL_GROUPS = ("hydra", "schema", "shared")  # conf/ folders a user never picks from (Hydra's, schemas, shared parts)


def config_groups() -> str:
    """`medprune --help`'s list of the config groups a user picks from, each with its choices (conf/<group>/*.yaml),
    read from conf/ (Hydra's own $APP_CONFIG_GROUPS also lists the internal folders)."""
    lines = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in INTERNAL_GROUPS):
        choices = sorted(f.stem for f in group.glob("*.yaml"))
        if choices:
            lines.append(f"{group.name}: {', '.join(choices)}")
    return "\n".join(lines)
