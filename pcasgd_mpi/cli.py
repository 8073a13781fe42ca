"""`pcasgd-mpi`: a thin command-line shell over the trainer."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from typing import NoReturn

from . import __version__
from .config import Algorithm, Choice, Flag, Group, TrainConfig, WeightRule, flag_of
from .launch import abort_job, env_rank

# Derived, for callers that want the names as text; the one list is config.Algorithm.
ALGORITHMS = tuple(a.value for a in Algorithm)

NO_LAUNCHER_NOTE = "pcasgd-mpi: running 1 agent (no MPI launcher found); launch with mpirun -n N ... for N agents"


def _rank() -> int:
    return env_rank() or 0


def _usage_error(prog: str, message: str) -> NoReturn:
    if _rank() == 0:  # every rank parses the same argv: one copy of the message
        print(f"{prog}: error: {message} (see '{prog} --help')", file=sys.stderr)
    sys.exit(_agreed_error_status(2))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        _usage_error(self.prog, message)


def _agreed_error_status(code: int) -> int:
    """Exit status for an error every rank found by itself (the same argv, or agreed in setup).

    Only rank 0 reports it and fails; the others end quietly, because the first rank to exit
    non-zero makes mpirun kill the rest, possibly before rank 0 has printed. mpirun still
    returns rank 0's status.
    """
    return code if _rank() == 0 else 0


# ----------------------------------------------------------------------------- train options
def _arg_type(check):
    """argparse's `type=` from a field check: its ValueError becomes argparse's one-line error."""

    def convert(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _help(f: dataclasses.Field) -> str:
    meta = f.metadata
    text = meta["help"]
    if meta["default_text"] is not None:
        text += f" (default: {meta['default_text']})"
    elif not isinstance(meta["check"], Flag) and f.default is not dataclasses.MISSING and f.default is not None:
        text += f" (default: {f.default})"
    elif f.default_factory is not dataclasses.MISSING and f.default_factory():
        text += f" (default: {','.join(map(str, f.default_factory()))})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _add_train_options(t: argparse.ArgumentParser) -> None:
    """One command-line option per TrainConfig field, as its metadata describes it.

    Nothing is defaulted here (argparse.SUPPRESS): an option absent from the namespace was not
    given, so the config file or the dataclass default applies."""
    groups = {g: t.add_argument_group(g.value) for g in Group}
    exclusive: dict = {}  # tag -> its mutually exclusive group
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        where = groups[meta["group"]]
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = where.add_mutually_exclusive_group()
            where = exclusive[meta["exclusive"]]
        kwargs = {"dest": f.name, "help": _help(f), "default": argparse.SUPPRESS}
        check = meta["check"]
        if isinstance(check, Flag):
            kwargs["action"] = "store_false" if flag_of(f).startswith("--no-") else "store_true"
        else:
            if meta["repeat"]:
                kwargs["action"] = "append"
                check = check.item
            kwargs["type"] = _arg_type(check)
            metavar = meta["metavar"]
            if metavar is None and isinstance(check, Choice):
                metavar = "{" + ",".join(e.value for e in check.enum) + "}"
            if metavar is not None:
                kwargs["metavar"] = metavar
        where.add_argument(flag_of(f), **kwargs)
    groups[Group.OUTPUT].add_argument("--debug", action="store_true", help="show Python tracebacks")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: dataclass defaults, then --config FILE, then the flags given.

    A bad value anywhere is a usage error: one line, exit status 2."""
    try:
        return _merge(args)
    except ValueError as exc:
        _usage_error("pcasgd-mpi train", str(exc))


def _merge(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    from_file = {}
    if args.config:
        from_file = TrainConfig.parse_mapping(_read_yaml(args.config), source=f"--config {args.config}")
        for f in dataclasses.fields(TrainConfig):
            tag = f.metadata["exclusive"]
            # --epochs on the command line replaces the file's steps, and the other way round.
            if f.name in given and tag:
                for other in dataclasses.fields(TrainConfig):
                    if other.metadata["exclusive"] == tag and other.name != f.name:
                        from_file.pop(other.name, None)
    return TrainConfig(**(from_file | given))


def _read_yaml(path: str):
    import yaml

    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except IsADirectoryError:
        raise ValueError(f"--config {path}: is a directory; pass a YAML file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: cannot read it ({str(exc).splitlines()[0]})") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pcasgd-mpi", description="Decentralized asynchronous training over MPI with PC-ASGD.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train one model per MPI rank (launch with mpirun -n N)",
        description="Train one model per MPI rank: mpirun -n N pcasgd-mpi train [options]",
    )
    t.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="options from a YAML file (keys as the long options, e.g. an earlier run's "
        "OUT/config.yaml); flags given here win",
    )
    _add_train_options(t)

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
    show.add_argument("--weights", default="metropolis", choices=[w.value for w in WeightRule])
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--png", default=None, help="also draw the graph to this PNG file")
    return p


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
    cfg = train_config(args)
    from mpi4py import MPI

    from .trainer import SetupError, run

    if env_rank() is None and MPI.COMM_WORLD.Get_size() == 1:
        print(NO_LAUNCHER_NOTE, file=sys.stderr, flush=True)
    try:
        summary = run(cfg)
    except SetupError as exc:
        # Every rank knows about it (the ranks agreed on it), so nobody is left waiting.
        if _rank() == 0:
            print(f"pcasgd-mpi: error: {exc}", file=sys.stderr)
        return _agreed_error_status(2)
    if summary is not None and "stopped_at" in summary:
        return 0
    if summary is not None and "final_accuracy" in summary:
        consensus = summary["consensus_distance"]
        print(
            f"final test accuracy of the average model: {summary['final_accuracy']:.4f} "
            f"(agents: {', '.join(f'{a:.3f}' for a in summary['agent_accuracies'])}; "
            f"consensus distance {'not finite' if consensus is None else f'{consensus:.3g}'}; "
            f"{summary['wall_time_s']:.1f} s)"
        )
        if summary.get("diverged"):
            ranks = ", ".join(f"rank {r} at step {k}" for r, k in summary["diverged"].items())
            print(f"diverged (their weights became inf or NaN): {ranks}")
        print(f"results in {summary['out']}")
    if summary is not None and summary.get("failed_ranks"):
        # The survivors finished, but the job lost ranks: say so, and let the exit status say it too.
        # After a rank failed, MPI_Finalize can wait forever for it; everything is written.
        if "final_accuracy" in summary:
            print(
                f"pcasgd-mpi: rank{'s' if len(summary['failed_ranks']) > 1 else ''} "
                f"{', '.join(map(str, summary['failed_ranks']))} failed during training; the survivors "
                f"finished (exit status {EXIT_RANKS_FAILED})",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RANKS_FAILED)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import stopping

    stopping.install()
    args = build_parser().parse_args(argv)
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
        print(f"pcasgd-mpi [rank {_rank()}]: error: {exc}", file=sys.stderr, flush=True)
        abort_job(2)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: report once, end the job
        if getattr(args, "debug", False):
            traceback.print_exc()
        rank = _rank()
        # Our own run-time errors say what happened in their message; anything else names its type.
        kind = "" if type(exc).__name__ in ("Timeout", "Diverged") else f"{type(exc).__name__}: "
        print(f"pcasgd-mpi [rank {rank}]: error: {kind}{exc}", file=sys.stderr, flush=True)
        abort_job(1)
        return 1


EXIT_RANKS_FAILED = 3  # fault-tolerant run: the survivors finished without some ranks


if __name__ == "__main__":
    sys.exit(main())
