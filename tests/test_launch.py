import os
import sys
import time

import pytest

from launch import start_until
from pcasgd_mpi import launch


def test_run_captured_returns_the_output_and_exit_status():
    cmd = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    proc, timed_out = launch.run_captured(cmd, 30)
    assert not timed_out
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_run_captured_kills_the_whole_process_group_past_its_time(tmp_path):
    # The child starts a grandchild, as mpirun starts ranks; both must be gone after the timeout.
    pid_file = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    proc, timed_out = launch.run_captured([sys.executable, "-c", script], 3)
    assert timed_out and proc.returncode != 0
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of a dead parent may linger as a zombie until it is reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_env_rank_reads_the_launchers_variables(monkeypatch):
    for var in launch.LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert launch.env_rank() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert launch.env_rank() == 5
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    assert launch.env_rank() == 2, "Open MPI's own variable comes first"


def test_start_until_makes_a_launch_whose_launcher_did_not_start_once_more(tmp_path):
    tries = tmp_path / "tries"
    failing = f'echo x >> {tries}; echo "{launch.LAUNCHER_DID_NOT_START}" >&2; exit 213'
    with pytest.raises(AssertionError, match="status 213"):
        start_until(["sh", "-c", failing], lambda _: False, 10)
    assert tries.read_text().count("x") == 2, "one launch, then once more"
    other = f"echo x >> {tries}; echo 'another failure' >&2; exit 1"
    with pytest.raises(AssertionError, match="another failure"):
        start_until(["sh", "-c", other], lambda _: False, 10)
    assert tries.read_text().count("x") == 3, "any other early end is not retried"
    marker = tmp_path / "ready"
    proc = start_until(["sh", "-c", f"touch {marker}; sleep 30"], lambda _: marker.exists(), 10)
    assert proc.poll() is None
    os.killpg(proc.pid, 9)
    proc.communicate()
