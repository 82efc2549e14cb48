"""A schema key's range, declared beside it: `key(ge=1)` is the dataclass field (no default: the value
lives in conf/) whose metadata `pipeline.config.check_ranges` reads, the one validator of every declared
range. A list or mapping key's bound applies to each of its items. Rules between keys stay explicit code
in pipeline/config.py (`validate`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

BOUNDS = "bounds"  # the metadata entry


@dataclass(frozen=True)
class Bounds:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def admits(self, value: Any) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def describe(self, integer: bool = False) -> str:
        """"an integer >= 1", ">= 0.0 and < 1.0": what the error message says was expected."""
        parts = [f"{op} {bound}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return ("an integer " if integer else "") + " and ".join(parts)


def key(*, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None) -> Any:
    """A schema field with no default (MISSING: its value is in conf/) and its range."""
    return field(default=MISSING, metadata={BOUNDS: Bounds(ge=ge, gt=gt, le=le, lt=lt)})
