"""Shared pieces of the API tests: the active-backend fixture and small data makers.

The kernel tests take a backend *module* (conftest.py); the API tests need the backend
*active* (``fastnn.use_backend``), since layers, losses and optimizers call whichever
backend is current. A module opts in with::

    from _helpers import active_backend  # noqa: F401  (fixture)
    pytestmark = pytest.mark.usefixtures("active_backend")

A backend that cannot load makes its tests error, never skip.
"""
import numpy as np
import pytest

import fastnn as fn

SEED = 20240611

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu")
LOSSES = ("mse", "mae", "huber", "cross_entropy", "binary_cross_entropy", "hinge")
LABEL_LOSSES = ("cross_entropy", "hinge")


@pytest.fixture(params=fn.kernels.BACKENDS)
def active_backend(request):
    """Run the test with each kernel backend active in turn; yields its name."""
    with fn.use_backend(request.param):
        yield request.param


def rng(offset=0):
    """A fixed-seed generator (``offset`` gives independent streams in one test)."""
    return np.random.default_rng(SEED + offset)


def mlp(sizes, activation="tanh", dtype="float32", seed=0, **dense_kwargs):
    """A Sequential of Dense layers ``sizes[0] -> ... -> sizes[-1]``; identity output."""
    last = len(sizes) - 2
    return fn.Sequential([
        fn.Dense(sizes[i], sizes[i + 1], activation=activation if i < last else None,
                 dtype=dtype, seed=seed + i, **dense_kwargs)
        for i in range(len(sizes) - 1)])


def targets_for(loss, n, k, gen):
    """Random targets of the right kind for ``loss`` on a network with ``k`` outputs."""
    if loss in LABEL_LOSSES:
        return gen.integers(0, k, size=n)
    if loss == "binary_cross_entropy":
        return (gen.random((n, k)) < 0.5).astype(np.float64)
    return gen.normal(size=(n, k))


def linear_threshold_task(n, gen, n_features=5, n_labels=3):
    """Multi-label data: label j is 1 where the j-th linear function of x is positive."""
    X = gen.normal(size=(n, n_features))
    W = gen.normal(size=(n_features, n_labels))
    return X.astype(np.float32), (X @ W > 0).astype(np.float32)


def noisy_sine(n, gen, noise=0.1):
    """x uniform on [-3, 3], y = sin(x) + noise * N(0, 1); both (n, 1)."""
    x = gen.uniform(-3.0, 3.0, size=(n, 1))
    return x.astype(np.float32), (np.sin(x) + noise * gen.normal(size=x.shape)).astype(np.float32)


def blobs(n_per_class, gen, centers=((-2.0, 0.0), (2.0, 0.0), (0.0, 2.5)), scale=0.6):
    """Gaussian blobs around ``centers``: X (n_per_class * k, 2) float32, y int64."""
    X = np.concatenate([gen.normal(c, scale, size=(n_per_class, 2)) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    order = gen.permutation(len(y))
    return X[order].astype(np.float32), y[order]
