import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pcasgd_mpi import data
from pcasgd_mpi.data import DataError, ShardSampler, load, partition

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- file writers


def write_idx(path, array, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(folder, n_train=6, n_test=4, gz=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_cifar(folder, per_batch=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            b"labels": list(rng.integers(0, 10, per_batch).tolist()),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


# ---------------------------------------------------------------- digits / synthetic


def test_digits_shapes_split_and_standardisation():
    ds = load("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert abs(len(ds.x_test) - 0.2 * 1797) <= 5
    # Stratified: every class keeps its share of the test split within one sample.
    counts_all = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10).float()
    counts_test = torch.bincount(ds.y_test, minlength=10).float()
    assert torch.all((counts_test - 0.2 * counts_all).abs() <= 1)
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert abs(ds.x_train.mean().item()) < 1e-4
    assert abs(ds.x_train.std().item() - 1) < 1e-3
    other = load("digits", seed=123)
    assert torch.equal(ds.x_test, other.x_test) and torch.equal(ds.y_test, other.y_test)


def test_digits_loads_without_importing_sklearn():
    import subprocess
    import sys

    code = "import sys; from pcasgd_mpi import data; data.load('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_synthetic_deterministic_and_shaped():
    kwargs = dict(synthetic_shape=(3, 4, 4), synthetic_classes=5, synthetic_size=(100, 40))
    a, b, c = (load("synthetic", seed=s, **kwargs) for s in (3, 3, 4))
    assert a.x_train.shape == (100, 3, 4, 4) and a.x_test.shape == (40, 3, 4, 4)
    assert a.input_shape == (3, 4, 4) and a.num_classes == 5
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_synthetic_is_learnable_by_logistic_regression():
    ds = load("synthetic", seed=0, synthetic_size=(400, 200))
    torch.manual_seed(0)
    model = torch.nn.Linear(64, ds.num_classes)
    x, y = ds.x_train.flatten(1), ds.y_train
    for _ in range(100):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        # Plain gradient steps: torch.optim's first step pays a multi-second import.
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    with torch.no_grad():
        acc = (model(ds.x_test.flatten(1)).argmax(1) == ds.y_test).float().mean().item()
    assert acc > 2 / ds.num_classes


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError, match="fashion-mnist"):
        load("imagenet")


# ---------------------------------------------------------------- MNIST IDX files


@pytest.mark.parametrize(
    "name,sub,gz",
    [
        ("mnist", "", False),
        ("mnist", "MNIST/raw", True),
        ("fashion-mnist", "FashionMNIST/raw", False),
    ],
)
def test_idx_reader_layouts(tmp_path, name, sub, gz):
    arrays = write_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    ds = load(name, root=tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert abs(ds.x_train.mean().item()) < 1e-4
    # Normalisation is monotone, so pixel order must survive.
    raw = arrays["train-images-idx3-ubyte"].reshape(6, -1)
    assert np.array_equal(np.argsort(raw[0], kind="stable"), np.argsort(ds.x_train[0].flatten().numpy(), kind="stable"))


def test_idx_missing_root_and_files(tmp_path):
    with pytest.raises(DataError, match="--data-dir.*train-images-idx3-ubyte"):
        load("mnist")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as err:
        load("mnist", root=tmp_path)
    assert "MNIST/raw" in str(err.value).replace("\\", "/")


def test_idx_corrupt_files(tmp_path):
    write_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x03" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        load("mnist", root=tmp_path)
    write_mnist(tmp_path)
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load("mnist", root=tmp_path)


def test_idx_corrupt_gzip_and_mismatched_counts(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load("mnist", root=tmp_path)
    write_mnist(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5) % 10, gz=True)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load("mnist", root=tmp_path)


# ---------------------------------------------------------------- CIFAR-10 pickles


@pytest.mark.parametrize("sub", ["cifar-10-batches-py", ""])
def test_cifar_reader_layouts(tmp_path, sub):
    write_cifar(tmp_path / sub if sub else tmp_path)
    ds = load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.y_train.dtype == torch.int64
    per_channel = ds.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3), atol=1e-4)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load("cifar10")
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch.*cifar-10-batches-py"):
        load("cifar10", root=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load("cifar10", root=tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="test_batch"):
        load("cifar10", root=tmp_path)


# ---------------------------------------------------------------- partition


def _check_cover(shards, n):
    joined = np.concatenate(shards)
    assert len(joined) == n and len(np.unique(joined)) == n
    assert all(len(s) > 0 for s in shards)


def _mean_max_share(labels, shards):
    return np.mean([np.bincount(labels[s]).max() / len(s) for s in shards])


def test_partition_iid():
    labels = np.arange(103) % 10
    shards = partition(labels, 4, "iid", seed=1)
    _check_cover(shards, 103)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    again = partition(torch.as_tensor(labels), 4, "iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = partition(labels, 4, "iid", seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_partition_dirichlet_skew_and_determinism():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    skewed = partition(labels, 8, "dirichlet:0.1", seed=0)
    _check_cover(skewed, 2000)
    again = partition(labels, 8, "dirichlet:0.1", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))
    iid = partition(labels, 8, "iid", seed=0)
    assert _mean_max_share(labels, skewed) > 2 * _mean_max_share(labels, iid)


def test_partition_dirichlet_never_leaves_agent_empty():
    labels = np.zeros(20, dtype=int)
    for seed in range(5):
        _check_cover(partition(labels, 10, "dirichlet:0.01", seed=seed), 20)


@pytest.mark.parametrize(
    "scheme", ["dirichlet", "dirichlet:", "dirichlet:x", "dirichlet:0", "dirichlet:-1", "zipf:1", "IID"]
)
def test_partition_rejects_bad_scheme(scheme):
    with pytest.raises(DataError, match="scheme"):
        partition(np.arange(10), 2, scheme)


def test_partition_rejects_too_many_agents():
    with pytest.raises(DataError, match="agents"):
        partition(np.arange(3), 4)


# ---------------------------------------------------------------- ShardSampler


def test_sampler_epochs_drop_tail_and_cover_shard():
    indices = np.arange(100, 123)
    s = ShardSampler(indices, batch_size=5, seed=0, rank=1)
    assert s.steps_per_epoch == 4
    epoch0 = [s.next_batch() for _ in range(4)]
    assert s.epoch == 1 and s.position == 0
    flat = np.concatenate(epoch0)
    assert len(np.unique(flat)) == 20 and set(flat) <= set(indices)
    epoch1 = np.concatenate([s.next_batch() for _ in range(4)])
    assert not np.array_equal(flat, epoch1)


def test_sampler_small_shard_uses_whole_shard():
    s = ShardSampler(np.array([7, 8, 9]), batch_size=32, seed=0, rank=0)
    assert s.steps_per_epoch == 1
    assert sorted(s.next_batch().tolist()) == [7, 8, 9]
    assert s.epoch == 1


def test_sampler_deterministic_and_rank_dependent():
    idx = np.arange(50)
    a = [ShardSampler(idx, 8, seed=5, rank=0).next_batch() for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    b = ShardSampler(idx, 8, seed=5, rank=1).next_batch()
    assert not np.array_equal(a[0], b)


def test_sampler_resume_gives_identical_stream():
    idx = np.arange(37)
    reference = ShardSampler(idx, 6, seed=9, rank=2)
    stream = [reference.next_batch() for _ in range(20)]
    first = ShardSampler(idx, 6, seed=9, rank=2)
    for _ in range(8):
        first.next_batch()
    resumed = ShardSampler(idx, 6, seed=9, rank=2)
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(resumed.next_batch(), b) for b in stream[8:])


def test_sampler_rejects_mismatched_state():
    state = ShardSampler(np.arange(10), 4, seed=0, rank=0).state_dict()
    with pytest.raises(DataError, match="batch_size"):
        ShardSampler(np.arange(10), 5, seed=0, rank=0).load_state_dict(state)


def test_module_constants():
    assert data.DATASETS == ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "mnist1d")


# ---------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A private cache folder holding one generated copy, so the tests generate once, not per test."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        ds = load("mnist1d")
    return folder, ds


@pytest.fixture
def mnist1d(mnist1d_cache, monkeypatch):
    folder, ds = mnist1d_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return ds


def test_mnist1d_published_split_shape_and_standardisation(mnist1d):
    ds = mnist1d
    assert ds.name == "mnist1d" and ds.num_classes == 10
    assert ds.input_shape == (1, 40)
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # 500 signals per class before the 80/20 split: every class is present in both parts.
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert float(ds.x_train.std()) == pytest.approx(1.0, abs=1e-3)


def test_mnist1d_generation_is_offline_deterministic_rng_neutral_and_replaces_a_bad_cache(
    mnist1d_cache, tmp_path, monkeypatch
):
    import random

    import mnist1d.data

    def forbidden(*args, **kwargs):
        raise AssertionError("the download path was used")

    folder, cached = mnist1d_cache
    (name,) = [p.name for p in (folder / "pcasgd-mpi").glob("mnist1d-*.npz")]
    (tmp_path / "pcasgd-mpi").mkdir()
    (tmp_path / "pcasgd-mpi" / name).write_bytes(b"not an npz file")
    monkeypatch.setattr(mnist1d.data, "get_dataset", forbidden)
    monkeypatch.setattr(mnist1d.data.requests, "get", forbidden)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    fresh = load("mnist1d")
    # make_dataset reseeds the global generators; the loader must restore them.
    assert (np.random.rand(), random.random()) == expected
    assert torch.equal(fresh.x_train, cached.x_train) and torch.equal(fresh.y_test, cached.y_test)
    # The bad file was replaced by a whole one, and the temporary file of the atomic write is gone.
    assert [p.name for p in (tmp_path / "pcasgd-mpi").iterdir()] == [name]
    with np.load(tmp_path / "pcasgd-mpi" / name) as f:
        assert np.array_equal(f["y_test"], cached.y_test.numpy())


def test_mnist1d_missing_package_is_one_clear_error(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    with pytest.raises(DataError, match="pip install mnist1d"):
        load("mnist1d")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3"])
def test_mnist1d_partitions_cover_the_train_set(mnist1d, scheme):
    shards = partition(mnist1d.y_train, 8, scheme, seed=0)
    assert len(shards) == 8 and all(len(s) > 0 for s in shards)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(4000))
    again = partition(mnist1d.y_train, 8, scheme, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if scheme != "iid":
        # Label skew: some agent holds far more of its top class than the 10 % of an even split.
        top = max(np.bincount(mnist1d.y_train[s].numpy(), minlength=10).max() / len(s) for s in shards)
        assert top > 0.3
