"""Numerical gradient check of a model's analytic gradients (float64)."""
import numpy as np

from ._validation import check_float, check_int
from .layers import layer_from_config
from .model import Sequential, _require_compiled_model


def _float64_copy(model):
    """The same network (same weights, loss) in float64."""
    configs = [dict(layer.get_config(), dtype="float64") for layer in model.layers]
    copy = Sequential([layer_from_config(c) for c in configs])
    copy.params[...] = model.params
    copy.compile(model.loss.get_config(), "sgd")
    return copy


def numerical_gradient(f, x, eps=1e-6, indices=None):
    """Central differences of the scalar ``f()`` with respect to the entries of ``x``.

    ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)``, with ``x`` nudged in place (and
    restored) for each entry.

    Parameters
    ----------
    f : callable
        ``f() -> float``, reading ``x``.
    x : ndarray
        Contiguous array that ``f`` reads.
    eps : float, default 1e-6
        The step.
    indices : array-like of int, optional
        Entries (into the flattened ``x``) to differentiate; default all.

    Returns
    -------
    ndarray
        float64, shaped like ``x``; with ``indices``, one value per index.

    Raises
    ------
    ValueError
        ``x`` is not contiguous.
    """
    flat = x.reshape(-1)  # a view: x must be contiguous
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_gradient needs a contiguous array x")
    picked = np.arange(flat.size) if indices is None else np.asarray(indices)
    grad = np.empty(picked.size)
    for j, i in enumerate(picked):
        saved = flat[i]
        flat[i] = saved + eps
        up = f()
        flat[i] = saved - eps
        down = f()
        flat[i] = saved
        grad[j] = (up - down) / (2 * eps)
    return grad.reshape(x.shape) if indices is None else grad


def gradcheck(model, X, y, eps=1e-5, sample_weight=None, max_params=2000, seed=0):
    """Largest relative error between ``compute_gradients`` and central differences.

    Runs on a float64 copy of the model in inference mode (dropout off), regularization
    included. ``err_i = abs(g_i - n_i) / max(abs(g_i), abs(n_i), 1e-4)``, where
    ``n_i = (L(p + eps e_i) - L(p - eps e_i)) / (2 eps)``; entries smaller than 1e-4 are
    thus judged by absolute error, below which rounding in L dominates. The default
    ``eps`` balances truncation (~eps^2) against rounding in L (~1e-16 / eps); at 1e-6
    rounding alone already reaches ~1e-6 on the small entries.

    Parameters
    ----------
    model : Sequential
        A compiled model (left unchanged).
    X : array-like, shape (n_samples, n_features)
        Inputs.
    y : array-like
        Targets for the model's loss.
    eps : float > 0, default 1e-5
        The central-difference step.
    sample_weight : array-like, shape (n_samples,), optional
        Per-sample weights of the loss.
    max_params : int >= 1, default 2000
        Models with more parameters are checked on a random subset of that size.
    seed : int, default 0
        Seed of that subset.

    Returns
    -------
    float
        The largest ``err_i``.

    Raises
    ------
    NotCompiledError
        The model was not compiled.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> X, y = fn.datasets.xor()
    >>> model = fn.Sequential([fn.Dense(2, 4, activation="tanh", seed=0), fn.Dense(4, 2)])
    >>> _ = model.compile("cross_entropy")
    >>> fn.gradcheck(model, X, y) < 1e-6
    True
    """
    _require_compiled_model(model, "gradcheck")
    eps = check_float(eps, "eps", low=0.0, low_open=True)
    max_params = check_int(max_params, "max_params", low=1)
    model64 = _float64_copy(model)
    X, target, weights = model64._prepare(X, y, sample_weight)

    def loss_at():
        return model64._loss_and_grad(X, target, weights, training=False)[0]

    loss_at()
    analytic = model64.grads.copy()
    params = model64.params
    n = params.size
    idx = np.arange(n) if n <= max_params else np.sort(
        np.random.default_rng(seed).choice(n, max_params, replace=False))
    numeric = numerical_gradient(loss_at, params, eps, idx)
    a = analytic[idx]
    denom = np.maximum(np.maximum(np.abs(a), np.abs(numeric)), 1e-4)
    return float(np.max(np.abs(a - numeric) / denom))
