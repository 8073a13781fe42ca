"""The grid file of `pcasgd-mpi experiment`: its schema, its checks and the runs it expands to.

A grid (YAML)::

    ranks: 4                       # MPI ranks (agents) of the job
    job_timeout: 1800              # seconds the whole job may take when it is launched from here
    mode: lockstep                 # any other TrainConfig field: the base of every run
    dataset: digits
    steps: 300
    eval_every: 30
    algorithms: [dsgd, clip, predict, "pc-asgd:0.25", pc-asgd-pv, pc-asgd-av, allreduce]
    delays: [none, "fixed:2", "random:0.5:4", "ranks:0,2:8"]   # async: none, "straggler:3:4", "link:0,2:30"
    seeds: [0, 1, 2]
    partitions: [iid, "dirichlet:0.3"]   # optional axis (else the base `partition`)
    lrs: [0.1, 0.5]                      # optional axis (else the base `lr`)
    exclude:                             # optional: combinations not to run
      - {algorithm: allreduce, delay: ["fixed:2", "random:0.5:4"]}

`pc-asgd:THETA` is pc-asgd with θ = THETA (`pc-asgd` alone: θ = 0.5). In async mode, where staleness
is not injected but comes from speeds and links, the delay axis names those conditions instead:
`straggler:RANK:FACTOR` (`--straggler`) and `link:RANKS:MS` (`--link-delay`). Importable without MPI
or torch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .config import Algorithm, Mode, TrainConfig
from .delay import DelayModel, SpecError, Straggler, link_delays

ALGORITHMS = tuple(a.value for a in Algorithm)
DEFAULT_THETA = TrainConfig.theta
# The decentralized rules that see stale neighbours; allreduce is synchronous and ignores the delay model.
STALE_AWARE = tuple(a for a in ALGORITHMS if a != Algorithm.ALLREDUCE)

AXES = {"algorithms": "algorithm", "delays": "delay", "seeds": "seed", "partitions": "partition", "lrs": "lr"}
# `job_timeout`, not `timeout`: TrainConfig.timeout is each run's limit on waiting for a neighbour.
META = ("ranks", "job_timeout", "exclude", "name")
# Fields every run sets itself; in the base they would be silently overridden.
RUN_FIELDS = ("algorithm", "theta", "theta_rule", "delay", "seed", "out", "progress")
DEFAULT_JOB_TIMEOUT = 3600.0


class GridError(ValueError):
    """A grid file that cannot be run; the message is one line naming the file and the entry."""


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class AlgoSpec:
    name: str
    theta: float | None = None  # only pc-asgd has one
    theta_rule: str | None = None  # pc-asgd:stable or pc-asgd:link (--theta-rule)

    RULES = ("stable", "link")

    @classmethod
    def parse(cls, entry) -> AlgoSpec:
        text = str(entry).strip()
        name, sep, value = text.partition(":")
        if name not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm '{text}'; choose from {', '.join(ALGORITHMS)} "
                "(pc-asgd:THETA sets θ, pc-asgd:stable and pc-asgd:link set --theta-rule)"
            )
        if name != "pc-asgd":
            if sep:
                raise ValueError(f"'{text}': only pc-asgd takes a value (pc-asgd:THETA, pc-asgd:stable, pc-asgd:link)")
            return cls(name)
        if value.strip() in cls.RULES:
            return cls(name, theta_rule=value.strip())
        try:
            theta = float(value) if sep else DEFAULT_THETA
        except ValueError:
            theta = float("nan")
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"'{text}': THETA must be a number in [0, 1] (or pc-asgd:stable, pc-asgd:link)")
        return cls(name, theta)

    @property
    def label(self) -> str:
        if self.theta_rule:
            return f"{self.name}:{self.theta_rule}"
        return self.name if self.theta is None else f"{self.name}:{self.theta:g}"

    @property
    def slug(self) -> str:
        if self.theta_rule:
            return f"{self.name}-{self.theta_rule}"
        return self.name if self.theta is None else f"{self.name}-t{self.theta:g}"


def _slug(text: str) -> str:
    return text.replace(":", "-").replace(",", "_").replace("/", "_").replace(" ", "")


@dataclass(frozen=True)
class RunSpec:
    algorithm: AlgoSpec
    delay: str
    partition: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return "__".join(
            [self.algorithm.slug, _slug(self.delay), _slug(self.partition), f"lr{self.lr:g}", f"s{self.seed}"]
        )

    @property
    def setting(self) -> Setting:
        return Setting(self.delay, self.partition, self.lr)

    def train_fields(self, base: dict, out: Path) -> dict:
        fields = dict(
            base,
            algorithm=self.algorithm.name,
            **_delay_fields(self.delay),
            partition=self.partition,
            lr=self.lr,
            seed=self.seed,
            out=str(out),
            progress=False,
        )
        # One diverging run is a result of the comparison, not the end of the grid.
        fields.setdefault("on_diverge", "continue")
        if self.algorithm.theta is not None:
            fields["theta"] = self.algorithm.theta
        if self.algorithm.theta_rule:
            fields["theta_rule"] = self.algorithm.theta_rule
        return fields


@dataclass(frozen=True)
class Setting:
    delay: str
    partition: str
    lr: float

    @property
    def key(self) -> str:
        # No "|": the key also names rows inside markdown tables.
        return f"delay {self.delay} · {self.partition} · lr {self.lr:g}"

    @property
    def slug(self) -> str:
        return f"{_slug(self.delay)}__{_slug(self.partition)}__lr{self.lr:g}"


@dataclass
class Grid:
    path: Path
    name: str
    base: dict
    algorithms: list[AlgoSpec]
    delays: list[str]
    seeds: list[int]
    partitions: list[str]
    lrs: list[float]
    ranks: int
    timeout: float
    exclude: list[dict]

    def runs(self) -> list[RunSpec]:
        """Every combination not excluded; a setting's runs are contiguous, seeds innermost."""
        out = []
        for partition in self.partitions:
            for lr in self.lrs:
                for delay in self.delays:
                    for algo in self.algorithms:
                        for seed in self.seeds:
                            spec = RunSpec(algo, delay, partition, lr, seed)
                            if not any(_matches(rule, spec) for rule in self.exclude):
                                out.append(spec)
        return out

    def settings(self) -> list[Setting]:
        return [Setting(d, p, lr) for p in self.partitions for lr in self.lrs for d in self.delays]

    def describe(self) -> dict:
        return {
            "file": str(self.path),
            "name": self.name,
            "ranks": self.ranks,
            "base": self.base,
            "algorithms": [a.label for a in self.algorithms],
            "delays": self.delays,
            "seeds": self.seeds,
            "partitions": self.partitions,
            "lrs": self.lrs,
            "exclude": self.exclude,
        }


# Async conditions on the delay axis: prefix -> the TrainConfig field it sets (a one-entry list).
ASYNC_CONDITIONS = {"straggler": "straggler", "link": "link_delay"}


def _delay_fields(delay: str) -> dict:
    """The TrainConfig fields a delay-axis entry sets: --delay, or one async condition."""
    kind, sep, rest = delay.partition(":")
    if sep and kind in ASYNC_CONDITIONS:
        return {"delay": "none", ASYNC_CONDITIONS[kind]: [rest]}
    return {"delay": delay}


def _parse_delay(entry, ranks: int, mode: Mode) -> str:
    """One delay-axis entry, checked; raises ValueError (or SpecError) naming the problem."""
    text = str(entry).strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in ASYNC_CONDITIONS:
        if mode is not Mode.ASYNC and kind == "link":
            raise ValueError(f"{text!r} needs mode async (in lockstep, inject delays with fixed:, random:, ranks:)")
        if kind == "link":
            link_delays([rest], ranks)  # raises naming a malformed spec or a rank beyond the job
        elif (slow := Straggler.parse(rest).rank) >= ranks:
            raise ValueError(f"{text!r} names rank {slow} but the job has only {ranks} ranks")
        return f"{kind}:{rest}"
    model = DelayModel.parse(text)
    model.check_ranks(ranks)
    if model.max_delay > 0 and mode is not Mode.LOCKSTEP:
        raise ValueError(
            "injected delays need mode lockstep; async runs make their own staleness "
            "(use straggler:RANK:FACTOR or link:RANKS:MS)"
        )
    return str(model)


def _matches(rule: dict, spec: RunSpec) -> bool:
    values = {
        "algorithm": (spec.algorithm.label, spec.algorithm.name),
        "delay": (spec.delay,),
        "partition": (spec.partition,),
        "lr": (spec.lr,),
        "seed": (spec.seed,),
    }
    for key, wanted in rule.items():
        if not any(v in values[key] for v in wanted):
            return False
    return True


def _train_config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_base(base: dict, path: Path) -> dict:
    """The grid's base settings as TrainConfig types them; raises GridError of one line.

    The same checks as `pcasgd-mpi train --config FILE.yaml`: one definition of every option.
    """
    try:
        return TrainConfig.parse_mapping(base, str(path))
    except ValueError as exc:
        raise GridError(str(exc)) from None


def parse_grid(raw, path: str | Path = "<grid>") -> Grid:
    """Check a loaded grid document; every problem is a GridError of one line."""
    path = Path(path)

    def fail(msg: str):
        raise GridError(f"{path}: {msg}")

    if not isinstance(raw, dict):
        fail(
            "the grid must be a mapping of settings (key: value), got "
            f"{type(raw).__name__ if raw is not None else 'an empty file'}"
        )
    fields = _train_config_fields()
    unknown = [k for k in raw if k not in AXES and k not in META and k not in fields]
    if unknown:
        fail(
            f"unknown key(s) {', '.join(map(repr, unknown))}; use TrainConfig fields "
            f"(e.g. steps, lr, dataset), the axes {', '.join(AXES)} or {', '.join(META)}"
        )
    base = _check_base({k: v for k, v in raw.items() if k in fields}, path)
    for key in RUN_FIELDS:
        if key in base:
            plural = {"algorithm": "algorithms", "delay": "delays", "seed": "seeds", "theta": "algorithms"}.get(key)
            fail(f"'{key}' is set by each run" + (f"; list it under '{plural}'" if plural else ""))
    for axis in ("partitions", "lrs"):
        if axis in raw and AXES[axis] in base:
            fail(f"both '{AXES[axis]}' and '{axis}' are given; keep one")
    for key in ("algorithms", "delays", "seeds"):
        if key not in raw:
            fail(f"missing '{key}'")
    base.setdefault("mode", Mode.LOCKSTEP)

    ranks = raw.get("ranks", 4)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        fail(f"ranks must be a whole number >= 1, got {ranks!r}")
    timeout = raw.get("job_timeout", DEFAULT_JOB_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        fail(f"job_timeout must be a number of seconds > 0, got {timeout!r}")

    algorithms = []
    for i, entry in enumerate(_checked_list(raw, "algorithms", fail)):
        try:
            algorithms.append(AlgoSpec.parse(entry))
        except ValueError as exc:
            fail(f"algorithms[{i}]: {exc}")
    delays = []
    for i, entry in enumerate(_checked_list(raw, "delays", fail)):
        try:
            delays.append(_parse_delay(entry, ranks, Mode(base["mode"])))
        except (SpecError, ValueError) as exc:
            fail(f"delays[{i}]: {str(exc).replace('--delay ', 'delay ')}")
    seeds = []
    for i, entry in enumerate(_checked_list(raw, "seeds", fail)):
        if not isinstance(entry, int) or isinstance(entry, bool):
            fail(f"seeds[{i}]: a seed must be a whole number, got {entry!r}")
        seeds.append(entry)
    partitions = [str(p) for p in _checked_list(raw, "partitions", fail, default=base.pop("partition", "iid"))]
    for i, scheme in enumerate(partitions):
        _check_partition(scheme, ranks, lambda msg, i=i: fail(f"partitions[{i}]: {msg}"))
    lrs = []
    for i, entry in enumerate(_checked_list(raw, "lrs", fail, default=base.pop("lr", 0.1))):
        if not isinstance(entry, (int, float)) or isinstance(entry, bool) or not entry > 0:
            fail(f"lrs[{i}]: a learning rate must be a number > 0, got {entry!r}")
        lrs.append(float(entry))
    for axis, values in (
        ("algorithms", [a.label for a in algorithms]),
        ("delays", delays),
        ("seeds", seeds),
        ("partitions", partitions),
        ("lrs", lrs),
    ):
        dup = [v for v, n in Counter(values).items() if n > 1]
        if dup:
            fail(f"'{axis}' lists {dup[0]!r} more than once")
    exclude = _parse_exclude(raw.get("exclude", []), fail, ranks, Mode(base["mode"]))
    grid = Grid(
        path,
        str(raw.get("name", path.stem)),
        base,
        algorithms,
        delays,
        seeds,
        partitions,
        lrs,
        ranks,
        float(timeout),
        exclude,
    )
    runs = grid.runs()
    if not runs:
        fail("'exclude' leaves no run")
    for spec in runs:
        # Settings that are fine one by one can still clash (steps and epochs, tolerance > horizon):
        # better now than after hours of other runs.
        try:
            TrainConfig(**spec.train_fields(base, path.parent))
        except ValueError as exc:
            fail(f"run {spec.name}: {exc}")
    return grid


def _checked_list(raw: dict, key: str, fail, default=None) -> list:
    value = raw.get(key, default)
    if value is None:
        fail(f"'{key}' is empty")
    values = value if isinstance(value, list) else [value]
    if not values:
        fail(f"'{key}' is empty")
    return values


def _check_partition(scheme: str, ranks: int, fail) -> None:
    from . import data

    try:
        # A tiny fake label vector: this only checks that the scheme parses.
        data.partition(np.arange(10 * ranks) % 10, ranks, scheme, seed=0)
    except ValueError as exc:
        fail(str(exc))


def _parse_exclude(raw, fail, ranks: int, mode: Mode) -> list[dict]:
    if not isinstance(raw, list):
        fail("'exclude' must be a list of mappings such as {algorithm: allreduce, delay: fixed:2}")
    rules = []
    keys = {"algorithm", "delay", "partition", "lr", "seed"}
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or not rule:
            fail(f"exclude[{i}] must be a mapping of {', '.join(sorted(keys))} to a value or a list")
        bad = [k for k in rule if k not in keys]
        if bad:
            fail(f"exclude[{i}]: unknown key {bad[0]!r}; use {', '.join(sorted(keys))}")
        norm = {}
        for key, value in rule.items():
            values = value if isinstance(value, list) else [value]
            try:
                if key == "algorithm":
                    values = [AlgoSpec.parse(v).label if ":" in str(v) else str(v) for v in values]
                    unknown = [v for v in values if v.partition(":")[0] not in ALGORITHMS]
                    if unknown:
                        raise ValueError(f"unknown algorithm '{unknown[0]}'")
                elif key == "delay":
                    values = [_parse_delay(v, ranks, mode) for v in values]  # as the delay axis reads them
                elif key == "lr":
                    values = [float(v) for v in values]
                elif key == "partition":
                    values = [str(v) for v in values]
            except (SpecError, ValueError, TypeError) as exc:
                fail(f"exclude[{i}].{key}: {str(exc).replace('--delay ', 'delay ')}")
            norm[key] = values
        rules.append(norm)
    return rules


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GridError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    return parse_grid(raw, path)
