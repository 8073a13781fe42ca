"""Run-directory rules: never write over files this project did not make, nor mix two runs."""

import pytest

from pcasgd_mpi import rundir
from pcasgd_mpi.rundir import MARKER, RunDirError


def finished_run(out):
    rundir.prepare(out)
    (out / "metrics").mkdir()
    (out / "metrics" / "rank-0.jsonl").write_text("{}\n")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "config.yaml").write_text("lr: 0.1\n")
    (out / "summary.json").write_text("{}\n")
    checkpoint(out / "checkpoints")


def checkpoint(folder, rank=0, step=5):
    (folder / f"rank-{rank}").mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}" / f"step-{step:09d}.pt").write_bytes(b"x")


@pytest.mark.parametrize("exists", [False, True])
def test_new_or_empty_directory_is_marked_ours(tmp_path, exists):
    out = tmp_path / "a" / "run"
    if exists:
        out.mkdir(parents=True)
    assert rundir.prepare(out) == out
    assert (out / MARKER).is_file()


def test_directory_with_the_users_files_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    (out / "metrics").mkdir(parents=True)
    for name, text in [("config.yaml", "mine"), ("metrics.jsonl", "mine"), ("metrics/rank-0.jsonl", "mine")]:
        (out / name).write_text(text)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(
            RunDirError,
            match=rf"--out {out} holds files that pcasgd-mpi did not write; "
            r"choose another --out or empty it",
        ):
            rundir.prepare(out, **flags)
    assert (out / "metrics" / "rank-0.jsonl").read_text() == "mine" and not (out / MARKER).exists()


def test_finished_run_needs_overwrite_which_clears_only_our_outputs(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="already holds a finished run; choose another --out or pass --overwrite"):
        rundir.prepare(out)
    rundir.prepare(out, resume=True)  # continuing is allowed and touches nothing
    assert (out / "summary.json").exists()
    rundir.prepare(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]


def test_interrupted_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    rundir.prepare(out)
    checkpoint(out / "checkpoints", rank=1)
    with pytest.raises(
        RunDirError, match="holds an interrupted run: pass --resume to continue it or --overwrite to start afresh"
    ):
        rundir.prepare(out)
    rundir.prepare(out, resume=True)
    assert (out / "checkpoints" / "rank-1" / "step-000000005.pt").exists()
    rundir.prepare(out, overwrite=True)
    assert not (out / "checkpoints").exists()


def test_our_run_that_died_before_any_checkpoint_is_reused(tmp_path):
    out = tmp_path / "run"
    rundir.prepare(out)
    (out / "config.yaml").write_text("lr: 0.1\n")
    assert rundir.inspect(out, out / "checkpoints") is rundir.State.OURS
    rundir.prepare(out)


def test_separate_checkpoint_dir_with_old_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint(ckpt)
    with pytest.raises(RunDirError, match=rf"--checkpoint-dir {ckpt} holds checkpoints of an earlier run"):
        rundir.prepare(tmp_path / "run", ckpt)
    rundir.prepare(tmp_path / "run", ckpt, overwrite=True)
    assert not list(ckpt.glob("rank-*/step-*.pt"))


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(RunDirError, match=rf"--out {afile} is a file, not a directory; choose another --out"):
        rundir.prepare(afile)
    with pytest.raises(RunDirError, match=rf"--out {afile}/run cannot be written \(.*\); choose a writable place"):
        rundir.prepare(afile / "run")
    with pytest.raises(RunDirError, match=rf"--checkpoint-dir {afile} is a file"):
        rundir.prepare(tmp_path / "run", afile)
    with pytest.raises(RunDirError, match=rf"--checkpoint-dir {afile}/c cannot be written"):
        rundir.prepare(tmp_path / "run2", afile / "c")
