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
    numeric = np.empty(idx.size)
    for j, i in enumerate(idx):
        saved = params[i]
        params[i] = saved + eps
        up = loss_at()
        params[i] = saved - eps
        down = loss_at()
        params[i] = saved
        numeric[j] = (up - down) / (2 * eps)
    a = analytic[idx]
    denom = np.maximum(np.maximum(np.abs(a), np.abs(numeric)), 1e-4)
    return float(np.max(np.abs(a - numeric) / denom))
