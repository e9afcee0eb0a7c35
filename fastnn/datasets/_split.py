"""Random train/test split, optionally stratified by class."""
import numbers

import numpy as np

from .._validation import check_bool, check_float, check_seed


def _test_count(test_size, n):
    """Number of test samples: a fraction in (0, 1) of n (rounded up) or a count."""
    if isinstance(test_size, (bool, np.bool_)) or not isinstance(test_size, numbers.Real):
        raise TypeError(f"test_size must be a float fraction in (0, 1) or an int count, "
                        f"got {type(test_size).__name__}")
    if isinstance(test_size, numbers.Integral):
        if not 1 <= test_size <= n - 1:
            raise ValueError(f"test_size as a count must be in [1, {n - 1}] for {n} samples "
                             f"(both parts need at least one), got {test_size}")
        return int(test_size)
    fraction = check_float(test_size, "test_size", low=0.0, high=1.0,
                           low_open=True, high_open=True)
    n_test = int(np.ceil(fraction * n))
    if n_test > n - 1:
        raise ValueError(f"test_size={fraction} of {n} samples leaves {n - n_test} for "
                         f"training; both parts need at least one sample")
    return n_test


def _stratified_indices(y, n_test, rng):
    """Test and train indices drawn class by class.

    Each class c gets ``n_c * n_test // n`` test samples; the few left over go to the
    classes with the largest remainders, so every class's test count is within one of
    its exact share and the total is ``n_test``.
    """
    _, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes)
    share, remainder = np.divmod(counts * n_test, len(y))
    short = n_test - int(share.sum())
    share[np.argsort(-remainder, kind="stable")[:short]] += 1
    test, train = [], []
    for c, n_c_test in enumerate(share):
        members = rng.permutation(np.flatnonzero(codes == c))
        test.append(members[:n_c_test])
        train.append(members[n_c_test:])
    return rng.permutation(np.concatenate(test)), rng.permutation(np.concatenate(train))


def train_test_split(X, y, test_size=0.25, seed=None, stratify=False):
    """Shuffle and split (X, y) into a training and a test part.

    The parts are disjoint, cover all n samples, are in random order, and keep X's and
    y's dtypes; the same ``seed`` gives the same split.

    Parameters
    ----------
    X : array-like, shape (n, ...)
        Samples, n >= 2.
    y : array-like, shape (n,)
        Labels or targets.
    test_size : float in (0, 1) or int in [1, n - 1], default 0.25
        A fraction (the test part gets ``ceil(test_size * n)`` samples) or a count.
    seed : int, optional
        Seed of the shuffle (None: fresh randomness).
    stratify : bool, default False
        Split each class of y in that proportion (each class's test count within one
        of its exact share).

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray

    Raises
    ------
    ValueError
        Mismatched lengths, y not 1-D, fewer than 2 samples, or a ``test_size`` that
        leaves a part empty.
    TypeError
        ``test_size`` is neither a float nor an int.

    Examples
    --------
    >>> import fastnn as fn
    >>> X, y = fn.datasets.load_iris()
    >>> X_train, X_test, y_train, y_test = fn.datasets.train_test_split(
    ...     X, y, test_size=0.2, seed=0, stratify=True)
    >>> len(X_train), len(X_test)
    (120, 30)
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim == 0:
        raise ValueError(f"X must be an array of samples (n, ...), got a scalar {X!r}")
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D of length {len(X)}, got shape {y.shape}")
    if len(y) != len(X):
        raise ValueError(f"y has {len(y)} samples but X has {len(X)}")
    n = len(X)
    if n < 2:
        raise ValueError(f"X must have at least 2 samples to split, got {n}")
    n_test = _test_count(test_size, n)
    check_bool(stratify, "stratify")
    rng = np.random.default_rng(check_seed(seed))
    if stratify:
        test, train = _stratified_indices(y, n_test, rng)
    else:
        order = rng.permutation(n)
        test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]
