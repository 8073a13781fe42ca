"""How each training option's value is checked, converted and shown in --help.

Each check takes a value as the command line (text) or a YAML file (int, float, bool, list, ...)
gives it and returns the typed value, or raises ValueError saying what is wrong, without the
option's name (the caller adds it, spelled as the user wrote it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    optional: bool = False  # None (YAML null) means "use the documented default"

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in [{_num(self.low)}, {_num(self.high)}]"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        return what

    def __call__(self, value):
        if value is None and self.optional:
            return None
        number = None
        if isinstance(value, str):
            try:
                number = self.kind(value.strip())
            except ValueError:
                pass
        elif _is_number(value):
            if self.kind is float:
                number = float(value)
            elif isinstance(value, int) or float(value).is_integer():
                number = int(value)
        if number is None or (self.kind is float and not math.isfinite(number)):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        if self.high is not None and number > self.high:
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        return number


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Choice:
    enum: type[Enum]

    def describe(self) -> str:
        return "one of " + ", ".join(e.value for e in self.enum)

    def __call__(self, value):
        try:
            return self.enum(value)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {value!r}") from None


@dataclass(frozen=True)
class Text:
    optional: bool = False

    def describe(self) -> str:
        return "a text"

    def __call__(self, value):
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a non-empty text, got {value!r}")
        return value


@dataclass(frozen=True)
class Flag:
    def describe(self) -> str:
        return "true or false"

    def __call__(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class Shape:
    def describe(self) -> str:
        return "positive sizes like 3,32,32"

    def __call__(self, value):
        items = value.strip("[]() ").split(",") if isinstance(value, str) else value
        try:
            if not isinstance(items, (list, tuple)) or not items or any(isinstance(d, bool) for d in items):
                raise ValueError
            dims = [int(d) if isinstance(d, int) else int(str(d).strip()) for d in items]
        except ValueError:
            raise ValueError(f"expected sizes like 3,32,32, got {value!r}") from None
        if any(d < 1 for d in dims):
            raise ValueError(f"sizes must be positive, got {value!r}")
        return dims


@dataclass(frozen=True)
class Repeated:
    """A repeatable option: a list in YAML (or one item), one item per flag on the command line."""

    item: Callable

    def describe(self) -> str:
        return "a list"

    def __call__(self, value):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [self.item(v) for v in items]


def _spec_text(example: str) -> Callable:
    def check(value):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected text like {example}, got {value!r}")
        return value.strip()

    return check


def link_delay_spec(value) -> str:
    """`RANKS:MS`: comma-separated ranks >= 0, then a finite delay in milliseconds >= 0."""
    text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    ranks, sep, ms = (text or "").rpartition(":")
    try:
        if not sep or not ranks:
            raise ValueError
        rank_list = [int(r) for r in ranks.split(",")]
        delay = float(ms)
    except ValueError:
        raise ValueError(f"'{value}' is not RANKS:MS (e.g. 1,3:20 delays ranks 1 and 3 by 20 ms)") from None
    if any(r < 0 for r in rank_list) or not math.isfinite(delay) or delay < 0:
        raise ValueError(f"'{value}': ranks must be >= 0 and MS a finite number >= 0")
    return text
