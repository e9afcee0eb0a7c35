"""Reference backend: plain, readable numpy.

This module *is* the kernel contract. The compiled backends (``_numba``, ``_cython``)
implement the same functions with the same positional arguments and are tested
against this one; the benchmarks use it as the numpy baseline.

Conventions shared by every backend:

* Arrays are C-contiguous float32 or float64, one dtype per call; integer class
  labels are int64. Outputs are preallocated by the caller and written in place;
  a kernel returns None or the loss as a Python float.
* Every kernel checks its arguments' shapes, dtypes and lengths (``_checks``, O(1))
  and the class labels / sample indices it reads, and raises ValueError (TypeError
  for a non-array) naming the argument, so no call reads or writes out of bounds.
  Values are not checked: the API validates them once, at its boundary.
* Shapes: ``n`` samples, ``d`` input features, ``k`` outputs. Dense weights are
  ``w (d, k)`` and bias ``b (k,)`` so the layer computes ``x @ w + b``.
* ``act`` is an integer code from ``fastnn.kernels.ACTIVATIONS``; ``alpha`` is the
  leaky_relu slope / elu alpha (None means the activation's default).
* Activation derivatives are computed from the forward *output* ``a``, so the
  pre-activation never has to be kept.
* Losses are the mean over samples (and over outputs where PyTorch averages them);
  with per-sample ``weights`` the loss is ``sum_i w_i l_i / sum_i w_i``.
  ``dpred`` receives d(loss)/d(pred); pass None to compute the loss only.
* Optimizer updates work on flat 1-D buffers in place and follow the algorithm
  boxes of torch.optim. ``step`` is the 1-based number of this update.
"""
import math
import os
import time

import numpy as np

from . import _checks
from . import (
    ADAGRAD, BINARY_CROSS_ENTROPY, CROSS_ENTROPY, DEFAULT_ALPHA, ELU, HINGE, HUBER,
    IDENTITY, LABEL_LOSS_CODES, LAUNCHER_GONE, LEAKY_RELU, MAE, MSE, NODE_DATA, NODE_DONE, NODE_LOSS,
    NODE_INIT, NODE_READY, NODE_REDUCED, NODE_RELEASED, REDUCE_LOSS, REDUCE_START, REDUCE_WAIT, RELU,
    RMSPROP, SGD, SIGMOID, SOFTPLUS, STEP, TANH, NodeSum, chunk,
    dense_stack_workspace_size, node_split_layout, optimizer_states_used,
)


def _alpha(act, alpha):
    return DEFAULT_ALPHA[act] if alpha is None else alpha


def _sigmoid(z, out):
    """Overflow-free logistic: exp only ever sees -|z|."""
    e = np.exp(-np.abs(z))
    np.divide(np.where(z >= 0, 1.0, e), 1.0 + e, out=out, casting="unsafe")
    return out


# ----------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------

def activation_forward(act, z, out, alpha=None):
    """``out = act(z)``, elementwise. ``z`` and ``out`` have the same shape (may alias).

    identity z; step [z >= 0]; sigmoid 1/(1+e^-z); tanh; relu max(z, 0);
    leaky_relu z if z > 0 else alpha*z; softplus log(1+e^z); elu z if z > 0 else
    alpha*(e^z - 1).
    """
    _checks.activation("activation_forward", act, {"z": z}, out)
    return _activation_forward(act, z, out, alpha)


def _activation_forward(act, z, out, alpha=None):
    alpha = _alpha(act, alpha)
    if act == IDENTITY:
        if out is not z:
            out[...] = z
    elif act == STEP:
        out[...] = z >= 0
    elif act == SIGMOID:
        _sigmoid(z, out)
    elif act == TANH:
        np.tanh(z, out=out)
    elif act == RELU:
        np.maximum(z, 0, out=out)
    elif act == LEAKY_RELU:
        np.copyto(out, np.where(z > 0, z, alpha * z))
    elif act == SOFTPLUS:
        np.logaddexp(0, z, out=out)
    elif act == ELU:
        np.copyto(out, np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0))))
    else:
        raise ValueError(f"unknown activation code {act}")


def activation_backward(act, a, dout, out, alpha=None):
    """``out = dout * act'(z)`` with the derivative written in terms of ``a = act(z)``.

    identity 1; step 0; sigmoid a(1-a); tanh 1-a^2; relu [a > 0];
    leaky_relu 1 if a > 0 else alpha; softplus 1-e^-a; elu 1 if a > 0 else a+alpha.
    ``out`` may alias ``dout``.
    """
    _checks.activation("activation_backward", act, {"a": a, "dout": dout}, out)
    return _activation_backward(act, a, dout, out, alpha)


def _activation_backward(act, a, dout, out, alpha=None):
    alpha = _alpha(act, alpha)
    if act == IDENTITY:
        if out is not dout:
            out[...] = dout
    elif act == STEP:
        out[...] = 0
    elif act == SIGMOID:
        np.multiply(dout, a * (1 - a), out=out)
    elif act == TANH:
        np.multiply(dout, 1 - a * a, out=out)
    elif act == RELU:
        np.multiply(dout, a > 0, out=out)
    elif act == LEAKY_RELU:
        np.multiply(dout, np.where(a > 0, 1, alpha).astype(a.dtype), out=out)
    elif act == SOFTPLUS:
        np.multiply(dout, -np.expm1(-a), out=out)
    elif act == ELU:
        np.multiply(dout, np.where(a > 0, 1, a + alpha), out=out)
    else:
        raise ValueError(f"unknown activation code {act}")


def softmax_forward(z, out):
    """Row-wise softmax ``out_ij = e^(z_ij - m_i) / sum_j e^(z_ij - m_i)``, m_i = max_j
    z_ij (so exp never overflows). z, out (n, k), k >= 1; ``out`` may alias ``z``."""
    _checks.softmax_forward(z, out)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.divide(e, e.sum(axis=1, keepdims=True), out=out)


# ----------------------------------------------------------------------------------
# Dense layer
# ----------------------------------------------------------------------------------

def dense_forward(x, w, b, act, out, alpha=None):
    """``out = act(x @ w + b)``.  x (n, d), w (d, k), b (k,), out (n, k)."""
    _checks.dense_forward(x, w, b, act, out)
    return _dense_forward(x, w, b, act, out, alpha)


def _dense_forward(x, w, b, act, out, alpha=None):
    np.matmul(x, w, out=out)
    out += b
    _activation_forward(act, out, out, alpha)


def dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """Backward of ``a = act(x @ w + b)`` given ``dout = dL/da``.

    ``dz = dout * act'(a)``; ``dw = x.T @ dz``; ``db = dz.sum(0)``; ``dx = dz @ w.T``
    (skipped when dx is None). x (n, d), w (d, k), a/dout/dz (n, k), dx (n, d),
    dw (d, k), db (k,). ``dz`` may alias ``dout``.
    """
    _checks.dense_backward(x, w, a, dout, act, dz, dx, dw, db)
    return _dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha)


def _dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    _activation_backward(act, a, dout, dz, alpha)
    np.matmul(x.T, dz, out=dw)
    np.sum(dz, axis=0, out=db)
    if dx is not None:
        np.matmul(dz, w.T, out=dx)


def dense_per_sample_grad(x, dz, jac, offset, use_bias):
    """Per-sample parameter gradients of a dense layer, written as Jacobian rows.

    For every sample s: ``jac[s, offset + i*k + j] = x[s, i] * dz[s, j]`` (the row-major
    flattening of the outer product x_s dz_s^T, i.e. of dW for that sample alone) and,
    when ``use_bias``, ``jac[s, offset + d*k + j] = dz[s, j]``. x (n, d), dz (n, k),
    jac (n, P) with P >= offset + d*k (+ k); other columns are left untouched.
    """
    _checks.dense_per_sample_grad(x, dz, jac, offset, use_bias)
    n, d = x.shape
    k = dz.shape[1]
    block = jac[:, offset:offset + d * k].reshape(n, d, k)
    np.multiply(x[:, :, None], dz[:, None, :], out=block)
    if use_bias:
        jac[:, offset + d * k:offset + d * k + k] = dz


def dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out):
    """The inference pass of ``L`` dense layers in one call.

    ``a_0 = x``, ``a_l+1 = act_l(a_l @ W_l + b_l)`` (``dense_forward`` per layer),
    ``out = a_L``. x (n, widths[0]); params (P,) holding, per layer, W (widths[l],
    widths[l+1]) row-major then b (widths[l+1],) if use_bias[l] (the layout of
    ``TrainEpochSpec.params``); widths int64 (L+1,); acts int64 (L,) activation codes;
    alphas float64 (L,) resolved alphas; use_bias int64 (L,) 0 / 1; workspace at least
    ``dense_stack_workspace_size(n, widths)`` elements: hidden layer l writes the
    (n, widths[l+1]) block at the start of its half ``l % 2``; out (n, widths[L]).
    """
    _dense_stack(x, params, widths, acts, alphas, use_bias, workspace, out, dense_forward)


def _dense_stack(x, params, widths, acts, alphas, use_bias, workspace, out, layer_forward):
    """``dense_stack_forward`` with ``layer_forward`` (a ``dense_forward``) per layer."""
    _checks.dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out)
    n_layers = widths.shape[0] - 1
    n = x.shape[0]
    half = dense_stack_workspace_size(n, widths) // 2
    a, p = x, 0
    for layer in range(n_layers):
        d, k = int(widths[layer]), int(widths[layer + 1])
        w = params[p:p + d * k].reshape(d, k)
        p += d * k
        if use_bias[layer]:
            bias = params[p:p + k]
            p += k
        else:
            bias = np.zeros(k, params.dtype)
        if layer == n_layers - 1:
            dst = out
        else:
            start = (layer % 2) * half
            dst = workspace[start:start + n * k].reshape(n, k)
        layer_forward(a, w, bias, int(acts[layer]), dst, float(alphas[layer]))
        a = dst


# ----------------------------------------------------------------------------------
# bfloat16 products with float32 accumulation: the exact emulation of the hardware
# ----------------------------------------------------------------------------------

def _bf16(x):
    """float32 ``x`` rounded to bfloat16, returned as a new float32 array.

    bf16 is the upper 16 bits of a float32. The rounding is AVX512_BF16's
    (vcvtneps2bf16), on the float32 bits: to nearest, ties to even (add 0x7fff plus
    the lowest kept bit, drop the low half; finite values past the largest bf16 go to
    inf); NaN stays NaN, quieted (bit 22 set); inf stays inf; subnormal inputs become
    signed zero (the instruction treats them as zero). A product of two bf16 values is
    exact in float32, so a float32 matmul of rounded operands is the bf16 product with
    float32 accumulation, up to the order of the sums.
    """
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)
    rounded = np.where((u & 0x7F800000) == 0, u & np.uint32(0x80000000), rounded)
    rounded = np.where((u & 0x7FFFFFFF) > 0x7F800000,
                       (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), rounded)
    return rounded.astype(np.uint32).view(np.float32)


def bf16_round(x, out):
    """``out = x`` rounded to bfloat16 (``_bf16``), as float32. x and out float32 of one
    shape; out may be x."""
    _checks.bf16_round(x, out)
    out[...] = _bf16(x)


def dense_forward_bf16(x, w, b, act, out, alpha=None):
    """``out = act(bf16(x) @ bf16(w) + b)``: the product of the rounded operands with
    float32 accumulation; bias and activation in float32. float32 x (n, d), w (d, k),
    b (k,), out (n, k)."""
    _checks.dense_forward(x, w, b, act, out)
    _checks.float32_only("dense_forward_bf16", x)
    _dense_forward_bf16(x, w, b, act, out, alpha)


def _dense_forward_bf16(x, w, b, act, out, alpha=None):
    _dense_forward(_bf16(x), _bf16(w), b, act, out, alpha)


def dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """Backward of ``dense_forward_bf16``: ``dz = dout * act'(a)`` and ``db = dz.sum(0)``
    in float32; ``dw = bf16(x).T @ bf16(dz)``; ``dx = bf16(dz) @ bf16(w).T`` (skipped when
    dx is None). float32, shapes as ``dense_backward``."""
    _checks.dense_backward(x, w, a, dout, act, dz, dx, dw, db)
    _checks.float32_only("dense_backward_bf16", x)
    _dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha)


def _dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    _activation_backward(act, a, dout, dz, alpha)
    np.sum(dz, axis=0, out=db)
    dz_rounded = _bf16(dz)
    np.matmul(_bf16(x).T, dz_rounded, out=dw)
    if dx is not None:
        np.matmul(dz_rounded, _bf16(w).T, out=dx)


def dense_stack_forward_bf16(x, params, widths, acts, alphas, use_bias, workspace, out):
    """``dense_stack_forward`` with every layer's product in bf16
    (``dense_forward_bf16``). float32; shapes and layout as ``dense_stack_forward``."""
    _checks.float32_only("dense_stack_forward_bf16", x)
    _dense_stack(x, params, widths, acts, alphas, use_bias, workspace, out,
                 dense_forward_bf16)


# ----------------------------------------------------------------------------------
# Losses: each returns the loss and (unless dpred is None) writes its gradient
# ----------------------------------------------------------------------------------

#: Argument names of the pointwise losses (prediction, target, gradient).
_PRED = ("pred", "target", "dpred")


def _sample_scale(n, weights):
    """Per-sample factor of the mean: 1/n, or w_i / sum(w)."""
    if weights is None:
        return np.full(n, 1.0 / n, dtype=np.float64)
    return weights.astype(np.float64) / weights.sum(dtype=np.float64)


def _reduce(per_sample, scale):
    return float(np.dot(per_sample.astype(np.float64), scale))


def softmax_cross_entropy(logits, labels, weights, dlogits):
    """Fused stable softmax + cross-entropy (torch CrossEntropyLoss on logits).

    logits (n, k); labels int64 (n,) class indices, or (n, k) probability rows of the
    logits' dtype. l_i = logsumexp(z_i) - z_i[y_i]  (or -sum_j y_ij log softmax(z_i)_j).
    dlogits (n, k) = s_i * (softmax(z_i) * sum_j y_ij - y_i), with s_i = 1/n or
    w_i / sum(w).
    """
    _checks.softmax_cross_entropy(logits, labels, weights, dlogits)
    return _softmax_cross_entropy(logits, labels, weights, dlogits)


def _softmax_cross_entropy(logits, labels, weights, dlogits):
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if labels.ndim == 1:
        target = np.zeros_like(logits)
        target[np.arange(n), labels] = 1
    else:
        target = labels
    per_sample = -(target * log_prob).sum(axis=1)
    scale = _sample_scale(n, weights)
    if dlogits is not None:
        grad = np.exp(log_prob) * target.sum(axis=1, keepdims=True) - target
        np.multiply(grad, scale[:, None], out=dlogits, casting="unsafe")
    return _reduce(per_sample, scale)


def sigmoid_binary_cross_entropy(pred, target, weights, dpred):
    """Stable sigmoid + binary cross-entropy (torch BCEWithLogitsLoss), mean over n*k.

    pred (n, k) logits, target (n, k) in [0, 1].
    ``l_ij = max(z, 0) - z t + log(1 + e^-|z|)``;  ``dpred = s_i (sigmoid(z) - t) / k``.
    """
    _checks.loss("sigmoid_binary_cross_entropy", _PRED, pred, target, weights, dpred)
    return _sigmoid_binary_cross_entropy(pred, target, weights, dpred)


def _sigmoid_binary_cross_entropy(pred, target, weights, dpred):
    n, k = pred.shape
    per_elem = np.maximum(pred, 0) - pred * target + np.log1p(np.exp(-np.abs(pred)))
    scale = _sample_scale(n, weights) / k
    if dpred is not None:
        sig = _sigmoid(pred, np.empty_like(pred))
        np.multiply(sig - target, scale[:, None], out=dpred, casting="unsafe")
    return _reduce(per_elem.sum(axis=1), scale)


def mean_squared_error(pred, target, weights, dpred):
    """torch MSELoss, mean over n*k.  pred, target (n, k).

    l_ij = (p - t)^2;  dpred = 2 s_i (p - t) / k.
    """
    _checks.loss("mean_squared_error", _PRED, pred, target, weights, dpred)
    return _mean_squared_error(pred, target, weights, dpred)


def _mean_squared_error(pred, target, weights, dpred):
    n, k = pred.shape
    diff = pred - target
    scale = _sample_scale(n, weights) / k
    if dpred is not None:
        np.multiply(diff, 2 * scale[:, None], out=dpred, casting="unsafe")
    return _reduce((diff * diff).sum(axis=1), scale)


def mean_absolute_error(pred, target, weights, dpred):
    """torch L1Loss, mean over n*k.  ``l_ij = |p - t|``;  ``dpred = s_i sign(p - t) / k``."""
    _checks.loss("mean_absolute_error", _PRED, pred, target, weights, dpred)
    return _mean_absolute_error(pred, target, weights, dpred)


def _mean_absolute_error(pred, target, weights, dpred):
    n, k = pred.shape
    diff = pred - target
    scale = _sample_scale(n, weights) / k
    if dpred is not None:
        np.multiply(np.sign(diff), scale[:, None], out=dpred, casting="unsafe")
    return _reduce(np.abs(diff).sum(axis=1), scale)


def huber(pred, target, delta, weights, dpred):
    """torch HuberLoss(delta), mean over n*k.  d = p - t:

    ``l = d^2/2 if |d| <= delta else delta (|d| - delta/2)``;
    ``dpred = s_i clip(d, -delta, delta) / k``.
    """
    _checks.loss("huber", _PRED, pred, target, weights, dpred)
    return _huber(pred, target, delta, weights, dpred)


def _huber(pred, target, delta, weights, dpred):
    n, k = pred.shape
    diff = pred - target
    absd = np.abs(diff)
    per_elem = np.where(absd <= delta, 0.5 * diff * diff, delta * (absd - 0.5 * delta))
    scale = _sample_scale(n, weights) / k
    if dpred is not None:
        np.multiply(np.clip(diff, -delta, delta), scale[:, None], out=dpred, casting="unsafe")
    return _reduce(per_elem.sum(axis=1), scale)


def multiclass_hinge(scores, labels, margin, weights, dscores):
    """Multiclass SVM loss (Weston-Watkins), summed over wrong classes, mean over samples.

    scores (n, k), labels int64 (n,).  l_i = sum_{j != y_i} max(0, s_ij - s_iy_i + margin).
    dscores: +s_i for each violating j, -s_i * (number of violations) at y_i.
    """
    _checks.multiclass_hinge(scores, labels, weights, dscores)
    return _multiclass_hinge(scores, labels, margin, weights, dscores)


def _multiclass_hinge(scores, labels, margin, weights, dscores):
    n = scores.shape[0]
    rows = np.arange(n)
    margins = scores - scores[rows, labels][:, None] + margin
    margins[rows, labels] = 0
    violated = margins > 0
    per_sample = np.where(violated, margins, 0).sum(axis=1)
    scale = _sample_scale(n, weights)
    if dscores is not None:
        grad = violated.astype(np.float64)
        grad[rows, labels] = -violated.sum(axis=1)
        np.multiply(grad, scale[:, None], out=dscores, casting="unsafe")
    return _reduce(per_sample, scale)


# ----------------------------------------------------------------------------------
# Optimizer steps over flat parameter / gradient / state buffers (all 1-D, in place)
# ----------------------------------------------------------------------------------

def sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
               nesterov, step):
    """torch.optim.SGD.  g = grad + wd*p; if momentum: b = g (step 1) else
    b = mu*b + (1-dampening)*g, and g = g + mu*b (nesterov) or b;  p -= lr*g.
    ``momentum_buf`` is untouched when momentum == 0.
    """
    _checks.sgd_update(params, grads, momentum_buf, momentum)
    return _sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay, nesterov, step)


def _sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
                nesterov, step):
    g = grads + weight_decay * params if weight_decay else grads.copy()
    if momentum:
        if step == 1:
            momentum_buf[...] = g
        else:
            momentum_buf *= momentum
            momentum_buf += (1 - dampening) * g
        if nesterov:
            g += momentum * momentum_buf
        else:
            g = momentum_buf
    params -= lr * g


def adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step):
    """torch.optim.Adagrad.  g = grad + wd*p; clr = lr / (1 + (t-1)*lr_decay);
    G += g^2; p -= clr * g / (sqrt(G) + eps).
    """
    _checks.adagrad_update(params, grads, state_sum)
    return _adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step)


def _adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step):
    g = grads + weight_decay * params if weight_decay else grads
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum += g * g
    params -= clr * g / (np.sqrt(state_sum) + eps)


def rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                   weight_decay, momentum, centered):
    """torch.optim.RMSprop.  g = grad + wd*p; v = alpha*v + (1-alpha)*g^2;
    centered: gbar = alpha*gbar + (1-alpha)*g, v~ = v - gbar^2, else v~ = v;
    momentum: b = mu*b + g/(sqrt(v~)+eps), p -= lr*b; else p -= lr*g/(sqrt(v~)+eps).
    ``momentum_buf`` / ``grad_avg`` are untouched unless momentum > 0 / centered.
    """
    _checks.rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, momentum,
                           centered)
    return _rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps, weight_decay, momentum, centered)


def _rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                    weight_decay, momentum, centered):
    g = grads + weight_decay * params if weight_decay else grads
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    if centered:
        grad_avg *= alpha
        grad_avg += (1 - alpha) * g
        denom = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denom = np.sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buf *= momentum
        momentum_buf += g / denom
        params -= lr * momentum_buf
    else:
        params -= lr * g / denom


def adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2,
                eps, weight_decay, decoupled, amsgrad, step):
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True).

    AdamW: ``p *= 1 - lr*wd``; Adam: ``g = grad + wd*p``.  ``m = b1*m + (1-b1)*g``;
    ``v = b2*v + (1-b2)*g^2``; amsgrad: ``vmax = max(vmax, v)`` and v is replaced by vmax;
    ``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``.
    ``max_exp_avg_sq`` is untouched unless amsgrad.
    """
    _checks.adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
    return _adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, step)


def _adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2,
                 eps, weight_decay, decoupled, amsgrad, step):
    if decoupled:
        params *= 1 - lr * weight_decay
        g = grads
    else:
        g = grads + weight_decay * params if weight_decay else grads
    exp_avg *= beta1
    exp_avg += (1 - beta1) * g
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    else:
        v = exp_avg_sq
    params -= (lr / bias1) * exp_avg / (np.sqrt(v) / bias2_sqrt + eps)


# ----------------------------------------------------------------------------------
# A whole training epoch of a stack of dense layers in one call
# ----------------------------------------------------------------------------------

def _batch_loss(loss_code, loss_param, out, labels, targets, rows, dout):
    """Loss of one batch (and its gradient into dout) for a train_epoch loss code."""
    if loss_code == CROSS_ENTROPY:
        return _softmax_cross_entropy(out, labels[rows], None, dout)
    if loss_code == HINGE:
        return _multiclass_hinge(out, labels[rows], loss_param, None, dout)
    target = targets[rows]
    if loss_code == MSE:
        return _mean_squared_error(out, target, None, dout)
    if loss_code == MAE:
        return _mean_absolute_error(out, target, None, dout)
    if loss_code == HUBER:
        return _huber(out, target, loss_param, None, dout)
    return _sigmoid_binary_cross_entropy(out, target, None, dout)


def _batch_hits(loss_code, out, labels, targets, rows):
    """Correct predictions in a batch: argmax == label for label losses, elementwise
    (logit > 0) == (target >= 0.5) for binary_cross_entropy, 0 for regression."""
    if loss_code in LABEL_LOSS_CODES:
        return int(np.count_nonzero(out.argmax(axis=1) == labels[rows]))
    if loss_code == BINARY_CROSS_ENTROPY:
        return int(np.count_nonzero((out > 0) == (targets[rows] >= 0.5)))
    return 0


def _optimizer_step(optimizer, params, grads, lr, t):
    """One update of the whole flat buffer by the optimizer of an OptimizerSpec."""
    hyper = optimizer.hyper
    state0, state1, state2 = optimizer.states
    if optimizer.code == SGD:
        _sgd_update(params, grads, state0, lr, hyper[0], hyper[1], hyper[2], bool(hyper[3]),
                    t)
    elif optimizer.code == ADAGRAD:
        _adagrad_update(params, grads, state0, lr, hyper[0], hyper[1], hyper[2], t)
    elif optimizer.code == RMSPROP:
        _rmsprop_update(params, grads, state0, state1, state2, lr, hyper[0], hyper[1],
                        hyper[2], hyper[3], bool(hyper[4]))
    else:
        _adam_update(params, grads, state0, state1, state2, lr, hyper[0], hyper[1],
                     hyper[2], hyper[3], bool(hyper[4]), bool(hyper[5]), t)


class _NodeSteps:
    """The steps of a NodeSum epoch (``fastnn.kernels.NodeSum``), as the compiled
    kernels take them, with ``node.sync()`` around every flag."""

    #: A waiting rank's sleep between polls once it has polled for ``node.spin``.
    POLL_SECONDS = 2e-5

    def __init__(self, node, dtype, n_params, first=0):
        self.node, self.rank = node, node.rank
        self.flags = [seg[:5 * 8].view(np.int64) for seg in node.segments]
        self.losses = [seg[NODE_LOSS:NODE_LOSS + 8].view(np.float64) for seg in node.segments]
        nbytes = n_params * np.dtype(dtype).itemsize
        self.data = [seg[NODE_DATA:NODE_DATA + nbytes].view(dtype) for seg in node.segments]
        parts = len(self.data)
        #: every rank's chunk of the summed parameters, those after the first ``first``
        self.chunks = [slice(first + a, first + b)
                       for a, b in (chunk(n_params - first, parts, r) for r in range(parts))]
        self.split = None

    def next_step(self):
        """The number of this rank's next step (its DONE + 1)."""
        return int(self.flags[self.rank][NODE_DONE]) + 1

    def _wait(self, flag, step):
        deadline, parent = None, self.node.parent
        while not all(f[flag] >= step for f in self.flags):
            if deadline is None:
                deadline = time.perf_counter() + self.node.spin
            elif time.perf_counter() > deadline:
                if parent and os.getppid() != parent:
                    raise RuntimeError(LAUNCHER_GONE.format(parent))
                time.sleep(self.POLL_SECONDS)
        self.node.sync()  # the loads that follow see what the ranks stored

    def _raise(self, flag, step):
        self.node.sync()  # what this rank stored, before the flag
        self.flags[self.rank][flag] = step

    def begin(self, loss_rows):
        """Once no rank still reads this rank's segment, put ``loss_rows`` in its loss
        slot; the step's number."""
        done = int(self.flags[self.rank][NODE_DONE])
        self._wait(NODE_DONE, done)
        self.losses[self.rank][0] = loss_rows
        return done + 1

    def finish(self, step, global_rows, optimizer, params, lr, t):
        """The global loss; the gradient summed and every chunk updated from it."""
        me = self.rank
        self._raise(NODE_READY, step)
        self._wait(NODE_READY, step)
        loss = 0.0
        for slot in self.losses:
            loss += float(slot[0])
        loss /= global_rows
        own = self.data[me][self.chunks[me]]
        for r, data in enumerate(self.data):
            if r != me:
                np.add(own, data[self.chunks[me]], out=own)
        self._raise(NODE_REDUCED, step)
        if np.isfinite(loss):
            if self.split is not None:
                self.split.update(step, int(global_rows), optimizer, lr, t)
            self._wait(NODE_REDUCED, step)
            for data, part in zip(self.data, self.chunks):
                states = tuple(state[part] for state in optimizer.states)
                _optimizer_step(optimizer._replace(states=states), params[part], data[part],
                                lr, t)
        self._raise(NODE_DONE, step)
        return loss


class _NodeSplit:
    """The first layer of a NodeSum epoch split by columns (``NodeSum``: W1 by the
    ranks' column blocks, b1, the optimizer's states of them laid out alike, the global
    batch's inputs and dz in ``shared``)."""

    def __init__(self, node, widths, use_bias, optimizer, dtype):
        dtype = np.dtype(dtype)
        d, k, rows = int(widths[0]), int(widths[1]), node.split_rows
        self.used = optimizer_states_used(optimizer.code, optimizer.hyper)
        _, states_at, x_at, dz_at, _ = node_split_layout(widths, rows, dtype.itemsize,
                                                         len(self.used))
        shared = node.shared
        self.n_first = d * k + (k if use_bias[0] else 0)
        ranks = len(node.segments)
        self.cols = slice(*chunk(k, ranks, node.rank))
        #: rank r's columns chunk(k, K, r) = [c0, c1), a (d, c1 - c0) block at d * c0
        spans = [chunk(k, ranks, r) for r in range(ranks)]

        def first_layer(at):  # (the ranks' blocks, b) of the first-layer area at byte at
            area = shared[at:at + (d * k + k) * dtype.itemsize].view(dtype)
            return ([area[d * c0:d * c1].reshape(d, c1 - c0) for c0, c1 in spans],
                    area[d * k:])

        self.blocks, b = first_layer(0)
        self.b = b if use_bias[0] else np.zeros(k, dtype)
        #: the used optimizer states, each as (blocks, b) like W1 and b1
        self.states = [first_layer((1 + i) * states_at) for i in range(len(self.used))]
        self.x = shared[x_at:x_at + 2 * rows * d * dtype.itemsize].view(dtype).reshape(
            2, rows, d)
        self.dz = shared[dz_at:dz_at + rows * k * dtype.itemsize].view(dtype).reshape(rows, k)
        self.rank = node.rank
        self.has_bias = bool(use_bias[0])

    def weights(self):
        """W1 (d, k), from the ranks' blocks."""
        return np.concatenate(self.blocks, axis=1)

    def _areas(self, params, states):
        """(flat (P,) buffer, its (blocks, b) in shared) for the params and used states."""
        return [(params, (self.blocks, self.b))] + [
            (states[slot], area) for slot, area in zip(self.used, self.states)]

    def take(self, params, states):
        """This rank's columns of W1 and b1, and of the optimizer's used ``states``,
        from the flat buffers into ``shared``."""
        d, k = self.blocks[0].shape[0], self.b.shape[0]
        for flat, (blocks, b) in self._areas(params, states):
            blocks[self.rank][...] = flat[:d * k].reshape(d, k)[:, self.cols]
            if self.has_bias:
                b[self.cols] = flat[d * k:d * k + k][self.cols]

    def give(self, params, states):
        """W1 and b1, and the optimizer's used ``states``, from ``shared`` into the
        flat buffers."""
        d, k = self.blocks[0].shape[0], self.b.shape[0]
        for flat, (blocks, b) in self._areas(params, states):
            flat[:d * k] = np.concatenate(blocks, axis=1).ravel()
            if self.has_bias:
                flat[d * k:d * k + k] = b

    def update(self, step, rows, optimizer, lr, t):
        """This rank's columns over the global batch of ``rows`` rows, with
        ``dW1[:, c] = x.T @ dz[:, c]`` and ``db1[c] = dz[:, c].sum(0)``: plain SGD as
        ``W1[:, c] = (1 - lr wd) W1[:, c] - lr dW1[:, c]`` (the fold one process
        makes), ``b1[c] -= lr (db1[c] + wd b1[c])``; any other optimizer by its step on
        the columns and their states."""
        c, w = self.cols, self.blocks[self.rank]
        dtype = w.dtype
        x, dz = self.x[step % 2, :rows], self.dz[:rows, c]
        db = dz.sum(axis=0, dtype=np.float64)
        if optimizer.code == SGD and optimizer.hyper[0] == 0:
            weight_decay = optimizer.hyper[2]
            if self.has_bias:
                self.b[c] -= (lr * (db + weight_decay * self.b[c])).astype(dtype)
            w[...] = dtype.type(1 - lr * weight_decay) * w + dtype.type(-lr) * (x.T @ dz)
            return
        parts = [(w.reshape(-1), (x.T @ dz).reshape(-1),
                  [blocks[self.rank].reshape(-1) for blocks, _ in self.states])]
        if self.has_bias:
            parts.append((self.b[c], db.astype(dtype), [b[c] for _, b in self.states]))
        for p, g, used in parts:
            states = [g] * 3   # the unused slots: never touched
            for slot, state in zip(self.used, used):
                states[slot] = state
            _optimizer_step(optimizer._replace(states=tuple(states)), p, g, lr, t)


def train_epoch(spec):
    """One epoch of mini-batch training of ``L`` dense layers, all in one call.

    ``spec`` is a ``fastnn.kernels.TrainEpochSpec`` (the fields are documented there).
    Visits the samples ``order`` in batches of ``batch_size`` (the last may be
    smaller). For each batch: gather its rows of X into the workspace; forward
    ``a_l+1 = act_l(a_l @ W_l + b_l)``; loss and d(loss)/d(output) (mean over the
    batch); backward into ``grads``; one optimizer update with learning rate ``lrs[b]``
    for batch b and update number ``t = step + b + 1``.

    ``grads`` is scratch, and after the call it holds no defined values on any
    backend: the backends differ there (and only there) in how they schedule the same
    arithmetic. This reference writes the whole gradient, then updates the whole
    buffer. The compiled backends update each layer as soon as its backward is done,
    while its gradient is in cache (the optimizers are elementwise, so this is the same
    arithmetic): numba writes each layer's gradient to ``grads`` first; Cython does too,
    except for plain SGD (momentum 0), which it folds into the backward, ``W = (1 - lr
    wd) W - lr x.T @ dz`` being the dW gemm itself (beta = 1 - lr wd, alpha = -lr), so
    ``grads`` is never written. numba does not fold: ``np.dot`` has no alpha / beta, and
    a separate update pass is what folding would save. Unused optimizer state buffers
    are untouched.

    With ``bf16`` the dense products are ``dense_forward_bf16`` / ``dense_backward_bf16``'s
    (the weights rounded once per step: the update follows the whole backward).

    ``stats`` float64 (4,) receives [sum of batch loss * batch rows, correct predictions
    (see _batch_hits), batches completed, the last batch's loss]. A batch whose loss is
    not finite ends the epoch before its update, so ``stats[2]`` tells how many updates
    were made and ``stats[3]`` holds the offending loss.

    A sample index in ``order`` outside [0, n) or a class label outside [0, widths[L])
    raises ValueError: here before any update; the compiled backends check each batch
    as they gather it, so the batches before the bad one have been applied.

    With ``reduce`` (a data-parallel epoch, see ``fastnn.kernels.REDUCE_LOSS``) the
    epoch has ``len(lrs)`` steps, the loss gradient is scaled by the share REDUCE_LOSS
    returns, each layer's reduction starts after its backward, and the update waits
    for every layer's; ``stats`` keeps this process's sums (the loss and hits of its
    rows), ``stats[3]`` the global loss that stopped the epoch. A ``NodeSum`` ``reduce``
    sums the gradient in the ranks' shared memory and updates from the sum
    (``_NodeSteps``); with ``split_rows`` it splits the first layer by columns instead
    (``_NodeSplit``).
    """
    _checks.train_epoch(spec)
    _checks.train_epoch_indices(spec)
    (X, labels, targets, order, batch_size, widths, acts, alphas, use_bias, params, grads,
     workspace, loss_code, loss_param, optimizer, lrs, step, stats, bf16, reduce) = spec
    forward, backward = ((_dense_forward_bf16, _dense_backward_bf16) if bf16
                         else (_dense_forward, _dense_backward))
    n_layers = widths.shape[0] - 1
    m = order.shape[0]
    widest = int(widths.max())
    n_steps = -(-m // batch_size) if reduce is None else lrs.shape[0]
    node = split = None
    if isinstance(reduce, NodeSum):
        if reduce.split_rows:
            split = _NodeSplit(reduce, widths, use_bias, optimizer, params.dtype)
            row_starts = reduce.row_starts
        node = _NodeSteps(reduce, params.dtype, params.shape[0],
                          split.n_first if split is not None else 0)
        node.split = split
        reduce, global_rows = None, spec.reduce.global_rows
    stats[:] = 0
    if split is not None:  # every rank's columns of the first layer, before any forward
        node._wait(NODE_RELEASED, int(node.flags[node.rank][NODE_RELEASED]))
        s = node.next_step()
        split.take(params, optimizer.states)
        node._raise(NODE_INIT, s)
        node._wait(NODE_INIT, s)
    for b in range(n_steps):
        rows = order[b * batch_size:(b + 1) * batch_size]
        size = rows.shape[0]
        offset = 0
        outs = []
        for width in widths:
            outs.append(workspace[offset:offset + size * width].reshape(size, width))
            offset += size * width
        delta = workspace[offset:offset + size * widest]
        dprev = workspace[offset + batch_size * widest:offset + batch_size * widest
                          + size * widest]
        if split is not None:  # the inputs into the shared global batch
            s = node.next_step()
            outs[0] = split.x[s % 2, row_starts[b]:row_starts[b] + size]
            np.take(X, rows, axis=0, out=outs[0])
            node._wait(NODE_DONE, s - 1)   # every rank's first layer of step s - 1
        else:
            np.take(X, rows, axis=0, out=outs[0])
        layer_params = []
        p = 0
        for layer in range(n_layers):
            d, k = widths[layer], widths[layer + 1]
            w = params[p:p + d * k].reshape(d, k)
            dw = grads[p:p + d * k].reshape(d, k)
            p += d * k
            if use_bias[layer]:
                bias, db = params[p:p + k], grads[p:p + k]
                p += k
            else:
                bias, db = np.zeros(k, params.dtype), np.empty(k, params.dtype)
            if layer == 0 and split is not None:
                w, bias = split.weights(), split.b
            layer_params.append((w, bias, dw, db))
            forward(outs[layer], w, bias, acts[layer], outs[layer + 1], alphas[layer])
        out = outs[n_layers]
        dout = delta[:out.size].reshape(out.shape)
        loss = _batch_loss(loss_code, loss_param, out, labels, targets, rows, dout) if size \
            else 0.0
        stats[3] = loss
        if node is not None:
            node_step = node.begin(loss * size)
            dout *= size / global_rows[b] if global_rows[b] > 0 else 0.0
        elif reduce is not None:
            dout *= reduce(REDUCE_LOSS, -1, loss, size)
        elif not np.isfinite(loss):
            return
        stats[1] += _batch_hits(loss_code, out, labels, targets, rows)
        for layer in range(n_layers - 1, -1, -1):
            w, bias, dw, db = layer_params[layer]
            d, k = widths[layer], widths[layer + 1]
            dx = dprev[:size * d].reshape(size, d) if layer > 0 else None
            if layer == 0 and split is not None:  # dz into the shared global batch
                _activation_backward(acts[0], outs[1], dout, split.dz[
                    row_starts[b]:row_starts[b] + size], alphas[0])
                continue
            backward(outs[layer], w, outs[layer + 1], dout, acts[layer], dout, dx, dw, db,
                     alphas[layer])
            if layer > 0:
                dout = dx
                delta, dprev = dprev, delta
            if reduce is not None:
                reduce(REDUCE_START, layer, 0.0, size)
        for layer in range(n_layers - 1 if reduce is not None else -1, -1, -1):
            global_loss = reduce(REDUCE_WAIT, layer, 0.0, size)
            if not np.isfinite(global_loss):
                stats[3] = global_loss
                return
        if node is not None:
            global_loss = node.finish(node_step, global_rows[b], optimizer, params, lrs[b],
                                      step + b + 1)
            if not np.isfinite(global_loss):
                stats[3] = global_loss
                break
        else:
            _optimizer_step(optimizer, params, grads, lrs[b], step + b + 1)
        stats[0] += loss * size
        stats[2] += 1
    if split is not None:  # every rank's last update written: the first layer's values
        node._wait(NODE_DONE, node.next_step() - 1)
        split.give(params, optimizer.states)
        node._raise(NODE_RELEASED, int(node.flags[node.rank][NODE_RELEASED]) + 1)
