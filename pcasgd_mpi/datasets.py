"""Datasets, per-agent partitions and per-agent minibatch streams.

Nothing here is downloaded: ``digits`` ships with scikit-learn, ``synthetic``
and ``mnist1d`` are generated, and MNIST, Fashion-MNIST and CIFAR-10 are read from files the
user already has (the layouts torchvision leaves behind are recognised).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import random
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "mnist1d")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_SUBDIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


class DataError(ValueError):
    """A dataset, partition scheme or data file is unusable as given."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


def load(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    synthetic_shape: tuple[int, ...] = (1, 8, 8),
    synthetic_classes: int = 10,
    synthetic_size: tuple[int, int] = (2000, 500),
) -> Dataset:
    """Load ``name`` as float32 inputs and int64 labels, normalised with train statistics.

    ``seed`` only affects ``synthetic``; the other datasets have fixed splits so
    every run is evaluated on the same test set.
    """
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        return _make_synthetic(seed, tuple(synthetic_shape), synthetic_classes, synthetic_size)
    if name in _IDX_SUBDIRS:
        return _load_idx_dataset(name, root)
    if name == "cifar10":
        return _load_cifar10(root)
    if name == "mnist1d":
        return _load_mnist1d()
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _standardise(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]):
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    # A constant input (e.g. a blank toy file) would otherwise divide by zero.
    std = np.where(std < 1e-8, 1.0, std)
    out = []
    for x in (x_train, x_test):
        x = x.astype(np.float32, copy=False)
        x -= mean.astype(np.float32)
        x /= std.astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return out


def _make_dataset(name, x_train, y_train, x_test, y_test, num_classes, axes) -> Dataset:
    xt, xv = _standardise(x_train, x_test, axes)
    return Dataset(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(np.array(y_train, dtype=np.int64)),
        x_test=xv,
        y_test=torch.from_numpy(np.array(y_test, dtype=np.int64)),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in xt.shape[1:]),
    )


def _digits_file() -> Path:
    # The CSV scikit-learn ships; read directly because importing sklearn costs seconds per rank.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'digits' needs scikit-learn installed (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():
        raise DataError(f"scikit-learn's digits file is missing at {path}; reinstall scikit-learn")
    return path


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits() -> Dataset:
    raw = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)
    x = (raw[:, :-1].reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = raw[:, -1].astype(np.int64)
    # Fixed seed: the test set must not change between runs being compared.
    tr, te = _stratified_split(y, 0.2, seed=0)
    return _make_dataset("digits", x[tr], y[tr], x[te], y[te], 10, axes=(0, 1, 2, 3))


def _make_synthetic(seed, shape, num_classes, size) -> Dataset:
    if not shape or any(int(d) < 1 for d in shape):
        raise DataError(f"synthetic shape {shape} must be non-empty with positive sizes")
    if num_classes < 2:
        raise DataError(f"synthetic data needs at least 2 classes, got {num_classes}")
    n_train, n_test = (int(n) for n in size)
    if n_train < 1 or n_test < 1:
        raise DataError(f"synthetic size {tuple(size)} must be two positive counts (train, test)")
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((num_classes, *shape))
    y = rng.integers(0, num_classes, size=n_train + n_test)
    # At this noise a linear model gets roughly 80% on 8x8 inputs: learnable, not saturated.
    noise = 2.5 * rng.standard_normal((n_train + n_test, *shape))
    x = (prototypes[y] + noise).astype(np.float32)
    axes = tuple(range(x.ndim))
    return _make_dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, axes)


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); re-download it") from exc


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    raw = _read_bytes(path)
    # Magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path}: bad magic number, expected an IDX file of bytes with {ndim} dims; re-download it")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: header promises {math.prod(dims)} bytes of data but the file holds "
            f"{len(raw) - header}; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_files(folders: list[Path], names: tuple[str, ...], allow_gz: bool) -> list[Path] | None:
    """Return the paths of all ``names`` from the first folder that holds every one of them."""
    for folder in folders:
        found = []
        for name in names:
            options = [folder / name] + ([folder / f"{name}.gz"] if allow_gz else [])
            hit = next((p for p in options if p.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def _require_root(name: str, root, what: str) -> Path:
    if root is None:
        raise DataError(f"dataset {name!r} needs --data-dir pointing at a folder with {what}")
    return Path(root).expanduser()


def _load_idx_dataset(name: str, root) -> Dataset:
    listing = ", ".join(_IDX_FILES) + " (each optionally .gz)"
    root = _require_root(name, root, listing)
    folders = [root, root / _IDX_SUBDIRS[name]]
    paths = _find_files(folders, _IDX_FILES, allow_gz=True)
    if paths is None:
        searched = ", ".join(str(f) for f in folders)
        raise DataError(f"dataset {name!r}: expected {listing} in one of: {searched}")
    x_tr, y_tr, x_te, y_te = (_read_idx(p, 3 if i % 2 == 0 else 1) for i, p in enumerate(paths))
    for images, labels, img_path, lbl_path in ((x_tr, y_tr, *paths[:2]), (x_te, y_te, *paths[2:])):
        if len(images) != len(labels) or len(labels) == 0:
            raise DataError(
                f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}; "
                "the files do not belong together, re-download them"
            )
        if labels.max() > 9:
            raise DataError(f"{lbl_path}: label {labels.max()} outside 0..9; re-download it")
    scale = np.float32(1 / 255)
    return _make_dataset(name, x_tr[:, None] * scale, y_tr, x_te[:, None] * scale, y_te, 10, axes=(0, 1, 2, 3))


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR-10 batch holds (dicts, lists, bytes, numpy arrays): a pickle
    naming anything else, such as a function to call, is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # arrays pickled with protocol 5 by a newer numpy (a re-saved copy of the files)
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes for Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused to load ({exc}); use the original CIFAR-10 python files") from None
    # A damaged pickle can fail in many ways; all of them mean the same to the user.
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({exc}); re-download it") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: missing b'data' or b'labels'; not a CIFAR-10 python batch")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data) or len(data) == 0:
        raise DataError(
            f"{path}: expected N x 3072 pixels with N labels, got data {data.shape} and "
            f"{len(labels)} labels; re-download it"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels outside 0..9; re-download it")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def _load_cifar10(root) -> Dataset:
    listing = "cifar-10-batches-py/ (data_batch_1..5, test_batch)"
    root = _require_root("cifar10", root, listing)
    folders = [root / "cifar-10-batches-py", root]
    paths = _find_files(folders, _CIFAR_FILES, allow_gz=False)
    if paths is None:
        searched = ", ".join(str(f) for f in folders)
        raise DataError(f"dataset 'cifar10': expected {', '.join(_CIFAR_FILES)} in one of: {searched}")
    batches = [_read_cifar_batch(p) for p in paths]
    x_tr = np.concatenate([b[0] for b in batches[:5]]).astype(np.float32)
    y_tr = np.concatenate([b[1] for b in batches[:5]])
    x_te, y_te = batches[5][0].astype(np.float32), batches[5][1]
    x_tr /= 255
    x_te /= 255
    return _make_dataset("cifar10", x_tr, y_tr, x_te, y_te, 10, axes=(0, 2, 3))


# The published MNIST-1D split (Greydanus & Kobak 2020): make_dataset's defaults, seed 42.
MNIST1D_SPLIT = (4000, 1000)
MNIST1D_LENGTH = 40
_MNIST1D_CACHE_FORMAT = 1


def _mnist1d_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        raise DataError("dataset 'mnist1d' needs the mnist1d package (pip install mnist1d)") from None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pcasgd-mpi"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Run the package's generator with its default arguments, leaving the global RNGs as they were.

    Only ``make_dataset`` is called: ``get_dataset`` may fetch a file from the network.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(f"dataset 'mnist1d' needs the mnist1d package (pip install mnist1d): {exc}") from exc
    # make_dataset reseeds numpy's and Python's global generators; callers must not feel it.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {key: np.asarray(raw[key]) for key in ("x", "y", "x_test", "y_test")}


def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """The generated arrays, from a per-user cache file when one exists (generation takes seconds).

    Each of many ranks may find the cache missing and write it; the write is atomic (temporary
    file, then rename), so a reader sees either no file or a whole one.
    """
    path = _cache_dir() / f"mnist1d-{_mnist1d_version()}-v{_MNIST1D_CACHE_FORMAT}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in ("x", "y", "x_test", "y_test")}
        if len(arrays["y"]) == MNIST1D_SPLIT[0] and len(arrays["y_test"]) == MNIST1D_SPLIT[1]:
            return arrays
    # A missing, partial or foreign cache file only means generating again.
    except Exception:
        pass
    arrays = _generate_mnist1d()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only home only costs the generation next time
    return arrays


def _load_mnist1d() -> Dataset:
    arrays = _mnist1d_arrays()
    x_tr, x_te = (arrays[k].astype(np.float32)[:, None, :] for k in ("x", "x_test"))
    y_tr, y_te = arrays["y"], arrays["y_test"]
    if x_tr.shape != (MNIST1D_SPLIT[0], 1, MNIST1D_LENGTH) or x_te.shape != (MNIST1D_SPLIT[1], 1, MNIST1D_LENGTH):
        raise DataError(
            f"the mnist1d package generated {x_tr.shape} / {x_te.shape} signals instead of the "
            f"published {MNIST1D_SPLIT} x {MNIST1D_LENGTH}; install mnist1d>=0.0.2,<0.1"
        )
    return _make_dataset("mnist1d", x_tr, y_tr, x_te, y_te, 10, axes=(0, 1, 2))
