"""Experiment grids: expansion, names, validation, aggregation, the report, the paper's checks,
and one small MPI job."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from launch import ROOT, mpirun_prefix, run
from pcasgd_mpi import aggregation, config, report, runner
from pcasgd_mpi import grid as gridfile
from test_plot import PNG_MAGIC, make_run

GRIDS = ROOT / "benchmarks" / "grids"


def grid_of(**raw):
    doc = {"ranks": 4, "steps": 10, "algorithms": ["dsgd"], "delays": ["none"], "seeds": [0]} | raw
    return gridfile.parse_grid(doc, "g.yaml")


# ----------------------------------------------------------------------------- expansion and names
def test_grid_expands_every_combination_with_unique_stable_names():
    g = grid_of(
        algorithms=["dsgd", "pc-asgd:0.25", "pc-asgd"],
        delays=["none", "random:0.5:4", "ranks:0,2:8"],
        seeds=[0, 1],
        partitions=["iid", "dirichlet:0.3"],
        lrs=[0.1, 0.5],
    )
    runs = g.runs()
    assert len(runs) == 3 * 3 * 2 * 2 * 2
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert "pc-asgd-t0.25__ranks-0_2-8__dirichlet-0.3__lr0.5__s1" in names
    assert "dsgd__random-0.5-4__iid__lr0.1__s0" in names
    assert [a.label for a in g.algorithms] == ["dsgd", "pc-asgd:0.25", "pc-asgd:0.5"]
    # A setting's runs are contiguous so that a partly finished grid already fills whole cells.
    first = runs[: 3 * 3 * 2]
    assert {(r.partition, r.lr) for r in first} == {("iid", 0.1)}


def test_run_fields_set_algorithm_theta_delay_and_keep_the_base():
    g = grid_of(algorithms=["pc-asgd:0.75", "clip"], delays=["fixed:2"], lr=0.3, eval_every=5)
    pc, clip = g.runs()
    f = pc.train_fields(g.base, ROOT / "x")
    assert f["algorithm"] == "pc-asgd" and f["theta"] == 0.75 and f["delay"] == "fixed:2"
    assert f["lr"] == 0.3 and f["eval_every"] == 5 and f["mode"] == "lockstep" and f["progress"] is False
    assert "theta" not in clip.train_fields(g.base, ROOT / "x")
    assert f["on_diverge"] == "continue", "one diverging run must not end the grid"
    strict = grid_of(on_diverge="abort").runs()[0].train_fields(grid_of(on_diverge="abort").base, ROOT / "x")
    assert str(strict["on_diverge"]) == "abort"


def test_pc_asgd_stable_sets_theta_by_the_delay_and_the_base_cannot():
    g = grid_of(algorithms=["pc-asgd:stable", "pc-asgd:0.25"], delays=["fixed:2"])
    stable, fixed = g.runs()
    assert [a.label for a in g.algorithms] == ["pc-asgd:stable", "pc-asgd:0.25"]
    assert stable.name.startswith("pc-asgd-stable__")
    f = stable.train_fields(g.base, ROOT / "x")
    assert f["theta_rule"] == "stable" and "theta" not in f
    assert "theta_rule" not in fixed.train_fields(g.base, ROOT / "x")
    with pytest.raises(gridfile.GridError, match="theta_rule"):
        grid_of(theta_rule="stable")
    with pytest.raises(gridfile.GridError, match="pc-asgd:stable"):
        grid_of(algorithms=["pc-asgd:steady"])
    (link,) = grid_of(algorithms=["pc-asgd:link"], delays=["fixed:2"]).runs()
    assert link.algorithm.label == "pc-asgd:link" and link.name.startswith("pc-asgd-link__")
    assert link.train_fields(g.base, ROOT / "x")["theta_rule"] == "link"


def test_async_conditions_on_the_delay_axis_set_straggler_and_link_delay():
    g = grid_of(mode="async", delays=["none", "straggler:3:4", "link:0,2:30"], algorithms=["dsgd", "pc-asgd-av"])
    fields = {r.name: r.train_fields(g.base, ROOT / "x") for r in g.runs()}
    assert {r.delay for r in g.runs()} == {"none", "straggler:3:4", "link:0,2:30"}
    slow = fields["pc-asgd-av__straggler-3-4__iid__lr0.1__s0"]
    assert slow["straggler"] == ["3:4"] and slow["delay"] == "none" and "link_delay" not in slow
    link = fields["dsgd__link-0_2-30__iid__lr0.1__s0"]
    assert link["link_delay"] == ["0,2:30"] and link["delay"] == "none" and "straggler" not in link
    config.TrainConfig(**slow)
    config.TrainConfig(**link)
    only = grid_of(
        mode="async",
        delays=["none", "straggler:3:4", "link:0,2:30"],
        algorithms=["dsgd", "pc-asgd-av"],
        exclude=[{"algorithm": "dsgd", "delay": ["straggler:3:4", "link:0,2:30"]}],
    )
    assert {(r.algorithm.label, r.delay) for r in only.runs() if r.algorithm.label == "dsgd"} == {("dsgd", "none")}
    with pytest.raises(gridfile.GridError, match=r"exclude\[0\]\.delay: 'link:0,2:30' needs mode async"):
        grid_of(delays=["none"], exclude=[{"algorithm": "dsgd", "delay": "link:0,2:30"}])


def test_exclude_removes_matching_runs_and_delays_are_canonical():
    g = grid_of(
        algorithms=["dsgd", "clip", "allreduce"],
        delays=["none", "fixed:02"],
        seeds=[0, 1],
        exclude=[{"algorithm": "allreduce", "delay": "fixed:2"}, {"algorithm": ["clip"], "delay": "none"}],
    )
    combos = {(r.algorithm.label, r.delay) for r in g.runs()}
    assert combos == {("dsgd", "none"), ("dsgd", "fixed:2"), ("clip", "fixed:2"), ("allreduce", "none")}


def test_every_algorithm_of_the_trainer_can_be_a_grid_axis():
    names = [a.value for a in config.Algorithm]
    assert [a.label for a in grid_of(algorithms=names).algorithms] == [
        "pc-asgd:0.5" if n == "pc-asgd" else n for n in names
    ]


def test_shipped_grids_parse_and_have_the_planned_size():
    grids = {p.stem: gridfile.load_grid(p) for p in GRIDS.glob("*.yaml")}
    assert {"digits", "digits-noniid", "tiny", "resnet20-synthetic"} <= set(grids)
    digits = grids["digits"]
    assert [a.label for a in digits.algorithms] == [
        "dsgd",
        "clip",
        "predict",
        "pc-asgd:0.25",
        "pc-asgd:0.5",
        "pc-asgd:0.75",
        "pc-asgd-pv",
        "pc-asgd-av",
        "allreduce",
    ]
    assert digits.delays == ["none", "fixed:2", "random:0.5:4", "ranks:0,2:8"] and digits.seeds == [0, 1, 2]
    noniid = grids["digits-noniid"]
    labels = {a.label for a in noniid.algorithms}
    assert {"dsgd", "clip", "predict", "pc-asgd:0.5", "pc-asgd-pv", "pc-asgd-av"} <= labels
    assert "dirichlet:0.3" in noniid.partitions and 0.5 in noniid.lrs
    tiny = grids["tiny"]
    assert tiny.ranks == 2 and len(tiny.runs()) == 2


def test_importing_the_experiment_does_not_start_mpi():
    code = "import sys, pcasgd_mpi.experiment, pcasgd_mpi.runner; print('mpi4py' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "change, message",
    [
        ({"algorithms": ["dsgd", "sgd"]}, r"algorithms\[1\]: unknown algorithm 'sgd'"),
        ({"algorithms": ["pc-asgd:1.5"]}, r"algorithms\[0\]: 'pc-asgd:1.5': THETA must be a number in \[0, 1\]"),
        ({"algorithms": ["clip:0.3"]}, r"only pc-asgd takes a value"),
        ({"delays": ["none", "fixed:x"]}, r"delays\[1\]: delay 'fixed:x': TAU must be a whole number"),
        ({"delays": ["sometimes"]}, r"delays\[0\]: delay 'sometimes' is not one of"),
        ({"delays": ["ranks:0,5:2"]}, r"delays\[0\]: .*ranks \[5\] but the job has only 4 ranks"),
        ({"partitions": ["dirichlet:-1"]}, r"partitions\[0\]: bad partition scheme"),
        ({"lrs": [0.1, 0]}, r"lrs\[1\]: a learning rate must be a number > 0"),
        ({"seeds": [0, "a"]}, r"seeds\[1\]: a seed must be a whole number"),
        ({"seeds": []}, r"'seeds' is empty"),
        ({"seeds": [1, 1]}, r"'seeds' lists 1 more than once"),
        ({"stepz": 5}, r"unknown key\(s\) 'stepz'"),
        ({"algorithm": "dsgd"}, r"'algorithm' is set by each run; list it under 'algorithms'"),
        ({"steps": "many"}, r"steps: must be a whole number >= 1, got 'many'"),
        ({"mode": "sometimes"}, r"mode: .*sometimes"),
        ({"steps": 5, "epochs": 1.0}, r"run dsgd__none__iid__lr0.1__s0: --steps and --epochs both given"),
        ({"lr": 0.1, "lrs": [0.1]}, r"both 'lr' and 'lrs' are given"),
        ({"exclude": [{"algorithm": "dsgd"}]}, r"'exclude' leaves no run"),
        ({"exclude": [{"colour": "red"}]}, r"exclude\[0\]: unknown key 'colour'"),
        ({"mode": "async", "delays": ["fixed:2"]}, r"injected delays need mode lockstep.*straggler:RANK:FACTOR"),
        ({"delays": ["link:0,2:30"]}, r"delays\[0\]: 'link:0,2:30' needs mode async"),
        ({"mode": "async", "delays": ["straggler:9:4"]}, r"straggler"),
        ({"mode": "async", "delays": ["link:0,2:-5"]}, r"link"),
        ({"ranks": 0}, r"ranks must be a whole number >= 1"),
    ],
)
def test_bad_grid_is_one_clear_value_error_line(change, message):
    with pytest.raises(ValueError, match=message) as info:
        grid_of(**change)
    text = str(info.value)
    assert "\n" not in text and text.startswith("g.yaml: ")


def test_missing_axis_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="missing 'delays'"):
        gridfile.parse_grid({"algorithms": ["dsgd"], "seeds": [0]}, "g.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithms: [dsgd\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML at line \d+") as info:
        gridfile.load_grid(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no such grid file"):
        gridfile.load_grid(tmp_path / "nope.yaml")


def test_command_line_reports_a_bad_grid_in_one_line_without_mpi(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"algorithms": ["dsgd", "fast-sgd"], "delays": ["none"], "seeds": [0]}))
    proc = subprocess.run(
        [sys.executable, "-m", "pcasgd_mpi.experiment", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown algorithm 'fast-sgd'" in proc.stderr


# ----------------------------------------------------------------------------- aggregation
ACC = {  # (algorithm, delay) -> accuracy per seed
    ("dsgd", "none"): [0.90, 0.92, 0.94],
    ("clip", "none"): [0.90, 0.92, 0.94],
    ("pc-asgd-pv", "none"): [0.91, 0.92, 0.93],
    ("pc-asgd-av", "none"): [0.90, 0.92, 0.94],
    ("dsgd", "fixed:2"): [0.80, 0.82, 0.84],
    ("clip", "fixed:2"): [0.85, 0.86, 0.87],
    ("pc-asgd-pv", "fixed:2"): [0.84, 0.85, 0.86],
    ("pc-asgd-av", "fixed:2"): [0.88, 0.89, 0.90],
}


def fabricated():
    g = grid_of(algorithms=["dsgd", "clip", "pc-asgd-pv", "pc-asgd-av"], delays=["none", "fixed:2"], seeds=[0, 1, 2])
    summaries = {}
    for spec in g.runs():
        acc = ACC[(spec.algorithm.label, spec.delay)][spec.seed]
        summaries[spec.name] = {
            "final_accuracy": acc,
            "consensus_distance": 0.01 * (1 + spec.seed),
            "pv_wins": {"predict": spec.seed, "clip": 2} if spec.delay != "none" else {"predict": 0, "clip": 0},
        }
    return g, summaries


def test_aggregate_mean_std_and_worst_case_gap():
    g, summaries = fabricated()
    agg = aggregation.aggregate(g, summaries)
    key = "delay fixed:2 · iid · lr 0.1"
    cell = agg["table"]["clip"][key]["accuracy"]
    assert cell["mean"] == pytest.approx(0.86) and cell["std"] == pytest.approx(0.01) and cell["n"] == 3
    assert agg["reference"]["accuracy"][key] == pytest.approx(0.92)
    assert agg["gaps"]["dsgd"][key] == pytest.approx(0.10)
    assert agg["worst_gap"]["pc-asgd-av"] == {"gap": pytest.approx(0.03), "setting": key}
    assert agg["worst_gap"]["dsgd"]["gap"] == pytest.approx(0.10)
    share = agg["table"]["pc-asgd-pv"][key]["pv_predict_share"]
    assert share["mean"] == pytest.approx((0 + 1 / 3 + 2 / 4) / 3)
    assert agg["table"]["pc-asgd-pv"]["delay none · iid · lr 0.1"]["pv_predict_share"] is None
    cons = agg["table"]["dsgd"][key]["consensus_distance"]
    assert cons["mean"] == pytest.approx(0.02)


def _benchmark(name: str):
    """A script of benchmarks/ as a module (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_paper_checks_are_computed_from_the_numbers():
    checks = _benchmark("paper_checks").checks
    g, summaries = fabricated()
    ch = checks(aggregation.aggregate(g, summaries))
    # PV 0.85 vs best baseline clip 0.86 ± 0.01: exactly on the line, so it holds.
    assert ch["pv_vs_baselines"]["holds"] is True
    assert ch["pv_vs_baselines"]["rows"][0]["best"] == "clip"
    assert ch["pv_no_delay"]["holds"] is True
    assert ch["av_worst_case"]["within"] is True and ch["av_worst_case"]["best_of_variants"] is True
    # Move PV below the line and let clip beat AV's worst case: both answers must flip.
    for spec in g.runs():
        if spec.delay == "fixed:2" and spec.algorithm.label == "pc-asgd-pv":
            summaries[spec.name]["final_accuracy"] -= 0.05
        if spec.delay == "fixed:2" and spec.algorithm.label == "clip":
            summaries[spec.name]["final_accuracy"] += 0.05
    ch = checks(aggregation.aggregate(g, summaries))
    assert ch["pv_vs_baselines"]["holds"] is False
    assert ch["av_worst_case"]["best_of_variants"] is False and ch["av_worst_case"]["better_variants"] == ["clip"]


def test_paper_checks_cannot_answer_without_the_algorithms():
    checks = _benchmark("paper_checks").checks
    g = grid_of(algorithms=["dsgd", "clip"], delays=["none", "fixed:2"])
    summaries = {spec.name: {"final_accuracy": 0.9} for spec in g.runs()}
    assert checks(aggregation.aggregate(g, summaries)) == {
        "pv_vs_baselines": None,
        "pv_no_delay": None,
        "av_worst_case": None,
    }


def test_paper_checks_command_writes_its_answers_next_to_the_results(tmp_path, capsys):
    paper_checks = _benchmark("paper_checks")
    g, summaries = fabricated()
    (tmp_path / "results.json").write_text(json.dumps(aggregation.aggregate(g, summaries)))
    assert paper_checks.main([str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "checks.json").read_text())
    assert saved["pv_vs_baselines"]["holds"] is True
    text = (tmp_path / "checks.md").read_text()
    assert text.startswith("# Checks: g") and "pc-asgd-av worst-case gap ≤ 3 pp: yes" in text
    assert text in capsys.readouterr().out
    assert paper_checks.main([str(tmp_path / "nowhere")]) == 2
    assert "results.json: not found" in capsys.readouterr().err


def test_missing_runs_are_left_out_and_reported():
    g, summaries = fabricated()
    gone = next(n for n in summaries if n.startswith("clip__fixed-2") and n.endswith("s2"))
    del summaries[gone]
    agg = aggregation.aggregate(g, summaries)
    cell = agg["table"]["clip"]["delay fixed:2 · iid · lr 0.1"]
    assert cell["finished"] == 2 and cell["accuracy"]["mean"] == pytest.approx(0.855)
    text = report.render_markdown(agg)
    assert "1 run(s) have no summary yet" in text


def test_runs_with_a_diverged_rank_are_named_in_the_report():
    g, summaries = fabricated()
    name = next(n for n in summaries if n.startswith("clip__fixed-2"))
    summaries[name] = dict(summaries[name], diverged={"1": 17})
    text = report.render_markdown(aggregation.aggregate(g, summaries))
    assert "In 1 run(s) a rank's weights became inf or NaN" in text
    assert f"- {name}: rank 1 at step 17" in text
    assert "inf or NaN" not in report.render_markdown(aggregation.aggregate(*fabricated()))


def test_markdown_has_the_tables_and_the_gap_row():
    g, summaries = fabricated()
    text = report.render_markdown(aggregation.aggregate(g, summaries))
    assert "| delay | partition | lr | dsgd | clip | pc-asgd-pv | pc-asgd-av |" in text
    assert "| fixed:2 | iid | 0.1 | 82.0 ± 2.0 | 86.0 ± 1.0 | 85.0 ± 1.0 | 89.0 ± 1.0 |" in text
    assert "| **worst-case gap to dsgd, no delay (pp)** | | | +10.0 | +6.0 | +7.0 | +3.0 |" in text
    assert "Consensus distance" in text and "predict share" in text
    assert "Checks" not in text, "the paper's claims are judged in benchmarks/paper_checks.py"


def test_write_report_from_run_directories(tmp_path):
    g = grid_of(algorithms=["dsgd", "pc-asgd-pv"], delays=["none", "fixed:2"], seeds=[0, 1], ranks=2)
    for i, spec in enumerate(g.runs()):
        make_run(
            tmp_path / "runs" / spec.name,
            algorithm=spec.algorithm.name,
            delay=spec.delay,
            accuracy=0.9 - 0.01 * i,
            seed=spec.seed,
        )
    agg = report.write_report(g, tmp_path)
    assert agg["table"]["dsgd"]["delay none · iid · lr 0.1"]["accuracy"]["mean"] == pytest.approx(0.895)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["worst_gap"].keys() == {"dsgd", "pc-asgd-pv"}
    assert (tmp_path / "results.md").read_text().startswith("# Results: g")
    for fig in agg["figures"]:
        assert (tmp_path / fig).read_bytes()[:8] == PNG_MAGIC
    assert {p.split("/")[-1] for p in agg["figures"]} == {
        "curves__none__iid__lr0.1.png",
        "curves__fixed-2__iid__lr0.1.png",
        "consensus.png",
        "staleness.png",
    }


def test_a_finished_run_is_skipped_and_one_with_other_settings_refused(tmp_path):
    g = grid_of(ranks=2)
    spec = g.runs()[0]
    same, other = tmp_path / "same", tmp_path / "other"
    make_run(same, algorithm="dsgd", delay="none", steps=10, eval_every=0)
    make_run(other, algorithm="dsgd", delay="none", steps=20, eval_every=0)
    assert runner._existing_run(tmp_path / "missing", spec.train_fields(g.base, tmp_path / "missing")) is None
    assert runner._existing_run(same, spec.train_fields(g.base, same)) == "done"
    with pytest.raises(gridfile.GridError, match=r"other settings \(steps: 20 there, 10 in the grid\)"):
        runner._existing_run(other, spec.train_fields(g.base, other))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.mpi
def test_tiny_grid_under_mpirun_then_resumed_through_the_relaunch(tmp_path):
    grid, out = GRIDS / "tiny.yaml", tmp_path / "exp"
    cmd = [sys.executable, "-m", "pcasgd_mpi.experiment", str(grid), "--out", str(out)]
    proc = run(mpirun_prefix(2) + cmd, timeout=300)
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, log
    assert "[1/2] dsgd__fixed-2__iid__lr0.1__s0: accuracy" in proc.stdout, log
    assert "[2/2] pc-asgd-pv__fixed-2__iid__lr0.1__s0: accuracy" in proc.stdout, log
    results = json.loads((out / "results.json").read_text())
    assert all(r["finished"] for r in results["runs"]) and len(results["runs"]) == 2
    assert 0.0 < results["table"]["pc-asgd-pv"]["delay fixed:2 · iid · lr 0.1"]["accuracy"]["mean"] <= 1.0
    assert results["table"]["pc-asgd-pv"]["delay fixed:2 · iid · lr 0.1"]["pv_choices"] > 0
    for fig in results["figures"]:
        assert (out / fig).read_bytes()[:8] == PNG_MAGIC
    assert "| fixed:2 | iid | 0.1 |" in (out / "results.md").read_text()

    # Without mpirun the module starts its own job; every run is finished, so nothing trains again.
    proc = run(cmd, timeout=300)
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, log
    assert "launching:" in proc.stdout and proc.stdout.count("finished earlier, skipped") == 2, log

    # A run the grid was stopped in (its directory without a summary) is run again from the start.
    (out / "runs" / "pc-asgd-pv__fixed-2__iid__lr0.1__s0" / "summary.json").unlink()
    proc = run(mpirun_prefix(2) + cmd, timeout=300)
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, log
    assert proc.stdout.count("finished earlier, skipped") == 1, log
    assert "[2/2] pc-asgd-pv__fixed-2__iid__lr0.1__s0: accuracy" in proc.stdout, log
    assert (out / "runs" / "pc-asgd-pv__fixed-2__iid__lr0.1__s0" / "summary.json").exists()


# ----------------------------------------------------------------------------- the convex check
def test_convex_check_runs_tiny_and_answers_from_its_data(tmp_path):
    convex = _benchmark("convex")
    args = [
        "--agents",
        "4",
        "--dim",
        "4",
        "--rows",
        "8",
        "--batch",
        "2",
        "--steps",
        "60",
        "--tail",
        "20",
        "--seeds",
        "2",
        "--taus",
        "0,3",
        "--out",
        str(tmp_path),
    ]
    assert convex.main(args) == 0
    result = json.loads((tmp_path / "convex.json").read_text())
    assert (tmp_path / "convex.png").read_bytes()[:8] == PNG_MAGIC
    errors = result["errors"]
    # Without delay nothing is stale, so every rule is the same update.
    at0 = [errors[a]["0"]["mean"] for a in convex.ALGORITHMS]
    assert max(at0) == pytest.approx(min(at0), rel=1e-9)
    expected = all(
        errors["pc-asgd-pv"][t]["mean"] <= max(errors["clip"][t]["mean"], errors["predict"][t]["mean"])
        for t in ("0", "3")
    )
    answer = result["checks"]["b_pv_not_worse_than_worse_of_clip_predict"]["holds"]
    assert answer is expected
    assert f"**{answer}**" in (tmp_path / "convex.md").read_text()

    # The same function on made-up numbers: both answers follow the numbers.
    def table(pv, grow):
        cell = lambda v: {"mean": v}  # noqa: E731
        return {
            "dsgd": {"0": cell(1), "2": cell(1)},
            "clip": {"0": cell(1), "2": cell(2)},
            "predict": {"0": cell(1), "2": cell(3)},
            "pc-asgd": {"0": cell(1), "2": cell(grow)},
            "pc-asgd-pv": {"0": cell(1), "2": cell(pv)},
            "pc-asgd-av": {"0": cell(1), "2": cell(1)},
        }

    ok = convex.evaluate_checks(table(pv=2.5, grow=1.5), [0, 2])
    assert ok["b_pv_not_worse_than_worse_of_clip_predict"]["holds"] is True
    assert ok["a_error_grows_with_tau"]["holds"] is True
    bad = convex.evaluate_checks(table(pv=3.5, grow=0.5), [0, 2])
    assert bad["b_pv_not_worse_than_worse_of_clip_predict"]["holds"] is False
    assert bad["a_error_grows_with_tau"]["holds"] is False
