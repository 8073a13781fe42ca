"""TrainConfig as the one definition of every training option: checks, files, hashes and the parser."""

import dataclasses
import math
import subprocess
import sys

import pytest
import yaml

from pcasgd_mpi import cli
from pcasgd_mpi.config import (
    DEFAULT_STEPS,
    Algorithm,
    Balance,
    Dataset,
    Mode,
    Slope,
    Stop,
    TrainConfig,
    check_rule_settings,
    flag_of,
)

FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", "float | None")]


def parse(*argv):
    """The TrainConfig `pcasgd-mpi train ARGV` would run with, in-process."""
    return cli.train_config(cli.build_parser().parse_args(["train", *argv]))


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- the dataclass
def test_defaults_and_enums():
    cfg = TrainConfig()
    assert cfg.algorithm is Algorithm.PC_ASGD_PV and cfg.mode is Mode.ASYNC and cfg.lam == 0.04
    assert cfg.slope is Slope.UPDATE and cfg.stop is Stop.FIRST and cfg.balance is Balance.MIX
    # --balance auto (the default) is mix in async mode and none in lockstep, decided once, here
    assert TrainConfig(mode="lockstep").balance is Balance.NONE
    assert TrainConfig(balance="none").balance is Balance.NONE
    assert cfg.link_delay == [] and cfg.duration is None and Dataset("mnist1d") is Dataset.MNIST1D
    # strings from the Python API become the enums; the enums still compare equal to their text
    cfg = TrainConfig(algorithm="dsgd", mode="lockstep")
    assert cfg.algorithm is Algorithm.DSGD and cfg.mode == "lockstep" and f"{cfg.mode}" == "lockstep"


def test_every_float_field_is_covered():
    assert {"theta", "lam", "timeout", "epochs", "duration", "lr", "momentum", "weight_decay"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf", "nan", "-inf"])
def test_non_finite_floats_are_rejected_everywhere(name, bad):
    with pytest.raises(ValueError, match=rf"--{name.replace('_', '-')}: must be .*finite|theta must be"):
        TrainConfig(**{name: bad})
    with pytest.raises(ValueError, match=rf"^run.yaml: {name}: must be"):
        TrainConfig.from_mapping({name: bad}, source="run.yaml")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_float_flags_are_one_usage_line(capsys, name):
    flag = flag_of(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    line = usage_error(capsys, flag, "nan")
    assert line.startswith(f"pcasgd-mpi train: error: argument {flag}: must be")
    assert "nan" in line


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threads": 0}, "--threads: must be a whole number >= 1, got 0"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints: must be a whole number >= 1, got 0"),
        ({"batch_size": 0}, "--batch-size: must be a whole number >= 1"),
        ({"steps": 0}, "--steps: must be a whole number >= 1"),
        ({"steps": 2.5}, "--steps: must be a whole number"),
        ({"steps": True}, "--steps: must be a whole number"),
        ({"lr": 0}, "--lr: must be a finite number > 0"),
        ({"momentum": -0.1}, "--momentum: must be a finite number >= 0"),
        ({"duration": 0}, "--duration: must be a finite number > 0"),
        ({"seed": -1}, "--seed: must be a whole number >= 0"),
        ({"theta": 1.5}, "--theta: must be a finite number in [0, 1]"),
        ({"theta_rule": "auto"}, "--theta-rule: must be one of fixed, stable"),
        ({"momentum_kind": "quasi-global"}, "--momentum-kind quasi-global needs a momentum > 0"),
        ({"momentum_kind": "global"}, "--momentum-kind: must be one of local, quasi-global"),
        (
            {"theta_rule": "stable"},
            "--theta-rule stable sets the θ of pc-asgd; it does not apply to --algorithm pc-asgd-pv",
        ),
        (
            {"theta_rule": "link", "algorithm": "pc-asgd"},
            "--theta-rule link needs --mode lockstep",
        ),
        (
            {"theta_rule": "link", "algorithm": "pc-asgd", "mode": "lockstep", "momentum": 0.9},
            "--theta-rule link under momentum needs --momentum-kind quasi-global",
        ),
        ({"algorithm": "sgd"}, "--algorithm: must be one of dsgd, clip, predict, pc-asgd, pc-asgd-pv"),
        ({"slope": "curvature"}, "--slope: must be one of update, gradient, velocity"),
        ({"stop": "last"}, "--stop: must be one of first, each"),
        ({"balance": "steps"}, "--balance: must be one of auto, none, lr, mix"),
        ({"link_delay": ["1:-5"]}, "--link-delay: '1:-5': ranks must be >= 0 and MS a finite number >= 0"),
        ({"link_delay": ["1:inf"]}, "MS a finite number >= 0"),
        ({"link_delay": ["-1:5"]}, "ranks must be >= 0"),
        ({"link_delay": ["a:5"]}, "is not RANKS:MS"),
        ({"link_delay": ["20"]}, "is not RANKS:MS"),
        ({"synthetic_shape": [3, 0, 4]}, "--synthetic-shape: sizes must be positive"),
        ({"steps": 5, "epochs": 1.0}, "--steps and --epochs both given"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite both given"),
        ({"tolerance": 5, "horizon": 2}, "tolerance (5) must not exceed horizon (2)"),
        ({"horizon": 0}, "tolerance (1) must not exceed horizon (0)"),  # async resolves tolerance to 1
        ({"progress": "no"}, "--no-progress: must be true or false"),
    ],
)
def test_bad_values_are_one_line_naming_the_option(kwargs, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_good_link_delays_and_lists():
    cfg = TrainConfig(link_delay=["1,3:20", "0:0.5"], straggler=["2:4"], synthetic_shape="3,32,32")
    assert cfg.link_delay == ["1,3:20", "0:0.5"] and cfg.synthetic_shape == [3, 32, 32]


def test_shared_rule_check_is_the_one_the_optimizer_uses():
    from pcasgd_mpi import optimizer

    assert optimizer.check_rule_settings is check_rule_settings
    assert optimizer.Algorithm is Algorithm and optimizer.Mode is Mode
    for bad in ({"theta": math.nan}, {"lam": math.inf}, {"lam": -1}, {"tolerance": -1}, {"lam_mode": "x"}):
        settings = {"theta": 0.5, "lam": 0.04, "lam_mode": "fixed", "tolerance": 1, "horizon": 16} | bad
        with pytest.raises(ValueError):
            check_rule_settings(**settings)


def test_training_hash_keeps_trajectory_options_and_skips_run_control():
    base = TrainConfig()
    for change in ({"link_delay": ["1:20"]}, {"duration": 5.0}, {"stop": "each"}, {"steps": 9}):
        assert TrainConfig(**change).training_hash() == base.training_hash(), change
    for change in ({"slope": "velocity"}, {"balance": "lr"}, {"lam": 0.1}):
        assert TrainConfig(**change).training_hash() != base.training_hash(), change


# ----------------------------------------------------------------------------- files
def test_from_mapping_accepts_hyphens_and_rejects_unknown_keys():
    cfg = TrainConfig.from_mapping({"batch-size": 16, "lam_mode": "adaptive", "mode": "lockstep"}, source="x.yaml")
    assert cfg.batch_size == 16 and cfg.lam_mode == "adaptive" and cfg.mode is Mode.LOCKSTEP
    with pytest.raises(ValueError, match=r"^x.yaml: unknown option 'batchsize'"):
        TrainConfig.from_mapping({"batchsize": 16}, source="x.yaml")
    with pytest.raises(ValueError, match=r"^x.yaml: expected a mapping"):
        TrainConfig.from_mapping(["lr", 1], source="x.yaml")
    with pytest.raises(ValueError, match=r"^x.yaml: steps: must be a whole number >= 1, got 'many'"):
        TrainConfig.from_mapping({"steps": "many"}, source="x.yaml")
    with pytest.raises(ValueError, match=r"^x.yaml: lr: must be a finite number > 0, got True"):
        TrainConfig.from_mapping({"lr": True}, source="x.yaml")


def test_effective_config_resolves_steps_and_tolerance_and_reads_back(tmp_path):
    cfg = TrainConfig(mode="lockstep", epochs=2.0, batch_size=16, out="somewhere", overwrite=True)
    steps = cfg.resolved_steps(train_samples=1000, world_size=4)
    assert steps == math.ceil(2.0 * 1000 / (4 * 16))
    used = cfg.effective(steps=steps)
    written = used.to_file()
    assert written["steps"] == steps and written["epochs"] is None and written["tolerance"] == 0
    assert "out" not in written and "overwrite" not in written and "resume" not in written
    assert written["algorithm"] == "pc-asgd-pv" and type(written["algorithm"]) is str
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False, allow_unicode=True))
    again = parse("--config", str(path))
    assert again == dataclasses.replace(used, out=None, overwrite=False)
    assert TrainConfig().resolved_steps(10, 1) == DEFAULT_STEPS
    assert TrainConfig(tolerance=None).effective(steps=7).tolerance == 1  # async


def test_first_difference_compares_effective_values():
    saved = TrainConfig(mode="lockstep", steps=20).effective(steps=20).to_file()
    assert TrainConfig(mode="lockstep", steps=20).first_difference(saved) is None
    assert TrainConfig(mode="lockstep", steps=20, lr=0.5).first_difference(saved) == ("lr", 0.1, 0.5)
    assert TrainConfig(mode="lockstep").first_difference(saved) is None  # default length: resolved at run time
    assert TrainConfig(mode="lockstep", steps=20, tolerance=2).first_difference(saved) == ("tolerance", 0, 2)


# ----------------------------------------------------------------------------- the command line
def test_config_file_then_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 40\nlr: 0.5\nstraggler: ['1:2']\nlink-delay: '0:5'\n")
    cfg = parse("--config", str(path), "--lr", "0.2", "--epochs", "3")
    assert cfg.lr == 0.2 and cfg.epochs == 3.0 and cfg.steps is None  # --epochs replaces the file's steps
    assert cfg.straggler == ["1:2"] and cfg.link_delay == ["0:5"]
    assert parse("--config", str(path), "--no-progress", "--straggler", "0:3").straggler == ["0:3"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: .inf\n", "--config {p}: lr: must be a finite number > 0, got inf"),
        ("momentum: .nan\n", "--config {p}: momentum: must be a finite number >= 0, got nan"),
        ("bogus: 1\n", "--config {p}: unknown option 'bogus'"),
        ("- a\n- b\n", "--config {p}: expected a mapping"),
        ("steps: [\n", "--config {p}: cannot read it"),
        ("steps: 5\nepochs: 2\n", "--steps and --epochs both given"),
    ],
)
def test_bad_config_file_is_one_usage_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = usage_error(capsys, "--config", str(path))
    assert line.startswith("pcasgd-mpi train: error:") and message.format(p=path) in line


def test_config_that_is_a_directory_or_missing(tmp_path, capsys):
    assert "is a directory" in usage_error(capsys, "--config", str(tmp_path))
    assert "cannot read it" in usage_error(capsys, "--config", str(tmp_path / "none.yaml"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "argument --threads: must be a whole number >= 1, got '0'"),
        (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be a whole number >= 1"),
        (["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
        (["--algorithm", "sgd"], "argument --algorithm: must be one of dsgd"),
        (["--steps", "5", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
        (["--link-delay", "1:nan"], "argument --link-delay: '1:nan'"),
    ],
)
def test_bad_flags_are_one_usage_line(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_parser_has_one_option_per_field_and_no_hand_written_train_options():
    help_text = cli.build_parser().parse_args  # the parser builds without error
    assert help_text
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f.metadata["group"], f.name
    src = open(cli.__file__).read()
    assert "_actions" not in src and "_SubParsersAction" not in src
    assert 'add_argument("--lr"' not in src and 'add_argument("--algorithm"' not in src


def _train_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pcasgd_mpi.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def _help_entries(text: str) -> dict[str, str]:
    """flag -> its help entry, lines joined (argparse wraps them)."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  --") or line.startswith("  -h"):
            current = line.split()[0]
            entries[current] = line
        elif line.startswith("    ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_each_default_once_and_correctly():
    raw = _train_help()
    assert "(default: True)" not in raw and "(default: False)" not in raw and "(default: None)" not in raw
    entries = _help_entries(raw)
    assert {flag_of(f) for f in dataclasses.fields(TrainConfig)} <= set(entries)
    for entry in entries.values():
        assert entry.count("(default") <= 1, entry
    for flag, default in [
        ("--algorithm", "pc-asgd-pv"),
        ("--mode", "async"),
        ("--model", "mlp"),
        ("--dataset", "digits"),
        ("--lam-mode", "fixed"),
        ("--batch-size", "32"),
        ("--lr", "0.1"),
        ("--momentum", "0.0"),
        ("--weight-decay", "0.0"),
        ("--seed", "0"),
        ("--lam", "0.04"),
        ("--steps", "500"),
        ("--slope", "update"),
        ("--stop", "first"),
        ("--balance", "auto"),
        ("--tolerance", "0 lockstep, 1 async"),
        ("--synthetic-shape", "1,8,8"),
    ]:
        assert f"(default: {default})" in entries[flag].replace("- ", "-"), (flag, entries[flag])
    for flag in ("--no-progress", "--resume", "--overwrite", "--epochs", "--duration", "--link-delay"):
        assert "default" not in entries[flag], entries[flag]


def test_options_added_later_leave_the_training_hash_of_earlier_checkpoints_alone():
    # The hash of the defaults as checkpoints written before --theta-rule and --momentum-kind have it.
    assert TrainConfig().training_hash() == "0f468f1c21d74401"
    assert TrainConfig(algorithm="pc-asgd", momentum=0.9).training_hash() == "620928bd422bf49d"
    assert (
        TrainConfig(algorithm="pc-asgd", theta_rule="stable").training_hash()
        != TrainConfig(algorithm="pc-asgd").training_hash()
    )
    assert (
        TrainConfig(momentum=0.9, momentum_kind="quasi-global").training_hash()
        != TrainConfig(momentum=0.9).training_hash()
    )
