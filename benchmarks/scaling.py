"""How cost grows with the number of ranks: start-up, per-step time and memory, ring and exponential.

    python benchmarks/scaling.py                      # 2, 4, 8, 16, 32 ranks under mpirun
    python benchmarks/scaling.py --launcher srun      # the same under srun -N2 (two nodes)
    python benchmarks/scaling.py --ranks 2,4 --quick  # smoke run

One launch per rank count; every rank runs this file as a worker (``--worker``) and measures:

- start-up to the first step, in phases: launcher (from the driver's launch to the creation of
  this process), python (interpreter start), torch import, mpi4py import, MPI init
  (``MPI_Init_thread``, which also waits for the slowest rank to get there), the first torch
  optimizer (torch imports torch._dynamo then: torch's cost, not the project's), the project's imports
  (``pcasgd_mpi.trainer`` and what it pulls in), data (digits, shard, sampler), set-up (model,
  graph and mixing weights, ``DistributedOptimizer`` with its kernel loading), and the first
  step. Each phase as wall time and as CPU time of the process: with more ranks than cores the
  wall time of a phase is mostly waiting for a core, its CPU time is what the rank itself spent.
- per-step time, the trainer's MLP on digits (9 k parameters, batch 32), in blocks of steps, all
  ways to step interleaved in rounds: compute-only (the same loop with plain torch SGD, no
  exchange), dsgd (the exchange of weights and plain mixing) and the chosen ``--algorithm``
  (default pc-asgd-pv: weights and gradients on the wire, the prediction of stale neighbours,
  PV's two forward passes), each of the last two on a ring and on the exponential graph, async.
  exchange = dsgd − compute; rule = algorithm − dsgd (its larger message included).
- peak memory per rank (``getrusage`` maxrss) after the imports, after the set-up and at the end.

Rank 0 prints one ``BENCH_JSON`` line per launch; the driver collects them, prints a table and
writes the JSON (``--json``) and the table in Markdown (``--markdown``).
"""

import time

_WALL0, _PERF0, _CPU0 = time.time(), time.perf_counter(), time.process_time()  # before any import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARKER = "BENCH_JSON "
LAUNCH_ENV = "PCASGD_SCALING_LAUNCHED_AT"  # the driver's wall clock when it started the launcher
GRAPHS = ("ring", "exponential")
PHASES = (
    "launcher",
    "python",
    "torch",
    "torch_optim",
    "mpi4py",
    "mpi_init",
    "project_imports",
    "data",
    "setup",
    "first_step",
)
OWN = ("project_imports", "data", "setup")  # the project's own share of start-up
SRUN_BLOCK_MAX = 4  # ranks per node placed in blocks under srun: the virtual nodes' CPUs


def process_age() -> float:
    """Seconds since this process was created, from /proc (10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------- worker
class Clock:
    """Wall and CPU time of consecutive phases."""

    def __init__(self):
        self.created_at = time.time() - process_age()  # both read now: the age keeps growing
        self.wall = {"python": max(0.0, _WALL0 - self.created_at)}
        self.cpu = {"python": _CPU0}  # CPU time of the process before its first line
        self._perf, self._cpu = _PERF0, _CPU0

    def mark(self, phase: str) -> None:
        perf, cpu = time.perf_counter(), time.process_time()
        self.wall[phase], self.cpu[phase] = perf - self._perf, cpu - self._cpu
        self._perf, self._cpu = perf, cpu


def worker(args) -> None:
    clock = Clock()
    launched = os.environ.get(LAUNCH_ENV)
    clock.wall["launcher"] = max(0.0, clock.created_at - float(launched)) if launched else None
    clock.cpu["launcher"] = None
    import torch

    clock.mark("torch")
    # The first torch optimizer imports torch._dynamo (its constructor is wrapped to disable
    # dynamo): torch's cost, paid by any training script, timed apart from the project's set-up.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    clock.mark("torch_optim")
    import mpi4py

    mpi4py.rc.initialize = False  # to time MPI's own start-up apart from the import
    mpi4py.rc.finalize = True
    from mpi4py import MPI

    clock.mark("mpi4py")
    MPI.Init_thread()
    clock.mark("mpi_init")
    rss_imports = maxrss_mb()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch.nn.functional as F

    import pcasgd_mpi.trainer  # noqa: F401  (what `pcasgd-mpi train` imports)
    from pcasgd_mpi import data, models
    from pcasgd_mpi import world as world_mod
    from pcasgd_mpi.optimizer import DistributedOptimizer

    clock.mark("project_imports")

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)  # one core or less per rank
    ds = data.load("digits", seed=0)
    shard = data.partition(ds.y_train, size, "iid", seed=0)[rank]
    sampler = data.ShardSampler(shard, args.batch, 0, rank)
    clock.mark("data")

    def leg(algorithm: str | None, graph: str | None) -> dict:
        model = models.build("mlp", ds.input_shape, ds.num_classes, seed=0)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = None
        if algorithm is not None:
            # Its own communicator: optimizers alive at the same time must not take each other's messages.
            world = world_mod.init(graph, comm=comm.Dup())
            opt = DistributedOptimizer(inner, model, world=world, algorithm=algorithm, mode="async")
        return {
            "model": model,
            "inner": inner,
            "opt": opt,
            "cpu": [],
            "wall": [],
            "degree": None if opt is None else len(opt.neighbours),
        }

    legs = {"compute": leg(None, None)}
    for graph in args.graphs:
        legs[f"dsgd/{graph}"] = leg("dsgd", graph)
        legs[f"{args.algorithm}/{graph}"] = leg(args.algorithm, graph)
    clock.mark("setup")
    rss_setup = maxrss_mb()

    def run_block(state: dict, steps: int) -> tuple[float, float]:
        model, inner, opt = state["model"], state["inner"], state["opt"]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            idx = torch.from_numpy(sampler.next_batch())
            xb, yb = ds.x_train[idx], ds.y_train[idx]
            loss = F.cross_entropy(model(xb), yb)
            if opt is None:
                inner.zero_grad()
                loss.backward()
                inner.step()
            else:
                opt.zero_grad()
                loss.backward()
                opt.step(closure=lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb))
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    run_block(legs[f"{args.algorithm}/{args.graphs[0]}"], 1)
    clock.mark("first_step")
    for state in legs.values():  # warm-up, untimed
        run_block(state, 2)
    for _ in range(args.rounds):
        for state in legs.values():
            comm.Barrier()  # every rank starts a block together, so that all of them step at once
            wall, cpu = run_block(state, args.steps)
            state["wall"].append(wall)
            state["cpu"].append(cpu)
    for state in legs.values():
        if state["opt"] is not None:
            state["opt"].finalize()
    mine = {
        "host": MPI.Get_processor_name(),
        "wall": clock.wall,
        "cpu": clock.cpu,
        "rss_mb": {"imports": rss_imports, "setup": rss_setup, "end": maxrss_mb()},
        "step_wall": {k: s["wall"] for k, s in legs.items()},
        "step_cpu": {k: s["cpu"] for k, s in legs.items()},
        "degree": {k: s["degree"] for k, s in legs.items()},
    }
    everyone = comm.gather(mine, root=0)
    if rank == 0:
        print(MARKER + json.dumps(summarise(everyone, args)), flush=True)


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summarise(ranks: list[dict], args) -> dict:
    """Per phase and per way to step: the median over ranks (and the worst rank where it matters)."""
    n = len(ranks)
    startup = {
        p: {
            "wall_median": med(r["wall"].get(p) for r in ranks),
            "wall_max": max((r["wall"].get(p) or 0.0) for r in ranks),
            "cpu_median": med(r["cpu"].get(p) for r in ranks),
        }
        for p in PHASES
    }
    # The time to the first step of the slowest rank, counted from the launch when known.
    to_first = [sum(r["wall"].get(p) or 0.0 for p in PHASES) for r in ranks]
    legs = list(ranks[0]["step_wall"])
    steps = {}
    for leg in legs:
        # Per round, the ratio to compute-only of the same round; then the median over rounds and ranks.
        ratios = [w / c for r in ranks for w, c in zip(r["step_wall"][leg], r["step_wall"]["compute"])]
        cpu_ratios = [w / c for r in ranks for w, c in zip(r["step_cpu"][leg], r["step_cpu"]["compute"])]
        steps[leg] = {
            "wall_ms": 1e3 * med(v for r in ranks for v in r["step_wall"][leg]),
            "cpu_ms": 1e3 * med(v for r in ranks for v in r["step_cpu"][leg]),
            "wall_vs_compute": med(ratios),
            "cpu_vs_compute": med(cpu_ratios),
            "degree": ranks[0]["degree"][leg],
        }
    return {
        "ranks": n,
        "hosts": sorted({r["host"] for r in ranks}),
        "ranks_per_host": {h: sum(r["host"] == h for r in ranks) for h in {r["host"] for r in ranks}},
        "algorithm": args.algorithm,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        "startup": startup,
        "to_first_step_s": {"median": med(to_first), "max": max(to_first)},
        "project_own_cpu_s": med(sum(r["cpu"].get(p) or 0.0 for p in OWN) for r in ranks),
        "steps": steps,
        "rss_mb": {
            k: {"median": med(r["rss_mb"][k] for r in ranks), "max": max(r["rss_mb"][k] for r in ranks)}
            for k in ("imports", "setup", "end")
        },
        "load_average": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- driver
def launch_command(launcher: str, ranks: int) -> list[str]:
    if launcher == "srun":
        if ranks % 2:
            raise SystemExit(f"--launcher srun splits the ranks over 2 nodes: {ranks} is odd; pick even counts")
        # -O: more tasks than CPUs, as --oversubscribe does for mpirun. Slurm refuses
        # --ntasks-per-node above a node's CPUs even with -O; -m cyclic splits the ranks evenly
        # then, alternating nodes (so every ring edge crosses them).
        per_node = ranks // 2
        place = [f"--ntasks-per-node={per_node}"] if per_node <= SRUN_BLOCK_MAX else ["-n", str(ranks), "-m", "cyclic"]
        return ["srun", "-N2", *place, "-O", "--mpi=pmix", "--kill-on-bad-exit=1"]
    from pcasgd_mpi.launch import mpirun_command

    return mpirun_command(ranks)


def run_one(args, ranks: int) -> tuple[dict | None, str | None, float]:
    from pcasgd_mpi.launch import mpi_environment, run_captured

    worker_args = [
        "--worker",
        "--algorithm",
        args.algorithm,
        "--graphs",
        ",".join(args.graphs),
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
    ]
    cmd = launch_command(args.launcher, ranks) + [sys.executable, str(Path(__file__).resolve())] + worker_args
    timeout = 60 + 25 * ranks  # 32 ranks at a load average of 40 on 2 cores took about 5 minutes
    env = mpi_environment()
    t0 = time.monotonic()
    env[LAUNCH_ENV] = repr(time.time())
    proc, timed_out = run_captured(cmd, timeout, env=env, cwd=ROOT)
    out, err = proc.stdout, proc.stderr
    if timed_out:
        return None, f"timed out after {timeout} s\n{err[-2000:]}", time.monotonic() - t0
    wall = time.monotonic() - t0
    records = [json.loads(line[len(MARKER) :]) for line in out.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or len(records) != 1:
        return None, f"exit status {proc.returncode}\n{err[-3000:]}{out[-1000:]}", wall
    records[0]["launch_wall_s"] = round(wall, 2)
    return records[0], None, wall


def fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(results: list[dict], args, meta: dict) -> str:
    algo = args.algorithm
    lines = [
        f"Command: `{meta['command']}`; {meta['machine']}; load average {meta['load_before']} before, "
        f"{meta['load_after']} after; wall time {meta['wall_s']:.0f} s.",
        "",
        "Start-up, median rank (wall s / CPU s); the project's own = imports + data + set-up:",
        "",
        "| ranks | hosts | launcher | python | torch | torch optim | mpi4py | MPI init | project imports | data "
        "| set-up | first step | to first step (median / slowest) | project's own CPU s "
        "| maxrss MB (median / max) |",
        "|---" * 15 + "|",
    ]
    for r in results:
        s = r["startup"]

        def cell(p):
            return f"{fmt(s[p]['wall_median'])} / {fmt(s[p]['cpu_median'])}"

        hosts = ", ".join(f"{h}: {c}" for h, c in sorted(r["ranks_per_host"].items()))
        lines.append(
            f"| {r['ranks']} | {hosts} | {fmt(s['launcher']['wall_median'])} | "
            + " | ".join(cell(p) for p in PHASES[1:])
            + f" | {fmt(r['to_first_step_s']['median'], '.1f')} / "
            f"{fmt(r['to_first_step_s']['max'], '.1f')} | {fmt(r['project_own_cpu_s'])} | "
            f"{fmt(r['rss_mb']['end']['median'], '.0f')} / {fmt(r['rss_mb']['end']['max'], '.0f')} |"
        )
    lines += [
        "",
        "Per step, median over ranks and rounds: CPU ms (wall ms); ratios to compute-only of the "
        "same round, CPU (wall); degree in brackets:",
        "",
        "| ranks | compute-only | " + " | ".join(f"dsgd {g} | {algo} {g}" for g in args.graphs) + " |",
        "|---" * (2 + 2 * len(args.graphs)) + "|",
    ]
    for r in results:
        st = r["steps"]
        row = [str(r["ranks"]), f"{fmt(st['compute']['cpu_ms'])} ({fmt(st['compute']['wall_ms'])})"]
        for g in args.graphs:
            for leg in (f"dsgd/{g}", f"{algo}/{g}"):
                x = st[leg]
                row.append(
                    f"[{x['degree']}] {fmt(x['cpu_ms'])} ({fmt(x['wall_ms'])}); "
                    f"×{fmt(x['cpu_vs_compute'])} (×{fmt(x['wall_vs_compute'])})"
                )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def driver(args) -> int:
    import datetime
    import platform

    started = time.monotonic()
    load_before = [round(x, 1) for x in os.getloadavg()]
    results, errors = [], {}
    for n in args.ranks:
        print(f"[{n} ranks] {args.launcher} ...", flush=True)
        rec, error, wall = run_one(args, n)
        if error:
            errors[n] = error
            print(f"[{n} ranks] FAILED: {error}", file=sys.stderr, flush=True)
            continue
        results.append(rec)
        s = rec["steps"]
        print(
            f"[{n} ranks] {wall:.1f} s; to first step {rec['to_first_step_s']['median']:.1f} s (median rank), "
            f"project's own CPU {rec['project_own_cpu_s']:.2f} s; step CPU ms compute "
            f"{s['compute']['cpu_ms']:.2f}, "
            + ", ".join(f"{k} {v['cpu_ms']:.2f}" for k, v in s.items() if k != "compute")
            + f"; maxrss {rec['rss_mb']['end']['max']:.0f} MB",
            flush=True,
        )
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/scaling.py"] + sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {platform.platform()}",
        "load_before": load_before,
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "wall_s": time.monotonic() - started,
    }
    table = markdown(results, args, meta) if results else ""
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "errors": errors}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4,8,16,32", help="comma-separated rank counts")
    parser.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated topologies")
    parser.add_argument("--algorithm", default="pc-asgd-pv", help="the rule measured against dsgd")
    parser.add_argument(
        "--launcher",
        choices=("mpirun", "srun"),
        default="mpirun",
        help="srun: -N2 with half the ranks on each node (source the cluster's env.sh first)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of blocks, every way to step once per round")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps, for the smoke test")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--ranks takes comma-separated integers, got {args.ranks!r}")
    if not args.ranks or min(args.ranks) < 2:
        parser.error("--ranks needs counts of at least 2")
    args.graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    if args.quick:
        args.rounds, args.steps = 2, 3
    if args.worker:
        worker(args)
        return 0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
