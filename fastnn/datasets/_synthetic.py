"""Generated toy problems: XOR and the CS231n spirals."""
import numpy as np

from .._validation import check_float, check_int, check_seed


def xor():
    """The four XOR points: X (4, 2) float32 corners of the unit square, y (4,) int64.

    Rows (0, 0), (0, 1), (1, 0), (1, 1) with labels ``x0 xor x1`` = 0, 1, 1, 0: the
    smallest problem no single-layer perceptron can solve.

    Returns
    -------
    X : ndarray, shape (4, 2), float32
    y : ndarray, shape (4,), int64
    """
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    return X, y


def spirals(n=100, classes=3, noise=0.2, seed=None):
    """The CS231n spirals, ``n`` points *per class*: X (n*classes, 2), y (n*classes,).

    Class j has radius ``r = linspace(0, 1, n)`` and angle
    ``t = linspace(4j, 4(j+1), n) + noise * N(0, 1)``, and its points are
    ``(r sin t, r cos t)``. Rows are grouped by class (class 0 first), so shuffle or
    use ``train_test_split`` before mini-batch training.

    Parameters
    ----------
    n : int >= 1, default 100
        Points per class.
    classes : int >= 1, default 3
        Number of spiral arms (classes).
    noise : float >= 0, default 0.2
        Standard deviation of the angle noise.
    seed : int, optional
        The same seed gives the same points; None draws fresh ones.

    Returns
    -------
    X : ndarray, shape (n * classes, 2), float32
    y : ndarray, shape (n * classes,), int64
    """
    n = check_int(n, "n", low=1)
    classes = check_int(classes, "classes", low=1)
    noise = check_float(noise, "noise", low=0.0)
    rng = np.random.default_rng(check_seed(seed))
    X = np.empty((n * classes, 2), dtype=np.float32)
    y = np.repeat(np.arange(classes, dtype=np.int64), n)
    radius = np.linspace(0.0, 1.0, n)
    for j in range(classes):
        angle = np.linspace(4.0 * j, 4.0 * (j + 1), n) + noise * rng.standard_normal(n)
        X[j * n:(j + 1) * n, 0] = radius * np.sin(angle)
        X[j * n:(j + 1) * n, 1] = radius * np.cos(angle)
    return X, y
