"""Injected delays (lockstep mode) and stragglers (async mode), parsed from short specs.

Pure and deterministic: the delay of a message depends only on (seed, sender, receiver, step),
so a lockstep run is reproducible to the bit and can be resumed at any step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum


class SpecError(ValueError):
    """A malformed --delay or --straggler value."""


class DelayKind(str, Enum):
    NONE = "none"
    FIXED = "fixed"
    RANDOM = "random"
    RANKS = "ranks"


DELAY_FORMS = "none, fixed:TAU, random:P:TAU or ranks:R1,R2:TAU"


def _int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"--delay '{spec}': {what} must be a whole number, got '{text}' ({DELAY_FORMS})") from None
    if value < 0:
        raise SpecError(f"--delay '{spec}': {what} must be >= 0 ({DELAY_FORMS})")
    return value


@dataclass(frozen=True)
class DelayModel:
    """Which message agent j uses from neighbour l at step k: the one from step k - delay(l, j, k)."""

    kind: DelayKind = DelayKind.NONE
    tau: int = 0
    prob: float = 0.0
    ranks: frozenset[int] = frozenset()
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> DelayModel:
        parts = spec.strip().split(":")
        try:
            kind = DelayKind(parts[0])
        except ValueError:
            raise SpecError(f"--delay '{spec}' is not one of {DELAY_FORMS}") from None
        arity = {DelayKind.NONE: 1, DelayKind.FIXED: 2, DelayKind.RANDOM: 3, DelayKind.RANKS: 3}[kind]
        if len(parts) != arity:
            raise SpecError(f"--delay '{spec}' has {len(parts) - 1} fields after '{kind.value}'; use {DELAY_FORMS}")
        if kind is DelayKind.NONE:
            return cls(seed=seed)
        tau = _int(parts[-1], "TAU", spec)
        if kind is DelayKind.FIXED:
            return cls(kind, tau, seed=seed)
        if kind is DelayKind.RANDOM:
            try:
                prob = float(parts[1])
            except ValueError:
                prob = -1.0
            if not 0.0 <= prob <= 1.0:
                raise SpecError(f"--delay '{spec}': P must be a probability in [0, 1] ({DELAY_FORMS})")
            return cls(kind, tau, prob=prob, seed=seed)
        ranks = frozenset(_int(r, "each rank", spec) for r in parts[1].split(",") if r != "")
        if not ranks:
            raise SpecError(f"--delay '{spec}': name at least one rank ({DELAY_FORMS})")
        return cls(kind, tau, ranks=ranks, seed=seed)

    @property
    def max_delay(self) -> int:
        return 0 if self.kind is DelayKind.NONE else self.tau

    def check_ranks(self, size: int) -> None:
        bad = sorted(r for r in self.ranks if r >= size)
        if bad:
            raise SpecError(f"--delay names ranks {bad} but the job has only {size} ranks (0..{size - 1})")

    def delay(self, sender: int, receiver: int, step: int) -> int:
        if self.kind is DelayKind.NONE:
            return 0
        if self.kind is DelayKind.FIXED:
            return self.tau
        if self.kind is DelayKind.RANKS:
            return self.tau if sender in self.ranks else 0
        digest = hashlib.blake2b(f"{self.seed}:{sender}:{receiver}:{step}".encode(), digest_size=8).digest()
        return self.tau if int.from_bytes(digest, "little") / 2.0**64 < self.prob else 0

    def link_delay(self, a: int, b: int) -> int:
        """The longest delay either direction of the link between a and b can have."""
        if self.kind is DelayKind.NONE or (self.kind is DelayKind.RANDOM and self.prob == 0.0):
            return 0
        if self.kind is DelayKind.RANKS:
            return self.tau if a in self.ranks or b in self.ranks else 0
        return self.tau

    def __str__(self) -> str:
        if self.kind is DelayKind.NONE:
            return "none"
        if self.kind is DelayKind.FIXED:
            return f"fixed:{self.tau}"
        if self.kind is DelayKind.RANDOM:
            return f"random:{self.prob:g}:{self.tau}"
        return f"ranks:{','.join(map(str, sorted(self.ranks)))}:{self.tau}"


@dataclass(frozen=True)
class LinkDelays:
    """Both ends of a link use the message of the same step: the one its longest delay allows
    (--theta-rule link). Reads like a DelayModel where the lockstep view asks which message to use."""

    model: DelayModel

    @property
    def max_delay(self) -> int:
        return self.model.max_delay

    def delay(self, sender: int, receiver: int, step: int) -> int:
        return self.model.link_delay(sender, receiver)


@dataclass(frozen=True)
class Straggler:
    """`--straggler RANK:FACTOR`: that rank's steps take FACTOR times as long."""

    rank: int
    factor: float

    @classmethod
    def parse(cls, spec: str) -> Straggler:
        try:
            rank_text, factor_text = spec.split(":")
            rank, factor = int(rank_text), float(factor_text)
        except ValueError:
            raise SpecError(f"--straggler '{spec}' is not RANK:FACTOR (e.g. 2:4 slows rank 2 four times)") from None
        if rank < 0 or not 1.0 <= factor < float("inf"):
            raise SpecError(f"--straggler '{spec}': RANK must be >= 0 and FACTOR a finite number >= 1")
        return cls(rank, factor)


def link_delays(specs: list[str], size: int) -> dict[int, float]:
    """`--link-delay RANKS:MS` (repeatable) as {rank: seconds} for the ranks it names.

    A rank named twice is an error rather than a silent choice between two delays.
    """
    out: dict[int, float] = {}
    for spec in specs:
        ranks, _, ms = str(spec).rpartition(":")
        try:
            names, seconds = [int(r) for r in ranks.split(",")], float(ms) / 1000.0
        except ValueError:
            raise SpecError(f"--link-delay '{spec}' is not RANKS:MS (e.g. 0,2:20)") from None
        if not ranks or any(r < 0 for r in names) or not 0.0 <= seconds < float("inf"):
            raise SpecError(f"--link-delay '{spec}': ranks must be >= 0 and MS a finite number >= 0")
        for r in names:
            if r >= size:
                raise SpecError(f"--link-delay names rank {r} but the job has only {size} ranks (0..{size - 1})")
            if r in out:
                raise SpecError(f"--link-delay names rank {r} twice; give each rank one delay")
            out[r] = seconds
    return out
