"""`pcasgd-mpi`: a thin command-line shell over the trainer."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import __version__

ALGORITHMS = ("dsgd", "clip", "predict", "pc-asgd", "pc-asgd-pv", "pc-asgd-av", "allreduce")
MODES = ("lockstep", "async")
WEIGHT_RULES = ("metropolis", "uniform", "max-degree", "file")
DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet20", "vgg11")


def _env_rank() -> int:
    """This process's rank as the launcher sets it, read without starting MPI."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        if _env_rank() == 0:  # every rank parses the same argv: one copy of the message
            print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(_agreed_error_status(2))


def _agreed_error_status(code: int) -> int:
    """Exit status for an error every rank found by itself (the same argv, or agreed in setup).

    Only rank 0 reports it and fails; the others end quietly, because the first rank to exit
    non-zero makes mpirun kill the rest, possibly before rank 0 has printed. mpirun still
    returns rank 0's status.
    """
    return code if _env_rank() == 0 else 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in str(text).strip("[]() ").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,32,32, got {text}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text}")
    return dims


def _theta(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"theta must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pcasgd-mpi", description="Decentralized asynchronous training over MPI with PC-ASGD.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one model per MPI rank (launch with mpirun -n N)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="options from a YAML file (keys as the long options); flags given here win")
    g = t.add_argument_group("graph")
    g.add_argument("--topology", default="ring",
                   help="ring, torus, exponential, complete, star, random-regular:D, small-world:K:P, or a file")
    g.add_argument("--weights", default="metropolis", choices=WEIGHT_RULES, help="mixing-matrix rule")
    a = t.add_argument_group("algorithm")
    a.add_argument("--algorithm", default="pc-asgd-pv", choices=ALGORITHMS)
    a.add_argument("--theta", type=_theta, default=0.5, help="predict/clip tradeoff for pc-asgd")
    a.add_argument("--lam", type=float, default=0.04, help="Taylor-prediction coefficient λ (>= 0)")
    a.add_argument("--lam-mode", default="fixed", choices=("fixed", "adaptive"))
    a.add_argument("--tolerance", type=_nonneg_int, default=None,
                   help="staleness still counted fresh (default: 0 lockstep, 1 async)")
    a.add_argument("--horizon", type=_nonneg_int, default=16, help="staleness beyond which a neighbour is dropped")
    r = t.add_argument_group("execution")
    r.add_argument("--mode", default="async", choices=MODES)
    r.add_argument("--delay", default="none", help="lockstep delay: none, fixed:TAU, random:P:TAU, ranks:R1,R2:TAU")
    r.add_argument("--straggler", action="append", default=[], metavar="RANK:FACTOR",
                   help="make RANK's steps FACTOR times slower (repeatable)")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where each rank trains; with several GPUs per node, rank -> GPU by local rank")
    r.add_argument("--cuda-aware", default="auto", choices=("auto", "yes", "no"),
                   help="pass GPU buffers to MPI directly (auto: ask the MPI library; PCASGD_CUDA_AWARE=0|1 overrides)")
    r.add_argument("--fault-tolerant", action="store_true",
                   help="async: survive dead ranks (launch with mpirun --with-ft ulfm, see README)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores of the node / ranks on it)")
    r.add_argument("--timeout", type=_positive_float, default=120.0,
                   help="seconds any wait for another rank may take before the job is aborted")
    d = t.add_argument_group("data and model")
    d.add_argument("--dataset", default="digits", choices=DATASETS)
    d.add_argument("--data-dir", default=None, help="folder with the files of mnist, fashion-mnist or cifar10")
    d.add_argument("--synthetic-shape", type=_shape, default=[1, 8, 8], metavar="C,H,W",
                   help="input shape of --dataset synthetic")
    d.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (non-IID label skew)")
    d.add_argument("--model", default="mlp", choices=MODELS)
    o = t.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="local steps per rank (default 500)")
    length.add_argument("--epochs", type=_positive_float, default=None, help="passes over the training set")
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=_positive_float, default=0.1)
    o.add_argument("--momentum", type=float, default=0.0)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--seed", type=int, default=0)
    out = t.add_argument_group("output")
    out.add_argument("--out", default=None, help="run directory (default runs/<time>-<algorithm>)")
    c = t.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N",
                   help="write every rank's state every N steps (0: only when stopped by SIGTERM/SIGUSR1)")
    c.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUT/checkpoints)")
    c.add_argument("--keep-checkpoints", type=_nonneg_int, default=3, metavar="K", help="keep the last K per rank")
    c.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint (lockstep: the newest step all ranks have)")
    out.add_argument("--overwrite", action="store_true", help="allow --out to name a directory with a finished run")
    out.add_argument("--eval-every", type=_nonneg_int, default=0, help="evaluate every N steps (0: only at the end)")
    out.add_argument("--log-every", type=_nonneg_int, default=1, help="write a metrics line every N steps")
    out.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard scalars to OUT/tensorboard (needs: pip install tensorboard)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    out.add_argument("--debug", action="store_true", help="show Python tracebacks")

    from . import experiment, plot

    exp = sub.add_parser("experiment", help="run a grid of lockstep experiments from a YAML file")
    experiment.add_arguments(exp)
    fig = sub.add_parser("plot", help="draw the metrics of runs side by side")
    plot.add_arguments(fig)

    top = sub.add_parser("topology", help="inspect a topology")
    top_sub = top.add_subparsers(dest="topology_command", required=True, parser_class=_Parser)
    show = top_sub.add_parser("show", help="print the graph, mixing matrix and spectral gap")
    show.add_argument("spec")
    show.add_argument("-n", "--size", type=int, required=True, help="number of agents")
    show.add_argument("--weights", default="metropolis", choices=WEIGHT_RULES)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--png", default=None, help="also draw the graph to this PNG file")
    return p


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; values from --config become the defaults, so flags on the command line win."""
    args = parser.parse_args(argv)
    if getattr(args, "command", None) != "train" or not args.config:
        return args
    import yaml

    train = _train_parser(parser)
    try:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        train.error(f"--config {args.config}: cannot read it ({str(exc).splitlines()[0]})")
    if not isinstance(values, dict):
        train.error(f"--config {args.config}: expected a mapping of option: value")
    actions = {a.dest: a for a in train._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            train.error(f"--config {args.config}: unknown option '{key}'")
        defaults[dest] = _convert(train, args.config, action, value)
    train.set_defaults(**defaults)
    return parser.parse_args(argv)


def _convert(parser, path: str, action: argparse.Action, value):
    """Check a value from the config file exactly as the command line would."""
    if value is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(parser, path, action, v) for v in items]
    return _convert_one(parser, path, action, value)


def _convert_one(parser, path, action, value):
    try:
        converted = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(f"--config {path}: {action.dest.replace('_', '-')}: {exc}")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"--config {path}: {action.dest.replace('_', '-')}: '{value}' is not one of "
                     f"{', '.join(map(str, action.choices))}")
    return converted


def _topology_show(args) -> int:
    from . import topology

    graph = topology.build(args.spec, args.size, seed=args.seed)
    topology.validate(graph, args.size)
    W = topology.mixing_matrix(graph, args.weights)
    print(topology.describe(graph, W))
    if args.png:
        topology.draw(graph, args.png)
        print(f"graph drawn to {args.png}")
    return 0


def _train(args) -> int:
    from .trainer import SetupError, TrainConfig, run

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**fields)
    try:
        summary = run(cfg)
    except SetupError as exc:
        # Every rank knows about it (the ranks agreed on it), so nobody is left waiting.
        if _env_rank() == 0:
            print(f"pcasgd-mpi: error: {exc}", file=sys.stderr)
        return _agreed_error_status(2)
    if summary is not None and "stopped_at" in summary:
        return 0
    if summary is not None and "final_accuracy" in summary:
        print(f"final test accuracy of the average model: {summary['final_accuracy']:.4f} "
              f"(agents: {', '.join(f'{a:.3f}' for a in summary['agent_accuracies'])}; "
              f"consensus distance {summary['consensus_distance']:.3g}; "
              f"{summary['wall_time_s']:.1f} s)")
        print(f"results in {summary['out']}")
    if summary is not None and summary.get("failed_ranks"):
        # After a rank failed, MPI_Finalize can wait forever for it; everything is written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import stopping

    stopping.install()
    args = apply_config_file(build_parser(), argv)
    try:
        if args.command == "topology":
            return _topology_show(args)
        if args.command == "experiment":
            from . import experiment

            return experiment.main(args)
        if args.command == "plot":
            from . import plot

            return plot.main(args)
        return _train(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        # Bad input (topology, data, spec): one line, no traceback unless asked.
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"pcasgd-mpi [rank {_env_rank()}]: error: {exc}", file=sys.stderr, flush=True)
        _abort_if_parallel(2)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: report once, end the job
        if getattr(args, "debug", False):
            traceback.print_exc()
        rank = _env_rank()
        print(f"pcasgd-mpi [rank {rank}]: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _abort_if_parallel(1)
        return 1


def _abort_if_parallel(code: int) -> None:
    """Other ranks may be waiting on this one: take the whole job down instead of leaving them hanging."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)


if __name__ == "__main__":
    sys.exit(main())
