"""Seeded splits carved from one list of cases.

Ids are sorted before the permutation, so the split depends only on the set of cases and the seed,
never on the order a file system lists them in.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from data.base import DatasetError


def check_fraction(value: float, key: str) -> float:
    """Fractions come from YAML; a bad one must name its key before any file is read."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{key}={value!r} is invalid: expected a number > 0 and < 1")
    return float(value)


def carve(
    ids: Iterable[str], fractions: dict[str, float], seed: int, source: str = "the training set"
) -> dict[str, list[str]]:
    """Splits `ids` into `fractions` (name -> fraction) plus "train" holding the rest.

    Each carved split gets round(n * fraction) cases but at least one; train must keep at least one.
    Every split's ids come back sorted.
    """
    ordered = sorted(set(ids))
    n = len(ordered)
    sizes = {name: max(1, int(round(n * frac))) for name, frac in fractions.items()}
    needed = sum(sizes.values()) + 1
    if n < needed:
        wanted = ", ".join(f"{name} ({frac:g})" for name, frac in fractions.items())
        raise DatasetError(
            f"{source} has {n} image/mask pair(s): too few to carve non-empty train and {wanted} splits; "
            f"at least {needed} pairs are needed (add data, raise `limit`, or lower the fractions)"
        )
    order = np.random.default_rng(seed).permutation(n)
    out: dict[str, list[str]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = sorted(ordered[i] for i in order[start:start + size])
        start += size
    out["train"] = sorted(ordered[i] for i in order[start:])
    return out


def check_disjoint(splits: dict[str, Sequence[str]]) -> None:
    """Official split folders could share a case with training; that would leak test data."""
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(splits[a]) & set(splits[b]))
            if common:
                shown = ", ".join(common[:5]) + (" ..." if len(common) > 5 else "")
                raise DatasetError(f"{len(common)} case id(s) are in both the {a} and the {b} split: {shown}")
