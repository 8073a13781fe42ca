"""The options of one training run: each defined once, with its type, default, check and help.

The `train` command line is generated from these fields, `--config FILE.yaml` and experiment grids
are checked by them, and the run directory's config.yaml is written from them. Importable without
MPI or torch, and imports only checks.py and choices.py of this package (every other module may import it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .checks import Choice, Flag, Number, Repeated, Shape, Text, _is_number, _spec_text, link_delay_spec
from .choices import (  # noqa: F401  (the options' choices are part of this module's API)
    Algorithm,
    AvMomentum,
    Balance,
    CudaAware,
    Dataset,
    Device,
    Group,
    LamMode,
    Mode,
    Model,
    MomentumKind,
    OnDiverge,
    Slope,
    Stop,
    TextEnum,
    ThetaRule,
    WeightRule,
)

DEFAULT_STEPS = 500


def option(
    default,
    help: str,
    group: Group,
    check: Callable,
    *,
    metavar: str | None = None,
    flag: str | None = None,
    default_text: str | None = None,
    exclusive: str | None = None,
    repeat: bool = False,
):
    """A TrainConfig field with what the command line and the config file need to know of it.

    flag: the command-line spelling when it is not --name-with-hyphens (--no-progress).
    default_text: how --help shows a default of None that stands for a computed value.
    exclusive: options sharing this tag cannot both be given.
    """
    meta = {
        "help": help,
        "group": group,
        "check": check,
        "metavar": metavar,
        "flag": flag,
        "default_text": default_text,
        "exclusive": exclusive,
        "repeat": repeat,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_INT0 = Number(int, low=0)
_FINITE_POS = Number(float, low=0, low_open=True)
_FINITE_NONNEG = Number(float, low=0)


@dataclass
class TrainConfig:
    topology: str = option(
        "ring",
        "ring, torus, exponential, complete, star, random-regular:D, small-world:K:P, or a graph file",
        Group.GRAPH,
        Text(),
    )
    weights: WeightRule = option(
        WeightRule.METROPOLIS,
        "mixing-matrix rule (file: the weights in the graph file)",
        Group.GRAPH,
        Choice(WeightRule),
    )
    algorithm: Algorithm = option(
        Algorithm.PC_ASGD_PV, "what a rank does with a stale neighbour", Group.ALGORITHM, Choice(Algorithm)
    )
    theta: float = option(0.5, "predict/clip tradeoff of pc-asgd", Group.ALGORITHM, Number(float, 0, 1))
    theta_rule: ThetaRule = option(
        ThetaRule.FIXED,
        "θ of pc-asgd: --theta for every stale neighbour (fixed), per neighbour half the largest "
        "gain the delayed mixing tolerates at its staleness (stable; meant for --slope movement), or "
        "each link's disagreement predicted from the late pair and the link's own pulls (link; lockstep)",
        Group.ALGORITHM,
        Choice(ThetaRule),
    )
    lam: float = option(0.04, "Taylor-prediction coefficient λ (>= 0)", Group.ALGORITHM, _FINITE_NONNEG)
    lam_mode: LamMode = option(
        LamMode.FIXED, "λ as given (fixed) or scaled per parameter block (adaptive)", Group.ALGORITHM, Choice(LamMode)
    )
    slope: Slope = option(
        Slope.UPDATE,
        "slope of the Taylor prediction: the sender's last actual update "
        "(update), its raw gradient (gradient), estimated from its two newest messages "
        "(velocity, half the bytes), this rank's own steps since the copy was made (own, half the bytes), "
        "this rank's whole movement since then, mixing included (movement, half the bytes), "
        "or the sender's average movement per step, mixing included (drift)",
        Group.ALGORITHM,
        Choice(Slope),
    )
    tolerance: int | None = option(
        None,
        "staleness still counted fresh",
        Group.ALGORITHM,
        Number(int, low=0, optional=True),
        default_text="0 lockstep, 1 async",
    )
    horizon: int = option(16, "staleness beyond which a neighbour is dropped", Group.ALGORITHM, _INT0)
    mode: Mode = option(
        Mode.ASYNC,
        "async: every rank at its own pace; lockstep: every step waits for the neighbours' messages of that step",
        Group.EXECUTION,
        Choice(Mode),
    )
    delay: str = option(
        "none", "lockstep delay: none, fixed:TAU, random:P:TAU, ranks:R1,R2:TAU", Group.EXECUTION, _spec_text("fixed:3")
    )
    straggler: list[str] = option(
        [],
        "make RANK's steps FACTOR times slower (repeatable)",
        Group.EXECUTION,
        Repeated(_spec_text("2:4")),
        metavar="RANK:FACTOR",
        repeat=True,
    )
    link_delay: list[str] = option(
        [],
        "async: messages from RANKS reach their neighbours MS ms late (repeatable)",
        Group.EXECUTION,
        Repeated(link_delay_spec),
        metavar="RANKS:MS",
        repeat=True,
    )
    stop: Stop = option(
        Stop.FIRST,
        "async: all ranks stop together once one rank has done --steps or "
        "--duration elapsed (first), or every rank does its own --steps (each)",
        Group.EXECUTION,
        Choice(Stop),
    )
    balance: Balance = option(
        Balance.AUTO,
        "async: weigh a slower neighbour by its speed relative to this rank, so that every pair "
        "mixes as much per second each way (mix), scale a rank's step by its measured slowness (lr), "
        "or neither (none); auto is mix in async mode and none in lockstep",
        Group.EXECUTION,
        Choice(Balance),
    )
    device: Device = option(
        Device.CPU,
        "where each rank trains; with several GPUs per node, rank -> GPU by local rank",
        Group.EXECUTION,
        Choice(Device),
    )
    cuda_aware: CudaAware = option(
        CudaAware.AUTO,
        "pass GPU buffers to MPI directly (auto: ask the MPI library; PCASGD_CUDA_AWARE=0|1 overrides)",
        Group.EXECUTION,
        Choice(CudaAware),
    )
    fault_tolerant: bool = option(
        False, "async: survive dead ranks (launch with mpirun --with-ft ulfm, see README)", Group.EXECUTION, Flag()
    )
    threads: int | None = option(
        None,
        "torch threads per rank",
        Group.EXECUTION,
        Number(int, low=1, optional=True),
        default_text="cores of the node / ranks on it",
    )
    timeout: float = option(
        120.0,
        "seconds any wait for another rank may take before the job is aborted",
        Group.EXECUTION,
        _FINITE_POS,
        metavar="SECONDS",
    )
    on_diverge: OnDiverge = option(
        OnDiverge.ABORT,
        "a rank whose weights become inf or NaN: abort the job (one line, exit 1), or continue "
        "without it (its neighbours leave its messages out; summary.json names it). Grids continue",
        Group.EXECUTION,
        Choice(OnDiverge),
    )
    dataset: Dataset = option(Dataset.DIGITS, "training data", Group.DATA, Choice(Dataset))
    data_dir: str | None = option(
        None, "folder with the files of mnist, fashion-mnist or cifar10", Group.DATA, Text(optional=True), metavar="DIR"
    )
    synthetic_shape: list[int] = option(
        [1, 8, 8], "input shape of --dataset synthetic", Group.DATA, Shape(), metavar="C,H,W"
    )
    partition: str = option(
        "iid", "iid or dirichlet:ALPHA (non-IID label skew)", Group.DATA, _spec_text("dirichlet:0.5")
    )
    model: Model = option(Model.MLP, "network trained by every rank", Group.DATA, Choice(Model))
    steps: int | None = option(
        None,
        "local steps per rank",
        Group.OPTIMISATION,
        Number(int, low=1, optional=True),
        default_text=str(DEFAULT_STEPS),
        exclusive="length",
        metavar="N",
    )
    epochs: float | None = option(
        None,
        "passes over the training set, instead of --steps",
        Group.OPTIMISATION,
        Number(float, low=0, low_open=True, optional=True),
        exclusive="length",
        metavar="E",
    )
    duration: float | None = option(
        None,
        "async: all ranks stop together after this many seconds of training",
        Group.OPTIMISATION,
        Number(float, low=0, low_open=True, optional=True),
        metavar="SECONDS",
    )
    batch_size: int = option(
        32, "samples per local step (at most the rank's shard)", Group.OPTIMISATION, Number(int, low=1), metavar="B"
    )
    lr: float = option(0.1, "learning rate", Group.OPTIMISATION, _FINITE_POS)
    momentum: float = option(0.0, "SGD momentum", Group.OPTIMISATION, _FINITE_NONNEG)
    momentum_kind: MomentumKind = option(
        MomentumKind.LOCAL,
        "what the momentum accumulates: the local gradients (local, torch's SGD) or this rank's whole "
        "movement, mixing included (quasi-global), which keeps a rank's own data out of its momentum",
        Group.OPTIMISATION,
        Choice(MomentumKind),
    )
    av_momentum: AvMomentum = option(
        AvMomentum.SHARED,
        "pc-asgd-av under torch SGD's momentum: mix the momentum buffers with the neighbours' like the "
        "weights (shared), or keep each rank's its own (own); the other algorithms keep their own",
        Group.OPTIMISATION,
        Choice(AvMomentum),
    )
    weight_decay: float = option(0.0, "SGD weight decay", Group.OPTIMISATION, _FINITE_NONNEG)
    seed: int = option(0, "seed of the model, the data split and the batches", Group.OPTIMISATION, _INT0)
    out: str | None = option(
        None,
        "run directory: new, empty, or an earlier run of pcasgd-mpi",
        Group.OUTPUT,
        Text(optional=True),
        default_text="runs/<time>-<algorithm>",
        metavar="DIR",
    )
    overwrite: bool = option(
        False, "replace the earlier run in --out (its metrics, summary and checkpoints)", Group.OUTPUT, Flag()
    )
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)", Group.OUTPUT, _INT0, metavar="N")
    log_every: int = option(1, "write a metrics line every N steps (0: none)", Group.OUTPUT, _INT0, metavar="N")
    tensorboard: bool = option(
        False,
        "also write TensorBoard scalars to OUT/tensorboard (needs: pip install tensorboard)",
        Group.OUTPUT,
        Flag(),
    )
    progress: bool = option(True, "hide the progress bar", Group.OUTPUT, Flag(), flag="--no-progress")
    checkpoint_every: int = option(
        0,
        "write every rank's state every N steps (0: only when stopped by SIGTERM/SIGUSR1)",
        Group.CHECKPOINTS,
        _INT0,
        metavar="N",
    )
    checkpoint_dir: str | None = option(
        None,
        "where checkpoints go",
        Group.CHECKPOINTS,
        Text(optional=True),
        default_text="OUT/checkpoints",
        metavar="DIR",
    )
    keep_checkpoints: int = option(3, "keep the last K per rank", Group.CHECKPOINTS, Number(int, low=1), metavar="K")
    resume: bool = option(
        False,
        "continue from the newest checkpoint (lockstep: the newest step all ranks have)",
        Group.CHECKPOINTS,
        Flag(),
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, f.metadata["check"](getattr(self, f.name)))
            except ValueError as exc:
                raise ValueError(f"{flag_of(f)}: {exc}") from None
        if self.steps is not None and self.epochs is not None:
            raise ValueError("--steps and --epochs both given; give one of them")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume and --overwrite both given; --resume continues the run in --out, "
                "--overwrite starts it afresh: give one"
            )
        check_rule_settings(self.theta, self.lam, self.lam_mode, self.resolved_tolerance(), self.horizon)
        check_kinds(self.theta_rule, self.momentum_kind, self.algorithm, self.mode, self.momentum)
        if self.momentum_kind is MomentumKind.QUASI_GLOBAL and not self.momentum > 0:
            raise ValueError("--momentum-kind quasi-global needs a momentum > 0 (--momentum 0.9, say)")
        self.balance = resolve_balance(self.balance, self.mode)

    # ------------------------------------------------------------------ building one
    @classmethod
    def parse_mapping(cls, values: Mapping, source: str) -> dict:
        """Check a mapping of option: value (keys spelled with - or _); returns field name -> typed value.

        Raises ValueError of one line naming `source` and the key."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of option: value, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        checked = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ValueError(f"{source}: unknown option '{key}'; see pcasgd-mpi train --help")
            try:
                checked[name] = fields[name].metadata["check"](value)
            except ValueError as exc:
                raise ValueError(f"{source}: {key}: {exc}") from None
        return checked

    @classmethod
    def from_mapping(cls, values: Mapping, source: str = "config") -> TrainConfig:
        """A TrainConfig from e.g. a YAML document; every problem is one ValueError line naming `source`."""
        checked = cls.parse_mapping(values, source)
        try:
            return cls(**checked)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    # ------------------------------------------------------------------ resolved values
    def resolved_tolerance(self) -> int:
        """Lockstep counts only the current step as fresh; async one step behind (ALGORITHM.md)."""
        return resolve_tolerance(self.tolerance, self.mode)

    def resolved_steps(self, train_samples: int, world_size: int) -> int:
        """Local steps per rank: --steps, or --epochs over the whole training set, or the default."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_samples / (world_size * self.batch_size)))
        return DEFAULT_STEPS

    def effective(self, steps: int, tolerance: int | None = None) -> TrainConfig:
        """This configuration with the values the run actually used (what config.yaml records)."""
        return dataclasses.replace(
            self, steps=steps, epochs=None, tolerance=self.resolved_tolerance() if tolerance is None else tolerance
        )

    def to_file(self) -> dict:
        """Plain values keyed like the long options, for config.yaml; `--config` reads it back.

        Where the run went and whether it continued or replaced an earlier one are left out:
        the file repeats the run elsewhere."""
        skip = {"out", "overwrite", "resume"}
        return {
            f.name.replace("_", "-"): _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in skip
        }

    def first_difference(self, saved: Mapping, ignore: tuple[str, ...] = ()) -> tuple[str, object, object] | None:
        """(field, saved value, this value) of the first training setting in which a saved config.yaml
        (keys with - or _) differs from this one, or None. A length given by --epochs or left to the
        default is resolved from the data only at run time, so then steps and epochs are not compared."""
        saved = {str(k).replace("-", "_"): v for k, v in saved.items()}
        mine = {k.replace("-", "_"): v for k, v in self.to_file().items()}
        mine["tolerance"] = self.resolved_tolerance()
        for key, want in mine.items():
            if key in ignore or key not in saved or (key in ("steps", "epochs") and self.steps is None):
                continue
            if saved[key] != want:
                return key, saved[key], want
        return None

    # ------------------------------------------------------------------ identity
    def config_hash(self) -> str:
        """Every rank must run with the same options (progress and threads are per-rank matters)."""
        return _hash({k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "threads")})

    def training_hash(self) -> str:
        """What a checkpoint must agree on to be continued: the options that change the trajectory."""
        skip = {
            "progress",
            "threads",
            "out",
            "overwrite",
            "steps",
            "epochs",
            "duration",
            "stop",
            "link_delay",
            "eval_every",
            "log_every",
            "timeout",
            "straggler",
            "fault_tolerant",
            "tensorboard",
            "device",
            "cuda_aware",
            "checkpoint_every",
            "checkpoint_dir",
            "keep_checkpoints",
            "resume",
        }
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        for name, default in _ADDED_LATER.items():
            if fields[name] == default:  # at its default the trajectory is as before it existed
                del fields[name]
        return _hash(fields)


# Options added after checkpoints were first written: left out of the training hash at their
# default, so that those checkpoints can still be continued.
_ADDED_LATER = {"theta_rule": ThetaRule.FIXED, "momentum_kind": MomentumKind.LOCAL, "av_momentum": AvMomentum.SHARED}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def resolve_tolerance(tolerance: int | None, mode: Mode | str) -> int:
    if tolerance is not None:
        return tolerance
    return 0 if Mode(mode) is Mode.LOCKSTEP else 1


def resolve_balance(balance: Balance | str, mode: Mode | str) -> Balance:
    """`auto`: mix in async mode (ALGORITHM.md "Two execution modes", speed balance), none in lockstep."""
    balance = Balance(balance)
    if balance is not Balance.AUTO:
        return balance
    return Balance.MIX if Mode(mode) is Mode.ASYNC else Balance.NONE


def check_rule_settings(theta: float, lam: float, lam_mode: str, tolerance: int, horizon: int) -> None:
    """The update rule's settings, checked the same way for the command line and the Python API."""
    if not (_is_number(theta) and 0.0 <= theta <= 1.0):
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    if not (_is_number(lam) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if lam_mode not in tuple(LamMode):
        raise ValueError(f"lam_mode must be one of {', '.join(LamMode)}, got '{lam_mode}'")
    for name, value in (("tolerance", tolerance), ("horizon", horizon)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value}")
    if tolerance > horizon:
        raise ValueError(f"tolerance ({tolerance}) must not exceed horizon ({horizon})")


def check_kinds(
    theta_rule: ThetaRule | str,
    momentum_kind: MomentumKind | str,
    algorithm: Algorithm | str,
    mode: Mode | str,
    momentum: float = 0.0,
) -> None:
    """--theta-rule and --momentum-kind against the algorithm, mode and momentum, for the command line
    and the API alike (the wrapped optimizer itself is checked by momentum.check)."""
    rule = ThetaRule(theta_rule)
    if rule is not ThetaRule.FIXED and Algorithm(algorithm) is not Algorithm.PC_ASGD:
        raise ValueError(
            f"--theta-rule {rule.value} sets the θ of pc-asgd; it does not apply to --algorithm {algorithm} "
            "(use --algorithm pc-asgd, or --theta-rule fixed)"
        )
    if rule is ThetaRule.LINK and Mode(mode) is not Mode.LOCKSTEP:
        raise ValueError(
            "--theta-rule link needs --mode lockstep (both ends of a link must use the same late pair); "
            "in async mode use --theta-rule stable"
        )
    if MomentumKind(momentum_kind) is MomentumKind.QUASI_GLOBAL and Algorithm(algorithm) is Algorithm.ALLREDUCE:
        raise ValueError("--momentum-kind quasi-global is for the decentralized algorithms; allreduce has one model")
    # A local momentum carries a rank's own gradients on while the links pull it back late: with
    # --theta-rule link that resonance made the agents fall apart (RESULTS-fidelity.md section 15).
    if rule is ThetaRule.LINK and MomentumKind(momentum_kind) is MomentumKind.LOCAL and momentum > 0:
        raise ValueError(
            "--theta-rule link under momentum needs --momentum-kind quasi-global "
            "(with a local momentum the agents fall apart); or use --momentum 0"
        )


def _plain(value):
    if isinstance(value, TextEnum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
