"""Data sets for the experiments, all local: nothing here touches the network.

``load_dataset(spec)`` understands

* ``"mnist1d"`` (default): MNIST-1D (Greydanus 2020), *generated* by the ``mnist1d`` package with
  its default arguments (4000 train / 1000 test, 40 features). Only ``make_dataset`` is called,
  never ``get_dataset`` (which downloads). The arrays are cached as ``.npz`` under the cache dir.
* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images), split 80/20 with a fixed seed.
* a path to an ``.npz`` holding ``x_train, y_train, x_test, y_test``;
* a path to a directory holding the four MNIST IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``; ``.gz``
  and the ``train-images.idx3-ubyte`` spelling are accepted too).

Inputs are flattened to ``(N, features)`` float32, labels are int64 in ``0..classes-1``. A file
that is malformed raises ``ValueError`` naming the file, the key and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_dataset", "read_idx", "cache_dir", "DATASETS"]

#: Named data sets (anything else is taken as a path).
DATASETS = ("mnist1d", "digits")

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "train": int(self.x_train.shape[0]),
            "test": int(self.x_test.shape[0]),
            "features": self.num_features,
            "classes": self.num_classes,
        }


def cache_dir() -> Path:
    """``$BATCHNORM_CACHE``, else ``$XDG_CACHE_HOME/batchnorm``, else ``~/.cache/batchnorm``."""
    if os.environ.get("BATCHNORM_CACHE"):
        return Path(os.environ["BATCHNORM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchnorm"


def load_dataset(spec: str = "mnist1d", *, cache: str | os.PathLike | None = None) -> Dataset:
    """Load a named data set or a user's file; see the module docstring."""
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"data set must be a name or a path, got {type(spec).__name__}")
    if spec == "mnist1d":
        return _mnist1d(Path(cache) if cache is not None else cache_dir())
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"unknown data set {str(spec)!r}: not one of {list(DATASETS)} and no such file or "
            "directory"
        )
    if path.is_dir():
        return _mnist_idx_dir(path)
    if path.suffix == ".npz":
        return _npz(path)
    raise ValueError(
        f"{path}: expected an .npz file (x_train, y_train, x_test, y_test) or a directory of "
        "MNIST IDX files"
    )


# ---------------------------------------------------------------------------------- validation


def _features(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{where}: inputs must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{where}: inputs must have shape (N, features...) with rank >= 2, got shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{where}: no examples (shape {x.shape})")
    flat = np.asarray(x, dtype=np.float32).reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        raise ValueError(f"{where}: inputs have no features (shape {x.shape})")
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{where}: inputs contain NaN or infinity")
    return flat


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must have shape (N,), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{where}: labels must be whole numbers, got dtype {y.dtype}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    return labels


def _make(name: str, x_train, y_train, x_test, y_test, where: dict[str, str]) -> Dataset:
    """Validate and normalise four arrays; ``where`` names each array's origin for errors."""
    xtr = _features(np.asarray(x_train), where["x_train"])
    xte = _features(np.asarray(x_test), where["x_test"])
    ytr = _labels(np.asarray(y_train), where["y_train"])
    yte = _labels(np.asarray(y_test), where["y_test"])
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name}: {x.shape[0]} {split} inputs but {y.shape[0]} {split} labels; they "
                "must be equal"
            )
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(
            f"{name}: train inputs have {xtr.shape[1]} features but test inputs have {xte.shape[1]}"
        )
    if xtr.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 training examples, got {xtr.shape[0]}")
    if xte.shape[0] < 1:
        raise ValueError(f"{name}: need at least 1 test example, got 0")
    classes = np.unique(ytr)
    if classes.size < 2:
        raise ValueError(f"{name}: training labels must contain at least 2 classes")
    # Labels index the classifier's outputs (0 .. K-1, K = largest + 1): a stray huge label
    # would make a huge output layer, and a test label never seen in training is unlearnable.
    if ytr.max() >= 2 * classes.size + 16:
        raise ValueError(
            f"{name}: training labels run up to {int(ytr.max())} but only {classes.size} "
            "distinct classes occur; labels must be class indices 0 .. K-1 (remap them, e.g. "
            "with np.unique(y, return_inverse=True))"
        )
    unseen = np.setdiff1d(yte, classes)
    if unseen.size:
        raise ValueError(
            f"{name}: test label(s) {unseen[:5].tolist()} never occur in the training labels "
            f"({classes[:10].tolist()}{' ...' if classes.size > 10 else ''})"
        )
    return Dataset(name, xtr, ytr, xte, yte)


# ------------------------------------------------------------------------------------- sources


def _mnist1d(directory: Path) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # only used for downloading, which we never do
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            return _npz(path, name="mnist1d")
        except (ValueError, OSError):
            pass  # a damaged cache is regenerated below rather than reported
    # make_dataset reseeds NumPy's and Python's global generators; keep the caller's streams.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    arrays = {
        "x_train": data["x"],
        "y_train": data["y"],
        "x_test": data["x_test"],
        "y_test": data["y_test"],
    }
    dataset = _make("mnist1d", **arrays, where={k: f"mnist1d {k}" for k in arrays})
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
    )
    os.replace(tmp, path)
    return dataset


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0  # pixel values are 0..16
    y = np.asarray(bunch.target)
    order = np.random.default_rng(0).permutation(len(y))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return _make(
        "digits", x[train], y[train], x[test], y[test], where={k: f"digits {k}" for k in _NPZ_KEYS}
    )


def _npz(path: Path, name: str | None = None) -> Dataset:
    unreadable = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)
    if not zipfile.is_zipfile(path):  # np.load would guess a pickle and say so
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise ValueError(
                    f"{path}: holds a single array, not an .npz archive of named arrays"
                )
        raise ValueError(f"{path}: not a valid .npz file (not a zip archive)")
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ValueError(f"{path}: not a valid .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz archive of named arrays")
    with archive:
        missing = [k for k in _NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: missing array(s) {missing}; an .npz data set needs "
                f"{list(_NPZ_KEYS)}, found {sorted(archive.files)}"
            )
        arrays = {}
        for key in _NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except unreadable as exc:  # object arrays (pickles) and damaged members
                raise ValueError(f"{path} [{key}]: cannot read ({exc})") from exc
    where = {k: f"{path} [{k}]" for k in _NPZ_KEYS}
    return _make(name or path.stem, **arrays, where=where)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a native-endian array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX data type code 0x{code:02x}; known: "
            f"{[f'0x{c:02x}' for c in _IDX_DTYPES]}"
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {dims} ({expected} data bytes) but the file "
            f"holds {len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(directory: Path, key: str) -> Path:
    for stem in _IDX_NAMES[key]:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise ValueError(
        f"{directory}: no MNIST IDX file for {key} (looked for {list(_IDX_NAMES[key])}, "
        "optionally .gz)"
    )


def _mnist_idx_dir(directory: Path) -> Dataset:
    paths = {key: _find_idx(directory, key) for key in _IDX_NAMES}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].dtype == np.uint8:
            arrays[key] = arrays[key].astype(np.float32) / 255.0  # pixels to [0, 1]
    return _make(
        directory.name or str(directory), **arrays, where={k: str(p) for k, p in paths.items()}
    )
