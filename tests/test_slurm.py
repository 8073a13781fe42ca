"""The Slurm job scripts in jobs/: static checks, the smoke job on a real single-node Slurm, and
the three scripts on a Slurm of two virtual nodes.

The static checks run each script with a stub `srun` on PATH that records its arguments, so
they see the `pcasgd-mpi train` flags exactly as the script builds them, and parse those with
the CLI's own parser. The `cluster` tests start munged, slurmctld and slurmd through
tests/slurm/harness.sh (installing the Debian packages when they are missing) and submit
jobs/smoke.sbatch with `sbatch --wait`; the `two_nodes` tests do the same on nodes n1 and n2
(PCASGD_SLURM_NODES=2), where the ranks of one job see two hosts and talk over TCP.
`pytest -k "not cluster and not two_nodes"` leaves both out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm  # the slurm tier: python -m pytest -m slurm

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
SCRIPTS = sorted(JOBS.glob("*.sbatch"))
HARNESS = ROOT / "tests" / "slurm" / "harness.sh"
# The same checkout the jobs run (see _job_env), whatever `pip install -e` pointed at.
sys.path.insert(0, str(ROOT))

# Flags a job script passes (or has on a commented-out line to enable later) that
# `pcasgd-mpi train` does not accept yet, with the number of values each takes. An entry
# whose flag the parser knows is checked like any other flag: delete it when the flag lands.
PENDING: dict[str, int] = {}

# Environment variables Slurm sets; the scripts read them but they are not knobs.
SLURM_VARS = re.compile(r"SLURM_\w+")

# Within pytest-timeout's 600 s per test (setup.cfg). The harness bounds apt-get at 420 s and
# then reports "cannot install" (a skip) rather than running into this limit.
HARNESS_TIMEOUT = 540
JOB_TIMEOUT = 300
# Per two-node job (4 ranks on 2 cores): 35-200 s measured with the cores shared (load 35-55).
JOB2_TIMEOUT = 480


def test_every_script_is_there():
    assert {p.name for p in SCRIPTS} >= {"smoke.sbatch", "cifar10-resnet20.sbatch", "sweep.sbatch"}


# ---------------------------------------------------------------------------------------------
# Static checks: no Slurm needed.


def _header(text: str) -> list[str]:
    """The comment block after the shebang, up to the first #SBATCH line."""
    lines = text.splitlines()[1:]
    return list(itertools.takewhile(lambda l: l.startswith("#") and not l.startswith("#SBATCH"), lines))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_documents_its_knobs(script):
    text = script.read_text()
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert text.startswith("#!/bin/bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert "PCASGD_VENV" in text and "OMPI_MCA_btl" in text
    assert "srun --mpi=pmix" in text

    head = "\n".join(_header(text))
    assert len(_header(text)) >= 5, f"{script.name}: no header comment block describing the knobs"
    assert "#SBATCH" in text
    # sbatch stops reading #SBATCH lines at the first command.
    first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    last_directive = max(i for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))
    assert last_directive < first_command, f"{script.name}: #SBATCH line after the first command is ignored"
    # Every environment knob (a variable with a default) appears in the header.
    undocumented = sorted(k for k in _knobs(text) if not re.search(rf"\b{k}\b", head))
    assert not undocumented, f"{script.name}: knobs missing from the header: {undocumented}"


def _knobs(text: str) -> set[str]:
    """The environment variables a script reads with a default: `${VAR:-...}`, Slurm's own aside."""
    return {v for v in re.findall(r"\$\{(\w+):-", text) if not SLURM_VARS.fullmatch(v)}


def _clean_env(base) -> dict:
    """`base` without the variables of an enclosing Slurm job (SLURM_CONF, which names the
    cluster, stays) and without any job-script knob a developer may have exported."""
    knobs = set().union(*(_knobs(p.read_text()) for p in SCRIPTS))
    return {k: v for k, v in base.items() if k not in knobs and (k == "SLURM_CONF" or not k.startswith("SLURM_"))}


def _run_with_stub_srun(
    script: Path, tmp: Path, env: dict, args: list[str] = ()
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a job script outside Slurm with `srun` replaced by a recorder; return its srun calls."""
    bindir, calls = tmp / "bin", tmp / "calls"
    bindir.mkdir(exist_ok=True)
    calls.mkdir(exist_ok=True)
    for old in calls.iterdir():
        old.unlink()
    stub = bindir / "srun"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_CALLS/$(date +%s%N)-$$"\n')
    stub.chmod(0o755)
    full = _clean_env(os.environ)
    full.update(
        {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "SRUN_CALLS": str(calls),
            "SLURM_JOB_ID": "1234",
            "SLURM_NTASKS": "4",
            "SLURM_JOB_NODELIST": "node1",
        }
    )
    full.update(env)
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full, cwd=tmp, timeout=60)
    recorded = [p.read_bytes().split(b"\0")[:-1] for p in sorted(calls.iterdir())]
    return proc, [[a.decode() for a in argv] for argv in recorded]


def _train_args(srun_argv: list[str]) -> list[str]:
    assert "--mpi=pmix" in srun_argv, srun_argv
    # A rank that dies must take the step down, not leave the others waiting for it.
    assert "--kill-on-bad-exit=1" in srun_argv, srun_argv
    i = srun_argv.index("pcasgd-mpi")
    assert srun_argv[i + 1] == "train", srun_argv
    return srun_argv[i + 2 :]


def _parse_train(args: list[str]):
    """Parse train flags with the CLI's parser, leaving out PENDING flags it does not know yet."""
    from pcasgd_mpi.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    known = train._option_string_actions
    kept, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        flag = a.split("=", 1)[0]
        if flag in PENDING and flag not in known:
            skip = PENDING[flag] if "=" not in a else 0
            continue
        kept.append(a)
    try:
        args = parser.parse_args(["train", *kept])
    except SystemExit:
        pytest.fail(f"pcasgd-mpi train rejects: {' '.join(kept)}")
    # A flag the script does not pass means the training default (the parser may leave it out).
    from pcasgd_mpi.config import TrainConfig

    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if not hasattr(args, field.name):
            setattr(args, field.name, getattr(defaults, field.name))
    return args


def test_smoke_script_flags(tmp_path):
    proc, calls = _run_with_stub_srun(JOBS / "smoke.sbatch", tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1, calls
    args = _parse_train(_train_args(calls[0]))
    assert (args.steps, args.out, args.dataset) == (100, "runs/slurm-1234", "digits")


def test_cifar10_script_flags_and_resume(tmp_path):
    env = {"SLURM_CPUS_PER_TASK": "4", "OUT": str(tmp_path / "run")}
    proc, calls = _run_with_stub_srun(JOBS / "cifar10-resnet20.sbatch", tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1, calls
    assert "--cpus-per-task=4" in calls[0]
    first = _parse_train(_train_args(calls[0]))
    assert (first.dataset, first.model, first.data_dir) == ("cifar10", "resnet20", "data/cifar10")
    assert first.checkpoint_dir == str(tmp_path / "run" / "checkpoints") and first.threads == 4
    assert not first.resume

    assert (first.epochs, first.steps) == (200, None)
    proc, calls = _run_with_stub_srun(
        JOBS / "cifar10-resnet20.sbatch", tmp_path, {**env, "SLURM_RESTART_COUNT": "1", "STEPS": "7"}
    )
    assert proc.returncode == 0, proc.stderr
    again = _parse_train(_train_args(calls[0]))
    assert again.resume and again.checkpoint_dir == first.checkpoint_dir and again.out == first.out
    assert (again.epochs, again.steps) == (None, 7)

    # Flags on commented-out lines meant to be enabled later must be accepted (or PENDING) too.
    for line in re.findall(r"^#\s*extra\+=\((.*)\)\s*$", (JOBS / "cifar10-resnet20.sbatch").read_text(), re.M):
        _parse_train(line.split())


@pytest.mark.parametrize("finished", [False, True], ids=["mid-run", "after-the-end"])
def test_cifar10_notice_requeues_only_an_unfinished_run(tmp_path, finished):
    """The batch script's trap, with stand-ins: an `srun` that runs until USR1 (having written a
    summary when `finished`), and an `scontrol` that records its arguments."""
    bindir, out, ready, calls = tmp_path / "bin", tmp_path / "run", tmp_path / "ready", tmp_path / "scontrol"
    bindir.mkdir()
    (bindir / "srun").write_text(
        "#!/bin/bash\ntrap 'kill $!; exit 0' USR1\n"
        + (f"mkdir -p {out} && echo '{{}}' > {out}/summary.json\n" if finished else "")
        + f"touch {ready}\nsleep 60 >/dev/null 2>&1 &\nwait\n"
    )
    (bindir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    for stub in bindir.iterdir():
        stub.chmod(0o755)
    env = _clean_env(os.environ)
    env.update(
        PATH=f"{bindir}:{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_NTASKS="4",
        SLURM_JOB_NODELIST="n[1-2]",
        OUT=str(out),
    )
    proc = subprocess.Popen(
        ["bash", str(JOBS / "cifar10-resnet20.sbatch")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stand-in srun never started"
        time.sleep(0.2)  # the script is in `wait` by now
        os.kill(proc.pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "asking the ranks to checkpoint and stop" in output
    if finished:
        assert not calls.exists() and "the run finished before the notice" in output, output
    else:
        assert calls.read_text().split() == ["requeue", "77"], output


def test_sweep_script_covers_the_grid(tmp_path):
    env = {
        "ALGORITHMS": "dsgd pc-asgd-pv",
        "DELAYS": "none random:0.5:4 ranks:0,2:3",
        "SEEDS": "0 7",
        "SWEEP_DIR": str(tmp_path / "sweep"),
    }
    proc, calls = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, env)
    assert proc.returncode == 0 and not calls, proc.stderr
    names = proc.stdout.split()
    assert len(names) == len(set(names)) == 12
    seen = set()
    for i in range(len(names)):
        proc, calls = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, {**env, "SLURM_ARRAY_TASK_ID": str(i)})
        assert proc.returncode == 0, proc.stderr
        args = _parse_train(_train_args(calls[0]))
        assert args.mode == "lockstep"
        assert args.out == str(tmp_path / "sweep" / names[i])
        seen.add((args.algorithm, args.delay, args.seed))
    assert seen == set(itertools.product(["dsgd", "pc-asgd-pv"], ["none", "random:0.5:4", "ranks:0,2:3"], [0, 7]))

    # A finished run is skipped; an index past the grid is an error.
    done = tmp_path / "sweep" / names[0]
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    proc, calls = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, {**env, "SLURM_ARRAY_TASK_ID": "0"})
    assert proc.returncode == 0 and not calls, proc.stderr
    proc, calls = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, {**env, "SLURM_ARRAY_TASK_ID": "12"})
    assert proc.returncode != 0 and not calls


def test_sweep_collects_the_finished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    env = {"ALGORITHMS": "dsgd clip", "DELAYS": "fixed:2", "SEEDS": "3", "SWEEP_DIR": str(sweep)}
    proc, _ = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, env)
    names = proc.stdout.split()
    for i, name in enumerate(names):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "summary.json").write_text(
            json.dumps({"final_accuracy": 0.5 + i / 10, "model_sha256": f"sha{i}", "nodes": ["n2", "n1", "n2"]})
        )
    proc, calls = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, env, args=["collect"])
    assert proc.returncode == 0 and not calls, proc.stderr
    rows = [line.split("\t") for line in (sweep / "results.tsv").read_text().splitlines()]
    assert rows == [
        ["run", "algorithm", "delay", "seed", "final_accuracy", "model_sha256", "nodes"],
        [names[0], "dsgd", "fixed:2", "3", "0.5", "sha0", "n1,n2"],
        [names[1], "clip", "fixed:2", "3", "0.6", "sha1", "n1,n2"],
    ]
    assert proc.stdout.splitlines() == ["\t".join(r) for r in rows]

    # A run without its summary is named, and fails the collection.
    (sweep / names[1] / "summary.json").unlink()
    proc, _ = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, env, args=["collect"])
    assert proc.returncode == 1 and f"missing: {names[1]}" in proc.stderr
    assert len((sweep / "results.tsv").read_text().splitlines()) == 2
    proc, _ = _run_with_stub_srun(JOBS / "sweep.sbatch", tmp_path, env, args=["colect"])
    assert proc.returncode == 2 and "unknown argument 'colect'" in proc.stderr


def test_local_rank_under_srun_and_under_an_mpirun_inside_slurm():
    from pcasgd_mpi.device import local_rank

    # srun --mpi=pmix: Open MPI's own variable is unset, Slurm's is the answer.
    assert local_rank({"SLURM_LOCALID": "1", "SLURM_PROCID": "3"}) == 1
    # A launcher inside a Slurm task: the SLURM_LOCALID its ranks inherit is the launcher's own (0).
    assert local_rank({"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "1"}) == 1
    assert local_rank({"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == 2
    assert local_rank({"SLURM_LOCALID": "0", "PMI_LOCAL_RANK": "3"}) == 3


# ---------------------------------------------------------------------------------------------
# A real Slurm.


def _harness(cmd: str, timeout: float, env: dict) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["bash", str(HARNESS), cmd],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"harness.sh {cmd} took over {timeout} s:\n{exc.stderr or ''}")


@contextlib.contextmanager
def _locked(path: Path, timeout: float):
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} still locked after {timeout} s")
                time.sleep(0.5)
        yield


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def _cluster(nodes: int, dir_variable: str, default_dir: str):
    """A running Slurm of `nodes` nodes: the environment to reach it and the harness's state folder.

    Test sessions on the same machine share one cluster of each size. Each registers itself under
    users/; the last one out stops the cluster if a test session started it (not if a developer
    did with `harness.sh start`), unless PCASGD_SLURM_KEEP=1.
    """
    env = dict(os.environ)
    state_dir = Path(env.get(dir_variable) or default_dir)
    env.update(PCASGD_SLURM_NODES=str(nodes), PCASGD_SLURM_DIR=str(state_dir))
    users, marker, lock = state_dir / "users", state_dir / "started-by-tests", state_dir / "users.lock"
    users.mkdir(parents=True, exist_ok=True)
    me = users / str(os.getpid())
    with _locked(lock, HARNESS_TIMEOUT + 120):
        was_running = _harness("status", 60, env).returncode == 0
        t0 = time.monotonic()
        proc = _harness("start", HARNESS_TIMEOUT, env)
        if proc.returncode == 3:
            pytest.skip("Slurm cannot be installed here: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
        assert proc.returncode == 0, f"harness.sh start failed (exit {proc.returncode}):\n{proc.stderr}"
        print(f"Slurm ({nodes} node{'s' * (nodes > 1)}) up in {time.monotonic() - t0:.1f} s")
        if not was_running:
            marker.touch()
        me.touch()
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    yield env, state_dir
    with _locked(lock, 300):
        me.unlink(missing_ok=True)
        for other in users.iterdir():
            if not _alive(other.name):  # a session that died without cleaning up
                other.unlink(missing_ok=True)
        if not any(users.iterdir()) and marker.exists() and env.get("PCASGD_SLURM_KEEP") != "1":
            _harness("stop", 120, env)
            marker.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def slurm():
    """The single-node Slurm (state in PCASGD_SLURM_DIR, default /tmp/pcasgd-slurm)."""
    yield from _cluster(1, "PCASGD_SLURM_DIR", "/tmp/pcasgd-slurm")


@pytest.fixture(scope="module")
def slurm2():
    """Two virtual nodes n1 and n2 (state in PCASGD_SLURM_2NODES_DIR, default /tmp/pcasgd-slurm-2nodes)."""
    yield from _cluster(2, "PCASGD_SLURM_2NODES_DIR", "/tmp/pcasgd-slurm-2nodes")


def _daemon_logs(state_dir: Path, lines: int = 15) -> str:
    """The end of every slurmd's log, for a failure report."""
    parts = []
    for log in sorted((state_dir / "log").glob("slurmd*.log")):
        parts.append(f"--- {log.name} (end)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts)


def _job_env(base: dict, **extra: str) -> dict:
    """What the job inherits: this interpreter's `pcasgd-mpi` running this checkout's code."""
    env = _clean_env(base)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), base.get("PATH", "")))
    # Not whichever copy an editable install happens to point at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def test_cluster_has_the_pmix_plugin(slurm):
    env, _ = slurm
    proc = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, env=env, timeout=60)
    assert "pmix" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "script, options",
    [
        pytest.param("smoke.sbatch", [], id="smoke"),
        pytest.param("cifar10-resnet20.sbatch", ["--nodes=1", "--cpus-per-task=1"], id="cifar10"),  # fits one node
        pytest.param("sweep.sbatch", [], id="sweep"),
    ],
)
def test_cluster_accepts_the_directives(slurm, script, options):
    env, _ = slurm
    proc = subprocess.run(
        ["sbatch", "--test-only", *options, str(JOBS / script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_cluster_runs_the_smoke_job_on_four_ranks(slurm, tmp_path):
    env, state_dir = slurm
    out, log = tmp_path / "run", tmp_path / "job.out"
    name = f"pcasgd-smoke-test-{os.getpid()}"
    cmd = ["sbatch", "--wait", "--export=ALL", f"--job-name={name}", f"--output={log}", str(JOBS / "smoke.sbatch")]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_job_env(env, OUT=str(out)),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        submitted, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], env=env, timeout=60)
        proc.kill()
        submitted, _ = proc.communicate()
    elapsed = time.monotonic() - t0
    print(f"smoke job: {elapsed:.1f} s from submission to sbatch --wait returning")

    def report() -> str:
        job_out = log.read_text() if log.exists() else "(no job output file)"
        return f"--- sbatch\n{submitted}\n--- job output ({log})\n{job_out}\n{_daemon_logs(state_dir)}"

    assert proc.returncode is not None and elapsed < JOB_TIMEOUT, f"timed out after {JOB_TIMEOUT} s\n{report()}"
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}\n{report()}"
    summary_file = out / "summary.json"
    assert summary_file.exists(), report()
    summary = json.loads(summary_file.read_text())
    assert summary["world_size"] == 4, report()
    # 100 async steps, stopped when the first rank is done: it learns (chance is 0.1), but how far
    # depends on how the 2 cores were shared (0.47 to 0.9 seen)
    assert summary["final_accuracy"] > 0.3, (summary["final_accuracy"], report())


# ---------------------------------------------------------------------------------------------
# Two virtual nodes, n1 and n2: what a job spanning nodes must do.

NODES2 = ["--nodes=2", "--ntasks-per-node=2"]  # with --ntasks=4 alone Slurm puts 3 ranks on n1
CIFAR_STEPS = 40
# ResNet-20 on random 3x32x32 images, small batches: the job scripts' paths, at smoke-test cost.
# Scheduled checkpoints (which change nothing in the model) show when the run is under way.
CIFAR_ENV = {
    "STEPS": str(CIFAR_STEPS),
    "BATCH": "8",
    "MODE": "lockstep",
    "CKPT_EVERY": "5",
    "TRAIN_ARGS": "--dataset synthetic --synthetic-shape 3,32,32 --log-every 1",
}
CIFAR_OPTIONS = [*NODES2, "--cpus-per-task=1", "--time=00:10:00"]
SWEEP_ENV = {"ALGORITHMS": "dsgd pc-asgd-pv", "DELAYS": "none", "SEEDS": "0", "STEPS": "30"}
# Each task fills a node (2 tasks x 2 CPUs of 4), so the two tasks run at once on n1 and n2.
SWEEP_OPTIONS = ["--array=0-1", "--ntasks=2", "--cpus-per-task=2"]
# Far more steps than the test waits for: only the kill can end this job early.
KILL_ENV = {"STEPS": "100000"}
NOTICE = ["scancel", "--batch", "--signal=USR1"]  # what `--signal=B:USR1@120` does, now


def _shown(env: dict, options: list[str], script: str) -> str:
    """A tested submission as jobs/README.md shows it (the tests add OUT, --job-name, --output)."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "sbatch --wait", *options, f"jobs/{script}"])


def test_readme_shows_the_two_node_commands_tested():
    text = (JOBS / "README.md").read_text()
    for command in (
        _shown(CIFAR_ENV, CIFAR_OPTIONS, "cifar10-resnet20.sbatch"),
        _shown(SWEEP_ENV, SWEEP_OPTIONS, "sweep.sbatch"),
        _shown(KILL_ENV, NODES2, "smoke.sbatch"),
        " ".join(NOTICE) + " $JOBID",
        "scontrol update JobId=$JOBID StartTime=now",
        "bash jobs/sweep.sbatch collect",
        "PCASGD_SLURM_NODES=2 tests/slurm/harness.sh start",
    ):
        assert command in text, f"jobs/README.md does not show: {command}"


class _Job:
    """`sbatch --wait` in the background: found by its unique name while it runs, cancelled if it
    outlives its deadline or the test fails."""

    def __init__(
        self,
        env: dict,
        name: str,
        options: list[str],
        script: Path,
        job_env: dict,
        log: Path,
        cwd: Path,
        timeout: float = JOB2_TIMEOUT,
    ):
        self.env, self.name, self.log, self.timeout = env, name, log, timeout
        cmd = ["sbatch", "--wait", "--export=ALL", f"--job-name={name}", f"--output={log}", *options, str(script)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=job_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.submitted = ""

    def remaining(self) -> float:
        return self.timeout - (time.monotonic() - self.t0)

    def id(self) -> str:
        """The job id (an array's id), once Slurm has the job."""
        while self.remaining() > 0:
            out = subprocess.run(
                ["squeue", "-h", "-n", self.name, "-o", "%F"], capture_output=True, text=True, env=self.env, timeout=30
            ).stdout.split()
            if out:
                return out[0]
            assert self.proc.poll() is None, f"sbatch ended before its job was seen\n{self.report()}"
            time.sleep(0.5)
        pytest.fail(f"job {self.name} not seen in {self.timeout} s\n{self.report()}")

    def wait(self) -> int:
        try:
            self.submitted, _ = self.proc.communicate(timeout=max(self.remaining(), 1))
        except subprocess.TimeoutExpired:
            self.cancel()
            pytest.fail(f"job {self.name} still running after {self.timeout} s: cancelled\n{self.report()}")
        print(f"{self.name}: {time.monotonic() - self.t0:.1f} s from submission to sbatch --wait returning")
        return self.proc.returncode

    def cancel(self) -> None:
        subprocess.run(["scancel", f"--name={self.name}"], env=self.env, timeout=60)
        self.proc.kill()
        self.submitted, _ = self.proc.communicate()

    def report(self) -> str:
        job_out = self.log.read_text(errors="replace") if self.log.exists() else "(no job output file)"
        return f"--- sbatch\n{self.submitted}\n--- job output ({self.log})\n{job_out}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.cancel()


def _wait_for(what: str, check, job: _Job, limit: float):
    """Poll `check` until it returns something true, within `limit` s and the job's deadline."""
    deadline = time.monotonic() + min(limit, job.remaining())
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert job.proc.poll() is None, f"the job ended while waiting for {what}\n{job.report()}"
        time.sleep(0.3)
    pytest.fail(f"no {what} within {limit} s\n{job.report()}")


def _metrics_size(out: Path, rank: int) -> int:
    path = out / "metrics" / f"rank-{rank}.jsonl"
    return path.stat().st_size if path.exists() else 0


def _checkpoints(out: Path, rank: int) -> list[int]:
    from pcasgd_mpi import checkpoint

    return checkpoint.steps_available(out / "checkpoints", rank)


def _job_field(env: dict, job: str, field: str) -> str | None:
    """A field of `scontrol show job` (JobState, Restarts, ...); None once the job is gone."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, timeout=30)
    m = re.search(rf"\b{field}=(\S+)", proc.stdout)
    return m.group(1) if m else None


def _restarts(env: dict, job: str) -> str | None:
    """How often the job was requeued, once it was and its first start has fully ended (pending
    again); None before. Starting it while the old batch step is still being torn down makes
    slurmd refuse the launch ("already killed, do not launch batch job")."""
    restarts = _job_field(env, job, "Restarts")
    if restarts in (None, "0") or _job_field(env, job, "JobState") != "PENDING":
        return None
    return restarts


def _run_cifar10(slurm2, tmp: Path, name: str, during=None) -> tuple[dict, str, Path]:
    """jobs/cifar10-resnet20.sbatch on both nodes; `during(job, out)` acts while it runs."""
    env, state_dir = slurm2
    out, log = tmp / "run", tmp / "job.out"
    job_env = _job_env(env, OUT=str(out), **CIFAR_ENV)
    with _Job(
        env, f"pcasgd-{name}-{os.getpid()}", CIFAR_OPTIONS, JOBS / "cifar10-resnet20.sbatch", job_env, log, tmp
    ) as job:
        if during is not None:
            during(job, out)
        rc = job.wait()
        report = f"{job.report()}\n{_daemon_logs(state_dir)}"
    assert rc == 0, f"sbatch --wait exit {rc}\n{report}"
    assert (out / "summary.json").exists(), report
    return json.loads((out / "summary.json").read_text()), log.read_text(), out


@pytest.fixture(scope="module")
def cifar10_on_two_nodes(slurm2, tmp_path_factory):
    """One uninterrupted lockstep run: the placement to check and the model a preempted run must match."""
    return _run_cifar10(slurm2, tmp_path_factory.mktemp("cifar10-2nodes"), "cifar10-2n")


def test_two_nodes_cifar10_places_ranks_and_devices_by_node(cifar10_on_two_nodes, monkeypatch):
    summary, log, _ = cifar10_on_two_nodes
    assert summary["world_size"] == 4 and summary["steps"] == [CIFAR_STEPS] * 4, log
    # Slurm's block distribution: ranks 0 and 1 on n1, 2 and 3 on n2, each node counting from 0.
    assert summary["nodes"] == ["n1", "n1", "n2", "n2"], summary["nodes"]
    assert summary["local_ranks"] == [0, 1, 0, 1], summary["local_ranks"]
    assert summary["devices"] == ["cpu"] * 4
    # No GPU here: the choice each rank would make with its recorded local rank, on nodes of 2 GPUs.
    import torch

    from pcasgd_mpi.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = [(node, str(select_device("cuda", lr))) for node, lr in zip(summary["nodes"], summary["local_ranks"])]
    assert chosen == [("n1", "cuda:0"), ("n1", "cuda:1"), ("n2", "cuda:0"), ("n2", "cuda:1")]


def test_two_nodes_preemption_notice_checkpoints_requeues_and_resumes_to_the_same_model(
    slurm2, cifar10_on_two_nodes, tmp_path
):
    env, _ = slurm2
    reference, _, _ = cifar10_on_two_nodes
    seen = {}

    def preempt(job: _Job, out: Path) -> None:
        # Mid-run: every rank has written its first scheduled checkpoint. Then what
        # `--signal=B:USR1@120` does.
        _wait_for("a checkpoint of every rank", lambda: all(_checkpoints(out, r) for r in range(4)), job, 300)
        jobid = job.id()
        subprocess.run([*NOTICE, jobid], env=env, timeout=60, check=True)
        # The script requeues the job; Slurm holds it for cred_expire (30 s here): start it now.
        seen["restarts"] = _wait_for("the requeue", lambda: _restarts(env, jobid), job, 120)
        # Before the second start: later scheduled checkpoints replace the older ones (the last 3 kept).
        seen["checkpoints"] = [_checkpoints(out, r) for r in range(4)]
        time.sleep(3)  # let slurmd finish forgetting the first start before it is asked for the second
        subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], env=env, timeout=60)

    summary, log, out = _run_cifar10(slurm2, tmp_path, "preempt-2n", during=preempt)
    assert seen["restarts"] == "1"
    assert "time limit near: asking the ranks to checkpoint and stop" in log, log
    assert re.search(r"ranks stopped \(exit 0\); requeueing job", log), log
    assert "(start 2)" in log, log
    stopped = re.findall(r"stopped by signal after step (\d+)", log)
    assert len(stopped) == 1 and 0 < int(stopped[0]) < CIFAR_STEPS, log
    # Every rank, on both nodes, wrote its checkpoint of that same step.
    step = int(stopped[0])
    assert [step in steps for steps in seen["checkpoints"]] == [True] * 4, seen["checkpoints"]
    assert summary["nodes"] == ["n1", "n1", "n2", "n2"] and summary["steps"] == [CIFAR_STEPS] * 4
    # Lockstep is deterministic: stopping and resuming changes nothing.
    assert summary["model_sha256"] == reference["model_sha256"], log


def test_two_nodes_sweep_array_runs_on_both_nodes_and_collects(slurm2, tmp_path):
    env, state_dir = slurm2
    sweep = tmp_path / "sweep"
    job_env = _job_env(env, SWEEP_DIR=str(sweep), **SWEEP_ENV)
    with _Job(
        env,
        f"pcasgd-sweep-2n-{os.getpid()}",
        SWEEP_OPTIONS,
        JOBS / "sweep.sbatch",
        job_env,
        tmp_path / "sweep-%a.out",
        tmp_path,
    ) as job:
        rc = job.wait()
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("sweep-*.out")))
    assert rc == 0, f"sbatch --wait exit {rc}\n{logs}\n{_daemon_logs(state_dir)}"
    proc = subprocess.run(
        ["bash", str(JOBS / "sweep.sbatch"), "collect"],
        capture_output=True,
        text=True,
        env=job_env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr + logs
    header, *body = [line.split("\t") for line in proc.stdout.splitlines()]
    rows = [dict(zip(header, r)) for r in body]
    assert sorted(r["algorithm"] for r in rows) == ["dsgd", "pc-asgd-pv"], proc.stdout
    assert all(float(r["final_accuracy"]) > 0 and len(r["model_sha256"]) == 64 for r in rows), proc.stdout
    # Each run on one node, the runs on both.
    assert sorted(r["nodes"] for r in rows) == ["n1", "n2"], proc.stdout


def _rank_pid(jobid: str, rank: int) -> tuple[int, str] | None:
    """(pid, node) of a job's rank, found by the variables Slurm gave the process."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(
                v.split("=", 1)
                for v in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in v
            )
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            environ.get("SLURM_JOB_ID") == jobid
            and environ.get("SLURM_PROCID") == str(rank)
            and b"pcasgd-mpi" in cmdline
            and b"train" in cmdline
        ):
            return int(proc.name), environ.get("SLURMD_NODENAME", "?")
    return None


def test_two_nodes_rank_killed_on_n2_takes_the_job_down_naming_it(slurm2, tmp_path):
    env, state_dir = slurm2
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_env = _job_env(env, OUT=str(out), **KILL_ENV)
    with _Job(env, f"pcasgd-kill-2n-{os.getpid()}", NODES2, JOBS / "smoke.sbatch", job_env, log, tmp_path) as job:
        # Metrics are written in blocks of ~80 steps: once every rank's file has some, all are training.
        _wait_for("training steps", lambda: all(_metrics_size(out, r) for r in range(4)), job, 300)
        jobid = job.id()
        pid, node = _wait_for("rank 3's process", lambda: _rank_pid(jobid, 3), job, 30)
        assert node == "n2"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        job.timeout = min(job.timeout, killed_at - job.t0 + 90)  # no hang: down within 90 s
        rc = job.wait()
        print(f"job down {time.monotonic() - killed_at:.1f} s after the kill")
    text = log.read_text()
    assert rc != 0, text
    assert not (out / "summary.json").exists()
    # srun reports the tasks in the order they ended: the first line names the killed rank (with
    # --kill-on-bad-exit its node neighbour, rank 2, may end in the same instant and share the line).
    first = re.search(r"^srun: error: (\S+): tasks? ([\d,-]+): (.*)$", text, re.M)
    assert first and first.group(1) == "n2" and "Killed" in first.group(3), f"{text}\n{_daemon_logs(state_dir)}"
    assert first.group(2) in ("3", "2-3", "2,3"), f"{text}\n{_daemon_logs(state_dir)}"
