# Design:
# a) Same functions and positional arguments as kernels/_numpy.py (the contract and
#    the oracle). Arrays are typed C-contiguous memoryviews over the fused type
#    `floating` (float32 / float64); inputs are `const` so read-only arrays work.
#    Kernels never validate; the only exception they raise is MemoryError when
#    their small scratch buffer (one double per row, or per chunk and column)
#    cannot be allocated.
# b) Pure C helpers (`noexcept nogil`) compute one contiguous range of elements or
#    one block of rows, with the branch on the activation / loss kind hoisted out of
#    the inner loops. The def functions only resolve defaults and scalar
#    hyper-parameters (in double) and run the helpers `with nogil`.
# c) Matmuls call scipy.linalg.cython_blas sgemm / dgemm on row-major data by
#    swapping the operands (as sklearn/utils/_cython_blas.pyx); transposes go
#    through the gemm flags, never copies. The bias and activation are the gemm's
#    epilogue: `out` is prefilled with b and gemm runs with beta=1.
# d) Threads: work of at least _PARALLEL_MIN elements is split into one static chunk
#    per thread (prange); smaller work runs serially. BLAS is never called inside
#    a prange. Losses store one double per row and sum the rows serially, so the
#    loss does not depend on the thread count; db accumulates per-chunk double rows.
# e) Elementwise math runs in the arrays' precision (expf & co. for float32), as
#    numpy does; every reduction (losses, db) accumulates in double.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport (
    exp, expf, expm1, expm1f, fabs, log, log1p, log1pf, sqrt, sqrtf, tanh, tanhf,
)
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

from . import DEFAULT_ALPHA as _DEFAULT_ALPHA

# OpenMP when the compiler has it (setup.py passes -fopenmp / /openmp); otherwise
# serial stand-ins, so the module still builds where OpenMP is unavailable (macOS).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #else
    #define omp_set_num_threads(n) ((void)(n))
    #define omp_get_max_threads() 1
    #endif
    """
    void omp_set_num_threads(int n) noexcept nogil
    int omp_get_max_threads() noexcept nogil


cdef enum:
    # Activation codes (fastnn.kernels.ACTIVATIONS).
    IDENTITY = 0
    STEP = 1
    SIGMOID = 2
    TANH = 3
    RELU = 4
    LEAKY_RELU = 5
    SOFTPLUS = 6
    ELU = 7

cdef enum:
    # Loss kinds of the shared row-loss driver.
    MSE
    MAE
    HUBER
    BCE
    SOFTMAX_CE
    HINGE

# Below this many elements a loop runs serially: a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 17

# Threads the parallel loops use; set_num_threads changes it. Kept here as well as in
# OpenMP's per-thread ICV so that a call from any Python thread takes effect.
cdef int _num_threads = omp_get_max_threads()


def set_num_threads(int n):
    """Use ``n`` OpenMP threads in the kernels' parallel loops (BLAS is limited apart)."""
    global _num_threads
    omp_set_num_threads(n)
    _num_threads = n


cdef inline int _n_chunks(Py_ssize_t work, Py_ssize_t n_items) noexcept nogil:
    """Static chunks to split ``n_items`` into: one per thread for big work, else 1."""
    if work < _PARALLEL_MIN or _num_threads < 2 or n_items < 2:
        return 1
    return <int> min(<Py_ssize_t> _num_threads, n_items)


cdef double _resolve_alpha(int act, object alpha) except? -1:
    """``alpha`` or the activation's default (None -> DEFAULT_ALPHA[act])."""
    if alpha is not None:
        return alpha
    if 0 <= act < len(_DEFAULT_ALPHA):
        return _DEFAULT_ALPHA[act]
    return 0.0


# ----------------------------------------------------------------------------------
# Scalar math in the arrays' precision
# ----------------------------------------------------------------------------------

cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _expm1(floating x) noexcept nogil:
    if floating is float:
        return expm1f(x)
    else:
        return expm1(x)


cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _sigmoid(floating z) noexcept nogil:
    """1 / (1 + e^-z); exp only ever sees -|z|, so it never overflows."""
    cdef floating e = _exp(-z if z >= 0 else z)
    return (1 if z >= 0 else e) / (1 + e)


cdef inline floating _softplus(floating z) noexcept nogil:
    """log(1 + e^z) = max(z, 0) + log1p(e^-|z|)."""
    if z > 0:
        return z + _log1p(_exp(-z))
    return _log1p(_exp(z))


# ----------------------------------------------------------------------------------
# BLAS
# ----------------------------------------------------------------------------------

cdef inline void _gemm(
    char ta, char tb, int m, int n, int k, floating alpha,
    const floating *a, int lda,  # IN  op(A) (m, k), row-major
    const floating *b, int ldb,  # IN  op(B) (k, n), row-major
    floating beta,
    floating *c, int ldc,        # OUT C (m, n), row-major
) noexcept nogil:
    """Row-major ``C = alpha op(A) op(B) + beta C``.

    A row-major matrix is its transpose in column-major order, so BLAS computes
    ``C.T = op(B).T op(A).T``: operands and their flags swap, shapes (n, m, k).
    """
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float *> b, &ldb, <float *> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double *> b, &ldb, <double *> a, &lda,
              &beta, c, &ldc)


# ----------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------

cdef void _activation_forward_range(
    int act, floating alpha,
    const floating *z,  # IN
    floating *out,      # OUT (may alias z)
    Py_ssize_t size,
) noexcept nogil:
    """``out[:size] = act(z[:size])``; unknown codes act as identity."""
    cdef Py_ssize_t j
    if act == STEP:
        for j in range(size):
            out[j] = 1 if z[j] >= 0 else 0
    elif act == SIGMOID:
        for j in range(size):
            out[j] = _sigmoid(z[j])
    elif act == TANH:
        for j in range(size):
            out[j] = _tanh(z[j])
    elif act == RELU:
        for j in range(size):
            out[j] = z[j] if z[j] > 0 else 0
    elif act == LEAKY_RELU:
        for j in range(size):
            out[j] = z[j] if z[j] > 0 else alpha * z[j]
    elif act == SOFTPLUS:
        for j in range(size):
            out[j] = _softplus(z[j])
    elif act == ELU:
        for j in range(size):
            out[j] = z[j] if z[j] > 0 else alpha * _expm1(z[j])
    elif <const floating *> out != z:
        memcpy(out, z, size * sizeof(floating))


cdef void _activation_backward_range(
    int act, floating alpha,
    const floating *a,     # IN  forward output
    const floating *dout,  # IN
    floating *out,         # OUT (may alias dout)
    Py_ssize_t size,
) noexcept nogil:
    """``out[:size] = dout * act'(z)``, the derivative written in terms of ``a``."""
    cdef Py_ssize_t j
    if act == STEP:
        memset(out, 0, size * sizeof(floating))
    elif act == SIGMOID:
        for j in range(size):
            out[j] = dout[j] * (a[j] * (1 - a[j]))
    elif act == TANH:
        for j in range(size):
            out[j] = dout[j] * (1 - a[j] * a[j])
    elif act == RELU:
        for j in range(size):
            out[j] = dout[j] if a[j] > 0 else 0
    elif act == LEAKY_RELU:
        for j in range(size):
            out[j] = dout[j] if a[j] > 0 else dout[j] * alpha
    elif act == SOFTPLUS:
        for j in range(size):
            out[j] = dout[j] * -_expm1(-a[j])
    elif act == ELU:
        for j in range(size):
            out[j] = dout[j] if a[j] > 0 else dout[j] * (a[j] + alpha)
    elif <const floating *> out != dout:
        memcpy(out, dout, size * sizeof(floating))


cdef void _activation_forward_flat(
    int act, floating alpha,
    const floating *z,  # IN
    floating *out,      # OUT
    Py_ssize_t size,
) noexcept nogil:
    """``_activation_forward_range`` over the whole buffer, threaded when big."""
    cdef int c, nchunks = _n_chunks(size, size)
    if nchunks == 1:
        _activation_forward_range(act, alpha, z, out, size)
        return
    for c in prange(nchunks, schedule="static", num_threads=nchunks):
        _activation_forward_range(
            act, alpha, z + size * c // nchunks, out + size * c // nchunks,
            size * (c + 1) // nchunks - size * c // nchunks)


def _activation_forward(
    int act,
    const floating[::1] z,  # IN
    floating[::1] out,      # OUT
    double alpha,
):
    with nogil:
        _activation_forward_flat(act, <floating> alpha, &z[0], &out[0], z.shape[0])


def _activation_backward(
    int act,
    const floating[::1] a,     # IN
    const floating[::1] dout,  # IN
    floating[::1] out,         # OUT
    double alpha,
):
    cdef:
        Py_ssize_t size = a.shape[0]
        int c, nchunks = _n_chunks(size, size)
    with nogil:
        if nchunks == 1:
            _activation_backward_range(act, <floating> alpha, &a[0], &dout[0], &out[0],
                                       size)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                _activation_backward_range(
                    act, <floating> alpha, &a[size * c // nchunks],
                    &dout[size * c // nchunks], &out[size * c // nchunks],
                    size * (c + 1) // nchunks - size * c // nchunks)


def activation_forward(act, z, out, alpha=None):
    """``out = act(z)``, elementwise; any shape, ``out`` may alias ``z``."""
    _activation_forward(act, z.reshape(-1), out.reshape(-1), _resolve_alpha(act, alpha))


def activation_backward(act, a, dout, out, alpha=None):
    """``out = dout * act'(z)`` from the forward output ``a``; ``out`` may alias ``dout``."""
    _activation_backward(act, a.reshape(-1), dout.reshape(-1), out.reshape(-1),
                         _resolve_alpha(act, alpha))


# ----------------------------------------------------------------------------------
# Dense layer
# ----------------------------------------------------------------------------------

def dense_forward(
    const floating[:, ::1] x,  # IN  (n, d)
    const floating[:, ::1] w,  # IN  (d, k)
    const floating[::1] b,     # IN  (k,)
    int act,
    floating[:, ::1] out,      # OUT (n, k)
    alpha=None,
):
    """``out = act(x @ w + b)``: bias rows, then gemm with beta=1, then one pass."""
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1]
        floating alpha_ = _resolve_alpha(act, alpha)
        Py_ssize_t i
    with nogil:
        for i in range(n):
            memcpy(&out[i, 0], &b[0], k * sizeof(floating))
        _gemm(c"N", c"N", n, k, d, 1, &x[0, 0], d, &w[0, 0], k, 1, &out[0, 0], k)
        if act != IDENTITY:
            _activation_forward_flat(act, alpha_, &out[0, 0], &out[0, 0],
                                     <Py_ssize_t> n * k)


cdef void _dz_rows(
    int act, floating alpha,
    const floating *a,     # IN  (rows, k)
    const floating *dout,  # IN  (rows, k)
    floating *dz,          # OUT (rows, k), may alias dout
    double *db,            # OUT (k,) accumulated
    Py_ssize_t rows, Py_ssize_t k,
) noexcept nogil:
    """``dz = dout * act'(a)`` row by row, adding each row into ``db`` while in cache."""
    cdef Py_ssize_t i, j
    for i in range(rows):
        _activation_backward_range(act, alpha, a, dout, dz, k)
        for j in range(k):
            db[j] += dz[j]
        a += k
        dout += k
        dz += k


def dense_backward(
    const floating[:, ::1] x,     # IN  (n, d)
    const floating[:, ::1] w,     # IN  (d, k)
    const floating[:, ::1] a,     # IN  (n, k) forward output
    const floating[:, ::1] dout,  # IN  (n, k)
    int act,
    floating[:, ::1] dz,          # OUT (n, k), may alias dout
    floating[:, ::1] dx,          # OUT (n, d), None: skipped
    floating[:, ::1] dw,          # OUT (d, k)
    floating[::1] db,             # OUT (k,)
    alpha=None,
):
    """``dz = dout * act'(a)``, ``db = dz.sum(0)`` in one pass; ``dw = x.T @ dz`` and
    ``dx = dz @ w.T`` by gemm (transposes through the flags)."""
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1]
        floating alpha_ = _resolve_alpha(act, alpha)
        int c, nchunks = _n_chunks(<Py_ssize_t> n * k, n)
        Py_ssize_t j, lo, hi
        double total
        double *db_parts = <double *> calloc(<size_t> nchunks * k, sizeof(double))
    if db_parts == NULL:
        raise MemoryError()
    with nogil:
        if nchunks == 1:
            _dz_rows(act, alpha_, &a[0, 0], &dout[0, 0], &dz[0, 0], db_parts, n, k)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = <Py_ssize_t> n * c // nchunks
                hi = <Py_ssize_t> n * (c + 1) // nchunks
                _dz_rows(act, alpha_, &a[lo, 0], &dout[lo, 0], &dz[lo, 0],
                         db_parts + <Py_ssize_t> c * k, hi - lo, k)
        for j in range(k):
            total = 0
            for c in range(nchunks):
                total += db_parts[<Py_ssize_t> c * k + j]
            db[j] = <floating> total
        _gemm(c"T", c"N", d, k, n, 1, &x[0, 0], d, &dz[0, 0], k, 0, &dw[0, 0], k)
        if dx is not None:
            _gemm(c"N", c"T", n, d, k, 1, &dz[0, 0], k, &w[0, 0], k, 0, &dx[0, 0], d)
    free(db_parts)


cdef void _per_sample_grad_rows(
    const floating *x,   # IN  (rows, d)
    const floating *dz,  # IN  (rows, k)
    floating *jac,       # OUT (rows, width) from the layer's first column
    Py_ssize_t rows, Py_ssize_t d, Py_ssize_t k, Py_ssize_t width, bint use_bias,
) noexcept nogil:
    """Row s: the row-major outer product x_s dz_s^T, then dz_s when ``use_bias``."""
    cdef Py_ssize_t s, i, j
    cdef floating xi
    cdef floating *row
    for s in range(rows):
        row = jac
        for i in range(d):
            xi = x[i]
            for j in range(k):
                row[j] = xi * dz[j]
            row += k
        if use_bias:
            memcpy(row, dz, k * sizeof(floating))
        x += d
        dz += k
        jac += width


def dense_per_sample_grad(
    const floating[:, ::1] x,   # IN  (n, d)
    const floating[:, ::1] dz,  # IN  (n, k)
    floating[:, ::1] jac,       # OUT (n, P), columns [offset, offset + d*k (+ k))
    Py_ssize_t offset,
    bint use_bias,
):
    """Per-sample dense gradients as Jacobian rows: ``jac[s, offset + i*k + j] =
    x[s, i] dz[s, j]`` and, with ``use_bias``, ``jac[s, offset + d*k + j] = dz[s, j]``;
    other columns untouched."""
    cdef:
        Py_ssize_t n = x.shape[0], d = x.shape[1], k = dz.shape[1]
        Py_ssize_t width = jac.shape[1], lo, hi
        int c, nchunks = _n_chunks(n * (d + 1) * k, n)
    with nogil:
        if nchunks == 1:
            _per_sample_grad_rows(&x[0, 0], &dz[0, 0], &jac[0, 0] + offset, n, d, k,
                                  width, use_bias)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = n * c // nchunks
                hi = n * (c + 1) // nchunks
                _per_sample_grad_rows(&x[lo, 0], &dz[lo, 0], &jac[lo, 0] + offset,
                                      hi - lo, d, k, width, use_bias)


# ----------------------------------------------------------------------------------
# Losses: one driver (weights, threads, the reduction) over per-row helpers. Each
# helper returns the row's loss sum l_i and, when dp is not NULL, writes the row's
# gradient with the row's scale s.
# ----------------------------------------------------------------------------------

cdef double _mse_row(
    const floating *p, const floating *t, Py_ssize_t k, double s, floating *dp,
) noexcept nogil:
    cdef:
        Py_ssize_t j
        double diff, total = 0
    if dp == NULL:
        for j in range(k):
            diff = <double> p[j] - t[j]
            total += diff * diff
    else:
        for j in range(k):
            diff = <double> p[j] - t[j]
            total += diff * diff
            dp[j] = <floating> (2 * s * diff)
    return total


cdef double _mae_row(
    const floating *p, const floating *t, Py_ssize_t k, double s, floating *dp,
) noexcept nogil:
    cdef:
        Py_ssize_t j
        double diff, total = 0
    if dp == NULL:
        for j in range(k):
            total += fabs(<double> p[j] - t[j])
    else:
        for j in range(k):
            diff = <double> p[j] - t[j]
            total += fabs(diff)
            dp[j] = <floating> (s if diff > 0 else (-s if diff < 0 else 0))
    return total


cdef double _huber_row(
    const floating *p, const floating *t, Py_ssize_t k, double delta, double s,
    floating *dp,
) noexcept nogil:
    cdef:
        Py_ssize_t j
        double diff, absd, total = 0
    for j in range(k):
        diff = <double> p[j] - t[j]
        absd = fabs(diff)
        if absd <= delta:
            total += 0.5 * diff * diff
        else:
            total += delta * (absd - 0.5 * delta)
    if dp != NULL:
        for j in range(k):
            diff = <double> p[j] - t[j]
            dp[j] = <floating> (s * min(max(diff, -delta), delta))
    return total


cdef double _bce_row(
    const floating *z, const floating *t, Py_ssize_t k, double s, floating *dp,
) noexcept nogil:
    """max(z, 0) - z t + log(1 + e^-|z|) and s (sigmoid(z) - t): exp sees -|z| only."""
    cdef:
        Py_ssize_t j
        floating zj, e
        double total = 0
    for j in range(k):
        zj = z[j]
        e = _exp(-zj if zj >= 0 else zj)
        total += (<double> zj if zj > 0 else 0.0) - <double> zj * t[j] + _log1p(e)
        if dp != NULL:
            dp[j] = <floating> (s * (<double> ((1 if zj >= 0 else e) / (1 + e)) - t[j]))
    return total


cdef double _softmax_ce_row(
    const floating *z,  # IN  logits (k,)
    const floating *y,  # IN  probability row (k,), or NULL: class index `label`
    int64_t label, Py_ssize_t k, double s,
    floating *dz,       # OUT (k,) or NULL; holds e^(z - max) until the last sweep
) noexcept nogil:
    """l = (sum_j y_j) logsumexp(z) - sum_j y_j z_j, computed max-subtracted;
    dz = s (softmax(z) sum_j y_j - y)."""
    cdef:
        Py_ssize_t j
        floating zmax = z[0], e
        double sum_exp = 0, log_sum, y_sum = 1, yz = 0, c, e_label
    for j in range(1, k):
        if z[j] > zmax:
            zmax = z[j]
    if dz == NULL:
        for j in range(k):
            sum_exp += _exp(z[j] - zmax)
    else:
        for j in range(k):
            e = _exp(z[j] - zmax)
            dz[j] = e
            sum_exp += e
    log_sum = log(sum_exp)
    if y == NULL:
        yz = z[label] - zmax
    else:
        y_sum = 0
        for j in range(k):
            y_sum += y[j]
            yz += <double> y[j] * (z[j] - zmax)
    if dz != NULL:
        c = s * y_sum / sum_exp
        if y == NULL:
            e_label = dz[label]
            for j in range(k):
                dz[j] = <floating> (c * dz[j])
            dz[label] = <floating> (c * e_label - s)
        else:
            for j in range(k):
                dz[j] = <floating> (c * dz[j] - s * y[j])
    return y_sum * log_sum - yz


cdef double _hinge_row(
    const floating *z, int64_t label, Py_ssize_t k, floating margin, double s,
    floating *dz,
) noexcept nogil:
    """sum_{j != y} max(0, z_j - z_y + margin); dz = s per violation, -s * count at y."""
    cdef:
        Py_ssize_t j, violations = 0
        floating zy = z[label], m
        double total = 0
    for j in range(k):
        m = z[j] - zy + margin
        if j != label and m > 0:
            total += m
            violations += 1
            if dz != NULL:
                dz[j] = <floating> s
        elif dz != NULL:
            dz[j] = 0
    if dz != NULL:
        dz[label] = <floating> (-s * violations)
    return total


cdef void _loss_rows(
    int kind, double param,
    const floating *pred,     # IN  (n, k)
    const floating *target,   # IN  (n, k) or NULL
    const int64_t *labels,    # IN  (n,) or NULL
    const floating *weights,  # IN  (n,) or NULL
    double inv_total,         # 1 / (n or sum(weights)), divided by k where averaged
    Py_ssize_t k,
    floating *dpred,          # OUT (n, k) or NULL
    double *row_loss,         # OUT (n,) s_i * l_i
    Py_ssize_t start, Py_ssize_t stop,
) noexcept nogil:
    cdef:
        Py_ssize_t i, off
        double s, l = 0
        const floating *t = NULL
        floating *dp = NULL
        int64_t label = 0
    for i in range(start, stop):
        s = inv_total if weights == NULL else weights[i] * inv_total
        off = i * k
        if target != NULL:
            t = target + off
        if dpred != NULL:
            dp = dpred + off
        if labels != NULL:
            label = labels[i]
        if kind == MSE:
            l = _mse_row(pred + off, t, k, s, dp)
        elif kind == MAE:
            l = _mae_row(pred + off, t, k, s, dp)
        elif kind == HUBER:
            l = _huber_row(pred + off, t, k, param, s, dp)
        elif kind == BCE:
            l = _bce_row(pred + off, t, k, s, dp)
        elif kind == SOFTMAX_CE:
            l = _softmax_ce_row(pred + off, t, label, k, s, dp)
        elif kind == HINGE:
            l = _hinge_row(pred + off, label, k, <floating> param, s, dp)
        row_loss[i] = s * l


cdef double _loss(
    int kind, double param, bint mean_over_k,
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k) or None
    const int64_t[::1] labels,      # IN  (n,) or None
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
) except? -1:
    """sum_i s_i l_i with s_i = 1/n or w_i / sum(w) (and / k when ``mean_over_k``)."""
    cdef:
        Py_ssize_t n = pred.shape[0], k = pred.shape[1], i
        int c, nchunks = _n_chunks(n * k, n)
        const floating *t = NULL
        const int64_t *lab = NULL
        const floating *w = NULL
        floating *dp = NULL
        double inv_total, total = 0
        double *row_loss = <double *> malloc(n * sizeof(double))
    if row_loss == NULL:
        raise MemoryError()
    if target is not None:
        t = &target[0, 0]
    if labels is not None:
        lab = &labels[0]
    if weights is not None:
        w = &weights[0]
    if dpred is not None:
        dp = &dpred[0, 0]
    with nogil:
        if w == NULL:
            inv_total = 1.0 / n
        else:
            for i in range(n):
                total += w[i]
            inv_total = 1.0 / total
        if mean_over_k:
            inv_total /= k
        if nchunks == 1:
            _loss_rows(kind, param, &pred[0, 0], t, lab, w, inv_total, k, dp, row_loss,
                       0, n)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                _loss_rows(kind, param, &pred[0, 0], t, lab, w, inv_total, k, dp,
                           row_loss, n * c // nchunks, n * (c + 1) // nchunks)
        total = 0
        for i in range(n):
            total += row_loss[i]
    free(row_loss)
    return total


def _softmax_cross_entropy_index(
    const floating[:, ::1] logits,  # IN  (n, k)
    const int64_t[::1] labels,      # IN  (n,)
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dlogits,       # OUT (n, k) or None
):
    return _loss[floating](SOFTMAX_CE, 0, False, logits, None, labels, weights, dlogits)


def _softmax_cross_entropy_proba(
    const floating[:, ::1] logits,  # IN  (n, k)
    const floating[:, ::1] labels,  # IN  (n, k) probability rows
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dlogits,       # OUT (n, k) or None
):
    return _loss[floating](SOFTMAX_CE, 0, False, logits, labels, None, weights, dlogits)


def softmax_cross_entropy(logits, labels, weights, dlogits):
    """Fused stable softmax + cross-entropy (torch CrossEntropyLoss on logits).

    logits (n, k); labels int64 (n,) class indices or (n, k) probability rows.
    l_i = logsumexp(z_i) - z_i[y_i] (or -sum_j y_ij log softmax(z_i)_j);
    dlogits (n, k) = s_i (softmax(z_i) sum_j y_ij - y_i), s_i = 1/n or w_i / sum(w).
    """
    if labels.ndim == 1:
        return _softmax_cross_entropy_index(logits, labels, weights, dlogits)
    return _softmax_cross_entropy_proba(logits, labels, weights, dlogits)


def sigmoid_binary_cross_entropy(
    const floating[:, ::1] pred,    # IN  (n, k) logits
    const floating[:, ::1] target,  # IN  (n, k) in [0, 1]
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
):
    """torch BCEWithLogitsLoss, mean over n*k.
    l = max(z, 0) - z t + log(1 + e^-|z|);  dpred = s_i (sigmoid(z) - t) / k."""
    return _loss[floating](BCE, 0, True, pred, target, None, weights, dpred)


def mean_squared_error(
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k)
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
):
    """torch MSELoss, mean over n*k.  l = (p - t)^2;  dpred = 2 s_i (p - t) / k."""
    return _loss[floating](MSE, 0, True, pred, target, None, weights, dpred)


def mean_absolute_error(
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k)
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
):
    """torch L1Loss, mean over n*k.  l = |p - t|;  dpred = s_i sign(p - t) / k."""
    return _loss[floating](MAE, 0, True, pred, target, None, weights, dpred)


def huber(
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k)
    double delta,
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
):
    """torch HuberLoss(delta), mean over n*k.  d = p - t:
    l = d^2/2 if |d| <= delta else delta (|d| - delta/2);  dpred = s_i clip(d) / k."""
    return _loss[floating](HUBER, delta, True, pred, target, None, weights, dpred)


def multiclass_hinge(
    const floating[:, ::1] scores,  # IN  (n, k)
    const int64_t[::1] labels,      # IN  (n,)
    double margin,
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dscores,       # OUT (n, k) or None
):
    """Weston-Watkins multiclass SVM, mean over samples.
    l_i = sum_{j != y_i} max(0, s_ij - s_iy_i + margin); dscores: +s_i per violating j,
    -s_i * (number of violations) at y_i."""
    return _loss[floating](HINGE, margin, False, scores, None, labels, weights, dscores)


# ----------------------------------------------------------------------------------
# Optimizer steps over flat buffers: one fused loop, threaded when big
# ----------------------------------------------------------------------------------

cdef void _sgd_range(
    floating *p, const floating *g, floating *buf,
    floating lr, floating mu, floating damp_keep, floating wd, bint nesterov,
    bint first, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi
    for i in range(size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        if mu != 0:
            buf[i] = gi if first else mu * buf[i] + damp_keep * gi
            gi = gi + mu * buf[i] if nesterov else buf[i]
        p[i] -= lr * gi


def sgd_update(
    floating[::1] params,        # IN/OUT
    const floating[::1] grads,   # IN
    floating[::1] momentum_buf,  # IN/OUT, None or untouched when momentum == 0
    double lr, double momentum, double dampening, double weight_decay,
    bint nesterov, long step,
):
    """torch.optim.SGD.  g = grad + wd*p; if momentum: b = g (step 1) else
    b = mu*b + (1-dampening)*g, and g = g + mu*b (nesterov) or b;  p -= lr*g."""
    cdef:
        Py_ssize_t size = params.shape[0], lo
        int c, nchunks = _n_chunks(size, size)
        floating *buf = NULL
    if momentum != 0:
        buf = &momentum_buf[0]
    with nogil:
        if nchunks == 1:
            _sgd_range(&params[0], &grads[0], buf, lr, momentum, 1 - dampening,
                       weight_decay, nesterov, step == 1, size)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = size * c // nchunks
                _sgd_range(&params[lo], &grads[lo], buf + lo if buf != NULL else NULL,
                           lr, momentum, 1 - dampening, weight_decay, nesterov,
                           step == 1, size * (c + 1) // nchunks - lo)


cdef void _adagrad_range(
    floating *p, const floating *g, floating *state_sum,
    floating clr, floating wd, floating eps, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi
    for i in range(size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        state_sum[i] += gi * gi
        p[i] -= clr * gi / (_sqrt(state_sum[i]) + eps)


def adagrad_update(
    floating[::1] params,       # IN/OUT
    const floating[::1] grads,  # IN
    floating[::1] state_sum,    # IN/OUT
    double lr, double lr_decay, double weight_decay, double eps, long step,
):
    """torch.optim.Adagrad.  g = grad + wd*p; clr = lr / (1 + (t-1)*lr_decay);
    G += g^2; p -= clr * g / (sqrt(G) + eps)."""
    cdef:
        Py_ssize_t size = params.shape[0], lo
        int c, nchunks = _n_chunks(size, size)
        floating clr = lr / (1 + (step - 1) * lr_decay)
    with nogil:
        if nchunks == 1:
            _adagrad_range(&params[0], &grads[0], &state_sum[0], clr, weight_decay,
                           eps, size)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = size * c // nchunks
                _adagrad_range(&params[lo], &grads[lo], &state_sum[lo], clr,
                               weight_decay, eps, size * (c + 1) // nchunks - lo)


cdef void _rmsprop_range(
    floating *p, const floating *g, floating *square_avg, floating *buf,
    floating *grad_avg, floating lr, floating alpha, floating eps, floating wd,
    floating mu, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi, denom
    for i in range(size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        square_avg[i] = alpha * square_avg[i] + (1 - alpha) * gi * gi
        if grad_avg != NULL:
            grad_avg[i] = alpha * grad_avg[i] + (1 - alpha) * gi
            denom = _sqrt(square_avg[i] - grad_avg[i] * grad_avg[i]) + eps
        else:
            denom = _sqrt(square_avg[i]) + eps
        if buf != NULL:
            buf[i] = mu * buf[i] + gi / denom
            p[i] -= lr * buf[i]
        else:
            p[i] -= lr * gi / denom


def rmsprop_update(
    floating[::1] params,        # IN/OUT
    const floating[::1] grads,   # IN
    floating[::1] square_avg,    # IN/OUT
    floating[::1] momentum_buf,  # IN/OUT, None or untouched unless momentum > 0
    floating[::1] grad_avg,      # IN/OUT, None or untouched unless centered
    double lr, double alpha, double eps, double weight_decay, double momentum,
    bint centered,
):
    """torch.optim.RMSprop.  g = grad + wd*p; v = alpha*v + (1-alpha)*g^2;
    centered: gbar = alpha*gbar + (1-alpha)*g, v~ = v - gbar^2, else v~ = v;
    momentum: b = mu*b + g/(sqrt(v~)+eps), p -= lr*b; else p -= lr*g/(sqrt(v~)+eps)."""
    cdef:
        Py_ssize_t size = params.shape[0], lo
        int c, nchunks = _n_chunks(size, size)
        floating *buf = NULL
        floating *gbar = NULL
    if momentum > 0:
        buf = &momentum_buf[0]
    if centered:
        gbar = &grad_avg[0]
    with nogil:
        if nchunks == 1:
            _rmsprop_range(&params[0], &grads[0], &square_avg[0], buf, gbar, lr, alpha,
                           eps, weight_decay, momentum, size)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = size * c // nchunks
                _rmsprop_range(&params[lo], &grads[lo], &square_avg[lo],
                               buf + lo if buf != NULL else NULL,
                               gbar + lo if gbar != NULL else NULL, lr, alpha, eps,
                               weight_decay, momentum, size * (c + 1) // nchunks - lo)


cdef void _adam_range(
    floating *p, const floating *g, floating *m, floating *v, floating *vmax,
    floating step_size, floating beta1, floating beta2, floating bias2_sqrt,
    floating eps, floating wd, floating decay, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi, vi
    for i in range(size):
        if decay != 1:
            p[i] *= decay
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        m[i] = beta1 * m[i] + (1 - beta1) * gi
        v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
        vi = v[i]
        if vmax != NULL:
            if vi > vmax[i]:
                vmax[i] = vi
            vi = vmax[i]
        p[i] -= step_size * m[i] / (_sqrt(vi) / bias2_sqrt + eps)


def adam_update(
    floating[::1] params,          # IN/OUT
    const floating[::1] grads,     # IN
    floating[::1] exp_avg,         # IN/OUT
    floating[::1] exp_avg_sq,      # IN/OUT
    floating[::1] max_exp_avg_sq,  # IN/OUT, None or untouched unless amsgrad
    double lr, double beta1, double beta2, double eps, double weight_decay,
    bint decoupled, bint amsgrad, long step,
):
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True).
    AdamW: p *= 1 - lr*wd; Adam: g = grad + wd*p.  m = b1*m + (1-b1)*g;
    v = b2*v + (1-b2)*g^2; amsgrad: v = vmax = max(vmax, v);
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""
    cdef:
        Py_ssize_t size = params.shape[0], lo
        int c, nchunks = _n_chunks(size, size)
        floating *vmax = NULL
        floating step_size = lr / (1 - beta1 ** step)
        floating bias2_sqrt = sqrt(1 - beta2 ** step)
        floating decay = 1 - lr * weight_decay if decoupled else 1
        floating wd = 0 if decoupled else weight_decay
    if amsgrad:
        vmax = &max_exp_avg_sq[0]
    with nogil:
        if nchunks == 1:
            _adam_range(&params[0], &grads[0], &exp_avg[0], &exp_avg_sq[0], vmax,
                        step_size, beta1, beta2, bias2_sqrt, eps, wd, decay, size)
        else:
            for c in prange(nchunks, schedule="static", num_threads=nchunks):
                lo = size * c // nchunks
                _adam_range(&params[lo], &grads[lo], &exp_avg[lo], &exp_avg_sq[lo],
                            vmax + lo if vmax != NULL else NULL, step_size, beta1,
                            beta2, bias2_sqrt, eps, wd, decay,
                            size * (c + 1) // nchunks - lo)
