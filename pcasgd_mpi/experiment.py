"""Grids of lockstep runs in one MPI job, and their tables and figures.

`pcasgd-mpi experiment GRID.yaml [--out DIR]` (or `mpirun -n N python -m pcasgd_mpi.experiment
GRID.yaml`) runs every combination of the grid's axes with the trainer, one after another in the
same processes, because starting an MPI job costs seconds while a small run costs about as much.
Every run writes DIR/runs/<name>/; a run whose summary.json exists is not run again, so a grid
that was stopped resumes where it was. Rank 0 then writes DIR/results.md, DIR/results.json and
the figures.

The grid file (YAML)::

    ranks: 4                       # MPI ranks (agents) of the job
    job_timeout: 1800              # seconds the whole job may take when it is launched from here
    mode: lockstep                 # any other TrainConfig field: the base of every run
    dataset: digits
    steps: 300
    eval_every: 30
    algorithms: [dsgd, clip, predict, "pc-asgd:0.25", pc-asgd-pv, pc-asgd-av, allreduce]
    delays: [none, "fixed:2", "random:0.5:4", "ranks:0,2:8"]
    seeds: [0, 1, 2]
    partitions: [iid, "dirichlet:0.3"]   # optional axis (else the base `partition`)
    lrs: [0.1, 0.5]                      # optional axis (else the base `lr`)
    exclude:                             # optional: combinations not to run
      - {algorithm: allreduce, delay: ["fixed:2", "random:0.5:4"]}

`pc-asgd:THETA` is pc-asgd with θ = THETA (`pc-asgd` alone: θ = 0.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import plot as plotting
from .delay import DelayModel, SpecError

ALGORITHMS = ("dsgd", "clip", "predict", "pc-asgd", "pc-asgd-pv", "pc-asgd-av", "allreduce")
DEFAULT_THETA = 0.5
REFERENCE_ALGORITHM, REFERENCE_DELAY = "dsgd", "none"
# The decentralized rules that see stale neighbours; allreduce is synchronous and ignores the delay model.
STALE_AWARE = ("dsgd", "clip", "predict", "pc-asgd", "pc-asgd-pv", "pc-asgd-av")
PV_BASELINES = ("dsgd", "clip", "predict")
AV_MAX_GAP = 0.03
PV_NO_DELAY_TOLERANCE = 0.01

AXES = {"algorithms": "algorithm", "delays": "delay", "seeds": "seed", "partitions": "partition", "lrs": "lr"}
# `job_timeout`, not `timeout`: TrainConfig.timeout is each run's limit on waiting for a neighbour.
META = ("ranks", "job_timeout", "exclude", "name")
# Fields every run sets itself; in the base they would be silently overridden.
RUN_FIELDS = ("algorithm", "theta", "delay", "seed", "out", "progress")
DEFAULT_JOB_TIMEOUT = 3600.0


class GridError(ValueError):
    """A grid file that cannot be run; the message is one line naming the file and the entry."""


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class AlgoSpec:
    name: str
    theta: float | None = None  # only pc-asgd has one

    @classmethod
    def parse(cls, entry) -> "AlgoSpec":
        text = str(entry).strip()
        name, sep, value = text.partition(":")
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{text}'; choose from {', '.join(ALGORITHMS)} "
                             f"(pc-asgd:THETA sets θ)")
        if name != "pc-asgd":
            if sep:
                raise ValueError(f"'{text}': only pc-asgd takes a value (pc-asgd:THETA)")
            return cls(name)
        try:
            theta = float(value) if sep else DEFAULT_THETA
        except ValueError:
            theta = float("nan")
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"'{text}': THETA must be a number in [0, 1]")
        return cls(name, theta)

    @property
    def label(self) -> str:
        return self.name if self.theta is None else f"{self.name}:{self.theta:g}"

    @property
    def slug(self) -> str:
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
        return "__".join([self.algorithm.slug, _slug(self.delay), _slug(self.partition), f"lr{self.lr:g}",
                          f"s{self.seed}"])

    @property
    def setting(self) -> "Setting":
        return Setting(self.delay, self.partition, self.lr)

    def train_fields(self, base: dict, out: Path) -> dict:
        fields = dict(base, algorithm=self.algorithm.name, delay=self.delay, partition=self.partition,
                      lr=self.lr, seed=self.seed, out=str(out), progress=False)
        if self.algorithm.theta is not None:
            fields["theta"] = self.algorithm.theta
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
        return {"file": str(self.path), "name": self.name, "ranks": self.ranks, "base": self.base,
                "algorithms": [a.label for a in self.algorithms], "delays": self.delays, "seeds": self.seeds,
                "partitions": self.partitions, "lrs": self.lrs, "exclude": self.exclude}


def _matches(rule: dict, spec: RunSpec) -> bool:
    values = {"algorithm": (spec.algorithm.label, spec.algorithm.name), "delay": (spec.delay,),
              "partition": (spec.partition,), "lr": (spec.lr,), "seed": (spec.seed,)}
    for key, wanted in rule.items():
        if not any(v in values[key] for v in wanted):
            return False
    return True


def _train_config_fields() -> dict[str, str]:
    """TrainConfig's field names and annotation texts (config.py imports neither MPI nor torch)."""
    from .config import TrainConfig

    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def _type_ok(value, annotation: str) -> bool:
    allowed: tuple = ()
    for part in annotation.split("|"):
        part = part.strip()
        if part.startswith("list"):
            allowed += (list,)
        else:
            allowed += _TYPES.get(part, (object,))
    if isinstance(value, bool) and bool not in allowed:
        return False  # YAML's yes/no must not pass as a number
    return isinstance(value, allowed)


def parse_grid(raw, path: str | Path = "<grid>") -> Grid:
    """Check a loaded grid document; every problem is a GridError of one line."""
    path = Path(path)

    def fail(msg: str):
        raise GridError(f"{path}: {msg}")

    if not isinstance(raw, dict):
        fail("the grid must be a mapping of settings (key: value), got "
             f"{type(raw).__name__ if raw is not None else 'an empty file'}")
    fields = _train_config_fields()
    unknown = [k for k in raw if k not in AXES and k not in META and k not in fields]
    if unknown:
        fail(f"unknown key(s) {', '.join(map(repr, unknown))}; use TrainConfig fields "
             f"(e.g. steps, lr, dataset), the axes {', '.join(AXES)} or {', '.join(META)}")
    base = {k: v for k, v in raw.items() if k in fields}
    for key, value in base.items():
        if not _type_ok(value, fields[key]):
            fail(f"'{key}' must be {fields[key].replace(' | ', ' or ')}, got {value!r}")
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
    base.setdefault("mode", "lockstep")
    if base["mode"] not in ("lockstep", "async"):
        fail(f"mode must be lockstep or async, got '{base['mode']}'")

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
            model = DelayModel.parse(str(entry))
            model.check_ranks(ranks)
        except SpecError as exc:
            fail(f"delays[{i}]: {str(exc).replace('--delay ', 'delay ')}")
        if model.max_delay > 0 and base["mode"] != "lockstep":
            fail(f"delays[{i}]: injected delays need mode lockstep (async runs make their own staleness)")
        delays.append(str(model))
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
    for axis, values in (("algorithms", [a.label for a in algorithms]), ("delays", delays), ("seeds", seeds),
                         ("partitions", partitions), ("lrs", lrs)):
        dup = [v for v, n in Counter(values).items() if n > 1]
        if dup:
            fail(f"'{axis}' lists {dup[0]!r} more than once")
    exclude = _parse_exclude(raw.get("exclude", []), fail)
    grid = Grid(path, str(raw.get("name", path.stem)), base, algorithms, delays, seeds, partitions, lrs,
                ranks, float(timeout), exclude)
    if not grid.runs():
        fail("'exclude' leaves no run")
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


def _parse_exclude(raw, fail) -> list[dict]:
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
                    values = [str(DelayModel.parse(str(v))) for v in values]
                elif key == "lr":
                    values = [float(v) for v in values]
                elif key == "partition":
                    values = [str(v) for v in values]
            except (ValueError, TypeError) as exc:
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


# ----------------------------------------------------------------------------- running
# Options that change neither the trajectory nor the results of a finished run.
_BOOKKEEPING = ("out", "progress", "overwrite", "resume", "threads", "timeout", "checkpoint_every",
                "checkpoint_dir", "keep_checkpoints")


def _existing_run(run_dir: Path, fields: dict) -> str | None:
    """'done' when the run finished with the same configuration; None when it must be run.

    A finished run made with other settings is an error, not a skip: mixing it into the tables
    would report numbers for a configuration the grid does not describe.
    """
    if not (run_dir / "summary.json").exists():
        return None
    saved = plotting.read_config(run_dir)
    if not saved:
        return None
    from .config import TrainConfig

    wanted = json.loads(json.dumps(dataclasses.asdict(TrainConfig(**fields)), default=str))
    differ = [k for k in wanted if k not in _BOOKKEEPING and k in saved and saved[k] != wanted[k]]
    if differ:
        k = differ[0]
        raise GridError(f"{run_dir} holds a finished run with other settings ({k}: {saved[k]!r} there, "
                        f"{wanted[k]!r} in the grid); use another --out or delete that run")
    return "done"


def run_grid(grid: Grid, out: Path, comm, log=print) -> None:
    """Collective: run every missing run of the grid, then write the report on rank 0."""
    from .trainer import TrainConfig, run

    rank, size = comm.Get_rank(), comm.Get_size()
    if size != grid.ranks:
        raise GridError(f"{grid.path}: the grid is for {grid.ranks} ranks but the job has {size}; "
                        f"launch with mpirun -n {grid.ranks}")
    runs = grid.runs()
    if rank == 0:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps(grid.describe(), indent=2) + "\n")
        log(f"{grid.name}: {len(runs)} runs on {size} ranks, results in {out}")
    t_start = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        run_dir = out / "runs" / spec.name
        fields = spec.train_fields(grid.base, run_dir)
        status = None
        if rank == 0:
            try:
                status = _existing_run(run_dir, fields)
            except GridError as exc:
                status = exc
        status = comm.bcast(status, root=0)
        if isinstance(status, GridError):
            raise status
        t0 = time.perf_counter()
        if status == "done":
            if rank == 0:
                acc = json.loads((run_dir / "summary.json").read_text())["final_accuracy"]
                log(f"[{i}/{len(runs)}] {spec.name}: accuracy {acc:.4f} (finished earlier, skipped)")
            continue
        summary = run(TrainConfig(**fields), comm)
        if rank == 0:
            log(f"[{i}/{len(runs)}] {spec.name}: accuracy {summary['final_accuracy']:.4f} "
                f"({time.perf_counter() - t0:.1f} s)")
    comm.Barrier()
    if rank == 0:
        log(f"all runs done in {time.perf_counter() - t_start:.0f} s; writing the report")
        write_report(grid, out)
        log(f"report: {out / 'results.md'}")


# ----------------------------------------------------------------------------- aggregation
def _stats(values: list[float]) -> dict | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    # Sample standard deviation (ddof = 1): the seeds are a sample of the run-to-run spread.
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def _pv_share(summary: dict) -> float | None:
    wins = summary.get("pv_wins") or {}
    total = wins.get("predict", 0) + wins.get("clip", 0)
    return wins.get("predict", 0) / total if total else None


def _av_theta(summary: dict) -> float | None:
    thetas = [t["theta"] for per_rank in (summary.get("av") or {}).values() for t in (per_rank or {}).values()
              if t and t.get("measurements")]
    return float(np.mean(thetas)) if thetas else None


def aggregate(grid: Grid, summaries: dict[str, dict]) -> dict:
    """Tables as numbers: per (setting, algorithm) mean ± std over seeds, gaps and the checks.

    `summaries` maps run names to summary dicts; missing runs are left out of the statistics.
    """
    runs, cells = [], {}
    for spec in grid.runs():
        s = summaries.get(spec.name)
        row = {"name": spec.name, "algorithm": spec.algorithm.label, "delay": spec.delay,
               "partition": spec.partition, "lr": spec.lr, "seed": spec.seed, "finished": s is not None}
        if s is not None:
            row |= {"final_accuracy": s.get("final_accuracy"), "final_test_loss": s.get("final_test_loss"),
                    "consensus_distance": s.get("consensus_distance"), "pv_wins": s.get("pv_wins"),
                    "pv_predict_share": _pv_share(s), "av_theta": _av_theta(s),
                    "wall_time_s": s.get("wall_time_s")}
        runs.append(row)
        cells.setdefault(spec.algorithm.label, {}).setdefault(spec.setting.key, []).append(row)

    settings = [st for st in grid.settings() if any(st.key in per for per in cells.values())]
    table: dict[str, dict[str, dict]] = {}
    for label, per_setting in cells.items():
        for key, rows in per_setting.items():
            done = [r for r in rows if r["finished"]]
            table.setdefault(label, {})[key] = {
                "accuracy": _stats([r["final_accuracy"] for r in done]),
                "consensus_distance": _stats([r["consensus_distance"] for r in done]),
                "pv_predict_share": _stats([r["pv_predict_share"] for r in done]),
                "pv_choices": sum(sum((r["pv_wins"] or {}).values()) for r in done),
                "av_theta": _stats([r["av_theta"] for r in done]),
                "runs": len(rows), "finished": len(done),
            }

    def mean_acc(label: str, setting: Setting) -> float | None:
        st = table.get(label, {}).get(setting.key, {}).get("accuracy")
        return st["mean"] if st else None

    reference = {}
    for st in settings:
        ref = mean_acc(REFERENCE_ALGORITHM, Setting(REFERENCE_DELAY, st.partition, st.lr))
        reference[st.key] = ref
    gaps: dict[str, dict[str, float]] = {}
    worst: dict[str, dict] = {}
    for label in table:
        for st in settings:
            acc, ref = mean_acc(label, st), reference[st.key]
            if acc is not None and ref is not None:
                gaps.setdefault(label, {})[st.key] = ref - acc
        if gaps.get(label):
            key, gap = max(gaps[label].items(), key=lambda kv: kv[1])
            worst[label] = {"gap": gap, "setting": key}
    labels = [a.label for a in grid.algorithms if a.label in table]
    result = {
        "grid": grid.describe(),
        "algorithms": labels,
        "settings": [dataclasses.asdict(st) | {"key": st.key} for st in settings],
        "reference": {"algorithm": REFERENCE_ALGORITHM, "delay": REFERENCE_DELAY, "accuracy": reference},
        "table": table,
        "gaps": gaps,
        "worst_gap": worst,
        "runs": runs,
    }
    result["checks"] = checks(result)
    return result


def checks(agg: dict) -> dict:
    """The fidelity questions, answered from the numbers (each None when the grid cannot answer it)."""
    table, settings = agg["table"], [Setting(s["delay"], s["partition"], s["lr"]) for s in agg["settings"]]

    def acc(label, st):
        return table.get(label, {}).get(st.key, {}).get("accuracy")

    out: dict = {"pv_vs_baselines": None, "pv_no_delay": None, "av_worst_case": None}
    if "pc-asgd-pv" in table:
        rows, no_delay = [], []
        for st in settings:
            pv = acc("pc-asgd-pv", st)
            if pv is None:
                continue
            if st.delay == REFERENCE_DELAY:
                ds = acc(REFERENCE_ALGORITHM, st)
                if ds is not None:
                    diff = pv["mean"] - ds["mean"]
                    no_delay.append({"setting": st.key, "pv": pv["mean"], "dsgd": ds["mean"], "difference": diff,
                                     "holds": abs(diff) <= PV_NO_DELAY_TOLERANCE})
                continue
            base = {b: acc(b, st) for b in PV_BASELINES if acc(b, st) is not None}
            if not base:
                continue
            best = max(base, key=lambda b: base[b]["mean"])
            b = base[best]
            rows.append({"setting": st.key, "pv": pv["mean"], "pv_std": pv["std"], "best": best,
                         "best_mean": b["mean"], "best_std": b["std"], "margin": pv["mean"] - b["mean"],
                         "holds": pv["mean"] >= b["mean"] - b["std"],
                         "holds_with_pv_std": pv["mean"] >= b["mean"] - pv["std"]})
        if rows:
            out["pv_vs_baselines"] = {"rows": rows, "holds": all(r["holds"] for r in rows),
                                      "holds_with_pv_std": all(r["holds_with_pv_std"] for r in rows)}
        if no_delay:
            out["pv_no_delay"] = {"rows": no_delay, "holds": all(r["holds"] for r in no_delay),
                                  "tolerance": PV_NO_DELAY_TOLERANCE}
    worst = agg["worst_gap"]
    if "pc-asgd-av" in worst:
        av = worst["pc-asgd-av"]["gap"]
        others = {lab: w["gap"] for lab, w in worst.items()
                  if lab != "pc-asgd-av" and lab.partition(":")[0] in STALE_AWARE}
        better = sorted(lab for lab, g in others.items() if g < av)
        out["av_worst_case"] = {"av_gap": av, "av_setting": worst["pc-asgd-av"]["setting"],
                                "within": av <= AV_MAX_GAP, "max_gap": AV_MAX_GAP, "others": others,
                                "better_variants": better, "best_of_variants": not better}
    return out


# ----------------------------------------------------------------------------- the report
# One seed has no spread to show: "± 0" would read as a measured zero.
def _pct(st: dict | None) -> str:
    if st is None:
        return "—"
    return f"{100 * st['mean']:.1f}" + (f" ± {100 * st['std']:.1f}" if st["n"] > 1 else "")


def _sci(st: dict | None) -> str:
    if st is None:
        return "—"
    return f"{st['mean']:.2g}" + (f" ± {st['std']:.1g}" if st["n"] > 1 else "")


def _share(cell: dict) -> str:
    st = cell.get("pv_predict_share")
    if st is None:
        return "—"
    spread = f" ± {100 * st['std']:.0f}" if st["n"] > 1 else ""
    return f"{100 * st['mean']:.0f}%{spread} ({cell['pv_choices']} choices)"


def _theta(cell: dict) -> str:
    st = cell.get("av_theta")
    if st is None:
        return "—"
    return f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["n"] > 1 else "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def render_markdown(agg: dict, figures: list[str] | None = None) -> str:
    grid, labels, table = agg["grid"], agg["algorithms"], agg["table"]
    settings = agg["settings"]
    base = ", ".join(f"{k} {v}" for k, v in grid["base"].items())
    seeds = grid["seeds"]
    lines = [f"# Results: {grid['name']}", "",
             f"Grid `{grid['file']}`, {grid['ranks']} ranks; base: {base}; seeds {seeds}.",
             "Cells are mean ± sample standard deviation over the seeds of the final test accuracy (%) of",
             "the average model x̄. Gap = accuracy of dsgd without delay (same partition and lr) minus the",
             "cell, in percentage points; the worst case is the largest gap over the settings.", ""]
    unfinished = [r["name"] for r in agg["runs"] if not r["finished"]]
    if unfinished:
        lines += [f"**{len(unfinished)} run(s) have no summary yet** (left out): {', '.join(unfinished[:5])}"
                  + (" …" if len(unfinished) > 5 else ""), ""]

    def header(cols):
        return ["| delay | partition | lr | " + " | ".join(cols) + " |",
                "|---|---|---|" + "---|" * len(cols)]

    def row(st, cells):
        return f"| {st['delay']} | {st['partition']} | {st['lr']:g} | " + " | ".join(cells) + " |"

    lines += ["## Final test accuracy of the average model (%)", ""] + header(labels)
    for st in settings:
        lines.append(row(st, [_pct(table[lab].get(st["key"], {}).get("accuracy")) for lab in labels]))
    worst = agg["worst_gap"]
    lines.append("| **worst-case gap to dsgd, no delay (pp)** | | | " + " | ".join(
        f"{100 * worst[lab]['gap']:+.1f}" if lab in worst else "—" for lab in labels) + " |")
    lines += ["", "Where each worst case happens:", ""]
    for lab in labels:
        if lab in worst:
            lines.append(f"- {lab}: {100 * worst[lab]['gap']:+.1f} pp at {worst[lab]['setting']}")
    if any(lab.startswith("allreduce") for lab in labels):
        lines += ["", "allreduce averages gradients synchronously and has no neighbour messages: the delay "
                  "model does not act on it."]

    lines += ["", "## Consensus distance (1/N) Σ‖x_j − x̄‖² at the end", ""] + header(labels)
    for st in settings:
        lines.append(row(st, [_sci(table[lab].get(st["key"], {}).get("consensus_distance")) for lab in labels]))

    pv = [lab for lab in labels if lab == "pc-asgd-pv"]
    av = [lab for lab in labels if lab == "pc-asgd-av"]
    if pv or av:
        cols = [f"{lab}: predict share" for lab in pv] + [f"{lab}: mean final θ_l" for lab in av]
        lines += ["", "## Predict or clip", "",
                  "PV: share of its choices (steps with a stale neighbour) that kept the predicting candidate.",
                  "AV: θ_l of the measured neighbours at the end (1 = predict, 0 = clip), averaged over ranks.",
                  ""] + header(cols)
        for st in settings:
            cells = [_share(table[lab].get(st["key"], {})) for lab in pv]
            cells += [_theta(table[lab].get(st["key"], {})) for lab in av]
            lines.append(row(st, cells))

    lines += ["", "## Checks", ""] + _render_checks(agg["checks"])
    if figures:
        lines += ["", "## Figures", ""] + [f"- [{Path(f).name}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _render_checks(ch: dict) -> list[str]:
    lines = []
    pv = ch.get("pv_vs_baselines")
    if pv:
        lines += [f"- PV mean ≥ (best of dsgd/clip/predict) − (that one's std) under every delay: "
                  f"{_yes(pv['holds'])} (with PV's own std instead: {_yes(pv['holds_with_pv_std'])})", ""]
        lines += ["  | setting | PV | best baseline | margin (pp) | holds |", "  |---|---|---|---|---|"]
        for r in pv["rows"]:
            lines.append(f"  | {r['setting']} | {100 * r['pv']:.1f} ± {100 * r['pv_std']:.1f} | {r['best']} "
                         f"{100 * r['best_mean']:.1f} ± {100 * r['best_std']:.1f} | {100 * r['margin']:+.1f} | "
                         f"{_yes(r['holds'])} |")
        if any(r["pv_std"] == 0 and r["best_std"] == 0 for r in pv["rows"]):
            lines += ["", "  A spread of 0 here can mean a single seed: the check is then a plain comparison."]
        lines.append("")
    nd = ch.get("pv_no_delay")
    if nd:
        diffs = ", ".join(f"{100 * r['difference']:+.2f} pp ({r['setting']})" for r in nd["rows"])
        lines.append(f"- PV within {100 * nd['tolerance']:.0f} pp of dsgd without delay: {_yes(nd['holds'])} "
                     f"({diffs})")
    av = ch.get("av_worst_case")
    if av:
        others = ", ".join(f"{lab} {100 * g:+.1f}" for lab, g in sorted(av["others"].items(), key=lambda kv: kv[1]))
        lines.append(f"- pc-asgd-av worst-case gap ≤ {100 * av['max_gap']:.0f} pp: {_yes(av['within'])} "
                     f"({100 * av['av_gap']:+.1f} pp at {av['av_setting']})")
        lines.append(f"- no other variant has a smaller worst-case gap: {_yes(av['best_of_variants'])} "
                     f"(others, pp: {others})")
    return lines or ["- none of the checks applies to this grid"]


# ----------------------------------------------------------------------------- figures
def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std over runs at the steps all of them share."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    common = curves[0][0]
    for x, _ in curves[1:]:
        common = np.intersect1d(common, x)
    if not len(common):
        return None
    ys = np.stack([y[np.searchsorted(x, common)] for x, y in curves])
    return common, np.nanmean(ys, axis=0), (np.nanstd(ys, axis=0, ddof=1) if len(ys) > 1 else np.zeros(len(common)))


def write_figures(grid: Grid, out: Path, runs: dict[str, plotting.RunData]) -> list[str]:
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    by_cell: dict[tuple[str, str], list[plotting.RunData]] = {}
    for spec in grid.runs():
        if spec.name in runs:
            by_cell.setdefault((spec.setting.key, spec.algorithm.label), []).append(runs[spec.name])
    labels = [a.label for a in grid.algorithms]
    settings = [st for st in grid.settings() if any((st.key, lab) in by_cell for lab in labels)]
    written = []
    for st in settings:
        fig, axes = plotting.new_figure(1, 2)
        ax_acc, ax_loss = axes[0]
        for lab in labels:
            group = by_cell.get((st.key, lab))
            if not group:
                continue
            acc = _mean_curve([(r.eval_steps, r.accuracy) for r in group if r.has_accuracy])
            if acc is not None:
                line, = ax_acc.plot(acc[0], acc[1], marker=".", label=lab)
                ax_acc.fill_between(acc[0], acc[1] - acc[2], acc[1] + acc[2], alpha=0.15, color=line.get_color())
            loss = _mean_curve([(r.steps, r.loss) for r in group])
            if loss is not None:
                ax_loss.plot(loss[0], plotting.smooth(loss[1], plotting.default_window(len(loss[0]))), label=lab)
        ax_acc.set(xlabel="step", ylabel="test accuracy of the average model",
                   title="mean over seeds (band: ± 1 std)")
        ax_loss.set(xlabel="step", ylabel="training loss (mean over ranks and seeds)", yscale="log",
                    title="moving average of the minibatch loss")
        for ax in (ax_acc, ax_loss):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.suptitle(st.key)
        path = fig_dir / f"curves__{st.slug}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    rows = [(p, lr) for p in grid.partitions for lr in grid.lrs]
    fig, axes = plotting.new_figure(len(rows), len(grid.delays), width=4.5, height=3.4)
    for i, (p, lr) in enumerate(rows):
        for j, delay in enumerate(grid.delays):
            ax, st = axes[i][j], Setting(delay, p, lr)
            for lab in labels:
                group = [r for r in by_cell.get((st.key, lab), []) if r.has_consensus]
                cons = _mean_curve([(r.eval_steps, r.consensus) for r in group])
                if cons is not None and np.nanmax(cons[1]) > 0:
                    ax.plot(cons[0], cons[1], label=lab)
            ax.set_title(st.key, fontsize="small")
            ax.set(xlabel="step", ylabel="consensus distance")
            if ax.get_lines():
                ax.set_yscale("log")
    handles, names = next(((a.get_legend_handles_labels()) for row in axes for a in row
                           if a.get_legend_handles_labels()[0]), ([], []))
    if handles:
        fig.legend(handles, names, loc="outside right center", fontsize="small")
    path = fig_dir / "consensus.png"
    fig.savefig(path, dpi=90)
    written.append(path)

    fig, axes = plotting.new_figure(1, 1, width=7)
    hists = []
    for delay in grid.delays:
        total: Counter = Counter()
        for spec in grid.runs():
            if spec.delay == delay and spec.algorithm.name in STALE_AWARE and spec.name in runs:
                total.update(runs[spec.name].staleness)
        if total:
            hists.append((f"delay {delay}", total))
    plotting.staleness_bars(axes[0][0], hists)
    if hists:
        axes[0][0].legend(fontsize="small")
    axes[0][0].set_title("staleness of the neighbour messages used (all decentralized runs)", fontsize="small")
    path = fig_dir / "staleness.png"
    fig.savefig(path, dpi=100)
    written.append(path)
    return [str(p.relative_to(out)) for p in written]


def write_report(grid: Grid, out: Path) -> dict:
    """results.json, results.md and figures from whatever runs of the grid have finished."""
    runs, summaries = {}, {}
    for spec in grid.runs():
        run_dir = out / "runs" / spec.name
        if (run_dir / "summary.json").exists():
            runs[spec.name] = plotting.load_run(run_dir)
            summaries[spec.name] = runs[spec.name].summary
    agg = aggregate(grid, summaries)
    figures = write_figures(grid, out, runs) if runs else []
    agg["figures"] = figures
    (out / "results.json").write_text(json.dumps(agg, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(agg, figures))
    return agg


# ----------------------------------------------------------------------------- entry points
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS")


def _under_launcher() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def _env_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _relaunch(grid: Grid, config: str, out: Path, timeout: float) -> int:
    """Start this module under `mpirun -n <ranks>`; the child's output goes straight to ours."""
    from .launch import mpi_environment, mpirun_command

    try:
        cmd = mpirun_command(grid.ranks)
    except RuntimeError as exc:
        raise GridError(str(exc)) from None
    cmd += [sys.executable, "-m", "pcasgd_mpi.experiment", str(config), "--out", str(out)]
    env = mpi_environment()
    print(f"launching: {' '.join(cmd)} (time limit {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"pcasgd-mpi experiment: error: the job passed its time limit of {timeout:.0f} s and was "
              f"stopped; finished runs are kept, run the same command again to resume", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="GRID.yaml", help="grid file (see the module documentation)")
    parser.add_argument("--out", default=None, help="results directory (default: runs/<grid name>)")
    parser.add_argument("--job-timeout", type=float, default=None, metavar="SECONDS",
                        help="time limit of the MPI job when it is launched from here (default: the grid's "
                             "'job_timeout', else 3600)")
    parser.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.md, results.json and the figures from the finished runs; run nothing")


def main(args: argparse.Namespace) -> int:
    rank = _env_rank()
    try:
        grid = load_grid(args.config)
    except GridError as exc:
        if rank == 0:
            print(f"pcasgd-mpi experiment: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / grid.name
    if args.list:
        if rank == 0:
            for i, spec in enumerate(grid.runs(), 1):
                print(f"{i:4d} {spec.name}")
        return 0
    if args.report_only:
        if rank == 0:
            write_report(grid, out)
            print(f"report: {out / 'results.md'}")
        return 0
    if not _under_launcher() and grid.ranks > 1:
        return _relaunch(grid, args.config, out, args.job_timeout or grid.timeout)
    from mpi4py import MPI

    from .trainer import SetupError

    try:
        run_grid(grid, out, MPI.COMM_WORLD, log=lambda msg: print(msg, flush=True))
    except (GridError, SetupError) as exc:
        # Both are raised on every rank alike (the check is shared), so nobody is left waiting.
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"pcasgd-mpi experiment: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _script() -> int:
    parser = argparse.ArgumentParser(prog="python -m pcasgd_mpi.experiment", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return main(args)
    except Exception as exc:  # noqa: BLE001 - one rank failing must not leave the others waiting
        print(f"pcasgd-mpi experiment [rank {_env_rank()}]: error: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
            mpi.COMM_WORLD.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(_script())
