"""Iris and digits, read from the gzip-compressed CSV files shipped in ``data/``.

The files come from scikit-learn's ``sklearn/datasets/data/`` (BSD-3-Clause); see
``data/README.md`` for their original sources.
"""
import gzip
from importlib import resources

import numpy as np

from .._validation import check_bool


def _read_table(name, skip_header):
    """The numeric rows of the bundled ``data/<name>`` as a float64 (rows, cols) array."""
    path = resources.files(__package__).joinpath("data").joinpath(name)
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as text:
        return np.loadtxt(text, delimiter=",", dtype=np.float64, ndmin=2,
                          skiprows=1 if skip_header else 0)


def _split_target(table):
    """Features (all columns but the last) as float32 and the last column as int64 labels."""
    X = np.ascontiguousarray(table[:, :-1], dtype=np.float32)
    y = np.ascontiguousarray(table[:, -1], dtype=np.int64)
    return X, y


def load_iris():
    """Fisher's iris: X (150, 4) float32 in cm, y (150,) int64, 3 classes of 50.

    Columns: sepal length, sepal width, petal length, petal width.
    Classes: 0 setosa, 1 versicolor, 2 virginica. Setosa is linearly separable from
    the other two; versicolor and virginica are not separable from each other.

    Returns
    -------
    X : ndarray, shape (150, 4), float32
    y : ndarray, shape (150,), int64

    Examples
    --------
    >>> import fastnn as fn
    >>> X, y = fn.datasets.load_iris()
    >>> X.shape, y.shape
    ((150, 4), (150,))
    """
    return _split_target(_read_table("iris.csv.gz", skip_header=True))


def load_digits(scale=False):
    """UCI handwritten digits: X (1797, 64) float32 8x8 images, y (1797,) int64 in 0..9.

    Pixels are counts 0..16, left raw by default (row-major 8x8: ``X[i].reshape(8, 8)``).

    Parameters
    ----------
    scale : bool, default False
        Divide the pixels by 16, to [0, 1].

    Returns
    -------
    X : ndarray, shape (1797, 64), float32
    y : ndarray, shape (1797,), int64
    """
    check_bool(scale, "scale")
    X, y = _split_target(_read_table("digits.csv.gz", skip_header=False))
    if scale:
        X /= 16
    return X, y
