"""Seeded splits carved from one list of cases.

Ids are sorted before the permutation, so the split depends only on the set of cases and the seed,
never on the order a file system lists them in.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

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


def fold_sizes(n: int, folds: int) -> list[int]:
    """How many of `n` groups each of `folds` folds holds: near-equal, the first `n % folds` one more."""
    return [n // folds + (1 if k < n % folds else 0) for k in range(folds)]


def _folds_fit(n: int, folds: int, val_fraction: Optional[float]) -> bool:
    """Whether `n` groups make `folds` non-empty folds and, beside every fold, a non-empty train (and val)."""
    if n < folds:
        return False
    rest = n - fold_sizes(n, folds)[0]  # beside the largest fold
    needed = 1 if val_fraction is None else max(1, int(round(rest * val_fraction))) + 1
    return rest >= needed


def carve_fold(
    groups: Union[Mapping[str, str], Iterable[str]], folds: int, fold: int, val_fraction: Optional[float], seed: int,
    source: str = "the dataset", unit: str = "case",
) -> dict[str, list[str]]:
    """Fold `fold` of a seeded partition of the groups into `folds` folds (k-fold cross-validation, as nnU-Net
    does): "test" is that fold, "val" is carved from the other folds with `val_fraction` (`carve_groups`, the
    same seed) and "train" holds the rest. With `val_fraction` None (the test split comes from elsewhere:
    dataset.test_root) the fold is "val" and the other folds are "train".

    `groups` maps id -> group (case -> patient), so that every id of a group lands in one fold; a plain list
    of ids is its own groups. Fold sizes count groups and differ by at most one; the groups are sorted before
    the permutation, so over fold = 0..folds-1 every group is held out exactly once whatever order they
    came in. Too few groups for every fold to leave a non-empty train (and val) is a DatasetError, whichever
    fold is asked for, so a sweep over the folds fails at its first job. Ids come back sorted.
    """
    if not isinstance(groups, Mapping):
        groups = {case_id: case_id for case_id in groups}
    names = sorted(set(groups.values()))
    n = len(names)
    if not _folds_fit(n, folds, val_fraction):
        needed = n + 1
        while not _folds_fit(needed, folds, val_fraction):
            needed += 1
        held_out, beside = ("val", "a non-empty train split") if val_fraction is None else \
            ("test", f"non-empty train and val ({val_fraction:g}) splits")
        raise DatasetError(
            f"{source} has {n} {unit}(s): too few for folds={folds} (each fold a {held_out} split) with {beside} "
            f"beside every fold; at least {needed} are needed (add cases, or lower dataset.folds"
            f"{'' if val_fraction is None else ' or val_fraction'})"
        )
    order = np.random.default_rng(seed).permutation(n)
    sizes = fold_sizes(n, folds)
    start = sum(sizes[:fold])
    held = {names[i] for i in order[start:start + sizes[fold]]}
    held_ids = sorted(case_id for case_id, group in groups.items() if group in held)
    rest = {case_id: group for case_id, group in groups.items() if group not in held}
    if val_fraction is None:
        return {"train": sorted(rest), "val": held_ids}
    carved = carve_groups(rest, {"val": val_fraction}, seed, source=f"{source} beside fold {fold}", unit=unit)
    return {"train": carved["train"], "val": carved["val"], "test": held_ids}


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
