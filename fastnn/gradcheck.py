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
    """Central differences of the scalar ``f()`` with respect to the entries of the
    array ``x``, which ``f`` reads and which is nudged in place (and restored):
    ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)``. Returns a float64 array shaped like
    ``x``, or, with ``indices`` (into the flattened ``x``), one value per index.
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
    included. err_i = |g_i - n_i| / max(|g_i|, |n_i|, 1e-4), where
    n_i = (L(p + eps e_i) - L(p - eps e_i)) / (2 eps); entries smaller than 1e-4 are
    thus judged by absolute error, below which rounding in L dominates. The default
    ``eps`` balances truncation (~eps^2) against rounding in L (~1e-16 / eps); at 1e-6
    rounding alone already reaches ~1e-6 on the small entries. Models with more than
    ``max_params`` parameters are checked on a random subset of that size.
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
