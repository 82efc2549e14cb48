"""Seeded splits carved from one list of cases.

Ids are sorted before the permutation, so the split depends only on the set of cases and the seed,
never on the order a file system lists them in.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from data.base import DatasetError


def carve(
    ids: Iterable[str], fractions: dict[str, float], seed: int, source: str = "the training set",
    unit: str = "image/mask pair", hint: str = "add data, raise `limit`, or lower the fractions",
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
            f"{source} has {n} {unit}(s): too few to carve non-empty train and {wanted} splits; "
            f"at least {needed} are needed ({hint})"
        )
    order = np.random.default_rng(seed).permutation(n)
    out: dict[str, list[str]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = sorted(ordered[i] for i in order[start:start + size])
        start += size
    out["train"] = sorted(ordered[i] for i in order[start:])
    return out


def carve_groups(
    groups: Mapping[str, str], fractions: dict[str, float], seed: int, source: str = "the dataset", unit: str = "patient"
) -> dict[str, list[str]]:
    """Splits ids by group (`groups`: id -> group, e.g. case -> patient): every id of a group lands in
    the same split, so no patient is in two splits. Sizes count groups; ids come back sorted."""
    by_group = carve(groups.values(), fractions, seed, source=source, unit=unit, hint="add cases or lower the fractions")
    split_of = {group: name for name, members in by_group.items() for group in members}
    out: dict[str, list[str]] = {name: [] for name in by_group}
    for case_id in sorted(groups):
        out[split_of[groups[case_id]]].append(case_id)
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


def group_of(case_id: str, regex) -> str:
    """The patient/group a case belongs to: the first non-empty capture group of `regex` (or its whole
    match), else the case itself, so cases of one patient never straddle splits."""
    match = regex.search(case_id) if regex is not None else None
    if not match:
        return case_id
    groups = [g for g in match.groups() if g]
    return groups[0] if groups else match.group(0)
