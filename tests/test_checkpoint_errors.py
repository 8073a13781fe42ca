"""Files a run reads from the user: checkpoints, CIFAR-10 pickles and straggler specs; no code runs, one line each."""

import pickle

import numpy as np
import pytest
import torch

from pcasgd_mpi import checkpoint
from pcasgd_mpi.data import DataError, load
from pcasgd_mpi.delay import SpecError, Straggler


class _Payload:
    """Unpickling this would create the file named in `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_foreign_objects_never_suggests_weights_only_false(tmp_path):
    path = checkpoint.path_for(tmp_path, 0, 3)
    path.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "evil": _Payload(tmp_path / "ran")}, path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(tmp_path, 0, 3, {})
    message = str(info.value)
    assert "weights_only" not in message and "Weights only" not in message and "\n" not in message
    assert f"checkpoint {path} cannot be read" in message and "never loaded" in message
    assert not (tmp_path / "ran").exists()


def test_truncated_checkpoint_is_one_line(tmp_path):
    path = checkpoint.save(tmp_path, 0, 1, {"x": torch.ones(3)}, keep=1)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {path} cannot be read \(") as info:
        checkpoint.load(tmp_path, 0, 1, {})
    assert "weights_only" not in str(info.value)


def _cifar_batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"x",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [b"a"] * n,
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _write_cifar(folder, test_batch=None, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump(
                test_batch if (name == "test_batch" and test_batch is not None) else _cifar_batch(seed=i),
                f,
                protocol=protocol,
            )


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickles_of_plain_data_still_load(tmp_path, protocol):
    _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32) and len(ds.y_test) == 3


def test_hostile_cifar_pickle_is_refused_before_it_runs(tmp_path):
    target = tmp_path / "created-by-pickle"
    batch = _cifar_batch()
    batch[b"labels"] = _Payload(target)
    _write_cifar(tmp_path / "cifar-10-batches-py", test_batch=batch)
    with pytest.raises(DataError) as info:
        load("cifar10", root=tmp_path)
    message = str(info.value)
    assert "test_batch: refused to load (it refers to " in message and ".open," in message
    assert not target.exists()


@pytest.mark.parametrize("spec", ["1:inf", "1:nan", "1:-inf", "1:0.5"])
def test_straggler_factor_must_be_finite_and_at_least_one(spec):
    with pytest.raises(SpecError, match=rf"--straggler '{spec}': RANK must be >= 0 and FACTOR a finite number >= 1"):
        Straggler.parse(spec)
    assert Straggler.parse("1:4").factor == 4.0
