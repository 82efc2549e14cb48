"""medprune's pipeline. Importing it only checks that `data` and `models` are medprune's own packages.

A `data/` or `models/` folder in the working directory (where researchers keep their images) is a
namespace-package portion that an import finder may prefer to medprune's packages (setuptools' default editable
finder runs after the path finder); `from data import ...` would then fail with a puzzling ImportError. The check
looks the names up without importing anything and fails with one line saying what happened; it is the only thing
done at import (the start-up of an entry is pipeline/shell.py `start()`).
"""
from __future__ import annotations


class ShadowedPackage(ImportError):
    """`data` or `models` resolves to something other than the package installed beside `pipeline`."""


def check_packages() -> None:
    import importlib.util
    from pathlib import Path

    home = Path(__file__).resolve().parents[1]
    for name in ("data", "models"):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or Path(origin).resolve() != home / name / "__init__.py":
            found = origin or ", ".join(getattr(spec, "submodule_search_locations", None) or []) or "nothing"
            raise ShadowedPackage(
                f"import {name!r} finds {found}, not medprune's {home / name}: a {name}/ folder of the working directory "
                f"shadows it; install medprune with `make setup` (editable in compat mode) or from a wheel, or run "
                f"from another folder")


check_packages()
