"""fastnn.datasets: bundled and generated data, the IDX reader, train_test_split."""
import gzip
import io
import struct

import numpy as np
import pytest

import fastnn.datasets as ds


def check_Xy(X, y, n, d):
    assert X.shape == (n, d) and X.dtype == np.float32 and X.flags.c_contiguous
    assert y.shape == (n,) and y.dtype == np.int64
    assert np.isfinite(X).all()


# ----------------------------------------------------------------------------------
# Bundled and generated datasets
# ----------------------------------------------------------------------------------

def test_xor_is_the_four_corners():
    X, y = ds.xor()
    check_Xy(X, y, 4, 2)
    np.testing.assert_array_equal(X, [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(y, [0, 1, 1, 0])
    np.testing.assert_array_equal(y, X[:, 0].astype(int) ^ X[:, 1].astype(int))


def test_iris_shapes_ranges_and_classes():
    X, y = ds.load_iris()
    check_Xy(X, y, 150, 4)
    np.testing.assert_array_equal(np.bincount(y), [50, 50, 50])
    np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 50))
    assert X.min() >= 0.1 and X.max() <= 7.9
    # Fisher's first and last rows.
    np.testing.assert_allclose(X[0], [5.1, 3.5, 1.4, 0.2], rtol=1e-6)
    np.testing.assert_allclose(X[-1], [5.9, 3.0, 5.1, 1.8], rtol=1e-6)
    # The published column means (cm): sepal length/width, petal length/width.
    np.testing.assert_allclose(X.mean(0), [5.843, 3.057, 3.758, 1.199], atol=1e-3)


def test_iris_setosa_is_separable_by_petal_length():
    X, y = ds.load_iris()
    assert X[y == 0, 2].max() < X[y != 0, 2].min()


def test_digits_shapes_ranges_and_classes():
    X, y = ds.load_digits()
    check_Xy(X, y, 1797, 64)
    assert X.min() == 0 and X.max() == 16
    np.testing.assert_array_equal(X, np.round(X))
    counts = np.bincount(y)
    assert len(counts) == 10 and counts.sum() == 1797 and counts.min() >= 170
    assert y[:10].tolist() == list(range(10))


def test_digits_scale_divides_by_16():
    X_raw, y_raw = ds.load_digits()
    X, y = ds.load_digits(scale=True)
    check_Xy(X, y, 1797, 64)
    assert X.min() == 0 and X.max() == 1
    np.testing.assert_array_equal(X, X_raw / 16)
    np.testing.assert_array_equal(y, y_raw)


def test_loaders_return_fresh_arrays():
    X, _ = ds.load_iris()
    X[:] = -1
    assert ds.load_iris()[0].min() > 0


def test_digits_scale_must_be_bool():
    with pytest.raises(TypeError, match="scale"):
        ds.load_digits(scale="yes")


def test_spirals_shapes_and_classes():
    X, y = ds.spirals(n=50, classes=4, seed=0)
    check_Xy(X, y, 200, 2)
    np.testing.assert_array_equal(np.bincount(y), [50] * 4)
    np.testing.assert_array_equal(y, np.repeat(np.arange(4), 50))
    # Radius grows linearly from 0 to 1 along each arm, whatever the angle noise.
    radius = np.hypot(X[:, 0], X[:, 1])
    np.testing.assert_allclose(radius, np.tile(np.linspace(0, 1, 50), 4), atol=1e-6)


def test_spirals_default_is_cs231n_setup():
    X, y = ds.spirals(seed=0)
    check_Xy(X, y, 300, 2)
    np.testing.assert_array_equal(np.bincount(y), [100, 100, 100])


def test_spirals_without_noise_follow_the_formula():
    X, _ = ds.spirals(n=20, classes=2, noise=0.0)
    r = np.linspace(0, 1, 20)
    for j in range(2):
        t = np.linspace(4 * j, 4 * (j + 1), 20)
        np.testing.assert_allclose(X[20 * j:20 * (j + 1)], np.c_[r * np.sin(t), r * np.cos(t)],
                                   atol=1e-6)


def test_spirals_reproducible_by_seed():
    a, ya = ds.spirals(seed=7)
    b, yb = ds.spirals(seed=7)
    c, _ = ds.spirals(seed=8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"n": 0}, ValueError, "n"),
    ({"n": 2.5}, TypeError, "n"),
    ({"classes": 0}, ValueError, "classes"),
    ({"noise": -0.1}, ValueError, "noise"),
    ({"noise": float("nan")}, ValueError, "noise"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": "abc"}, TypeError, "seed"),
])
def test_spirals_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        ds.spirals(**kwargs)


# ----------------------------------------------------------------------------------
# IDX files (written here: MNIST itself is not downloaded by the tests)
# ----------------------------------------------------------------------------------

IDX_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
                  np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array):
    """The IDX encoding of ``array``: magic, big-endian sizes, big-endian data."""
    array = np.asarray(array)
    code = IDX_TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_mnist(directory, kind, images, labels, compress):
    prefix = "train" if kind == "train" else "t10k"
    suffix = ".gz" if compress else ""
    write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
    write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)


def mnist_like(n, seed, rows=28, cols=28):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(array), compress)
    out = ds.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0] = 0  # writable, owns its memory


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_labels_vector_and_file_object(tmp_path, compress):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    data = idx_bytes(labels)
    path = write(tmp_path / "labels", data, compress)
    np.testing.assert_array_equal(ds.read_idx(str(path)), labels)
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(ds.read_idx(handle), labels)
    np.testing.assert_array_equal(ds.read_idx(io.BytesIO(path.read_bytes())), labels)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("kind", ["train", "test"])
def test_load_mnist_round_trip(tmp_path, compress, kind):
    images, labels = mnist_like(6, seed=1)
    write_mnist(tmp_path, kind, images, labels, compress)
    X, y = ds.load_mnist(tmp_path, kind=kind)
    check_Xy(X, y, 6, 784)
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_allclose(X, images.reshape(6, 784) / 255, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_picks_the_requested_kind(tmp_path):
    train = mnist_like(4, seed=2)
    test = mnist_like(3, seed=3)
    write_mnist(tmp_path, "train", *train, compress=True)
    write_mnist(tmp_path, "test", *test, compress=False)
    assert len(ds.load_mnist(str(tmp_path))[0]) == 4
    X, y = ds.load_mnist(tmp_path, kind="test")
    np.testing.assert_array_equal(y, test[1])


def test_load_mnist_other_image_size(tmp_path):
    images, labels = mnist_like(3, seed=4, rows=4, cols=5)
    write_mnist(tmp_path, "train", images, labels, compress=False)
    X, _ = ds.load_mnist(tmp_path)
    assert X.shape == (3, 20)
    np.testing.assert_allclose(X[1], images[1].ravel() / 255, rtol=1e-6)


def test_load_mnist_missing_directory_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ds.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        ds.load_mnist(tmp_path)
    images, labels = mnist_like(2, seed=5)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(images), compress=True)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        ds.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        ds.load_mnist(tmp_path, kind="test")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_corrupt_magic_raises(tmp_path, compress):
    images, labels = mnist_like(2, seed=6)
    data = bytearray(idx_bytes(images))
    data[0] = 0x12
    write(tmp_path / "bad", bytes(data), compress)
    with pytest.raises(ValueError, match="magic number 0x12000803"):
        ds.read_idx(tmp_path / "bad")
    data = bytearray(idx_bytes(images))
    data[2] = 0x07  # no such type
    write(tmp_path / "bad", bytes(data), compress)
    with pytest.raises(ValueError, match="not an IDX file"):
        ds.read_idx(tmp_path / "bad")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_truncated_file_raises(tmp_path, compress):
    images, _ = mnist_like(3, seed=7)
    data = idx_bytes(images)
    for cut, match in [(len(data) - 1, "truncated"), (10, "truncated"), (2, "magic number")]:
        write(tmp_path / "short", data[:cut], compress)
        with pytest.raises(ValueError, match=match):
            ds.read_idx(tmp_path / "short")
    write(tmp_path / "long", data + b"\0", compress)
    with pytest.raises(ValueError, match="trailing bytes"):
        ds.read_idx(tmp_path / "long")


def test_truncated_gzip_stream_raises(tmp_path):
    images, _ = mnist_like(3, seed=8)
    packed = gzip.compress(idx_bytes(images))
    (tmp_path / "cut.gz").write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ValueError, match="gzip"):
        ds.read_idx(tmp_path / "cut.gz")


def test_load_mnist_rejects_wrong_magic_for_its_role(tmp_path):
    images, labels = mnist_like(3, seed=9)
    # Labels where images belong: a valid IDX file, but 1-D.
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(labels), compress=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels), compress=False)
    with pytest.raises(ValueError, match="0x00000803"):
        ds.load_mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images), compress=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels.astype(np.int32)), False)
    with pytest.raises(ValueError, match="0x00000801"):
        ds.load_mnist(tmp_path)


def test_load_mnist_count_mismatch_raises(tmp_path):
    images, labels = mnist_like(3, seed=10)
    write_mnist(tmp_path, "train", images, labels[:2], compress=False)
    with pytest.raises(ValueError, match="3 images .* 2 labels"):
        ds.load_mnist(tmp_path)


def test_load_mnist_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ds.load_mnist(tmp_path, kind="validation")
    with pytest.raises(TypeError, match="path"):
        ds.load_mnist(3)
    with pytest.raises(TypeError, match="file"):
        ds.read_idx(3.5)


# ----------------------------------------------------------------------------------
# train_test_split
# ----------------------------------------------------------------------------------

def indexed(n, d=3):
    """X whose first column is the row index, so rows can be traced through a split."""
    X = np.zeros((n, d), dtype=np.float32)
    X[:, 0] = np.arange(n)
    return X, np.arange(n) % 3


@pytest.mark.parametrize("test_size, n_test", [(0.25, 25), (0.2, 20), (0.333, 34), (10, 10),
                                               (1, 1), (99, 99)])
def test_split_sizes(test_size, n_test):
    X, y = indexed(100)
    X_train, X_test, y_train, y_test = ds.train_test_split(X, y, test_size=test_size, seed=0)
    assert X_test.shape == (n_test, 3) and y_test.shape == (n_test,)
    assert X_train.shape == (100 - n_test, 3) and y_train.shape == (100 - n_test,)
    assert X_train.dtype == X.dtype and y_train.dtype == y.dtype


def test_split_parts_are_disjoint_and_cover_everything():
    X, y = indexed(101)
    X_train, X_test, y_train, y_test = ds.train_test_split(X, y, seed=3)
    train_ids, test_ids = X_train[:, 0].astype(int), X_test[:, 0].astype(int)
    assert not set(train_ids) & set(test_ids)
    np.testing.assert_array_equal(np.sort(np.r_[train_ids, test_ids]), np.arange(101))
    # Rows stay paired with their labels.
    np.testing.assert_array_equal(y_train, train_ids % 3)
    np.testing.assert_array_equal(y_test, test_ids % 3)
    assert not np.array_equal(train_ids, np.sort(train_ids))  # shuffled


def test_split_reproducible_by_seed():
    X, y = indexed(50)
    a = ds.train_test_split(X, y, seed=1)
    b = ds.train_test_split(X, y, seed=1)
    c = ds.train_test_split(X, y, seed=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_split_stratified_keeps_class_shares():
    X, y = ds.load_iris()
    X_train, X_test, y_train, y_test = ds.train_test_split(X, y, test_size=0.2, seed=0,
                                                           stratify=True)
    np.testing.assert_array_equal(np.bincount(y_test), [10, 10, 10])
    np.testing.assert_array_equal(np.bincount(y_train), [40, 40, 40])


@pytest.mark.parametrize("seed", range(5))
def test_split_stratified_uneven_classes(seed):
    y = np.repeat([7, 3, 5], [70, 20, 10])
    X = np.arange(100).reshape(-1, 1)
    X_train, X_test, y_train, y_test = ds.train_test_split(X, y, test_size=0.25, seed=seed,
                                                           stratify=True)
    assert len(y_test) == 25 and len(y_train) == 75
    for label, count in [(7, 70), (3, 20), (5, 10)]:
        assert abs(np.sum(y_test == label) - count * 0.25) <= 1
    assert not set(X_train[:, 0]) & set(X_test[:, 0])
    np.testing.assert_array_equal(y[X_test[:, 0]], y_test)


def test_split_stratified_string_labels():
    y = np.array(["a", "b"] * 10)
    _, _, y_train, y_test = ds.train_test_split(np.zeros((20, 2)), y, test_size=0.5, seed=0,
                                                stratify=True)
    assert sorted(y_test.tolist()) == ["a"] * 5 + ["b"] * 5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"test_size": 0.0}, ValueError, "test_size"),
    ({"test_size": 1.0}, ValueError, "test_size"),
    ({"test_size": -0.5}, ValueError, "test_size"),
    ({"test_size": 0}, ValueError, "test_size"),
    ({"test_size": 10}, ValueError, "test_size"),
    ({"test_size": 0.95}, ValueError, "test_size"),
    ({"test_size": "half"}, TypeError, "test_size"),
    ({"test_size": True}, TypeError, "test_size"),
    ({"seed": -3}, ValueError, "seed"),
    ({"stratify": "yes"}, TypeError, "stratify"),
])
def test_split_bad_arguments(kwargs, error, match):
    X, y = indexed(10)
    with pytest.raises(error, match=match):
        ds.train_test_split(X, y, **kwargs)


def test_split_bad_data():
    X, y = indexed(10)
    with pytest.raises(ValueError, match="9 samples but X has 10"):
        ds.train_test_split(X, y[:9])
    with pytest.raises(ValueError, match="y must be 1-D"):
        ds.train_test_split(X, y.reshape(5, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ds.train_test_split(X[:1], y[:1])
    with pytest.raises(ValueError, match="X must be an array"):
        ds.train_test_split(3.0, y)
