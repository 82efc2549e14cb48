"""A run's config read back from its folder or from MLflow (pipeline.evaluate, pipeline.predict): data, never code.

`pipeline.run` writes a run's `config.yaml` resolved (every `${...}` replaced by its value) and logs it as an
artifact. Read back, it is parsed by `yaml.safe_load` and checked before any part of it is used:

- every value is plain: a string, number, bool or null, or a list or mapping of those;
- nothing is resolved: a `${...}` value is refused, never evaluated (it could read an environment variable
  into an error message, or call a resolver);
- `_target_` appears only where medprune writes it and names only what medprune names: `dataset._target_`
  one of the readers of `data.READERS` (built from plain values by `data.build_reader`, never by Hydra),
  `model._target_` a registered model builder (models/), and in `criterion`, `optimizer`, `scheduler` and
  `loss` (at any depth: the loss has terms) one of the targets their conf/ options name. Those four groups
  are a record of how the networks were trained: evaluate and predict never build them;
- no other key starts with an underscore (Hydra's `_args_`, `_recursive_`, ...), but `_partial_` in those groups.

A refusal is one `StoredConfigError` naming the file and the key, not the value.
"""
from __future__ import annotations

import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from data import READERS
from data.readers import ADDED_KEYS
from pipeline.paths import CONF_DIR

MAX_BYTES = 4 << 20  # a run's config is a few kB; a larger file is not one
RECORD_GROUPS = ("criterion", "optimizer", "scheduler", "loss")  # trained with, never built from a stored config
PLAIN = (str, int, float, bool, type(None))


class StoredConfigError(ValueError):
    """A stored run config that is not plain data medprune wrote; the message names the file and the key."""


@lru_cache(maxsize=None)
def recorded_targets(group: str) -> frozenset[str]:
    """Every `_target_` (at any depth) of the options conf/<group>/*.yaml: what a stored config may name there."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(found)


def _check_target(path: list[str], value: Any, where: str) -> None:
    key = ".".join(path)
    group = path[0]
    if len(path) == 2 and group == "dataset":
        if value not in READERS:
            raise StoredConfigError(f"{where}: {key} is not one of medprune's readers ({', '.join(READERS)}): refusing "
                                    f"to build it")
        return
    if len(path) == 2 and group == "model":
        from models import ModelConfigError, resolve_factory

        try:
            resolve_factory(value, "model")
        except ModelConfigError as err:
            raise StoredConfigError(f"{where}: {err}") from None
        return
    if group in RECORD_GROUPS:
        if value not in recorded_targets(group):
            raise StoredConfigError(f"{where}: {key} is not a target any conf/{group} option names: refusing a config "
                                    f"that names code of its own")
        return
    raise StoredConfigError(f"{where}: {key} is a _target_ where medprune writes none: a stored config is data, and "
                            f"nothing it names is built")


def _check(node: Any, path: list[str], where: str) -> Any:
    key = ".".join(path) or "the top level"
    if isinstance(node, dict):
        out = {}
        for name, value in node.items():
            if not isinstance(name, PLAIN) or name is None:
                raise StoredConfigError(f"{where}: {key} has a key of type {type(name).__name__}: expected plain keys")
            child = [*path, str(name)]
            if str(name) == "_target_":
                _check_target(child, value, where)
            elif str(name) == "_partial_" and path and path[0] in RECORD_GROUPS and isinstance(value, bool):
                pass
            elif str(name).startswith("_"):
                raise StoredConfigError(f"{where}: {'.'.join(child)} is not allowed: Hydra's instantiation keys are "
                                        f"not data (expected plain keys)")
            out[name] = _check(value, child, where)
        return out
    if isinstance(node, list):
        return [_check(value, [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"], where)
                for i, value in enumerate(node)]
    if isinstance(node, (datetime.date, datetime.datetime)):
        return node.isoformat()  # an unquoted date in YAML: the text it was
    if not isinstance(node, PLAIN):
        raise StoredConfigError(f"{where}: {key} holds a {type(node).__name__}: expected plain values (string, number, "
                                f"bool, null, lists and mappings of those)")
    if isinstance(node, str) and "${" in node:
        raise StoredConfigError(f"{where}: {key} holds an interpolation (${{...}}): a run's config is stored resolved; "
                                f"refusing to resolve it")
    return node


def check(config: Any, where: str) -> dict:
    """A parsed stored config, checked (module docstring); returns it with dates as their text."""
    if not isinstance(config, dict):
        raise StoredConfigError(f"{where} holds a {type(config).__name__}: expected a medprune run's config (a mapping)")
    checked = _check(config, [], where)
    if not isinstance(checked.get("dataset"), dict):
        raise StoredConfigError(f"{where} has no dataset section: expected a medprune run's config")
    for key, value in ADDED_KEYS.items():  # a run stored before the reader had the key: read as it was then
        checked["dataset"].setdefault(key, value)
    return checked


class _PlainLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases: medprune never writes them, and nested ones expand exponentially."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"an alias (*{event.anchor}) at line {event.start_mark.line + 1}: medprune writes none")
        return super().compose_node(parent, index)


def read(path: Path, where: str | None = None) -> dict:
    """`config.yaml` of a run folder (or a downloaded artifact), parsed as plain YAML and checked."""
    where = where or str(path)
    try:
        if not Path(path).is_file():
            raise StoredConfigError(f"{where} is not a file: expected a run's config.yaml")
        if Path(path).stat().st_size > MAX_BYTES:
            raise StoredConfigError(f"{where} is {Path(path).stat().st_size:,} bytes: a run's config is a few kB")
        config = yaml.load(Path(path).read_text(), Loader=_PlainLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise StoredConfigError(f"{where} cannot be read as plain YAML ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return check(config, where)
