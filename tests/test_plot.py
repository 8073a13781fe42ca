"""`pcasgd-mpi plot`: reading run directories and drawing them, on fabricated runs (no MPI)."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from launch import ROOT
from pcasgd_mpi import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    path,
    *,
    algorithm="pc-asgd-pv",
    delay="fixed:2",
    theta=0.5,
    ranks=2,
    steps=20,
    eval_every=10,
    accuracy=0.9,
    consensus=0.01,
    seed=0,
    summary=True,
    merged=True,
):
    """A run directory shaped like the trainer's output, with made-up but plausible numbers."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tau = int(delay.split(":")[-1]) if delay != "none" else 0
    lines = []
    for r in range(ranks):
        for k in range(steps):
            stale = None if k < tau else tau
            rec = {
                "rank": r,
                "step": k,
                "t": 0.01 * k,
                "loss": float(2.0 * np.exp(-k / 10) + 0.05 * rng.random()),
                "staleness": {str((r + 1) % ranks): stale},
            }
            if algorithm == "pc-asgd-pv" and stale:
                rec["choice"] = "predict" if k % 3 == 0 else "clip"
            lines.append(rec)
            if eval_every and (k + 1) % eval_every == 0:
                frac = (k + 1) / steps
                lines.append(
                    {
                        "rank": r,
                        "step": k + 1,
                        "eval": {
                            "agent_accuracy": accuracy * frac - 0.01,
                            "agent_loss": 1 - frac,
                            "accuracy": accuracy * frac,
                            "test_loss": 1.1 - frac,
                            "consensus_distance": consensus / frac,
                        },
                    }
                )
    if merged:
        (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    else:
        (path / "metrics").mkdir()
        for r in range(ranks):
            (path / "metrics" / f"rank-{r}.jsonl").write_text(
                "".join(json.dumps(x) + "\n" for x in lines if x["rank"] == r)
            )
    (path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "algorithm": algorithm,
                "theta": theta,
                "delay": delay,
                "seed": seed,
                "steps": steps,
                "eval-every": eval_every,
            }
        )
    )
    if summary:
        hist = {
            str(r): {str((r + 1) % ranks): ({"never": tau, str(tau): steps - tau} if tau else {"0": steps})}
            for r in range(ranks)
        }
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "algorithm": algorithm,
                    "delay": delay,
                    "world_size": ranks,
                    "final_accuracy": accuracy,
                    "final_test_loss": 0.1,
                    "consensus_distance": consensus,
                    "staleness_histogram": hist,
                    "pv_wins": {"predict": 3, "clip": 5} if algorithm == "pc-asgd-pv" else {"predict": 0, "clip": 0},
                    "wall_time_s": 1.0,
                }
            )
        )
    return path


def test_load_run_averages_loss_over_ranks_and_reads_evals(tmp_path):
    run = plot.load_run(make_run(tmp_path / "a", ranks=3, steps=20, eval_every=5))
    assert run.steps.tolist() == list(range(20))
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    step3 = [x["loss"] for x in lines if x.get("step") == 3 and "loss" in x]
    assert len(step3) == 3 and run.loss[3] == pytest.approx(np.mean(step3))
    assert run.eval_steps.tolist() == [5, 10, 15, 20]
    assert run.accuracy[-1] == pytest.approx(0.9)
    assert run.has_accuracy and run.has_consensus
    assert run.staleness == {"never": 6, 2: 54}  # from summary.json: 3 ranks x (2 never + 18 at τ = 2)
    assert run.label == "pc-asgd-pv, delay fixed:2"


def test_unfinished_run_reads_per_rank_files_and_logged_staleness(tmp_path):
    run = plot.load_run(make_run(tmp_path / "a", summary=False, merged=False, delay="fixed:3", ranks=2, steps=10))
    assert run.staleness == {"never": 6, 3: 14}
    assert len(run.steps) == 10


def test_label_shows_theta_of_pc_asgd(tmp_path):
    run = plot.load_run(make_run(tmp_path / "a", algorithm="pc-asgd", theta=0.25))
    assert run.label == "pc-asgd θ=0.25, delay fixed:2"


def test_plot_writes_png_from_two_run_dirs(tmp_path):
    a = make_run(tmp_path / "a", algorithm="dsgd", delay="none")
    b = make_run(tmp_path / "b", algorithm="pc-asgd-pv", delay="fixed:2", accuracy=0.8, seed=1)
    out = tmp_path / "figs" / "fig.png"
    args = argparse.Namespace(runs=[str(a), str(b)], output=str(out), smooth=None, title="two runs")
    assert plot.main(args) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_plot_handles_runs_without_evaluations(tmp_path):
    a = make_run(tmp_path / "a", eval_every=0)
    out = plot.plot_runs([plot.load_run(a)], tmp_path / "f.png", window=1)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_not_a_run_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(plot.PlotError, match="no such run directory"):
        plot.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot.load_run(tmp_path / "empty")
    proc = subprocess.run(
        [sys.executable, "-m", "pcasgd_mpi.plot", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such run directory" in proc.stderr


def test_smooth_is_a_trailing_mean():
    y = np.array([1.0, 3.0, 5.0, 7.0])
    assert plot.smooth(y, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert plot.smooth(y, 1) is y
