"""The dataset readers a config may name, and the one way a reader is built from a config.

A dataset config names its reader in `_target_`. That name is never handed to Hydra's `instantiate`
(which would build whatever a nested `_target_` names, at any depth): it must be one of `READERS`, the
allow-list, and every other value must be a plain keyword value (a string, number, bool, null, or a
list of those). The same rule serves the composed config of a job and a config read back from a run
folder or from MLflow (pipeline.evaluate, pipeline.predict), so a stored config is data: it cannot make
this process import or call anything else. (models/ applies the same rule to model configs.)
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Optional

from data.base import SegmentationData
from data.checks import plain_values

# `_target_` -> the module that defines it: medprune's readers, one per conf/dataset/*.yaml `_target_`
# (tests/test_config.py checks that the two lists agree). Imported only when named.
READERS: tuple[str, ...] = (
    "data.isic.ISIC2018",
    "data.slices.SliceFolders",
    "data.brats.BraTS",
    "data.brats.BraTS3D",
    "data.covid_ct.CovidCT",
    "data.covid_ct.CovidCT3D",
)

# Keys the readers gained after runs were first stored, with the value that reads data as the readers did before
# them: a run's stored config without such a key gets it (pipeline/stored_config.py), so older runs evaluate as
# they were trained.
ADDED_KEYS: dict[str, object] = {"folds": None, "fold": 0}


class ReaderSettingsError(ValueError):
    """A dataset config that names no medprune reader, holds a value that is not a plain keyword value, or a
    key or value its reader rejects; the message names the key."""


def reader_class(target: Any) -> type[SegmentationData]:
    """The reader `target` names, when it is on the allow-list."""
    if target not in READERS:
        raise ReaderSettingsError(f"dataset._target_={target!r} is not one of medprune's readers: expected one of "
                                  f"{', '.join(READERS)}")
    module, _, name = str(target).rpartition(".")
    return getattr(importlib.import_module(module), name)


def accepted_keys(target) -> Optional[set[str]]:
    """The keyword names `target` accepts, None for "anything". A class whose __init__ forwards **kwargs to
    its base (BraTS -> VolumeSliceData) accepts the base's keys too."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    functions = ([c.__dict__["__init__"] for c in inspect.getmro(target) if "__init__" in c.__dict__]
                 if inspect.isclass(target) else [target])
    keys: set[str] = set()
    for function in functions:
        params = inspect.signature(function).parameters
        keys |= {n for n, p in params.items() if p.kind in kinds and n != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return keys
    return None


def build_reader(cfg: Mapping[str, Any]) -> SegmentationData:
    """The reader the config names, called with the config's plain values (keys checked against its
    signature); a value its constructor rejects is a ReaderSettingsError naming the key. Nothing is read."""
    target = cfg.get("_target_")
    cls = reader_class(target)
    settings = plain_values(cfg, "dataset", ReaderSettingsError)
    accepted = accepted_keys(cls)
    unknown = sorted(k for k in settings if accepted is not None and k not in accepted)
    if unknown:
        raise ReaderSettingsError(f"Unknown key {', '.join('dataset.' + k for k in unknown)} for {target}; accepted "
                                  f"keys: {', '.join(sorted(accepted))}")
    try:
        return cls(**settings)
    except (ValueError, TypeError) as err:  # the constructors check their values and name the key
        raise ReaderSettingsError(f"dataset ({target}): {err}") from err
