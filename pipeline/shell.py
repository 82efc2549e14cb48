"""The one command shell of medprune's entries: `pipeline.run` (`medprune`), `pipeline.evaluate`, `pipeline.predict`.

Every entry starts with `start()`, the process-wide set-up that used to happen as a side effect of importing
some module: it checks that `data` and `models` are medprune's own packages (a researcher's `data/` folder in
the working directory must not stand in for them), sets `NO_ALBUMENTATIONS_UPDATE`, makes torchvision
importable (models/compat.py), and registers the OmegaConf resolvers and the config schema `conf/` needs.

The rest is what the entries share, so that they behave alike: configs composed by Hydra from the repository's
own `conf/` (`compose`), `--help` and `--cfg job`, logging, a user error as one line `medprune[ <command>]:
<kind>: ...` on stderr with exit status 2, a full disk as status 1, and SIGTERM as a clean stop (`guarded`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, TypeVar

from pipeline import ShadowedPackage, check_packages

T = TypeVar("T")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_STARTED = False


def start() -> None:
    """The start-up of every entry (and of the test suite); idempotent. See the module docstring."""
    global _STARTED
    if _STARTED:
        return
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before anything imports albumentations (data/)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in job logs (artifact downloads)
    check_packages()  # done at `import pipeline` already; here for a caller that cleared sys.modules
    from models import compat

    compat.ensure_torchvision()  # before anything imports torchvision / smp / timm
    from pipeline.config import register_schema
    from pipeline.paths import register_resolvers

    register_resolvers()
    register_schema()
    _STARTED = True


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def user_errors() -> dict[type, str]:
    """Errors a user can fix, each reported as one line (exit status 2) instead of a traceback."""
    from data import DatasetError, ReaderSettingsError
    from models import ModelConfigError, PretrainedWeightsUnavailable
    from models.io import ModelFileError
    from pipeline.baseline import BaselineError
    from pipeline.config import ConfigError
    from pipeline.latency_budget import LatencyBudgetError

    return {
        ConfigError: "configuration error",
        ModelConfigError: "configuration error",
        ReaderSettingsError: "configuration error",
        PretrainedWeightsUnavailable: "configuration error",
        DatasetError: "data error",
        BaselineError: "baseline error",
        ModelFileError: "model file error",
        LatencyBudgetError: "configuration error",
        ShadowedPackage: "installation error",
    }


def one_line(err: BaseException) -> str:
    """The first line of an error; a longer message (a list of bad files) is written to the run folder."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if len(lines) == 1:
        return lines[0]
    first = lines[0].rstrip(":") + ": " + lines[1].strip().lstrip("- ")
    try:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir) / "error.txt"
        path.write_text(str(err) + "\n")
        return first + (f" (and {len(lines) - 2} more line(s) in {path})" if len(lines) > 2 else "")
    except Exception:  # no run folder: say it all
        return " ".join(line.strip() for line in lines)


def guarded(prog: str, body: Callable[[], T], errors: Optional[Mapping[type, str]] = None, resumable: bool = False,
            on_stop: Optional[Callable[[], None]] = None) -> T:
    """`body()` with SIGTERM as a clean stop; a user error (`user_errors()` and `errors`) ends the process with one
    line `<prog>: <kind>: ...` and status 2, a full disk with status 1, a signal with its own status. `resumable`:
    the messages say that rerunning the command resumes (and Ctrl-C is one line too); `on_stop` runs on a kill."""
    from data.files import StorageFull
    from pipeline.tracking import Terminated, terminate_on_sigterm

    known = {**user_errors(), **(errors or {})}
    resume = "; rerun the same command to resume" if resumable else ""
    try:
        with terminate_on_sigterm():
            return body()
    except StorageFull as err:
        hint = ("what was written before is kept: free some space, then rerun the same command to resume" if resumable
                else "free some space and rerun")
        print(f"{prog}: storage error: {err.strerror}; {hint}", file=sys.stderr)
        raise SystemExit(1)
    except tuple(known) as err:
        kind = next(label for cls, label in known.items() if isinstance(err, cls))
        print(f"{prog}: {kind}: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2)
    except Terminated as stop:
        if on_stop is not None:
            on_stop()
        print(f"{prog}: terminated by signal {stop.signum}{resume}", file=sys.stderr)
        raise SystemExit(stop.code)
    except KeyboardInterrupt:
        if not resumable:
            raise
        if on_stop is not None:
            on_stop()
        print(f"{prog}: interrupted{resume}", file=sys.stderr)
        raise SystemExit(130)


# -- the key=value commands, composed by Hydra ---------------------------------------------------------------

def _quoted(value: str) -> str:
    """A value for Hydra's override grammar that stays the string typed (a run id may look like a number, a path
    may hold commas or brackets): single-quoted, with the quotes and the backslashes before them escaped."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def as_typed(args: Iterable[str], keys: Iterable[str]) -> list[str]:
    """`key=value` arguments with the values of `keys` quoted, so that Hydra keeps them as typed."""
    keys = set(keys)
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={_quoted(value)}" if sep and key in keys else arg)
    return out


def parse_overrides(args: list[str]):
    """Hydra's own parse of `key=value` arguments (what it would compose); a malformed one is a ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from pipeline.config import ConfigError

    try:
        return OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        raise ConfigError(one_line(err)) from err


def compose(config_name: str, overrides: list[str], alone: bool = False):
    """`conf/<config_name>.yaml` with the command line's overrides, composed by Hydra as the main entry composes
    conf/config.yaml (a key that is not there, or a value of the wrong shape, is a ConfigError). Nothing is
    written: no run folder, no `.hydra/` copy. `alone`: the file is composed without conf/'s groups, for a
    command whose keys share a group's name (`pipeline.predict model=`: Hydra would take it for the model group)."""
    from hydra import compose as hydra_compose
    from hydra import initialize, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config import ConfigError
    from pipeline.paths import CONF_DIR

    try:
        if alone:
            name = f"medprune_{config_name}"
            ConfigStore.instance().store(name=name, node=OmegaConf.load(CONF_DIR / f"{config_name}.yaml"))
            with initialize(version_base="1.3", config_path=None, job_name=config_name):
                return hydra_compose(name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            return hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from err


def command(name: str, doc: str, config_name: str, argv: Optional[list[str]], body: Callable[..., int],
            errors: Optional[Mapping[type, str]] = None, check: Optional[Callable[[list[str]], None]] = None,
            as_typed_keys: Iterable[str] = (), alone: bool = False) -> int:
    """The shell of the key=value commands (`pipeline.evaluate`, `pipeline.predict`): `start()`, `--help` (their
    docstring and the keys of `conf/<config_name>.yaml`), logging, `guarded`, and the arguments composed by Hydra
    onto `conf/<config_name>.yaml`: `check(keys given)` first (a command's own rules on which keys it takes),
    `as_typed_keys` kept as typed (`alone`: see `compose`); `--cfg job` prints the composed config instead of running
    `body(cfg, keys given)`, whose exit status this returns."""
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"medprune {name}"
    try:
        start()
    except ShadowedPackage as err:
        print(f"{prog}: installation error: {err}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        from pipeline.paths import CONF_DIR

        print(doc)
        print(f"Keys and defaults ({CONF_DIR / (config_name + '.yaml')}):\n")
        print(OmegaConf.to_yaml(compose(config_name, [], alone)))
        return 0 if argv else 2
    setup_logging()
    cfg_only = argv[:1] == ["--cfg"] or argv[-2:-1] == ["--cfg"]
    if cfg_only:  # `--cfg job` first or last, as Hydra takes it (there is no Hydra config to show: `job` only)
        argv = argv[2:] if argv[0] == "--cfg" else argv[:-2]

    def composed() -> int:
        overrides = as_typed(argv, as_typed_keys)
        given = [o.key_or_group for o in parse_overrides(overrides)]
        if check is not None:
            check(given)
        cfg = compose(config_name, overrides, alone)
        if cfg_only:
            print(OmegaConf.to_yaml(cfg))
            return 0
        return body(cfg, given)

    try:
        return guarded(prog, composed, errors)
    except SystemExit as stop:
        return int(stop.code or 0)
