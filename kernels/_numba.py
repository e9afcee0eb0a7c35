"""Numba backend: the kernel contract of ``_numpy`` as @njit kernels.

Design:

* Every public function is a thin Python wrapper: it resolves None / default arguments,
  picks the serial or the parallel core and makes one call; a core checks its
  arguments' shapes in O(1) (``_require``) and, should it refuse them, the wrapper
  raises the contract's error from ``_checks``. Cores have fixed types: explicit
  float32 and float64 signatures (read-only inputs, int64 labels), compiled once with
  ``cache=True``. A core is compiled, or loaded from the disk cache, on its first call
  (see ``_deferred``), so importing this module compiles nothing.
* Elementwise and row-wise cores are one plain function compiled twice, serially and
  with ``parallel=True`` (``prange`` is ``range`` in the serial build). Wrappers take the
  parallel build from ``PARALLEL_MIN_SIZE`` elements. Row-wise cores split the rows into
  ``n_chunks`` contiguous chunks; reductions go to one buffer slot per chunk and are
  summed serially afterwards.
* Matmuls are ``np.dot(a, b, out)`` (numba calls scipy's BLAS; transposes are F-ordered
  views, not copies), never inside a ``prange``. Their epilogues are fused: bias plus
  activation, and activation derivative plus bias gradient, row by row while the row
  is in cache.
* Why BLAS and not the Cython backend's own GEMM (kernels/fastnn_gemm.h), decided on
  measurements (1 thread, noisy shared Zen 5 VM, quick suite): this backend is the one
  that works where the extension was not compiled, so it cannot depend on it; numba's
  disk cache would freeze a C function's address, which changes with every process,
  so the kernels would have to take it as an argument (a first-class function type in
  every signature and a second, BLAS path for when the extension is absent). The gain
  is there for whoever wants it in the default backend: MNIST b128 SGD epoch, numba
  ~50 GFLOP/s, cython on BLAS ~47, cython on its own kernels ~100.
* ``train_epoch`` is one serial core running a whole epoch: it calls the row and span
  helpers and serial builds of the optimizer cores (``_nested``), so its arithmetic is
  that of the single kernels in sequence. It is compiled per dtype on first use.
* Elementwise math runs in the data dtype (float32 exp / expm1 / log1p as inline
  polynomials that vectorise); losses and reductions accumulate in float64.
* ``FASTMATH_FLAGS`` never includes nnan/ninf: NaN/inf semantics, and with them the
  stable exp/log paths (max-subtracted softmax, ``exp(-|z|)`` sigmoid/softplus), hold.
  Numba errors follow numpy (``error_model="numpy"``): a kernel never raises.
"""
import math
from types import FunctionType

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# The activation, loss and optimizer codes of fastnn.kernels. Compiled code reads them
# as compile-time constants, frozen into numba's disk cache, which is keyed on this
# file's timestamp only: that is safe because the codes are a fixed part of the kernel
# contract (never renumbered; a new code comes with new code in this file).
from . import (
    ADAGRAD, ADAM, BINARY_CROSS_ENTROPY, CROSS_ENTROPY, DEFAULT_ALPHA, ELU, HINGE, HUBER,
    IDENTITY, LEAKY_RELU, MAE, MSE, OPTIMIZER_CODES, OPTIMIZER_HYPER, RELU, RMSPROP, SGD,
    SIGMOID, SOFTPLUS, STEP, TANH,
)
from . import _checks, _numpy

#: Length of each optimizer code's ``hyper`` array (kernels.OPTIMIZER_HYPER).
_HYPER_SIZES = tuple(len(OPTIMIZER_HYPER[name]) for name in
                     sorted(OPTIMIZER_CODES, key=OPTIMIZER_CODES.get))

#: Work size (elements) from which wrappers call the parallel cores.
PARALLEL_MIN_SIZE = 1 << 17

#: The one fastmath flag set of this module. Never nnan/ninf; no "reassoc" (it let LLVM
#: reorder max(z,0) - z*t + log1p(e) in BCE and lose the whole loss to cancellation) and
#: no "contract" (fused multiply-adds round 1 - a*a and friends differently from numpy,
#: by more than the float32 tolerance where they cancel).
FASTMATH_FLAGS = {"nsz", "arcp", "afn"}

_OPTIONS = {"nogil": True, "fastmath": FASTMATH_FLAGS, "error_model": "numpy"}
_CORE_OPTIONS = dict(_OPTIONS, cache=True)
#: Helpers are only ever called from compiled code: no CPython / C entry points (numba
#: would otherwise compile both for every helper and signature, and nothing calls them).
_HELPER_OPTIONS = dict(_OPTIONS, no_cpython_wrapper=True, no_cfunc_wrapper=True)

_FLOATS = (types.float32, types.float64)
_i8, _f8, _b1 = types.int64, types.float64, types.boolean


#: What a wrapper's call raises when an argument does not fit the core: numba's
#: dispatcher (TypeError: no signature matches), the core's own check (ValueError), a
#: non-array (AttributeError), an unknown activation's alpha (IndexError) or a
#: placeholder looked up for a non-float dtype (KeyError, ``_empty_1d``). The wrapper
#: then raises the contract's error (``_checks``) or, if that finds nothing wrong, the
#: original one.
_REFUSED = (TypeError, ValueError, AttributeError, IndexError, KeyError)


def set_num_threads(n):
    """Threads used by the parallel cores (numba.set_num_threads)."""
    numba.set_num_threads(n)


# ----------------------------------------------------------------------------------
# Compilation: cores are compiled on first use, with explicit signatures
# ----------------------------------------------------------------------------------

def _in(dtype, ndim):
    """Read-only C-contiguous array type (writable arrays convert to it)."""
    return types.Array(dtype, ndim, "C", readonly=True)


def _out(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def _compile(func, make, parallel):
    """``func`` compiled (or loaded from the disk cache) for ``make(float32)`` and
    ``make(float64)``; no other signature is ever compiled.

    A parallel build compiles a twin of ``func`` under its own qualified name: numba
    names cache files after the function, and the serial and parallel builds of one
    signature would otherwise overwrite each other's entry.
    """
    sigs = [make(dtype) for dtype in _FLOATS]
    if not parallel:
        return njit(sigs, **_CORE_OPTIONS)(func)
    twin = FunctionType(func.__code__, func.__globals__, func.__name__ + "_parallel",
                        func.__defaults__, func.__closure__)
    twin.__qualname__ = func.__qualname__ + "_parallel"
    return njit(sigs, parallel=True, **_CORE_OPTIONS)(twin)


def _deferred(name, func, make, parallel):
    """Stand-in for the module global ``name`` until its first call.

    That call compiles the core, rebinds ``name`` to the compiled dispatcher and
    forwards; later calls go straight to the dispatcher. Importing the module compiles
    nothing, and a program pays (once, thanks to the cache) only for the cores it uses.
    """
    def compile_and_call(*args):
        core = _compile(func, make, parallel)
        globals()[name] = core
        return core(*args)
    return compile_and_call


def _serial_and_parallel(name, func, make):
    """Deferred serial and parallel builds of ``func``, bound to the module globals
    ``name + "_serial"`` and ``name + "_parallel"`` (``prange`` is ``range`` in the first).
    """
    return (_deferred(name + "_serial", func, make, False),
            _deferred(name + "_parallel", func, make, True))


def _n_chunks(n):
    """Row chunks for a parallel core: one per thread."""
    return max(1, min(n, numba.get_num_threads()))


_EMPTY = {np.dtype(t): (np.empty(0, t), np.empty((0, 0), t)) for t in (np.float32, np.float64)}


def _empty_1d(like):
    """Placeholder for an optional 1-D argument the core will not touch."""
    return _EMPTY[like.dtype][0]


def _empty_2d(like):
    """Placeholder for an optional 2-D output the core will not touch."""
    return _EMPTY[like.dtype][1]


# ----------------------------------------------------------------------------------
# Row and element helpers (inlined into the cores; compiled per caller type)
# ----------------------------------------------------------------------------------

@njit(**_HELPER_OPTIONS)
def _chunk(c, n_chunks, n):
    """Bounds [lo, hi) of chunk c when n rows are split into n_chunks."""
    return c * n // n_chunks, (c + 1) * n // n_chunks


@njit(**_HELPER_OPTIONS)
def _require(ok):
    """The cores' O(1) argument check: a ValueError that the wrapper replaces with the
    contract's message (``_checks``); called outside any prange."""
    if not ok:
        raise ValueError("kernel arguments do not match")


@njit(**_HELPER_OPTIONS)
def _labels_ok(bad_chunks):
    """Whether no chunk of a prange met a label outside [0, k) (read after the loop)."""
    for c in range(bad_chunks.shape[0]):
        if bad_chunks[c]:
            return False
    return True


@njit(**_HELPER_OPTIONS)
def _loss_shapes_ok(pred, target_rows, weights, grad, use_weights, want_grad):
    """pred (n, k) with n, k >= 1, target_rows == n, weights (n,) and grad (n, k) when
    used."""
    n, k = pred.shape
    return (n >= 1 and k >= 1 and target_rows == n
            and (not use_weights or weights.shape[0] == n)
            and (not want_grad or (grad.shape[0] == n and grad.shape[1] == k)))


@njit(**_HELPER_OPTIONS)
def _serial_sum(values):
    """Sum of per-chunk partials, in chunk order (a plain loop, never a parfor)."""
    total = 0.0
    for c in range(values.shape[0]):
        total += values[c]
    return total


# float32 e^x and e^x - 1 for x <= 0 and log(1 + x) for 0 <= x <= 1 (every exp / expm1
# / log1p here has such an argument) as inline polynomials, the same as the Cython
# backend's (see _cython.pyx): LLVM vectorises the loops that call them, where
# math.exp & co. are a libm call per element. float64 keeps math.*.

_F32 = np.float32


@njit(**_HELPER_OPTIONS)
def _expf32_nonpos(x):
    """Cephes' expf: x = n ln2 + r, e^r by a degree-7 polynomial, 2^n in the exponent
    bits (subnormal results by a last multiply with 2^-24); NaN gives NaN."""
    lowest = _F32(-104.0)
    xc = x if x > lowest else lowest
    xc = xc if xc < _F32(0.0) else _F32(0.0)
    n = (xc * _F32(1.44269504088896341) + _F32(12582912.0)) - _F32(12582912.0)
    r = (xc - n * _F32(0.693359375)) - n * _F32(-2.12194440e-4)
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * (r * r) + r + _F32(1.0)
    ni = np.int32(n)
    tiny = ni < np.int32(-126)
    bits = np.int32((ni + (np.int32(24) if tiny else np.int32(0)) + np.int32(127)) << 23)
    p = p * bits.view(np.float32)
    p = p * (_F32(5.9604644775390625e-08) if tiny else _F32(1.0))
    return x if x != x else p


@njit(**_HELPER_OPTIONS)
def _expm1f32_nonpos(x):
    """Taylor to x^8 above -0.5 (no cancellation), e^x - 1 below."""
    p = _F32(2.48015873e-5)
    p = p * x + _F32(1.98412698e-4)
    p = p * x + _F32(1.38888889e-3)
    p = p * x + _F32(8.33333333e-3)
    p = p * x + _F32(4.16666667e-2)
    p = p * x + _F32(1.66666667e-1)
    p = p * x + _F32(0.5)
    p = p * (x * x) + x
    q = _expf32_nonpos(x) - _F32(1.0)
    return p if x > _F32(-0.5) else q


@njit(**_HELPER_OPTIONS)
def _log1pf32_unit(e):
    """1 + e = 2^k (1 + x), x = e (k = 0) or (e - 1) / 2 (k = 1); Cephes' logf
    polynomial for log(1 + x)."""
    big = e >= _F32(0.41421356)
    x = (e - _F32(1.0)) * _F32(0.5) if big else e
    k = _F32(1.0) if big else _F32(0.0)
    z = x * x
    y = _F32(7.0376836292e-2)
    y = y * x - _F32(1.1514610310e-1)
    y = y * x + _F32(1.1676998740e-1)
    y = y * x - _F32(1.2420140846e-1)
    y = y * x + _F32(1.4249322787e-1)
    y = y * x - _F32(1.6668057665e-1)
    y = y * x + _F32(2.0000714765e-1)
    y = y * x - _F32(2.4999993993e-1)
    y = y * x + _F32(3.3333331174e-1)
    y = y * x * z + k * _F32(-2.12194440e-4) - _F32(0.5) * z
    return (x + y) + k * _F32(0.693359375)


def _float32_inline(math_fn, float32_fn):
    """A function that compiled code runs as ``float32_fn`` for a float32 argument and
    as ``math_fn`` for any other (numba's overload picks one at typing time)."""
    def dispatch(x):
        return math_fn(x)

    @overload(dispatch)
    def _typed(x):
        impl = float32_fn if x == types.float32 else math_fn
        return lambda x: impl(x)
    return dispatch


_exp_nonpos = _float32_inline(math.exp, _expf32_nonpos)  # e^x, x <= 0
_expm1_nonpos = _float32_inline(math.expm1, _expm1f32_nonpos)  # e^x - 1, x <= 0
_log1p_unit = _float32_inline(math.log1p, _log1pf32_unit)  # log(1 + x), 0 <= x <= 1


@njit(**_HELPER_OPTIONS)
def _sigmoid(z, one):
    """Overflow-free logistic: exp only ever sees -|z|."""
    e = _exp_nonpos(-abs(z))
    return (one if z >= 0 else e) / (one + e)


@njit(inline="always", **_HELPER_OPTIONS)
def _tanh(z, one):
    """tanh z = sign(z) (-m / (2 + m)), m = e^(-2|z|) - 1: no overflow, no cancellation
    near 0, and (float32) vectorisable, where libm's tanh is a call per element."""
    a = abs(z)
    m = _expm1_nonpos(-(a + a))
    return math.copysign(-m / (one + one + m), z)


@njit(**_HELPER_OPTIONS)
def _activation_forward_span(act, z, out, alpha):
    """out = act(z) over 1-D z and out (may alias)."""
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    n = z.shape[0]
    if act == IDENTITY:
        for i in range(n):
            out[i] = z[i]
    elif act == STEP:
        for i in range(n):
            out[i] = one if z[i] >= zero else zero
    elif act == SIGMOID:
        for i in range(n):
            out[i] = _sigmoid(z[i], one)
    elif act == TANH:
        for i in range(n):
            out[i] = _tanh(z[i], one)
    elif act == RELU:
        for i in range(n):
            v = z[i]
            out[i] = v if v > zero else zero
    elif act == LEAKY_RELU:
        for i in range(n):
            v = z[i]
            out[i] = v if v > zero else alpha * v
    elif act == SOFTPLUS:
        for i in range(n):
            v = z[i]
            out[i] = (v if v > zero else zero) + _log1p_unit(_exp_nonpos(-abs(v)))
    elif act == ELU:
        for i in range(n):
            v = z[i]
            out[i] = v if v > zero else alpha * _expm1_nonpos(v)


@njit(**_HELPER_OPTIONS)
def _activation_backward_span(act, a, dout, out, alpha):
    """out = dout * act'(z), from a = act(z); 1-D, out may alias dout."""
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    n = a.shape[0]
    if act == IDENTITY:
        for i in range(n):
            out[i] = dout[i]
    elif act == STEP:
        for i in range(n):
            out[i] = zero
    elif act == SIGMOID:
        for i in range(n):
            v = a[i]
            out[i] = dout[i] * (v * (one - v))
    elif act == TANH:
        for i in range(n):
            v = a[i]
            out[i] = dout[i] * (one - v * v)
    elif act == RELU:
        for i in range(n):
            d = dout[i]  # loaded unconditionally: a select, not a branch on the sign
            out[i] = d if a[i] > zero else zero
    elif act == LEAKY_RELU:
        for i in range(n):
            d = dout[i]
            out[i] = d if a[i] > zero else alpha * d
    elif act == SOFTPLUS:
        for i in range(n):
            out[i] = -dout[i] * _expm1_nonpos(-a[i])
    elif act == ELU:
        for i in range(n):
            v = a[i]
            d = dout[i]
            out[i] = d if v > zero else d * (v + alpha)


@njit(**_HELPER_OPTIONS)
def _weight_total(weights, use_weights, n):
    """Denominator of the weighted mean: sum(w) in float64, or n."""
    if not use_weights:
        return float(n)
    total = 0.0
    for i in range(n):
        total += weights[i]
    return total


@njit(**_HELPER_OPTIONS)
def _row_max(z):
    m = z[0]
    for j in range(1, z.shape[0]):
        if z[j] > m:
            m = z[j]
    return m


@njit(**_HELPER_OPTIONS)
def _sum_exp_shifted(z, m):
    """sum_j exp(z_j - m), in float64."""
    s = 0.0
    for j in range(z.shape[0]):
        s += _exp_nonpos(z[j] - m)
    return s


@njit(**_HELPER_OPTIONS)
def _store_exp_shifted(z, m, e):
    """e_j = exp(z_j - m); returns their sum in float64."""
    for j in range(z.shape[0]):  # no reduction in this loop: it vectorises
        e[j] = _exp_nonpos(z[j] - m)
    s = 0.0
    for j in range(z.shape[0]):
        s += e[j]
    return s


@njit(**_HELPER_OPTIONS)
def _bce_row(z, t, grad, i, c, want_grad):
    """Row i of BCE: sum_j max(z,0) - z t + log(1 + e^-|z|); grad[i] = c (sigmoid(z) - t)."""
    zero = z.dtype.type(0)
    one = z.dtype.type(1)
    s = 0.0
    if want_grad:
        g = grad[i]
        for j in range(z.shape[0]):
            v = z[j]
            e = _exp_nonpos(-abs(v))
            s += (v if v > zero else zero) - v * t[j] + _log1p_unit(e)
            g[j] = ((one if v >= zero else e) / (one + e) - t[j]) * c
    else:
        for j in range(z.shape[0]):
            v = z[j]
            s += (v if v > zero else zero) - v * t[j] + _log1p_unit(_exp_nonpos(-abs(v)))
    return s


@njit(**_HELPER_OPTIONS)
def _mse_row(p, t, grad, i, c, want_grad):
    """Row i of MSE: sum_j (p - t)^2; grad[i] = 2 c (p - t)."""
    c2 = c + c
    s = 0.0
    if want_grad:
        g = grad[i]
        for j in range(p.shape[0]):
            d = p[j] - t[j]
            s += d * d
            g[j] = d * c2
    else:
        for j in range(p.shape[0]):
            d = p[j] - t[j]
            s += d * d
    return s


@njit(**_HELPER_OPTIONS)
def _mae_row(p, t, grad, i, c, want_grad):
    """Row i of MAE: sum_j |p - t|; grad[i] = c sign(p - t)."""
    zero = p.dtype.type(0)
    s = 0.0
    if want_grad:
        g = grad[i]
        for j in range(p.shape[0]):
            d = p[j] - t[j]
            s += abs(d)
            g[j] = c if d > zero else (-c if d < zero else zero)
    else:
        for j in range(p.shape[0]):
            s += abs(p[j] - t[j])
    return s


@njit(**_HELPER_OPTIONS)
def _huber_row(p, t, delta, grad, i, c, want_grad):
    """Row i of Huber: sum_j d^2/2 if |d| <= delta else delta (|d| - delta/2);
    grad[i] = c clip(d, -delta, delta).  Row sums are float64; grad only when want_grad.
    """
    half = p.dtype.type(0.5)
    s = 0.0
    if want_grad:
        g = grad[i]
        for j in range(p.shape[0]):
            d = p[j] - t[j]
            if abs(d) <= delta:
                s += half * d * d
                g[j] = d * c
            else:
                s += delta * (abs(d) - half * delta)
                g[j] = (delta if d > 0 else -delta) * c
    else:
        for j in range(p.shape[0]):
            d = p[j] - t[j]
            ad = abs(d)
            s += half * d * d if ad <= delta else delta * (ad - half * delta)
    return s


@njit(**_HELPER_OPTIONS)
def _softmax_ce_index_row(z, y, grad, i, scale, want_grad):
    """Row i of softmax cross-entropy with class index y: returns
    scale * (logsumexp(z) - z[y]) in float64; grad[i] = scale * (softmax(z) - onehot(y)).
    """
    m = _row_max(z)
    if want_grad:
        e = grad[i]
        s = _store_exp_shifted(z, m, e)
        coef = e.dtype.type(scale / s)
        for j in range(e.shape[0]):
            e[j] *= coef
        e[y] -= e.dtype.type(scale)
    else:
        s = _sum_exp_shifted(z, m)
    return scale * (math.log(s) - (z[y] - np.float64(m)))


@njit(**_HELPER_OPTIONS)
def _hinge_row(z, y, margin, grad, i, scale, want_grad):
    """Row i of the multiclass hinge: returns sum_{j != y} max(0, z_j - z_y + margin) in
    float64; grad[i] = scale at violating j, -scale * violations at y, 0 elsewhere."""
    zero = z.dtype.type(0)
    k = z.shape[0]
    base = z[y] - margin
    row = 0.0
    violations = 0
    if want_grad:
        g = grad[i]
        scale_t = g.dtype.type(scale)
        for j in range(k):
            d = z[j] - base
            if d > zero and j != y:
                row += d
                violations += 1
                g[j] = scale_t
            else:
                g[j] = zero
        g[y] = g.dtype.type(-violations * scale)
    else:
        for j in range(k):
            d = z[j] - base
            if d > zero and j != y:
                row += d
    return row


# A dense layer's epilogues, shared by the dense kernels (per chunk of rows) and
# train_epoch (per batch). They take the (n, k) matrix for the row loops and its
# row-major flat (n * k,) view for the one-pass elementwise spans: numba's reshape is a
# runtime call, and a slice per row costs more than a row of a matrix.

@njit(inline="always", **_HELPER_OPTIONS)
def _bias_activation_rows(z, z_flat, b, use_bias, act, alpha, out_flat, in_place, lo, hi):
    """Rows [lo, hi) of ``out = act(x @ w + b)`` after the matmul z = x @ w: z += b
    (when ``use_bias``), then out = act(z) in one pass over the block (nothing for
    identity ``in_place``: out is z)."""
    k = z.shape[1]
    if use_bias:
        for i in range(lo, hi):
            row = z[i]  # row views: LLVM vectorizes these, not z[i, j]
            for j in range(k):
                row[j] += b[j]
    if act != IDENTITY or not in_place:
        _activation_forward_span(act, z_flat[lo * k:hi * k], out_flat[lo * k:hi * k],
                                 alpha)


@njit(inline="always", **_HELPER_OPTIONS)
def _dz_rows(act, a_flat, dout_flat, dz, dz_flat, alpha, acc, want_db, lo, hi):
    """Rows [lo, hi) of a dense backward's epilogue: dz = dout * act'(a) in one pass
    over the block, then (when ``want_db``) acc[j] = the sum of those rows of dz, in
    float64. ``dz`` may be ``dout``."""
    k = dz.shape[1]
    _activation_backward_span(act, a_flat[lo * k:hi * k], dout_flat[lo * k:hi * k],
                              dz_flat[lo * k:hi * k], alpha)
    if want_db:
        for j in range(k):
            acc[j] = 0.0
        for i in range(lo, hi):
            row = dz[i]
            for j in range(k):
                acc[j] += row[j]


# ----------------------------------------------------------------------------------
# Cores (one plain function each, compiled serial + parallel where the work is
# elementwise or row-wise)
# ----------------------------------------------------------------------------------

def _activation_forward_chunks(act, z, out, alpha, n_chunks):
    n = z.shape[0]
    _require(out.shape[0] == n and IDENTITY <= act <= ELU)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        _activation_forward_span(act, z[lo:hi], out[lo:hi], alpha)


def _activation_backward_chunks(act, a, dout, out, alpha, n_chunks):
    n = a.shape[0]
    _require(dout.shape[0] == n and out.shape[0] == n and IDENTITY <= act <= ELU)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        _activation_backward_span(act, a[lo:hi], dout[lo:hi], out[lo:hi], alpha)


def _softmax_chunks(z, out, n_chunks):
    """Each row: its max, e^(z - max) into out with the sum in float64, then out / sum."""
    n, k = z.shape
    _require(k >= 1 and out.shape[0] == n and out.shape[1] == k)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        for i in range(lo, hi):
            row = out[i]
            total = _store_exp_shifted(z[i], _row_max(z[i]), row)
            for j in range(k):
                row[j] = row[j] / total


def _dense_forward_rows(x, w, b, act, out, alpha, n_chunks):
    n, k = out.shape
    _require(x.shape[0] == n and x.shape[1] == w.shape[0] and w.shape[1] == k
             and b.shape[0] == k and IDENTITY <= act <= ELU)
    np.dot(x, w, out)
    flat = out.reshape(-1)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        _bias_activation_rows(out, flat, b, True, act, alpha, flat, True, lo, hi)


def _dense_backward_rows(x, w, a, dout, act, dz, dx, dw, db, alpha, want_dx, n_chunks):
    n, k = dz.shape
    d = x.shape[1]
    _require(x.shape[0] == n and w.shape[0] == d and w.shape[1] == k
             and a.shape[0] == n and a.shape[1] == k and dout.shape[0] == n
             and dout.shape[1] == k and dw.shape[0] == d and dw.shape[1] == k
             and db.shape[0] == k and IDENTITY <= act <= ELU
             and (not want_dx or (dx.shape[0] == n and dx.shape[1] == d)))
    db_chunks = np.empty((n_chunks, k))
    a_flat, dout_flat, dz_flat = a.reshape(-1), dout.reshape(-1), dz.reshape(-1)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        _dz_rows(act, a_flat, dout_flat, dz, dz_flat, alpha, db_chunks[c], True, lo, hi)
    for j in range(k):
        total = 0.0
        for c in range(n_chunks):
            total += db_chunks[c, j]
        db[j] = total
    np.dot(x.T, dz, dw)
    if want_dx:
        np.dot(dz, w.T, dx)


def _dense_stack_forward_layers(x, params, widths, acts, alphas, use_bias, workspace, out):
    """Per layer ``dense_forward``'s arithmetic (BLAS matmul, then bias and activation
    over the rows in one pass), hidden layer l writing half ``l % 2`` of the workspace,
    the last one ``out``."""
    n_layers = widths.shape[0] - 1
    n = x.shape[0]
    # The O(L) argument checks (the wrapper reports what is wrong).
    ok = (n_layers >= 1 and acts.shape[0] == n_layers and alphas.shape[0] == n_layers
          and use_bias.shape[0] == n_layers)
    hidden = 0
    n_params = 0
    if ok:
        for layer in range(n_layers + 1):
            ok = ok and widths[layer] >= 1
            if 0 < layer < n_layers:
                hidden = max(hidden, widths[layer])
        for layer in range(n_layers):
            ok = ok and IDENTITY <= acts[layer] <= ELU
            n_params += widths[layer] * widths[layer + 1]
            n_params += widths[layer + 1] if use_bias[layer] != 0 else 0
    _require(ok and x.shape[1] == widths[0] and params.shape[0] == n_params
             and workspace.shape[0] >= 2 * n * hidden and out.shape[0] == n
             and out.shape[1] == widths[n_layers])
    if n == 0:
        return
    half = n * hidden
    a_at = 0
    p = 0
    for layer in range(n_layers):
        d = widths[layer]
        k = widths[layer + 1]
        w = params[p:p + d * k].reshape((d, k))
        p += d * k
        dst_at = (layer % 2) * half
        z = out if layer == n_layers - 1 else workspace[dst_at:dst_at + n * k].reshape((n, k))
        if layer == 0:
            np.dot(x, w, z)
        else:
            np.dot(workspace[a_at:a_at + n * d].reshape((n, d)), w, z)
        bias = use_bias[layer] != 0
        z_flat = z.reshape(-1)
        _bias_activation_rows(z, z_flat, params[p:p + k], bias, acts[layer],
                              params.dtype.type(alphas[layer]), z_flat, True, 0, n)
        p += k if bias else 0
        a_at = dst_at


def _dense_per_sample_grad_rows(x, dz, jac, offset, use_bias, n_chunks):
    n, d = x.shape
    k = dz.shape[1]
    _require(dz.shape[0] == n and jac.shape[0] == n and offset >= 0
             and offset + d * k + (k if use_bias else 0) <= jac.shape[1])
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        for s in range(lo, hi):
            row = jac[s]
            g = dz[s]
            for i in range(d):
                xi = x[s, i]
                start = offset + i * k
                for j in range(k):
                    row[start + j] = xi * g[j]
            if use_bias:
                start = offset + d * k
                for j in range(k):
                    row[start + j] = g[j]


def _label_loss_rows(kind, z, labels, param, weights, grad, use_weights, want_grad,
                     n_chunks):
    """Softmax cross-entropy (``kind`` CROSS_ENTROPY) or the multiclass hinge with margin
    ``param`` (HINGE) over rows with class-index labels: the weighted mean loss; grad
    rows when ``want_grad``. Labels out of [0, k) are recorded per chunk and refused
    after the loop."""
    n, k = z.shape
    _require(_loss_shapes_ok(z, labels.shape[0], weights, grad, use_weights, want_grad))
    total_w = _weight_total(weights, use_weights, n)
    loss_chunks = np.empty(n_chunks)
    bad_chunks = np.zeros(n_chunks, np.bool_)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        loss = 0.0
        for i in range(lo, hi):
            y = labels[i]
            if y < 0 or y >= k:  # recorded, reported after the loop (never raise here)
                bad_chunks[c] = True
                continue
            scale = (weights[i] if use_weights else 1.0) / total_w
            if kind == CROSS_ENTROPY:
                loss += _softmax_ce_index_row(z[i], y, grad, i, scale, want_grad)
            else:
                loss += scale * _hinge_row(z[i], y, param, grad, i, scale, want_grad)
        loss_chunks[c] = loss
    _require(_labels_ok(bad_chunks))
    return _serial_sum(loss_chunks)


def _softmax_ce_prob_rows(logits, labels, weights, dlogits, use_weights, want_grad,
                          n_chunks):
    n, k = logits.shape
    _require(labels.shape[1] == k and _loss_shapes_ok(
        logits, labels.shape[0], weights, dlogits, use_weights, want_grad))
    total_w = _weight_total(weights, use_weights, n)
    loss_chunks = np.empty(n_chunks)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        loss = 0.0
        for i in range(lo, hi):
            z = logits[i]
            y = labels[i]
            scale = (weights[i] if use_weights else 1.0) / total_w
            m = _row_max(z)
            if want_grad:
                s = _store_exp_shifted(z, m, dlogits[i])
            else:
                s = _sum_exp_shifted(z, m)
            y_sum = 0.0
            y_shifted = 0.0
            for j in range(k):
                y_sum += y[j]
                y_shifted += y[j] * (np.float64(z[j]) - m)
            loss += scale * (y_sum * math.log(s) - y_shifted)
            if want_grad:
                e = dlogits[i]
                coef = e.dtype.type(scale * y_sum / s)
                scale_t = e.dtype.type(scale)
                for j in range(k):
                    e[j] = e[j] * coef - scale_t * y[j]
        loss_chunks[c] = loss
    return _serial_sum(loss_chunks)


def _pointwise_loss_rows(kind, pred, target, param, weights, dpred, use_weights,
                         want_grad, n_chunks):
    n, k = pred.shape
    _require(target.shape[1] == k and _loss_shapes_ok(
        pred, target.shape[0], weights, dpred, use_weights, want_grad))
    total_w = _weight_total(weights, use_weights, n) * k
    loss_chunks = np.empty(n_chunks)
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n)
        loss = 0.0
        for i in range(lo, hi):
            scale = (weights[i] if use_weights else 1.0) / total_w
            scale_t = pred.dtype.type(scale)
            p = pred[i]
            t = target[i]
            if kind == BINARY_CROSS_ENTROPY:
                row = _bce_row(p, t, dpred, i, scale_t, want_grad)
            elif kind == MSE:
                row = _mse_row(p, t, dpred, i, scale_t, want_grad)
            elif kind == MAE:
                row = _mae_row(p, t, dpred, i, scale_t, want_grad)
            else:
                row = _huber_row(p, t, param, dpred, i, scale_t, want_grad)
            loss += scale * row
        loss_chunks[c] = loss
    return _serial_sum(loss_chunks)


# The optimizer cores take the hyper-parameters as the kernels do and set up their
# scalar coefficients in float64 before casting them to the data dtype once (as torch
# computes them): the wrappers and train_epoch's update share that set-up.

def _sgd_elements(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
                  nesterov, step):
    n = params.shape[0]
    use_momentum = momentum != 0.0
    _require(grads.shape[0] == n and (not use_momentum or momentum_buf.shape[0] == n))
    f = params.dtype.type
    lr_t, mu, keep, wd = f(lr), f(momentum), f(1.0 - dampening), f(weight_decay)
    first_step = step == 1
    for i in prange(n):
        g = grads[i] + wd * params[i]
        if use_momentum:
            buf = g if first_step else mu * momentum_buf[i] + keep * g
            momentum_buf[i] = buf
            g = g + mu * buf if nesterov else buf
        params[i] -= lr_t * g


def _adagrad_elements(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step):
    n = params.shape[0]
    _require(grads.shape[0] == n and state_sum.shape[0] == n)
    f = params.dtype.type
    clr, wd, eps_t = f(lr / (1.0 + (step - 1) * lr_decay)), f(weight_decay), f(eps)
    for i in prange(n):
        g = grads[i] + wd * params[i]
        s = state_sum[i] + g * g
        state_sum[i] = s
        params[i] -= clr * g / (math.sqrt(s) + eps_t)


def _rmsprop_elements(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                      weight_decay, momentum, centered):
    n = params.shape[0]
    use_momentum = momentum > 0.0
    _require(grads.shape[0] == n and square_avg.shape[0] == n
             and (not use_momentum or momentum_buf.shape[0] == n)
             and (not centered or grad_avg.shape[0] == n))
    f = params.dtype.type
    lr_t, alpha_t, keep, eps_t = f(lr), f(alpha), f(1.0 - alpha), f(eps)
    wd, mu = f(weight_decay), f(momentum)
    for i in prange(n):
        g = grads[i] + wd * params[i]
        v = alpha_t * square_avg[i] + keep * g * g
        square_avg[i] = v
        if centered:
            gbar = alpha_t * grad_avg[i] + keep * g
            grad_avg[i] = gbar
            v = v - gbar * gbar
        denom = math.sqrt(v) + eps_t
        if use_momentum:
            buf = mu * momentum_buf[i] + g / denom
            momentum_buf[i] = buf
            params[i] -= lr_t * buf
        else:
            params[i] -= lr_t * g / denom


def _adam_elements(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2,
                   eps, weight_decay, decoupled, amsgrad, step):
    n = params.shape[0]
    _require(grads.shape[0] == n and exp_avg.shape[0] == n and exp_avg_sq.shape[0] == n
             and (not amsgrad or max_exp_avg_sq.shape[0] == n))
    f = params.dtype.type
    if decoupled:
        decay, wd = f(1.0 - lr * weight_decay), f(0.0)
    else:
        decay, wd = f(1.0), f(weight_decay)
    t = float(step)  # a float exponent: libm pow, as Python's float ** int
    step_size, bias2_sqrt = f(lr / (1.0 - beta1 ** t)), f(math.sqrt(1.0 - beta2 ** t))
    b1, keep1, b2, keep2, eps_t = f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(eps)
    for i in prange(n):
        p = params[i] * decay
        g = grads[i] + wd * p
        m = b1 * exp_avg[i] + keep1 * g
        v = b2 * exp_avg_sq[i] + keep2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            v = max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        params[i] = p - step_size * m / (math.sqrt(v) / bias2_sqrt + eps_t)


# The fused training epoch: one serial core calling serial builds of the cores above.
# Its own helpers are inline="always": as separate functions numba would optimize and
# machine-compile each call tree once on its own and again inside the kernel (about
# 2-3 s more cold compile per dtype).

def _nested(func):
    """Serial build of a core's plain function, for calls from inside another core
    (``prange`` is ``range``). Not cached by itself: it is compiled into its caller.
    Not inline="always": spliced in at numba-IR level, the rmsprop pass no longer gave
    bit-identical results to the rmsprop kernel."""
    return njit(**_HELPER_OPTIONS)(func)


_sgd_nested = _nested(_sgd_elements)
_adagrad_nested = _nested(_adagrad_elements)
_rmsprop_nested = _nested(_rmsprop_elements)
_adam_nested = _nested(_adam_elements)


@njit(inline="always", **_HELPER_OPTIONS)
def _gather_batch(X, labels, targets, order, start, x, y, t):
    """Rows order[start:start + n] of X into x (n, d), and of labels into y / of targets
    into t (k columns, even when empty) when those are not empty. One pass, so the
    random reads overlap. False (and the batch unfinished) at a sample index outside
    [0, len(X)) or a label outside [0, k)."""
    n, d = x.shape
    k = t.shape[1]
    for i in range(n):
        r = order[start + i]
        if r < 0 or r >= X.shape[0]:
            return False
        src = X[r]
        dst = x[i]
        for j in range(d):
            dst[j] = src[j]
        if y.shape[0]:
            label = labels[r]
            if label < 0 or label >= k:
                return False
            y[i] = label
        if t.shape[0]:
            src_t = targets[r]
            dst_t = t[i]
            for j in range(k):
                dst_t[j] = src_t[j]
    return True


@njit(inline="always", **_HELPER_OPTIONS)
def _epoch_batch_loss(loss_code, param, out, y, t, dout):
    """Loss of one train_epoch batch (mean over its rows; codes of kernels.LOSS_CODES)
    and its gradient into dout, from the batch's labels y or targets t."""
    n, k = out.shape
    loss = 0.0
    if loss_code == CROSS_ENTROPY:
        scale = 1.0 / n
        for i in range(n):
            loss += _softmax_ce_index_row(out[i], y[i], dout, i, scale, True)
    elif loss_code == HINGE:
        scale = 1.0 / n
        for i in range(n):
            loss += scale * _hinge_row(out[i], y[i], param, dout, i, scale, True)
    else:
        scale = 1.0 / (float(n) * k)
        scale_t = out.dtype.type(scale)
        if loss_code == MSE:
            for i in range(n):
                loss += scale * _mse_row(out[i], t[i], dout, i, scale_t, True)
        elif loss_code == MAE:
            for i in range(n):
                loss += scale * _mae_row(out[i], t[i], dout, i, scale_t, True)
        elif loss_code == HUBER:
            for i in range(n):
                loss += scale * _huber_row(out[i], t[i], param, dout, i, scale_t, True)
        else:
            for i in range(n):
                loss += scale * _bce_row(out[i], t[i], dout, i, scale_t, True)
    return loss


@njit(inline="always", **_HELPER_OPTIONS)
def _epoch_batch_hits(loss_code, out, y, t):
    """Correct predictions of one batch, as _numpy._batch_hits: argmax (first NaN, else
    first max) == label for cross_entropy / hinge, (logit > 0) == (target >= 0.5)
    elementwise for binary_cross_entropy, else 0."""
    n, k = out.shape
    zero = out.dtype.type(0)
    half = t.dtype.type(0.5)
    hits = 0
    if loss_code == CROSS_ENTROPY or loss_code == HINGE:
        for i in range(n):
            z = out[i]
            best = 0
            top = z[0]
            if top == top:
                for j in range(1, k):
                    v = z[j]
                    if v != v:
                        best = j
                        break
                    if v > top:
                        top = v
                        best = j
            if best == y[i]:
                hits += 1
    elif loss_code == BINARY_CROSS_ENTROPY:
        for i in range(n):
            z = out[i]
            ti = t[i]
            for j in range(k):
                if (z[j] > zero) == (ti[j] >= half):
                    hits += 1
    return hits


@njit(inline="always", **_HELPER_OPTIONS)
def _epoch_update(opt_code, hyper, params, grads, state0, state1, state2, lr, t):
    """One optimizer update (kernels.OPTIMIZER_CODES, ``hyper`` laid out as
    kernels.OPTIMIZER_HYPER) with rate lr at update number t: the update kernel's core,
    scalar set-up included."""
    if opt_code == SGD:
        _sgd_nested(params, grads, state0, lr, hyper[0], hyper[1], hyper[2],
                    hyper[3] != 0.0, t)
    elif opt_code == ADAGRAD:
        _adagrad_nested(params, grads, state0, lr, hyper[0], hyper[1], hyper[2], t)
    elif opt_code == RMSPROP:
        _rmsprop_nested(params, grads, state0, state1, state2, lr, hyper[0], hyper[1],
                        hyper[2], hyper[3], hyper[4] != 0.0)
    else:
        _adam_nested(params, grads, state0, state1, state2, lr, hyper[0], hyper[1],
                     hyper[2], hyper[3], hyper[4] != 0.0, hyper[5] != 0.0, t)


@njit(inline="always", **_HELPER_OPTIONS)
def _layer_state(state, start, end):
    """state[start:end], or ``state`` itself when empty (an unused buffer)."""
    return state[start:end] if state.shape[0] else state


def _train_epoch_batches(X, labels, targets, order, batch_size, widths, acts, alphas,
                         use_bias, params, grads, workspace, loss_code, loss_param,
                         opt_code, hyper, lrs, state0, state1, state2, step, stats):
    """The whole epoch: the batch loop of _numpy.train_epoch with the arithmetic of the
    single kernels (dense_forward, the loss, dense_backward, the update) in sequence;
    each layer is updated right after its backward.

    Workspace: the outputs of every layer (the gathered batch first), then two buffers
    of batch_size * widest: ``delta`` holds d(loss)/d(output) of the current layer and
    ``dz`` the matmul result before the epilogue (forward) or dout * act' (backward).
    The elementwise passes never write in place, so LLVM vectorizes them.
    """
    n_layers = widths.shape[0] - 1
    m = order.shape[0]
    # The O(L) argument checks (the wrapper reports what is wrong): sizes of every
    # buffer against widths; sample indices and labels are checked as gathered.
    widest = 0
    width_sum = 0
    n_params = 0
    sizes_ok = n_layers >= 1 and batch_size >= 1
    for layer in range(n_layers + 1):
        widest = max(widest, widths[layer])
        width_sum += widths[layer]
        sizes_ok = sizes_ok and widths[layer] >= 1
    if sizes_ok and acts.shape[0] == n_layers and alphas.shape[0] == n_layers \
            and use_bias.shape[0] == n_layers:
        for layer in range(n_layers):
            n_params += widths[layer] * widths[layer + 1]
            n_params += widths[layer + 1] if use_bias[layer] != 0 else 0
            sizes_ok = sizes_ok and IDENTITY <= acts[layer] <= ELU
    else:
        sizes_ok = False
    k_out = widths[n_layers] if n_layers >= 0 else 0
    label_loss = loss_code == CROSS_ENTROPY or loss_code == HINGE
    _require(sizes_ok and X.shape[1] == widths[0] and params.shape[0] == n_params
             and grads.shape[0] == n_params and state0.shape[0] == n_params
             and state1.shape[0] == n_params and state2.shape[0] == n_params
             and workspace.shape[0] >= batch_size * (width_sum + 2 * widest)
             and lrs.shape[0] >= (m + batch_size - 1) // batch_size
             and stats.shape[0] == 4 and CROSS_ENTROPY <= loss_code <= HINGE
             and SGD <= opt_code <= ADAM and hyper.shape[0] == _HYPER_SIZES[opt_code]
             and (labels.shape[0] == X.shape[0] if label_loss
                  else targets.shape[0] == X.shape[0] and targets.shape[1] == k_out))
    for s in range(4):
        stats[s] = 0.0
    # Per-call scratch: the batch's labels / targets and the float64 bias gradient.
    rows = min(batch_size, m)
    y_buf = np.empty(rows if label_loss else 0, np.int64)
    t_buf = np.empty((0 if label_loss else rows, k_out), params.dtype)
    db_acc = np.empty(widest)
    param = params.dtype.type(loss_param)
    for b in range((m + batch_size - 1) // batch_size):
        start = b * batch_size
        size = min(batch_size, m - start)
        delta_at = size * width_sum
        dz_at = delta_at + batch_size * widest
        d = widths[0]
        y = y_buf[:size] if y_buf.shape[0] else y_buf
        t = t_buf[:size] if t_buf.shape[0] else t_buf
        _require(_gather_batch(X, labels, targets, order, start,
                               workspace[:size * d].reshape((size, d)), y, t))
        # Forward: z = x @ W into the dz buffer, z += b there, out = act(z).
        x_at = 0
        p = 0
        for layer in range(n_layers):
            d = widths[layer]
            k = widths[layer + 1]
            out_at = x_at + size * d
            z = workspace[dz_at:dz_at + size * k].reshape((size, k))
            np.dot(workspace[x_at:out_at].reshape((size, d)),
                   params[p:p + d * k].reshape((d, k)), z)
            p += d * k
            bias = use_bias[layer] != 0
            _bias_activation_rows(z, workspace[dz_at:dz_at + size * k], params[p:p + k],
                                  bias, acts[layer], params.dtype.type(alphas[layer]),
                                  workspace[out_at:out_at + size * k], False, 0, size)
            p += k if bias else 0
            x_at = out_at
        out = workspace[x_at:x_at + size * k_out].reshape((size, k_out))
        loss = _epoch_batch_loss(loss_code, param, out, y, t,
                                 workspace[delta_at:delta_at + size * k_out].reshape(
                                     (size, k_out)))
        stats[3] = loss
        if not math.isfinite(loss):
            return
        stats[1] += _epoch_batch_hits(loss_code, out, y, t)
        # Backward, last layer first (x_at / p walk back to each layer's input / W):
        # dz = delta * act'(out), db = column sums of dz, dW = x.T @ dz and, but for the
        # first layer, delta = dz @ W.T for the layer below.
        for layer in range(n_layers - 1, -1, -1):
            d = widths[layer]
            k = widths[layer + 1]
            a_at = x_at
            x_at -= size * d
            bias = use_bias[layer] != 0
            if bias:
                p -= k
            bias_at = p
            p -= d * k
            dz = workspace[dz_at:dz_at + size * k].reshape((size, k))
            _dz_rows(acts[layer], workspace[a_at:a_at + size * k],
                     workspace[delta_at:delta_at + size * k], dz,
                     workspace[dz_at:dz_at + size * k], params.dtype.type(alphas[layer]),
                     db_acc, bias, 0, size)
            if bias:
                for j in range(k):
                    grads[bias_at + j] = db_acc[j]
            np.dot(workspace[x_at:a_at].reshape((size, d)).T, dz,
                   grads[p:p + d * k].reshape((d, k)))
            if layer > 0:
                np.dot(dz, params[p:p + d * k].reshape((d, k)).T,
                       workspace[delta_at:delta_at + size * d].reshape((size, d)))
            # The layer's update at once, while its gradient is in cache (delta has
            # used the old W): the same arithmetic as one update of the whole buffer.
            end = p + d * k + (k if bias else 0)
            _epoch_update(opt_code, hyper, params[p:end], grads[p:end],
                          _layer_state(state0, p, end), _layer_state(state1, p, end),
                          _layer_state(state2, p, end), lrs[b], step + b + 1)
        stats[0] += loss * size
        stats[2] += 1


_activation_forward_serial, _activation_forward_parallel = _serial_and_parallel(
    "_activation_forward", _activation_forward_chunks,
    lambda f: types.void(_i8, _in(f, 1), _out(f, 1), f, _i8))
_activation_backward_serial, _activation_backward_parallel = _serial_and_parallel(
    "_activation_backward", _activation_backward_chunks,
    lambda f: types.void(_i8, _in(f, 1), _in(f, 1), _out(f, 1), f, _i8))
_softmax_serial, _softmax_parallel = _serial_and_parallel(
    "_softmax", _softmax_chunks, lambda f: types.void(_in(f, 2), _out(f, 2), _i8))
_dense_forward_serial, _dense_forward_parallel = _serial_and_parallel(
    "_dense_forward", _dense_forward_rows,
    lambda f: types.void(_in(f, 2), _in(f, 2), _in(f, 1), _i8, _out(f, 2), f, _i8))
_dense_stack_forward_core = _deferred(
    "_dense_stack_forward_core", _dense_stack_forward_layers,
    lambda f: types.void(_in(f, 2), _in(f, 1), _in(_i8, 1), _in(_i8, 1), _in(_f8, 1),
                         _in(_i8, 1), _out(f, 1), _out(f, 2)), False)
_dense_backward_serial, _dense_backward_parallel = _serial_and_parallel(
    "_dense_backward", _dense_backward_rows,
    lambda f: types.void(_in(f, 2), _in(f, 2), _in(f, 2), _in(f, 2), _i8, _out(f, 2),
                         _out(f, 2), _out(f, 2), _out(f, 1), f, _b1, _i8))
_dense_per_sample_grad_serial, _dense_per_sample_grad_parallel = _serial_and_parallel(
    "_dense_per_sample_grad", _dense_per_sample_grad_rows,
    lambda f: types.void(_in(f, 2), _in(f, 2), _out(f, 2), _i8, _b1, _i8))
_label_loss_serial, _label_loss_parallel = _serial_and_parallel(
    "_label_loss", _label_loss_rows,
    lambda f: _f8(_i8, _in(f, 2), _in(_i8, 1), f, _in(f, 1), _out(f, 2), _b1, _b1, _i8))
_softmax_ce_prob_serial, _softmax_ce_prob_parallel = _serial_and_parallel(
    "_softmax_ce_prob", _softmax_ce_prob_rows,
    lambda f: _f8(_in(f, 2), _in(f, 2), _in(f, 1), _out(f, 2), _b1, _b1, _i8))
_pointwise_loss_serial, _pointwise_loss_parallel = _serial_and_parallel(
    "_pointwise_loss", _pointwise_loss_rows,
    lambda f: _f8(_i8, _in(f, 2), _in(f, 2), f, _in(f, 1), _out(f, 2), _b1, _b1, _i8))
_sgd_serial, _sgd_parallel = _serial_and_parallel(
    "_sgd", _sgd_elements,
    lambda f: types.void(_out(f, 1), _in(f, 1), _out(f, 1), _f8, _f8, _f8, _f8, _b1, _i8))
_adagrad_serial, _adagrad_parallel = _serial_and_parallel(
    "_adagrad", _adagrad_elements,
    lambda f: types.void(_out(f, 1), _in(f, 1), _out(f, 1), _f8, _f8, _f8, _f8, _i8))
_rmsprop_serial, _rmsprop_parallel = _serial_and_parallel(
    "_rmsprop", _rmsprop_elements,
    lambda f: types.void(_out(f, 1), _in(f, 1), _out(f, 1), _out(f, 1), _out(f, 1),
                         _f8, _f8, _f8, _f8, _f8, _b1))
_adam_serial, _adam_parallel = _serial_and_parallel(
    "_adam", _adam_elements,
    lambda f: types.void(_out(f, 1), _in(f, 1), _out(f, 1), _out(f, 1), _out(f, 1),
                         _f8, _f8, _f8, _f8, _f8, _b1, _b1, _i8))


def _train_epoch_signature(f):
    return types.void(_in(f, 2), _in(_i8, 1), _in(f, 2), _in(_i8, 1), _i8, _in(_i8, 1),
                      _in(_i8, 1), _in(_f8, 1), _in(_i8, 1), _out(f, 1), _out(f, 1),
                      _out(f, 1), _i8, _f8, _i8, _in(_f8, 1), _in(_f8, 1), _out(f, 1),
                      _out(f, 1), _out(f, 1), _i8, _out(_f8, 1))


_train_epoch_cores = {}


def _train_epoch_core(dtype):
    """The train_epoch core for ``dtype``, compiled (or loaded from the disk cache) on
    first use of that dtype only: it is the largest core of the module (~10 s of cold
    compile per signature), and a model trains in one dtype."""
    core = _train_epoch_cores.get(dtype)
    if core is None:
        f = types.float32 if dtype == np.float32 else types.float64
        core = njit([_train_epoch_signature(f)], **_CORE_OPTIONS)(_train_epoch_batches)
        _train_epoch_cores[dtype] = core
    return core


# ----------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------

def _alpha(act, alpha):
    return DEFAULT_ALPHA[act] if alpha is None else alpha


def activation_forward(act, z, out, alpha=None):
    """``out = act(z)``, elementwise. ``z`` and ``out`` have the same shape (may alias).

    identity z; step [z >= 0]; sigmoid 1/(1+e^-z); tanh; relu max(z, 0);
    leaky_relu z if z > 0 else alpha*z; softplus log(1+e^z); elu z if z > 0 else
    alpha*(e^z - 1).
    """
    try:
        if act == IDENTITY and out is z:
            return
        flat_z = z.reshape(-1)
        flat_out = out.reshape(-1)
        n = flat_z.shape[0]
        if n >= PARALLEL_MIN_SIZE:
            _activation_forward_parallel(act, flat_z, flat_out, _alpha(act, alpha),
                                         _n_chunks(n))
        else:
            _activation_forward_serial(act, flat_z, flat_out, _alpha(act, alpha), 1)
    except _REFUSED:
        _checks.activation("activation_forward", act, {"z": z}, out)
        raise


def activation_backward(act, a, dout, out, alpha=None):
    """``out = dout * act'(z)`` with the derivative written in terms of ``a = act(z)``.

    identity 1; step 0; sigmoid a(1-a); tanh 1-a^2; relu [a > 0];
    leaky_relu 1 if a > 0 else alpha; softplus 1-e^-a; elu 1 if a > 0 else a+alpha.
    ``out`` may alias ``dout``.
    """
    try:
        if act == IDENTITY and out is dout:
            return
        flat = (a.reshape(-1), dout.reshape(-1), out.reshape(-1))
        n = flat[0].shape[0]
        if n >= PARALLEL_MIN_SIZE:
            _activation_backward_parallel(act, *flat, _alpha(act, alpha), _n_chunks(n))
        else:
            _activation_backward_serial(act, *flat, _alpha(act, alpha), 1)
    except _REFUSED:
        _checks.activation("activation_backward", act, {"a": a, "dout": dout}, out)
        raise


def softmax_forward(z, out):
    """Row-wise softmax ``out_ij = e^(z_ij - m_i) / sum_j e^(z_ij - m_i)``, m_i = max_j
    z_ij, one pass per row (the sum in float64). z, out (n, k), k >= 1; ``out`` may
    alias ``z``.
    """
    try:
        if z.size >= PARALLEL_MIN_SIZE:
            _softmax_parallel(z, out, _n_chunks(z.shape[0]))
        else:
            _softmax_serial(z, out, 1)
    except _REFUSED:
        _checks.softmax_forward(z, out)
        raise


# ----------------------------------------------------------------------------------
# Dense layer
# ----------------------------------------------------------------------------------

def dense_forward(x, w, b, act, out, alpha=None):
    """``out = act(x @ w + b)``.  x (n, d), w (d, k), b (k,), out (n, k).

    One BLAS matmul into ``out``, then bias and activation in one pass over ``out``.
    """
    try:
        if out.size >= PARALLEL_MIN_SIZE:
            _dense_forward_parallel(x, w, b, act, out, _alpha(act, alpha),
                                    _n_chunks(out.shape[0]))
        else:
            _dense_forward_serial(x, w, b, act, out, _alpha(act, alpha), 1)
    except _REFUSED:
        _checks.dense_forward(x, w, b, act, out)
        raise


def dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """Backward of ``a = act(x @ w + b)`` given ``dout = dL/da``.

    ``dz = dout * act'(a)``; ``dw = x.T @ dz``; ``db = dz.sum(0)``; ``dx = dz @ w.T``
    (skipped when dx is None). x (n, d), w (d, k), a/dout/dz (n, k), dx (n, d),
    dw (d, k), db (k,). ``dz`` may alias ``dout``. dz and db come from one pass; the
    two matmuls are BLAS calls on transposed views.
    """
    want_dx = dx is not None
    try:
        dx_or_empty = dx if want_dx else _empty_2d(dz)
        if dz.size >= PARALLEL_MIN_SIZE:
            _dense_backward_parallel(x, w, a, dout, act, dz, dx_or_empty, dw, db,
                                     _alpha(act, alpha), want_dx, _n_chunks(dz.shape[0]))
        else:
            _dense_backward_serial(x, w, a, dout, act, dz, dx_or_empty, dw, db,
                                   _alpha(act, alpha), want_dx, 1)
    except _REFUSED:
        _checks.dense_backward(x, w, a, dout, act, dz, dx, dw, db)
        raise


def dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out):
    """The inference pass of ``L`` dense layers in one call:
    ``a_l+1 = act_l(a_l @ W_l + b_l)``, ``out = a_L``; shapes and layout as
    ``_numpy.dense_stack_forward``. One serial compiled loop: per layer a BLAS matmul,
    then bias and activation in one pass (``dense_forward``'s arithmetic), the hidden
    outputs alternating between the halves of ``workspace``.
    """
    try:
        _dense_stack_forward_core(x, params, widths, acts, alphas, use_bias, workspace, out)
    except _REFUSED:
        _checks.dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace,
                                    out)
        raise


def dense_per_sample_grad(x, dz, jac, offset, use_bias):
    """Per-sample parameter gradients of a dense layer, written as Jacobian rows.

    For every sample s: ``jac[s, offset + i*k + j] = x[s, i] * dz[s, j]`` (the row-major
    flattening of the outer product x_s dz_s^T, i.e. of dW for that sample alone) and,
    when ``use_bias``, ``jac[s, offset + d*k + j] = dz[s, j]``. x (n, d), dz (n, k),
    jac (n, P) with P >= offset + d*k (+ k); other columns are left untouched.
    """
    try:
        n, d = x.shape
        if n * d * dz.shape[1] >= PARALLEL_MIN_SIZE:
            _dense_per_sample_grad_parallel(x, dz, jac, offset, bool(use_bias),
                                            _n_chunks(n))
        else:
            _dense_per_sample_grad_serial(x, dz, jac, offset, bool(use_bias), 1)
    except _REFUSED:
        _checks.dense_per_sample_grad(x, dz, jac, offset, use_bias)
        raise


# ----------------------------------------------------------------------------------
# Losses: each returns the loss and (unless dpred is None) writes its gradient
# ----------------------------------------------------------------------------------

def _rows_call(serial, parallel, data, *args):
    """Call the row-wise core fitting ``data``'s size; the chunk count goes last."""
    if data.size >= PARALLEL_MIN_SIZE:
        return float(parallel(*args, _n_chunks(data.shape[0])))
    return float(serial(*args, 1))


def _pointwise_loss(kernel, kind, pred, target, param, weights, dpred):
    use_weights = weights is not None
    want_grad = dpred is not None
    try:
        return _rows_call(_pointwise_loss_serial, _pointwise_loss_parallel, pred,
                          kind, pred, target, param,
                          weights if use_weights else _empty_1d(pred),
                          dpred if want_grad else _empty_2d(pred), use_weights, want_grad)
    except _REFUSED:
        _checks.loss(kernel, ("pred", "target", "dpred"), pred, target, weights, dpred)
        raise


def softmax_cross_entropy(logits, labels, weights, dlogits):
    """Fused stable softmax + cross-entropy (torch CrossEntropyLoss on logits).

    logits (n, k); labels int64 (n,) class indices, or (n, k) probability rows of the
    logits' dtype. l_i = logsumexp(z_i) - z_i[y_i]  (or -sum_j y_ij log softmax(z_i)_j).
    dlogits (n, k) = s_i * (softmax(z_i) * sum_j y_ij - y_i), with s_i = 1/n or
    w_i / sum(w). One pass per row: max, sum of exp, loss and gradient.
    """
    use_weights = weights is not None
    want_grad = dlogits is not None
    try:
        weights_arg = weights if use_weights else _empty_1d(logits)
        grad_arg = dlogits if want_grad else _empty_2d(logits)
        if labels.ndim == 1:
            return _rows_call(_label_loss_serial, _label_loss_parallel, logits,
                              CROSS_ENTROPY, logits, labels, logits.dtype.type(0),
                              weights_arg, grad_arg, use_weights, want_grad)
        return _rows_call(_softmax_ce_prob_serial, _softmax_ce_prob_parallel, logits,
                          logits, labels, weights_arg, grad_arg, use_weights, want_grad)
    except _REFUSED:
        _checks.softmax_cross_entropy(logits, labels, weights, dlogits)
        raise


def sigmoid_binary_cross_entropy(pred, target, weights, dpred):
    """Stable sigmoid + binary cross-entropy (torch BCEWithLogitsLoss), mean over n*k.

    pred (n, k) logits, target (n, k) in [0, 1].
    l_ij = max(z, 0) - z t + log(1 + e^-|z|);  dpred = s_i (sigmoid(z) - t) / k.
    """
    return _pointwise_loss("sigmoid_binary_cross_entropy", BINARY_CROSS_ENTROPY, pred,
                           target, 0.0, weights, dpred)


def mean_squared_error(pred, target, weights, dpred):
    """torch MSELoss, mean over n*k.  pred, target (n, k).

    l_ij = (p - t)^2;  dpred = 2 s_i (p - t) / k.
    """
    return _pointwise_loss("mean_squared_error", MSE, pred, target, 0.0, weights, dpred)


def mean_absolute_error(pred, target, weights, dpred):
    """torch L1Loss, mean over n*k.  l_ij = |p - t|;  dpred = s_i sign(p - t) / k."""
    return _pointwise_loss("mean_absolute_error", MAE, pred, target, 0.0, weights, dpred)


def huber(pred, target, delta, weights, dpred):
    """torch HuberLoss(delta), mean over n*k.  d = p - t:

    l = d^2/2 if |d| <= delta else delta (|d| - delta/2);
    dpred = s_i clip(d, -delta, delta) / k.
    """
    return _pointwise_loss("huber", HUBER, pred, target, delta, weights, dpred)


def multiclass_hinge(scores, labels, margin, weights, dscores):
    """Multiclass SVM loss (Weston-Watkins), summed over wrong classes, mean over samples.

    scores (n, k), labels int64 (n,).  l_i = sum_{j != y_i} max(0, s_ij - s_iy_i + margin).
    dscores: +s_i for each violating j, -s_i * (number of violations) at y_i.
    """
    use_weights = weights is not None
    want_grad = dscores is not None
    try:
        return _rows_call(_label_loss_serial, _label_loss_parallel, scores,
                          HINGE, scores, labels, margin,
                          weights if use_weights else _empty_1d(scores),
                          dscores if want_grad else _empty_2d(scores), use_weights,
                          want_grad)
    except _REFUSED:
        _checks.multiclass_hinge(scores, labels, weights, dscores)
        raise


# ----------------------------------------------------------------------------------
# Optimizer steps over flat parameter / gradient / state buffers (all 1-D, in place),
# one fused pass each (its core sets up the scalar coefficients in float64).
# ----------------------------------------------------------------------------------

def sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
               nesterov, step):
    """torch.optim.SGD.  g = grad + wd*p; if momentum: b = g (step 1) else
    b = mu*b + (1-dampening)*g, and g = g + mu*b (nesterov) or b;  p -= lr*g.
    ``momentum_buf`` is untouched when momentum == 0.
    """
    use_momentum = bool(momentum)
    try:
        core = _sgd_parallel if params.shape[0] >= PARALLEL_MIN_SIZE else _sgd_serial
        core(params, grads, momentum_buf if use_momentum else _empty_1d(params), lr,
             momentum, dampening, weight_decay, bool(nesterov), step)
    except _REFUSED:
        _checks.sgd_update(params, grads, momentum_buf, momentum)
        raise


def adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step):
    """torch.optim.Adagrad.  g = grad + wd*p; clr = lr / (1 + (t-1)*lr_decay);
    G += g^2; p -= clr * g / (sqrt(G) + eps).
    """
    try:
        big = params.shape[0] >= PARALLEL_MIN_SIZE
        core = _adagrad_parallel if big else _adagrad_serial
        core(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step)
    except _REFUSED:
        _checks.adagrad_update(params, grads, state_sum)
        raise


def rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                   weight_decay, momentum, centered):
    """torch.optim.RMSprop.  g = grad + wd*p; v = alpha*v + (1-alpha)*g^2;
    centered: gbar = alpha*gbar + (1-alpha)*g, v~ = v - gbar^2, else v~ = v;
    momentum: b = mu*b + g/(sqrt(v~)+eps), p -= lr*b; else p -= lr*g/(sqrt(v~)+eps).
    ``momentum_buf`` / ``grad_avg`` are untouched unless momentum > 0 / centered.
    """
    use_momentum = momentum > 0
    try:
        big = params.shape[0] >= PARALLEL_MIN_SIZE
        core = _rmsprop_parallel if big else _rmsprop_serial
        core(params, grads, square_avg,
             momentum_buf if use_momentum else _empty_1d(params),
             grad_avg if centered else _empty_1d(params), lr, alpha, eps, weight_decay,
             momentum, bool(centered))
    except _REFUSED:
        _checks.rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, momentum,
                               centered)
        raise


def adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2,
                eps, weight_decay, decoupled, amsgrad, step):
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True).

    AdamW: p *= 1 - lr*wd; Adam: g = grad + wd*p.  m = b1*m + (1-b1)*g;
    v = b2*v + (1-b2)*g^2; amsgrad: vmax = max(vmax, v) and v is replaced by vmax;
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    ``max_exp_avg_sq`` is untouched unless amsgrad.
    """
    try:
        core = _adam_parallel if params.shape[0] >= PARALLEL_MIN_SIZE else _adam_serial
        core(params, grads, exp_avg, exp_avg_sq,
             max_exp_avg_sq if amsgrad else _empty_1d(params), lr, beta1, beta2, eps,
             weight_decay, bool(decoupled), bool(amsgrad), step)
    except _REFUSED:
        _checks.adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
        raise


# ----------------------------------------------------------------------------------
# A whole training epoch of a stack of dense layers in one call
# ----------------------------------------------------------------------------------

def train_epoch(spec):
    """One epoch of mini-batch training of ``L`` dense layers, all in one call.

    ``spec`` is a ``fastnn.kernels.TrainEpochSpec``. The contract of
    ``_numpy.train_epoch`` (workspace size, ``stats``, the stop before the update of a
    batch whose loss is not finite) as one serial compiled loop that returns to Python
    only when the epoch ends. Per batch: the rows (and labels or targets) are gathered;
    each layer is a BLAS matmul, then bias and activation (``dense_forward``'s
    arithmetic); the loss is the row helper of the matching loss kernel; each layer's
    backward is ``dense_backward``'s arithmetic (dz, the bias gradient summed in
    float64, dW and dx by BLAS); the update is the optimizer kernel's pass over the
    flat buffers (each layer's gradient goes to ``grads``, then its update; see
    ``_numpy.train_epoch`` for what ``grads`` holds afterwards). The result is
    bit-identical to calling those single kernels in sequence. Nothing is allocated
    per batch. Compiled per dtype, on the first call with that dtype. A ``bf16`` spec
    runs the Cython kernel (see ``_bf16_kernels``).

    An epoch with ``reduce`` runs the numpy reference (``_numpy.train_epoch``): compiled
    code reaches a Python callable only through ``numba.objmode``, whose callee must be
    a global, and ``cache=True`` freezes globals.
    """
    if spec.bf16:
        return _bf16_kernels().train_epoch(spec)
    if spec.reduce is not None:
        _numpy.train_epoch(spec)
        return
    try:
        optimizer = spec.optimizer
        state0, state1, state2 = optimizer.states
        _train_epoch_core(spec.params.dtype)(
            spec.X, spec.labels, spec.targets, spec.order, int(spec.batch_size),
            spec.widths, spec.acts, spec.alphas, spec.use_bias, spec.params, spec.grads,
            spec.workspace, int(spec.loss_code), float(spec.loss_param),
            int(optimizer.code), optimizer.hyper, spec.lrs, state0, state1, state2,
            int(spec.step), spec.stats)
    except _REFUSED:
        _checks.train_epoch(spec)
        _checks.train_epoch_indices(spec)
        raise


# ----------------------------------------------------------------------------------
# bfloat16 products: the Cython kernels
#
# Numba has no bfloat16 type, and @njit code cannot emit vdpbf16ps (llvmlite exposes
# no target intrinsics), so a numba bf16 GEMM would be the float32 one plus two
# rounding passes: slower than float32, the opposite of the point. This backend
# therefore runs the Cython backend's bf16 kernels (kernels/fastnn_bf16.h, GIL
# released there too); where the Cython extension is not built it raises ImportError.
# ----------------------------------------------------------------------------------

def _bf16_kernels():
    """The Cython backend, which holds the bf16 kernels of every compiled backend."""
    try:
        from . import _cython
    except ImportError as exc:
        raise ImportError(f"the numba backend's bf16 kernels are the Cython backend's, "
                          f"which cannot be loaded: {exc}") from exc
    return _cython


def bf16_round(x, out):
    """``_cython.bf16_round``: ``out = x`` rounded to bfloat16, as float32."""
    _bf16_kernels().bf16_round(x, out)


def dense_forward_bf16(x, w, b, act, out, alpha=None):
    """``_cython.dense_forward_bf16``: ``out = act(bf16(x) @ bf16(w) + b)``."""
    _bf16_kernels().dense_forward_bf16(x, w, b, act, out, alpha)


def dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """``_cython.dense_backward_bf16``: the backward of ``dense_forward_bf16``."""
    _bf16_kernels().dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha)


def dense_stack_forward_bf16(x, params, widths, acts, alphas, use_bias, workspace, out):
    """``_cython.dense_stack_forward_bf16``: the inference pass in bf16."""
    _bf16_kernels().dense_stack_forward_bf16(x, params, widths, acts, alphas, use_bias,
                                             workspace, out)
