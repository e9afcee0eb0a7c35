"""Small datasets: bundled, generated, and readers for files a user downloaded.

Every loader returns ``(X, y)``: X float32 (n, d) C-contiguous, y int64 (n,) class labels
0..k-1. Nothing here needs the network or a dependency beyond numpy.

* ``xor()``, ``spirals(n, classes, noise, seed)``: generated toy problems.
* ``load_iris()``, ``load_digits(scale=False)``: bundled in ``fastnn/datasets/data/``.
  Both files are copied unchanged (iris gzip-compressed) from scikit-learn's
  ``sklearn/datasets/data/`` (BSD-3-Clause, Copyright (c) 2007-2026 The scikit-learn
  developers). Iris is R.A. Fisher's data (1936; UCI Machine Learning Repository, with
  scikit-learn's correction of the two UCI entries that differ from Fisher's paper);
  digits is the test set of the UCI "Optical Recognition of Handwritten Digits" data
  (E. Alpaydin, C. Kaynak, 1998). ``data/README.md`` gives the details.
* ``load_mnist(path, kind)``, ``read_idx(file)``: readers for the IDX files of MNIST
  (and datasets in its format, such as Fashion-MNIST) downloaded by the user.
* ``train_test_split(X, y, test_size, seed, stratify)``.
"""
from ._bundled import load_digits, load_iris
from ._idx import load_mnist, read_idx
from ._split import train_test_split
from ._synthetic import spirals, xor

__all__ = [
    "xor",
    "spirals",
    "load_iris",
    "load_digits",
    "load_mnist",
    "read_idx",
    "train_test_split",
]
