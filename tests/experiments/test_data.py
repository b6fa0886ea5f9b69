"""Data loaders on valid and malformed files (the files are written by the tests)."""

from __future__ import annotations

import gzip
import socket
import struct

import numpy as np
import pytest

from batchnorm.experiments.data import load_dataset, read_idx


def _arrays(rng, n_train=12, n_test=5, shape=(3, 4), classes=3):
    return {
        "x_train": rng.normal(size=(n_train, *shape)),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.normal(size=(n_test, *shape)),
        "y_test": np.arange(n_test) % classes,
    }


def _write_idx(path, array, code=0x08, dims=None, compress=False):
    dims = array.shape if dims is None else dims
    body = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(body)


def _mnist_dir(tmp_path, rng, compress=False, n_train=6, n_test=4):
    suffix = ".gz" if compress else ""
    images = {
        k: rng.integers(0, 256, size=(n, 5, 5), dtype=np.uint8)
        for k, n in (("train", n_train), ("t10k", n_test))
    }
    labels = {
        "train": np.arange(n_train, dtype=np.uint8) % 4,
        "t10k": np.arange(n_test, dtype=np.uint8) % 4,
    }
    for split in ("train", "t10k"):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{suffix}", images[split], compress=compress
        )
        _write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels[split], compress=compress
        )
    return images, labels


# ------------------------------------------------------------------------------------- .npz


def test_npz_valid_is_flattened_and_typed(tmp_path, rng):
    arrays = _arrays(rng)
    np.savez(tmp_path / "mine.npz", **arrays)
    data = load_dataset(str(tmp_path / "mine.npz"))
    assert data.x_train.shape == (12, 12) and data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    np.testing.assert_allclose(data.x_test, arrays["x_test"].reshape(5, 12), rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, arrays["y_train"])
    assert data.num_classes == 3 and data.num_features == 12 and data.name == "mine"


def test_npz_whole_number_float_labels_are_accepted(tmp_path, rng):
    arrays = _arrays(rng)
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    np.savez(tmp_path / "f.npz", **arrays)
    assert load_dataset(str(tmp_path / "f.npz")).y_train.dtype == np.int64


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.pop("y_test"), "missing array"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "12 train inputs but 11 train labels"),
        (lambda a: a.update(x_test=a["x_test"][:, :2]), "features"),
        (lambda a: a.update(y_train=a["y_train"] + 0.5), "whole numbers"),
        (lambda a: a.update(y_test=-a["y_test"] - 1), ">= 0"),
        (lambda a: a.update(y_train=a["y_train"][:, None]), "shape (N,)"),
        (lambda a: a.update(x_train=np.full((12,), 1.0)), "rank >= 2"),
        (lambda a: a.update(x_train=np.where(a["x_train"] > 1, np.nan, a["x_train"])), "NaN"),
        (lambda a: a.update(x_train=np.array(["a"] * 24).reshape(12, 2)), "numeric"),
        (lambda a: a.update(y_train=np.zeros(12, dtype=np.int64)), "2 classes"),
        (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "no examples"),
        (lambda a: a["y_train"].__setitem__(0, 10**12), "class indices 0 .. K-1"),
        (lambda a: a.update(y_test=a["y_test"] + 7), "never occur in the training labels"),
    ],
)
def test_npz_malformed_raises_clear_error(tmp_path, rng, mutate, message):
    arrays = _arrays(rng)
    mutate(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="bad") as info:
        load_dataset(str(tmp_path / "bad.npz"))
    assert message in str(info.value)


def test_npz_with_pickled_objects_is_refused(tmp_path, rng):
    arrays = _arrays(rng)
    arrays["x_train"] = np.array([object()] * 12, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ValueError, match=r"obj\.npz \[x_train\]"):
        load_dataset(str(tmp_path / "obj.npz"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a zip archive"),
        (b"not a zip at all", "not a zip archive"),
        (b"PK\x03\x04garbage", "not a zip archive"),
        (b"\x93NUMPY\x01\x00", "holds a single array"),
    ],
)
def test_npz_garbage_raises_value_error(tmp_path, content, message):
    (tmp_path / "junk.npz").write_bytes(content)
    with pytest.raises(ValueError, match="junk.npz") as info:
        load_dataset(str(tmp_path / "junk.npz"))
    assert message in str(info.value) and "pickle" not in str(info.value)


def test_unknown_name_and_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected an .npz"):
        load_dataset(str(tmp_path / "data.csv"))
    with pytest.raises(TypeError):
        load_dataset(3)


# -------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_directory(tmp_path, rng, compress):
    images, labels = _mnist_dir(tmp_path, rng, compress=compress)
    data = load_dataset(str(tmp_path))
    assert data.x_train.shape == (6, 25) and data.x_test.shape == (4, 25)
    np.testing.assert_allclose(data.x_train, images["train"].reshape(6, 25) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, labels["t10k"])
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


@pytest.mark.parametrize(
    ("code", "dtype"), [(0x0C, np.int32), (0x0E, np.float64), (0x0B, np.int16), (0x0D, np.float32)]
)
def test_read_idx_big_endian_types(tmp_path, rng, code, dtype):
    array = (rng.normal(size=(3, 2, 4)) * 1000).astype(dtype)
    _write_idx(tmp_path / "a.idx", array, code=code)
    out = read_idx(tmp_path / "a.idx")
    assert out.shape == (3, 2, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x03", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "declares shape (3,)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "holds 2 data bytes"),
    ],
)
def test_read_idx_malformed(tmp_path, raw, message):
    (tmp_path / "bad-idx").write_bytes(raw)
    with pytest.raises(ValueError, match="bad-idx") as info:
        read_idx(tmp_path / "bad-idx")
    assert message in str(info.value)


def test_mnist_idx_missing_file_and_count_mismatch(tmp_path, rng):
    _mnist_dir(tmp_path, rng)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no MNIST IDX file for y_test"):
        load_dataset(str(tmp_path))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="4 test inputs but 3 test labels"):
        load_dataset(str(tmp_path))


def test_mnist_idx_corrupt_gzip(tmp_path, rng):
    _mnist_dir(tmp_path, rng, compress=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_dataset(str(tmp_path))


# ------------------------------------------------------------------------- bundled data sets


def test_mnist1d_is_generated_offline_and_cached(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the MNIST-1D loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(7)  # noqa: NPY002 (the legacy global stream is what must be kept)
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    data = load_dataset("mnist1d", cache=tmp_path)
    assert (data.x_train.shape, data.x_test.shape) == ((4000, 40), (1000, 40))
    assert data.num_classes == 10 and set(np.unique(data.y_train)) == set(range(10))
    # The generator reseeds NumPy's global stream; the loader must hand it back untouched.
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    again = load_dataset("mnist1d", cache=tmp_path)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)


def test_digits():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.max() <= 1.0 and data.num_classes == 10
