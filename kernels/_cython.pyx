# Design:
# a) Same functions and positional arguments as kernels/_numpy.py (the contract and
#    the oracle). Arrays are typed C-contiguous memoryviews over the fused type
#    `floating` (float32 / float64); inputs are `const` so read-only arrays work.
#    Each public function is a plain def that calls its typed twin (`_name`) and,
#    should that refuse the arguments (a memoryview that does not convert, or the
#    twin's O(1) check of every shape against the others), raises the contract's
#    error from kernels/_checks.py, as the other backends do. Class labels and sample
#    indices are bounds-checked inside the loops and reported after them. Values are
#    never validated. A scratch buffer that cannot be allocated is a MemoryError.
# b) Pure C helpers (`noexcept nogil`, raw pointers) compute one contiguous range of
#    elements or one block of rows, with the branch on the activation / loss kind
#    hoisted out of the inner loops; a dense layer, a loss or an optimizer step is one
#    helper taking its chunk count (1: serial). The def functions only resolve
#    defaults and scalar hyper-parameters (in double) and run the helpers `with nogil`.
# c) Matmuls call scipy.linalg.cython_blas sgemm / dgemm on row-major data by
#    swapping the operands (as sklearn/utils/_cython_blas.pyx); transposes go
#    through the gemm flags, never copies. The bias and activation are the gemm's
#    epilogue: `out` is prefilled with b and gemm runs with beta=1.
# d) Threads: work of at least _PARALLEL_MIN elements is split into one static chunk
#    per thread (prange); smaller work runs serially. BLAS is never called inside
#    a prange. Losses store one double per row and sum the rows serially, so the
#    loss does not depend on the thread count; db accumulates per-chunk double rows.
# e) Elementwise math runs in the arrays' precision, as numpy does: float32 exp,
#    expm1, log1p and tanh inline (see the C block below), float64 libm; every
#    reduction (losses, db) accumulates in double.
# f) train_epoch composes those same helpers over a whole epoch in one nogil loop, on
#    pointer offsets into params / grads / workspace (no allocation per batch),
#    serially: its nets are small, and BLAS keeps its own threads. Plain SGD is folded
#    into the weight-gradient gemm (beta = 1 - lr wd, alpha = -lr): dW is never stored
#    (except in a data-parallel epoch, whose `reduce` hook needs it).
#    dense_stack_forward (inference) runs the same dense forward helper per layer in
#    one nogil call, the hidden outputs alternating between two workspace halves.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport (
    exp, expm1, fabs, isfinite, log, log1p, sqrt, sqrtf, tanh,
)
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

from . import _checks
from . import ACTIVATIONS as _ACTIVATIONS
from . import DEFAULT_ALPHA as _DEFAULT_ALPHA
from . import LOSS_CODES as _LOSS_CODES
from . import OPTIMIZER_CODES as _OPTIMIZER_CODES
from . import OPTIMIZER_HYPER as _OPTIMIZER_HYPER
from . import REDUCE_LOSS as _REDUCE_LOSS
from . import REDUCE_START as _REDUCE_START
from . import REDUCE_WAIT as _REDUCE_WAIT

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

# A cache prefetch hint where the compiler has one (a no-op elsewhere).
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FASTNN_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
    #define FASTNN_PREFETCH(p) ((void)(p))
    #endif
    """
    void _prefetch "FASTNN_PREFETCH"(const void *p) noexcept nogil

# e^x and e^x - 1 for float32 x <= 0 (every exponential here: softmax z - max, sigmoid
# e^-|z|, softplus, elu), log(1 + x) for 0 <= x <= 1 and tanh inline, so the compiler
# can vectorise the loops that call them: libm's are a call per element (tanhf ~15 ns).
# e^x is Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n
# in the exponent bits (subnormal results by a last multiply with 2^-24, one rounding).
# Each within 2.5 ulp of the exact value; NaN gives NaN.
cdef extern from *:
    """
    #include <stdint.h>
    static inline float fastnn_expf_nonpos(float x)
    {
        const float lowest = -104.0f;  /* e^x rounds to 0 below ~ -103.97 */
        float xc = x > lowest ? x : lowest;  /* NaN too: no undefined float-to-int */
        xc = xc < 0.0f ? xc : 0.0f;  /* the domain; keeps 2^n representable */
        float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round */
        float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  /* xc - n ln2 */
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * (r * r) + r + 1.0f;
        int32_t ni = (int32_t) n;
        int tiny = ni < -126;  /* 2^n subnormal: 2^(n + 24) then 2^-24 (one rounding) */
        union { int32_t i; float f; } two_n;
        two_n.i = (ni + (tiny ? 24 : 0) + 127) << 23;
        p *= two_n.f;
        p *= tiny ? 0x1p-24f : 1.0f;
        return x != x ? x : p;
    }

    /* e^x - 1 for x <= 0: Taylor to x^8 above -0.5 (truncation < 6e-9, no
       cancellation), e^x - 1 below (|result| >= 0.39). */
    static inline float fastnn_expm1f_nonpos(float x)
    {
        float p = 2.48015873e-5f;
        p = p * x + 1.98412698e-4f;
        p = p * x + 1.38888889e-3f;
        p = p * x + 8.33333333e-3f;
        p = p * x + 4.16666667e-2f;
        p = p * x + 1.66666667e-1f;
        p = p * x + 0.5f;
        p = p * (x * x) + x;
        float q = fastnn_expf_nonpos(x) - 1.0f;
        return x > -0.5f ? p : q;
    }

    /* tanh x = sign(x) (-m / (2 + m)), m = e^(-2|x|) - 1. */
    static inline float fastnn_tanhf(float x)
    {
        float m = fastnn_expm1f_nonpos(-2.0f * fabsf(x));
        return copysignf(-m / (2.0f + m), x);
    }

    /* log(1 + e) for 0 <= e <= 1 (softplus and BCE: e = e^-|z|): 1 + e = 2^k (1 + x)
       with x = e itself (k = 0, exact) or (e - 1) / 2 (k = 1), |x| <= sqrt(2) - 1;
       log(1 + x) by Cephes' logf polynomial. */
    static inline float fastnn_log1pf_unit(float e)
    {
        int big = e >= 0.41421356f;
        float x = big ? (e - 1.0f) * 0.5f : e;
        float k = big ? 1.0f : 0.0f;
        float z = x * x;
        float y = 7.0376836292e-2f;
        y = y * x - 1.1514610310e-1f;
        y = y * x + 1.1676998740e-1f;
        y = y * x - 1.2420140846e-1f;
        y = y * x + 1.4249322787e-1f;
        y = y * x - 1.6668057665e-1f;
        y = y * x + 2.0000714765e-1f;
        y = y * x - 2.4999993993e-1f;
        y = y * x + 3.3333331174e-1f;
        y = y * x * z + k * -2.12194440e-4f - 0.5f * z;
        return (x + y) + k * 0.693359375f;
    }
    """
    float _expf_nonpos "fastnn_expf_nonpos"(float x) noexcept nogil
    float _log1pf_unit "fastnn_log1pf_unit"(float x) noexcept nogil
    float _expm1f_nonpos "fastnn_expm1f_nonpos"(float x) noexcept nogil
    float _tanhf "fastnn_tanhf"(float x) noexcept nogil


# The activation, loss and optimizer codes, from fastnn.kernels (defined there once),
# as C globals that the nogil code compares with.
cdef int IDENTITY = _ACTIVATIONS["identity"]
cdef int STEP = _ACTIVATIONS["step"]
cdef int SIGMOID = _ACTIVATIONS["sigmoid"]
cdef int TANH = _ACTIVATIONS["tanh"]
cdef int RELU = _ACTIVATIONS["relu"]
cdef int LEAKY_RELU = _ACTIVATIONS["leaky_relu"]
cdef int SOFTPLUS = _ACTIVATIONS["softplus"]
cdef int ELU = _ACTIVATIONS["elu"]
cdef int SOFTMAX_CE = _LOSS_CODES["cross_entropy"]
cdef int MSE = _LOSS_CODES["mse"]
cdef int MAE = _LOSS_CODES["mae"]
cdef int HUBER = _LOSS_CODES["huber"]
cdef int BCE = _LOSS_CODES["binary_cross_entropy"]
cdef int HINGE = _LOSS_CODES["hinge"]
cdef int SGD = _OPTIMIZER_CODES["sgd"]
cdef int ADAGRAD = _OPTIMIZER_CODES["adagrad"]
cdef int RMSPROP = _OPTIMIZER_CODES["rmsprop"]
cdef int ADAM = _OPTIMIZER_CODES["adam"]
cdef int REDUCE_LOSS = _REDUCE_LOSS
cdef int REDUCE_START = _REDUCE_START
cdef int REDUCE_WAIT = _REDUCE_WAIT

# Below this many elements a loop runs serially: a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 17

# Elements of a block that row-blocked passes keep in L1 between their sweeps.
cdef Py_ssize_t _L1_ELEMENTS = 2048

# train_epoch prefetches the next batch's sample rows while it computes this one when
# they take at most this many bytes (bigger batches would evict the weights from L2).
cdef Py_ssize_t _PREFETCH_BYTES = 1 << 16

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


#: What a typed twin raises for arguments it cannot take: a memoryview that does not
#: convert (ValueError / TypeError), a non-array (AttributeError / TypeError), or its
#: own shape check. The public def then raises the contract's error (``_checks``), or
#: the original one if that finds nothing wrong.
_REFUSED = (TypeError, ValueError, AttributeError)


cdef int _refuse() except -1:
    """The typed twins' shape-check failure (replaced by ``_checks``' message)."""
    raise ValueError("kernel arguments do not match")


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

cdef inline floating _exp_nonpos(floating x) noexcept nogil:
    """e^x for x <= 0 (inline for float32, see _expf_nonpos; libm exp for float64)."""
    if floating is float:
        return _expf_nonpos(x)
    else:
        return exp(x)


cdef inline floating _expm1_nonpos(floating x) noexcept nogil:
    """e^x - 1 for x <= 0 (inline for float32, see _expm1f_nonpos)."""
    if floating is float:
        return _expm1f_nonpos(x)
    else:
        return expm1(x)


cdef inline floating _log1p_unit(floating x) noexcept nogil:
    """log(1 + x) for 0 <= x <= 1 (inline for float32, see _log1pf_unit)."""
    if floating is float:
        return _log1pf_unit(x)
    else:
        return log1p(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    """tanh (inline for float32, see _tanhf)."""
    if floating is float:
        return _tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _sigmoid(floating z) noexcept nogil:
    """1 / (1 + e^-z); exp only ever sees -|z|, so it never overflows."""
    cdef floating e = _exp_nonpos(-z if z >= 0 else z)
    return (<floating> 1 if z >= 0 else e) / (<floating> 1 + e)


cdef inline floating _softplus(floating z) noexcept nogil:
    """log(1 + e^z) = max(z, 0) + log1p(e^-|z|)."""
    if z > 0:
        return z + _log1p_unit(_exp_nonpos(-z))
    return _log1p_unit(_exp_nonpos(z))


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
            out[j] = z[j] if z[j] > 0 else alpha * _expm1_nonpos(z[j])
    elif <const floating *> out != z:
        memcpy(out, z, size * sizeof(floating))


cdef void _activation_backward_range(
    int act, floating alpha,
    const floating *a,     # IN  forward output
    const floating *dout,  # IN
    floating *out,         # OUT (may alias dout)
    Py_ssize_t size,
) noexcept nogil:
    """``out[:size] = dout * act'(z)``, the derivative written in terms of ``a``.

    Piecewise derivatives multiply by a selected factor (as numpy does) rather than
    branch on the data: no mispredictions, and the loops vectorize."""
    cdef Py_ssize_t j
    if act == STEP:
        memset(out, 0, size * sizeof(floating))
    elif act == SIGMOID:
        for j in range(size):
            out[j] = dout[j] * (a[j] * (<floating> 1 - a[j]))
    elif act == TANH:
        for j in range(size):
            out[j] = dout[j] * (<floating> 1 - a[j] * a[j])
    elif act == RELU:
        for j in range(size):
            out[j] = dout[j] * (1 if a[j] > 0 else 0)
    elif act == LEAKY_RELU:
        for j in range(size):
            out[j] = dout[j] * (1 if a[j] > 0 else alpha)
    elif act == SOFTPLUS:
        for j in range(size):
            out[j] = dout[j] * -_expm1_nonpos(-a[j])
    elif act == ELU:
        for j in range(size):
            out[j] = dout[j] * (1 if a[j] > 0 else a[j] + alpha)
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
    if out.shape[0] != z.shape[0] or not IDENTITY <= act <= ELU:
        _refuse()
    if z.shape[0] == 0:
        return
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
    if dout.shape[0] != size or out.shape[0] != size or not IDENTITY <= act <= ELU:
        _refuse()
    if size == 0:
        return
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
    try:
        _activation_forward(act, z.reshape(-1), out.reshape(-1), _resolve_alpha(act, alpha))
    except _REFUSED:
        _checks.activation("activation_forward", act, {"z": z}, out)
        raise


def activation_backward(act, a, dout, out, alpha=None):
    """``out = dout * act'(z)`` from the forward output ``a``; ``out`` may alias ``dout``."""
    try:
        _activation_backward(act, a.reshape(-1), dout.reshape(-1), out.reshape(-1),
                             _resolve_alpha(act, alpha))
    except _REFUSED:
        _checks.activation("activation_backward", act, {"a": a, "dout": dout}, out)
        raise


cdef void _softmax_rows(
    const floating *z,  # IN  (n, k)
    floating *out,      # OUT (n, k), may alias z
    Py_ssize_t n, Py_ssize_t k,
) noexcept nogil:
    """Each row ``out = e^(z - max z) / sum e^(z - max z)``, the sum in double."""
    cdef:
        Py_ssize_t i, j
        floating zmax
        double total
        const floating *zi
        floating *oi
    for i in range(n):
        zi = z + i * k
        oi = out + i * k
        zmax = zi[0]
        for j in range(1, k):
            zmax = zi[j] if zi[j] > zmax else zmax
        for j in range(k):  # no reduction in this loop: it vectorises
            oi[j] = _exp_nonpos(zi[j] - zmax)
        total = 0
        for j in range(k):
            total += oi[j]
        for j in range(k):
            oi[j] = <floating> (oi[j] / total)


def _softmax_forward(
    const floating[:, ::1] z,  # IN  (n, k)
    floating[:, ::1] out,      # OUT (n, k)
):
    cdef Py_ssize_t n = z.shape[0], k = z.shape[1]
    if k < 1 or out.shape[0] != n or out.shape[1] != k:
        _refuse()
    if n == 0:
        return
    with nogil:
        _softmax_rows(&z[0, 0], &out[0, 0], n, k)


def softmax_forward(z, out):
    """Row-wise softmax ``out = e^(z - max z) / sum e^(z - max z)``, one pass per row
    (the sum in double). z, out (n, k), k >= 1; ``out`` may alias ``z``."""
    try:
        _softmax_forward(z, out)
    except _REFUSED:
        _checks.softmax_forward(z, out)
        raise


# ----------------------------------------------------------------------------------
# Dense layer
# ----------------------------------------------------------------------------------

cdef void _dense_forward_ptr(
    const floating *x,  # IN  (n, d)
    const floating *w,  # IN  (d, k)
    const floating *b,  # IN  (k,), or NULL: no bias
    int act, floating alpha,
    floating *out,      # OUT (n, k)
    int n, int d, int k, bint threaded,
) noexcept nogil:
    """``out = act(x @ w + b)``: bias rows, then gemm with beta=1 (beta=0 without a
    bias), then one activation pass, threaded when big unless ``threaded`` is False."""
    cdef Py_ssize_t i
    if b != NULL:
        for i in range(n):
            memcpy(out + i * k, b, k * sizeof(floating))
    _gemm(c"N", c"N", n, k, d, 1, x, d, w, k, 1 if b != NULL else 0, out, k)
    if act == IDENTITY:
        return
    if threaded:
        _activation_forward_flat(act, alpha, out, out, <Py_ssize_t> n * k)
    else:
        _activation_forward_range(act, alpha, out, out, <Py_ssize_t> n * k)


def _dense_forward(
    const floating[:, ::1] x,  # IN  (n, d)
    const floating[:, ::1] w,  # IN  (d, k)
    const floating[::1] b,     # IN  (k,)
    int act,
    floating[:, ::1] out,      # OUT (n, k)
    alpha,
):
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1]
        floating alpha_ = _resolve_alpha(act, alpha)
    if (w.shape[0] != d or b.shape[0] != k or out.shape[0] != n or out.shape[1] != k
            or not IDENTITY <= act <= ELU):
        _refuse()
    if n == 0 or k == 0:
        return
    with nogil:
        _dense_forward_ptr(&x[0, 0], &w[0, 0], &b[0], act, alpha_, &out[0, 0], n, d, k,
                           True)


cdef void _dz_rows(
    int act, floating alpha,
    const floating *a,     # IN  (rows, k)
    const floating *dout,  # IN  (rows, k)
    floating *dz,          # OUT (rows, k), may alias dout
    double *db,            # OUT (k,) accumulated, or NULL: no column sums
    Py_ssize_t rows, Py_ssize_t k,
) noexcept nogil:
    """``dz = dout * act'(a)`` in row blocks that fit in L1, adding each block's rows
    into ``db`` while in cache."""
    cdef Py_ssize_t i, j, block = max(1, _L1_ELEMENTS // max(k, 1)), stop
    if db == NULL:
        _activation_backward_range(act, alpha, a, dout, dz, rows * k)
        return
    while rows > 0:
        stop = min(block, rows)
        _activation_backward_range(act, alpha, a, dout, dz, stop * k)
        for i in range(stop):
            for j in range(k):
                db[j] += dz[i * k + j]
        a += stop * k
        dout += stop * k
        dz += stop * k
        rows -= stop


cdef void _dense_backward_ptr(
    const floating *x,     # IN  (n, d)
    const floating *w,     # IN  (d, k)
    const floating *a,     # IN  (n, k) forward output
    const floating *dout,  # IN  (n, k)
    int act, floating alpha,
    floating *dz,          # OUT (n, k), may alias dout
    floating *dx,          # OUT (n, d), or NULL: skipped
    floating *dw,          # OUT (d, k)
    floating *db,          # OUT (k,), or NULL: skipped
    double *db_parts,      # scratch (nchunks, k)
    int nchunks, int n, int d, int k,
) noexcept nogil:
    """``dz = dout * act'(a)`` and ``db = dz.sum(0)`` in one pass over ``nchunks`` row
    chunks (one double row of column sums per chunk); ``dw = x.T @ dz`` and
    ``dx = dz @ w.T`` by gemm (transposes through the flags)."""
    cdef:
        int c
        Py_ssize_t j, lo, hi
        double total
        double *parts = db_parts if db != NULL else NULL
    if parts != NULL:
        memset(parts, 0, <size_t> nchunks * k * sizeof(double))
    if nchunks == 1:
        _dz_rows(act, alpha, a, dout, dz, parts, n, k)
    else:
        for c in prange(nchunks, schedule="static", num_threads=nchunks):
            lo = <Py_ssize_t> n * c // nchunks
            hi = <Py_ssize_t> n * (c + 1) // nchunks
            _dz_rows(act, alpha, a + lo * k, dout + lo * k, dz + lo * k,
                     parts + <Py_ssize_t> c * k if parts != NULL else NULL, hi - lo, k)
    if parts != NULL:
        for j in range(k):
            total = 0
            for c in range(nchunks):
                total += parts[<Py_ssize_t> c * k + j]
            db[j] = <floating> total
    _gemm(c"T", c"N", d, k, n, 1, x, d, dz, k, 0, dw, k)
    if dx != NULL:
        _gemm(c"N", c"T", n, d, k, 1, dz, k, w, k, 0, dx, d)


cdef void _dense_backward_sgd_ptr(
    const floating *x,     # IN  (n, d)
    floating *w,           # IN/OUT (d, k)
    floating *b,           # IN/OUT (k,), or NULL: no bias
    const floating *a,     # IN  (n, k) forward output
    const floating *dout,  # IN  (n, k)
    int act, floating alpha,
    floating *dz,          # OUT (n, k), may alias dout
    floating *dx,          # OUT (n, d), or NULL: skipped
    double *db,            # scratch (k,)
    int n, int d, int k, double lr, double weight_decay,
) noexcept nogil:
    """One layer's backward with plain SGD folded in (torch.optim.SGD, momentum 0):
    ``dz = dout * act'(a)``, ``db = dz.sum(0)``; ``dx = dz @ w.T`` with the old ``w``;
    then ``w = (1 - lr wd) w - lr x.T @ dz`` as one gemm (beta = 1 - lr wd,
    alpha = -lr) and ``b -= lr (db + wd b)``. dW is never written: one pass over the
    weights instead of three (gemm out, update read, update write)."""
    cdef Py_ssize_t j
    if b != NULL:
        memset(db, 0, <size_t> k * sizeof(double))
    _dz_rows(act, alpha, a, dout, dz, db if b != NULL else NULL, n, k)
    if dx != NULL:
        _gemm(c"N", c"T", n, d, k, 1, dz, k, w, k, 0, dx, d)
    _gemm(c"T", c"N", d, k, n, <floating> -lr, x, d, dz, k,
          <floating> (1 - lr * weight_decay), w, k)
    if b != NULL:
        for j in range(k):
            b[j] -= <floating> (lr * (db[j] + weight_decay * b[j]))


def _dense_backward(
    const floating[:, ::1] x,     # IN  (n, d)
    const floating[:, ::1] w,     # IN  (d, k)
    const floating[:, ::1] a,     # IN  (n, k) forward output
    const floating[:, ::1] dout,  # IN  (n, k)
    int act,
    floating[:, ::1] dz,          # OUT (n, k), may alias dout
    floating[:, ::1] dx,          # OUT (n, d), None: skipped
    floating[:, ::1] dw,          # OUT (d, k)
    floating[::1] db,             # OUT (k,)
    alpha,
):
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1]
        floating alpha_ = _resolve_alpha(act, alpha)
        int nchunks = _n_chunks(<Py_ssize_t> n * k, n)
        floating *dx_ = NULL
        double *db_parts
    if (w.shape[0] != d or a.shape[0] != n or a.shape[1] != k or dout.shape[0] != n
            or dout.shape[1] != k or dz.shape[0] != n or dz.shape[1] != k
            or dw.shape[0] != d or dw.shape[1] != k or db.shape[0] != k
            or (dx is not None and (dx.shape[0] != n or dx.shape[1] != d))
            or not IDENTITY <= act <= ELU):
        _refuse()
    if n == 0:  # no rows: zero gradients, as numpy's sums over nothing
        dw[:, :] = 0
        db[:] = 0
        return
    if d == 0 or k == 0:
        raise ValueError(f"dense_backward: x and w must have at least one column, got "
                         f"x {tuple(x.shape)[:2]}, w {tuple(w.shape)[:2]}")
    db_parts = <double *> malloc(<size_t> nchunks * k * sizeof(double))
    if db_parts == NULL:
        raise MemoryError()
    if dx is not None:
        dx_ = &dx[0, 0]
    with nogil:
        _dense_backward_ptr(&x[0, 0], &w[0, 0], &a[0, 0], &dout[0, 0], act, alpha_,
                            &dz[0, 0], dx_, &dw[0, 0], &db[0], db_parts, nchunks, n, d,
                            k)
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


def _dense_per_sample_grad(
    const floating[:, ::1] x,   # IN  (n, d)
    const floating[:, ::1] dz,  # IN  (n, k)
    floating[:, ::1] jac,       # OUT (n, P), columns [offset, offset + d*k (+ k))
    Py_ssize_t offset,
    bint use_bias,
):
    cdef:
        Py_ssize_t n = x.shape[0], d = x.shape[1], k = dz.shape[1]
        Py_ssize_t width = jac.shape[1], lo, hi
        int c, nchunks = _n_chunks(n * (d + 1) * k, n)
    if (dz.shape[0] != n or jac.shape[0] != n or offset < 0
            or offset + d * k + (k if use_bias else 0) > width):
        _refuse()
    if n == 0 or d * k == 0:
        return
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


def dense_forward(x, w, b, act, out, alpha=None):
    """``out = act(x @ w + b)``: bias rows, then gemm with beta=1, then one pass.
    x (n, d), w (d, k), b (k,), out (n, k)."""
    try:
        _dense_forward(x, w, b, act, out, alpha)
    except _REFUSED:
        _checks.dense_forward(x, w, b, act, out)
        raise


cdef void _dense_stack_forward_ptr(
    const floating *x,        # IN  (n, widths[0])
    const floating *params,   # IN  (P,) per layer W_l then b_l (if use_bias[l])
    int n_layers,
    const int64_t *widths,    # IN  (L+1,)
    const int64_t *acts,      # IN  (L,)
    const double *alphas,     # IN  (L,)
    const int64_t *use_bias,  # IN  (L,)
    floating *workspace,      # scratch (2 half,)
    Py_ssize_t half,
    floating *out,            # OUT (n, widths[L])
    int n,
) noexcept nogil:
    """``a_l+1 = act_l(a_l @ W_l + b_l)`` layer by layer (``_dense_forward_ptr``), hidden
    layer l writing half ``l % 2`` of the workspace, the last one ``out``."""
    cdef:
        int layer, d, k
        Py_ssize_t p = 0
        const floating *a = x
        floating *dst
    for layer in range(n_layers):
        d = <int> widths[layer]
        k = <int> widths[layer + 1]
        dst = out if layer == n_layers - 1 else workspace + (layer % 2) * half
        _dense_forward_ptr(a, params + p, params + p + d * k if use_bias[layer] else NULL,
                           <int> acts[layer], <floating> alphas[layer], dst, n, d, k,
                           True)
        p += <Py_ssize_t> d * k + (k if use_bias[layer] else 0)
        a = dst


def _dense_stack_forward(
    const floating[:, ::1] x,      # IN  (n, widths[0])
    const floating[::1] params,    # IN  (P,)
    const int64_t[::1] widths,     # IN  (L+1,)
    const int64_t[::1] acts,       # IN  (L,)
    const double[::1] alphas,      # IN  (L,)
    const int64_t[::1] use_bias,   # IN  (L,)
    floating[::1] workspace,       # scratch
    floating[:, ::1] out,          # OUT (n, widths[L])
):
    cdef:
        int n_layers = widths.shape[0] - 1, layer
        Py_ssize_t n = x.shape[0], hidden = 0, p = 0
        bint ok = (n_layers >= 1 and acts.shape[0] == n_layers
                   and alphas.shape[0] == n_layers and use_bias.shape[0] == n_layers)
    # The O(L) checks of every size against widths.
    for layer in range(n_layers + 1 if ok else 0):
        ok = ok and widths[layer] >= 1
        if 0 < layer < n_layers:
            hidden = max(hidden, <Py_ssize_t> widths[layer])
    for layer in range(n_layers if ok else 0):
        ok = ok and IDENTITY <= acts[layer] <= ELU
        p += widths[layer] * widths[layer + 1] + (widths[layer + 1] if use_bias[layer] else 0)
    if not (ok and x.shape[1] == widths[0] and params.shape[0] == p
            and workspace.shape[0] >= 2 * n * hidden and out.shape[0] == n
            and out.shape[1] == widths[n_layers]):
        _refuse()
    if n == 0:
        return
    with nogil:
        _dense_stack_forward_ptr(&x[0, 0], &params[0], n_layers, &widths[0], &acts[0],
                                 &alphas[0], &use_bias[0],
                                 &workspace[0] if hidden > 0 else NULL, n * hidden,
                                 &out[0, 0], <int> n)


def dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out):
    """The inference pass of ``L`` dense layers in one call, GIL released: per layer
    ``a_l+1 = act_l(a_l @ W_l + b_l)`` (bias rows, gemm with beta=1, one activation
    pass, as ``dense_forward``), the hidden outputs alternating between the halves of
    ``workspace``, the last written into ``out``. Shapes and layout as
    ``_numpy.dense_stack_forward``."""
    try:
        _dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out)
    except _REFUSED:
        _checks.dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace,
                                    out)
        raise


def dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """``dz = dout * act'(a)``, ``db = dz.sum(0)`` in one pass; ``dw = x.T @ dz`` and
    ``dx = dz @ w.T`` (skipped when dx is None) by gemm (transposes through the flags).
    x (n, d), w (d, k), a / dout / dz (n, k), dx (n, d), dw (d, k), db (k,)."""
    try:
        _dense_backward(x, w, a, dout, act, dz, dx, dw, db, alpha)
    except _REFUSED:
        _checks.dense_backward(x, w, a, dout, act, dz, dx, dw, db)
        raise


def dense_per_sample_grad(x, dz, jac, offset, use_bias):
    """Per-sample dense gradients as Jacobian rows: ``jac[s, offset + i*k + j] =
    x[s, i] dz[s, j]`` and, with ``use_bias``, ``jac[s, offset + d*k + j] = dz[s, j]``;
    other columns untouched. x (n, d), dz (n, k), jac (n, P)."""
    try:
        _dense_per_sample_grad(x, dz, jac, offset, use_bias)
    except _REFUSED:
        _checks.dense_per_sample_grad(x, dz, jac, offset, use_bias)
        raise


#: Length of each optimizer code's ``hyper`` array (fastnn.kernels.OPTIMIZER_HYPER).
_HYPER_SIZES = tuple(len(_OPTIMIZER_HYPER[name]) for name in
                     sorted(_OPTIMIZER_CODES, key=_OPTIMIZER_CODES.get))

#: Argument names of the pointwise losses (prediction, target, gradient).
_PRED = ("pred", "target", "dpred")


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
        e = _exp_nonpos(-zj if zj >= 0 else zj)
        total += (<double> zj if zj > 0 else 0.0) - <double> zj * t[j] + _log1p_unit(e)
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
        floating zmax = z[0]
        double sum_exp = 0, log_sum, y_sum = 1, yz = 0, c, e_label
    for j in range(1, k):
        if z[j] > zmax:
            zmax = z[j]
    if dz == NULL:
        for j in range(k):
            sum_exp += _exp_nonpos(z[j] - zmax)
    else:
        for j in range(k):  # no reduction in this loop: it vectorises
            dz[j] = _exp_nonpos(z[j] - zmax)
        for j in range(k):
            sum_exp += dz[j]
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


cdef Py_ssize_t _loss_rows(
    int kind, double param,
    const floating *pred,     # IN  (n, k)
    const floating *target,   # IN  (., k) or NULL
    const int64_t *labels,    # IN  (.,) or NULL
    const int64_t *rows,      # IN  (n,) target / labels row of each pred row; NULL: i
    const floating *weights,  # IN  (n,) or NULL
    double inv_total,         # 1 / (n or sum(weights)), divided by k where averaged
    Py_ssize_t k,
    floating *dpred,          # OUT (n, k) or NULL
    double *row_loss,         # OUT (n,) s_i * l_i
    Py_ssize_t start, Py_ssize_t stop,
) noexcept nogil:
    """Rows [start, stop); returns how many had a label outside [0, k) (skipped)."""
    cdef:
        Py_ssize_t i, r, off, n_bad = 0
        double s, l = 0
        const floating *t = NULL
        floating *dp = NULL
        int64_t label = 0
    for i in range(start, stop):
        s = inv_total if weights == NULL else weights[i] * inv_total
        r = i if rows == NULL else rows[i]
        off = i * k
        if target != NULL:
            t = target + r * k
        if dpred != NULL:
            dp = dpred + off
        if labels != NULL:
            label = labels[r]
            if label < 0 or label >= k:
                row_loss[i] = 0
                n_bad += 1
                continue
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
    return n_bad


cdef double _loss_ptr(
    int kind, double param,
    const floating *pred,     # IN  (n, k)
    const floating *target,   # IN  (., k) or NULL
    const int64_t *labels,    # IN  (.,) or NULL
    const int64_t *rows,      # IN  (n,) target / labels row of each pred row; NULL: i
    const floating *weights,  # IN  (n,) or NULL
    floating *dpred,          # OUT (n, k) or NULL
    double *row_loss,         # scratch (n,)
    Py_ssize_t n, Py_ssize_t k, int nchunks,
    Py_ssize_t *n_bad,        # OUT rows whose label is outside [0, k)
) noexcept nogil:
    """sum_i s_i l_i with s_i = 1/n or w_i / sum(w), and / k for the losses torch
    averages over outputs too (MSE, MAE, Huber, BCE); rows in ``nchunks`` chunks.
    Rows with a label outside [0, k) are skipped and counted in ``n_bad``."""
    cdef:
        Py_ssize_t i, bad = 0
        int c
        double inv_total, total = 0
    if weights == NULL:
        inv_total = 1.0 / n
    else:
        for i in range(n):
            total += weights[i]
        inv_total = 1.0 / total
    if kind == MSE or kind == MAE or kind == HUBER or kind == BCE:
        inv_total /= k
    if nchunks == 1:
        bad = _loss_rows(kind, param, pred, target, labels, rows, weights, inv_total, k,
                         dpred, row_loss, 0, n)
    else:
        for c in prange(nchunks, schedule="static", num_threads=nchunks):
            bad += _loss_rows(kind, param, pred, target, labels, rows, weights, inv_total,
                              k, dpred, row_loss, n * c // nchunks, n * (c + 1) // nchunks)
    n_bad[0] = bad
    total = 0
    for i in range(n):
        total += row_loss[i]
    return total


cdef double _loss(
    int kind, double param,
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k) or None
    const int64_t[::1] labels,      # IN  (n,) or None
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
) except? -1:
    """``_loss_ptr`` on memoryviews, threaded when big; refuses shapes that do not match
    and (after the loop) a label outside [0, k)."""
    cdef:
        Py_ssize_t n = pred.shape[0], k = pred.shape[1], n_bad = 0
        int nchunks = _n_chunks(n * k, n)
        const floating *t = NULL
        const int64_t *lab = NULL
        const floating *w = NULL
        floating *dp = NULL
        double total
        double *row_loss
    if (n < 1 or k < 1
            or (target is not None and (target.shape[0] != n or target.shape[1] != k))
            or (labels is not None and labels.shape[0] != n)
            or (weights is not None and weights.shape[0] != n)
            or (dpred is not None and (dpred.shape[0] != n or dpred.shape[1] != k))):
        _refuse()
    row_loss = <double *> malloc(n * sizeof(double))
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
        total = _loss_ptr(kind, param, &pred[0, 0], t, lab, NULL, w, dp, row_loss, n, k,
                          nchunks, &n_bad)
    free(row_loss)
    if n_bad:
        _refuse()
    return total


def _softmax_cross_entropy_index(
    const floating[:, ::1] logits,  # IN  (n, k)
    const int64_t[::1] labels,      # IN  (n,)
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dlogits,       # OUT (n, k) or None
):
    return _loss[floating](SOFTMAX_CE, 0, logits, None, labels, weights, dlogits)


def _softmax_cross_entropy_proba(
    const floating[:, ::1] logits,  # IN  (n, k)
    const floating[:, ::1] labels,  # IN  (n, k) probability rows
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dlogits,       # OUT (n, k) or None
):
    return _loss[floating](SOFTMAX_CE, 0, logits, labels, None, weights, dlogits)


def softmax_cross_entropy(logits, labels, weights, dlogits):
    """Fused stable softmax + cross-entropy (torch CrossEntropyLoss on logits).

    logits (n, k); labels int64 (n,) class indices or (n, k) probability rows.
    l_i = logsumexp(z_i) - z_i[y_i] (or -sum_j y_ij log softmax(z_i)_j);
    dlogits (n, k) = s_i (softmax(z_i) sum_j y_ij - y_i), s_i = 1/n or w_i / sum(w).
    """
    try:
        if labels.ndim == 1:
            return _softmax_cross_entropy_index(logits, labels, weights, dlogits)
        return _softmax_cross_entropy_proba(logits, labels, weights, dlogits)
    except _REFUSED:
        _checks.softmax_cross_entropy(logits, labels, weights, dlogits)
        raise


cdef object _pointwise_loss(str kernel, int kind, double param, pred, target, weights,
                            dpred):
    """The typed ``_pointwise`` or, should it refuse the arguments, the contract's
    error (a C call: no second Python frame per loss)."""
    try:
        return _pointwise(kind, param, pred, target, weights, dpred)
    except _REFUSED:
        _checks.loss(kernel, _PRED, pred, target, weights, dpred)
        raise


def sigmoid_binary_cross_entropy(pred, target, weights, dpred):
    """torch BCEWithLogitsLoss, mean over n*k.  pred (n, k) logits, target (n, k) in
    [0, 1].  l = max(z, 0) - z t + log(1 + e^-|z|);  dpred = s_i (sigmoid(z) - t) / k."""
    return _pointwise_loss("sigmoid_binary_cross_entropy", BCE, 0, pred, target, weights,
                           dpred)


def mean_squared_error(pred, target, weights, dpred):
    """torch MSELoss, mean over n*k.  l = (p - t)^2;  dpred = 2 s_i (p - t) / k."""
    return _pointwise_loss("mean_squared_error", MSE, 0, pred, target, weights, dpred)


def mean_absolute_error(pred, target, weights, dpred):
    """torch L1Loss, mean over n*k.  l = |p - t|;  dpred = s_i sign(p - t) / k."""
    return _pointwise_loss("mean_absolute_error", MAE, 0, pred, target, weights, dpred)


def huber(pred, target, delta, weights, dpred):
    """torch HuberLoss(delta), mean over n*k.  d = p - t:
    l = d^2/2 if |d| <= delta else delta (|d| - delta/2);  dpred = s_i clip(d) / k."""
    return _pointwise_loss("huber", HUBER, delta, pred, target, weights, dpred)


def multiclass_hinge(scores, labels, margin, weights, dscores):
    """Weston-Watkins multiclass SVM, mean over samples.  scores (n, k), labels int64
    (n,).  l_i = sum_{j != y_i} max(0, s_ij - s_iy_i + margin); dscores: +s_i per
    violating j, -s_i * (number of violations) at y_i."""
    try:
        return _multiclass_hinge(scores, labels, margin, weights, dscores)
    except _REFUSED:
        _checks.multiclass_hinge(scores, labels, weights, dscores)
        raise


def _pointwise(
    int kind, double param,
    const floating[:, ::1] pred,    # IN  (n, k)
    const floating[:, ::1] target,  # IN  (n, k)
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dpred,         # OUT (n, k) or None
):
    return _loss[floating](kind, param, pred, target, None, weights, dpred)


def _multiclass_hinge(
    const floating[:, ::1] scores,  # IN  (n, k)
    const int64_t[::1] labels,      # IN  (n,)
    double margin,
    const floating[::1] weights,    # IN  (n,) or None
    floating[:, ::1] dscores,       # OUT (n, k) or None
):
    return _loss[floating](HINGE, margin, scores, None, labels, weights, dscores)


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
    if mu == 0:
        # Plain SGD as one branch-free loop, so the compiler vectorises it.
        for i in range(size):
            p[i] -= lr * (g[i] + wd * p[i])
        return
    for i in range(size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        if mu != 0:
            buf[i] = gi if first else mu * buf[i] + damp_keep * gi
            gi = gi + mu * buf[i] if nesterov else buf[i]
        p[i] -= lr * gi


cdef void _sgd_flat(
    floating *p, const floating *g,
    floating *buf,  # IN/OUT momentum buffer, or NULL when momentum == 0
    Py_ssize_t size, double lr, double momentum, double dampening, double weight_decay,
    bint nesterov, long step, int nchunks,
) noexcept nogil:
    cdef:
        int c
        Py_ssize_t lo
    if nchunks == 1:
        _sgd_range(p, g, buf, lr, momentum, 1 - dampening, weight_decay, nesterov,
                   step == 1, size)
        return
    for c in prange(nchunks, schedule="static", num_threads=nchunks):
        lo = size * c // nchunks
        _sgd_range(p + lo, g + lo, buf + lo if buf != NULL else NULL, lr, momentum,
                   1 - dampening, weight_decay, nesterov, step == 1,
                   size * (c + 1) // nchunks - lo)


def _sgd_update(
    floating[::1] params,        # IN/OUT
    const floating[::1] grads,   # IN
    floating[::1] momentum_buf,  # IN/OUT, None or untouched when momentum == 0
    double lr, double momentum, double dampening, double weight_decay,
    bint nesterov, long step,
):
    cdef:
        Py_ssize_t size = params.shape[0]
        floating *buf = NULL
    if grads.shape[0] != size or (momentum != 0 and (
            momentum_buf is None or momentum_buf.shape[0] != size)):
        _refuse()
    if momentum != 0:
        buf = &momentum_buf[0]
    with nogil:
        _sgd_flat(&params[0], &grads[0], buf, size, lr, momentum, dampening,
                  weight_decay, nesterov, step, _n_chunks(size, size))


def sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
               nesterov, step):
    """torch.optim.SGD.  g = grad + wd*p; if momentum: b = g (step 1) else
    b = mu*b + (1-dampening)*g, and g = g + mu*b (nesterov) or b;  p -= lr*g."""
    try:
        _sgd_update(params, grads, momentum_buf, lr, momentum, dampening, weight_decay,
                    nesterov, step)
    except _REFUSED:
        _checks.sgd_update(params, grads, momentum_buf, momentum)
        raise


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


cdef void _adagrad_flat(
    floating *p, const floating *g, floating *state_sum, Py_ssize_t size,
    double lr, double lr_decay, double weight_decay, double eps, long step, int nchunks,
) noexcept nogil:
    cdef:
        int c
        Py_ssize_t lo
        floating clr = lr / (1 + (step - 1) * lr_decay)
    if nchunks == 1:
        _adagrad_range(p, g, state_sum, clr, weight_decay, eps, size)
        return
    for c in prange(nchunks, schedule="static", num_threads=nchunks):
        lo = size * c // nchunks
        _adagrad_range(p + lo, g + lo, state_sum + lo, clr, weight_decay, eps,
                       size * (c + 1) // nchunks - lo)


def _adagrad_update(
    floating[::1] params,       # IN/OUT
    const floating[::1] grads,  # IN
    floating[::1] state_sum,    # IN/OUT
    double lr, double lr_decay, double weight_decay, double eps, long step,
):
    cdef Py_ssize_t size = params.shape[0]
    if grads.shape[0] != size or state_sum.shape[0] != size:
        _refuse()
    with nogil:
        _adagrad_flat(&params[0], &grads[0], &state_sum[0], size, lr, lr_decay,
                      weight_decay, eps, step, _n_chunks(size, size))


def adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step):
    """torch.optim.Adagrad.  g = grad + wd*p; clr = lr / (1 + (t-1)*lr_decay);
    G += g^2; p -= clr * g / (sqrt(G) + eps)."""
    try:
        _adagrad_update(params, grads, state_sum, lr, lr_decay, weight_decay, eps, step)
    except _REFUSED:
        _checks.adagrad_update(params, grads, state_sum)
        raise


cdef void _rmsprop_range(
    floating *p, const floating *g, floating *square_avg, floating *buf,
    floating *grad_avg, floating lr, floating alpha, floating eps, floating wd,
    floating mu, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi, vi, denom
        floating keep = 1 - alpha  # in the working precision: a bare 1 - alpha is double
    if buf == NULL and grad_avg == NULL:
        # The common case as one branch-free loop, so the compiler vectorises it.
        for i in range(size):
            gi = g[i] + wd * p[i]
            vi = alpha * square_avg[i] + keep * gi * gi
            square_avg[i] = vi
            p[i] -= lr * gi / (_sqrt(vi) + eps)
        return
    for i in range(size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        square_avg[i] = alpha * square_avg[i] + keep * gi * gi
        if grad_avg != NULL:
            grad_avg[i] = alpha * grad_avg[i] + keep * gi
            denom = _sqrt(square_avg[i] - grad_avg[i] * grad_avg[i]) + eps
        else:
            denom = _sqrt(square_avg[i]) + eps
        if buf != NULL:
            buf[i] = mu * buf[i] + gi / denom
            p[i] -= lr * buf[i]
        else:
            p[i] -= lr * gi / denom


cdef void _rmsprop_flat(
    floating *p, const floating *g, floating *square_avg,
    floating *buf,   # IN/OUT momentum buffer, or NULL unless momentum > 0
    floating *gbar,  # IN/OUT grad average, or NULL unless centered
    Py_ssize_t size, double lr, double alpha, double eps, double weight_decay,
    double momentum, int nchunks,
) noexcept nogil:
    cdef:
        int c
        Py_ssize_t lo
    if nchunks == 1:
        _rmsprop_range(p, g, square_avg, buf, gbar, lr, alpha, eps, weight_decay,
                       momentum, size)
        return
    for c in prange(nchunks, schedule="static", num_threads=nchunks):
        lo = size * c // nchunks
        _rmsprop_range(p + lo, g + lo, square_avg + lo,
                       buf + lo if buf != NULL else NULL,
                       gbar + lo if gbar != NULL else NULL, lr, alpha, eps,
                       weight_decay, momentum, size * (c + 1) // nchunks - lo)


def _rmsprop_update(
    floating[::1] params,        # IN/OUT
    const floating[::1] grads,   # IN
    floating[::1] square_avg,    # IN/OUT
    floating[::1] momentum_buf,  # IN/OUT, None or untouched unless momentum > 0
    floating[::1] grad_avg,      # IN/OUT, None or untouched unless centered
    double lr, double alpha, double eps, double weight_decay, double momentum,
    bint centered,
):
    cdef:
        Py_ssize_t size = params.shape[0]
        floating *buf = NULL
        floating *gbar = NULL
    if (grads.shape[0] != size or square_avg.shape[0] != size
            or (momentum > 0 and (momentum_buf is None or momentum_buf.shape[0] != size))
            or (centered and (grad_avg is None or grad_avg.shape[0] != size))):
        _refuse()
    if momentum > 0:
        buf = &momentum_buf[0]
    if centered:
        gbar = &grad_avg[0]
    with nogil:
        _rmsprop_flat(&params[0], &grads[0], &square_avg[0], buf, gbar, size, lr, alpha,
                      eps, weight_decay, momentum, _n_chunks(size, size))


def rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                   weight_decay, momentum, centered):
    """torch.optim.RMSprop.  g = grad + wd*p; v = alpha*v + (1-alpha)*g^2;
    centered: gbar = alpha*gbar + (1-alpha)*g, v~ = v - gbar^2, else v~ = v;
    momentum: b = mu*b + g/(sqrt(v~)+eps), p -= lr*b; else p -= lr*g/(sqrt(v~)+eps)."""
    try:
        _rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, lr, alpha, eps,
                        weight_decay, momentum, centered)
    except _REFUSED:
        _checks.rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, momentum,
                               centered)
        raise


cdef void _adam_range(
    floating *p, const floating *g, floating *m, floating *v, floating *vmax,
    floating step_size, floating beta1, floating beta2, floating bias2_sqrt,
    floating eps, floating wd, floating decay, Py_ssize_t size,
) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating gi, mi, vi
        floating keep1 = 1 - beta1, keep2 = 1 - beta2, inv_bias2 = 1 / bias2_sqrt
    if vmax == NULL and wd == 0:
        # The common case as one branch-free loop, so the compiler vectorises it
        # (decay * p is exact when decay == 1).
        for i in range(size):
            gi = g[i]
            mi = beta1 * m[i] + keep1 * gi
            vi = beta2 * v[i] + keep2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = decay * p[i] - step_size * mi / (_sqrt(vi) * inv_bias2 + eps)
        return
    for i in range(size):
        p[i] *= decay
        gi = g[i] + wd * p[i]
        m[i] = beta1 * m[i] + keep1 * gi
        v[i] = beta2 * v[i] + keep2 * gi * gi
        vi = v[i]
        if vmax != NULL:
            if vi > vmax[i]:
                vmax[i] = vi
            vi = vmax[i]
        p[i] -= step_size * m[i] / (_sqrt(vi) * inv_bias2 + eps)


cdef void _adam_flat(
    floating *p, const floating *g, floating *m, floating *v,
    floating *vmax,  # IN/OUT running max of v, or NULL unless amsgrad
    Py_ssize_t size, double lr, double beta1, double beta2, double eps,
    double weight_decay, bint decoupled, long step, int nchunks,
) noexcept nogil:
    cdef:
        int c
        Py_ssize_t lo
        floating step_size = lr / (1 - beta1 ** step)
        floating bias2_sqrt = sqrt(1 - beta2 ** step)
        floating decay = 1 - lr * weight_decay if decoupled else 1
        floating wd = 0 if decoupled else weight_decay
    if nchunks == 1:
        _adam_range(p, g, m, v, vmax, step_size, beta1, beta2, bias2_sqrt, eps, wd,
                    decay, size)
        return
    for c in prange(nchunks, schedule="static", num_threads=nchunks):
        lo = size * c // nchunks
        _adam_range(p + lo, g + lo, m + lo, v + lo, vmax + lo if vmax != NULL else NULL,
                    step_size, beta1, beta2, bias2_sqrt, eps, wd, decay,
                    size * (c + 1) // nchunks - lo)


def _adam_update(
    floating[::1] params,          # IN/OUT
    const floating[::1] grads,     # IN
    floating[::1] exp_avg,         # IN/OUT
    floating[::1] exp_avg_sq,      # IN/OUT
    floating[::1] max_exp_avg_sq,  # IN/OUT, None or untouched unless amsgrad
    double lr, double beta1, double beta2, double eps, double weight_decay,
    bint decoupled, bint amsgrad, long step,
):
    cdef:
        Py_ssize_t size = params.shape[0]
        floating *vmax = NULL
    if (grads.shape[0] != size or exp_avg.shape[0] != size or exp_avg_sq.shape[0] != size
            or (amsgrad and (max_exp_avg_sq is None or max_exp_avg_sq.shape[0] != size))):
        _refuse()
    if amsgrad:
        vmax = &max_exp_avg_sq[0]
    with nogil:
        _adam_flat(&params[0], &grads[0], &exp_avg[0], &exp_avg_sq[0], vmax, size, lr,
                   beta1, beta2, eps, weight_decay, decoupled, step,
                   _n_chunks(size, size))


def adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2,
                eps, weight_decay, decoupled, amsgrad, step):
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True).
    AdamW: p *= 1 - lr*wd; Adam: g = grad + wd*p.  m = b1*m + (1-b1)*g;
    v = b2*v + (1-b2)*g^2; amsgrad: v = vmax = max(vmax, v);
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""
    try:
        _adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1,
                     beta2, eps, weight_decay, decoupled, amsgrad, step)
    except _REFUSED:
        _checks.adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad)
        raise


# ----------------------------------------------------------------------------------
# A whole training epoch of a stack of dense layers in one call: the helpers above on
# pointer offsets into params / grads / workspace, serial elementwise code (the nets
# this is for are small: thread teams per batch would cost more than they save) and
# BLAS for the matmuls. No allocation inside the loop, no GIL, no exceptions.
# ----------------------------------------------------------------------------------

cdef void _optimizer_step(
    int opt_code,
    const double *hyper,  # IN  laid out as fastnn.kernels.OPTIMIZER_HYPER
    floating *p,          # IN/OUT (size,)
    const floating *g,    # IN  (size,)
    floating *s0, floating *s1, floating *s2,  # IN/OUT state; unused ones untouched
    Py_ssize_t size, double lr, long t,
) noexcept nogil:
    """One serial update for a ``train_epoch`` optimizer code, update number ``t``."""
    if opt_code == SGD:
        _sgd_flat(p, g, s0 if hyper[0] != 0 else NULL, size, lr, hyper[0], hyper[1],
                  hyper[2], hyper[3] != 0, t, 1)
    elif opt_code == ADAGRAD:
        _adagrad_flat(p, g, s0, size, lr, hyper[0], hyper[1], hyper[2], t, 1)
    elif opt_code == RMSPROP:
        _rmsprop_flat(p, g, s0, s1 if hyper[3] > 0 else NULL,
                      s2 if hyper[4] != 0 else NULL, size, lr, hyper[0], hyper[1],
                      hyper[2], hyper[3], 1)
    elif opt_code == ADAM:
        _adam_flat(p, g, s0, s1, s2 if hyper[5] != 0 else NULL, size, lr, hyper[0],
                   hyper[1], hyper[2], hyper[3], hyper[4] != 0, t, 1)


cdef Py_ssize_t _batch_hits(
    int loss_code,
    const floating *out,      # IN  (n, k) the net's output for the batch
    const int64_t *labels,    # IN  class labels of all samples (label losses)
    const floating *targets,  # IN  (., k) targets of all samples (the others)
    const int64_t *rows,      # IN  (n,) the batch's sample indices
    Py_ssize_t n, Py_ssize_t k,
) noexcept nogil:
    """Correct predictions: argmax == label for cross_entropy / hinge (the first
    maximum, a NaN counting as one, as numpy.argmax), elementwise (z > 0) == (t >= 0.5)
    for binary_cross_entropy, 0 for the regression losses."""
    cdef:
        Py_ssize_t i, j, best, hits = 0
        const floating *z
        const floating *t
        floating zmax
        bint nan
    if loss_code == SOFTMAX_CE or loss_code == HINGE:
        for i in range(n):
            # The max (and whether a NaN is there) without data-dependent branches,
            # then one sweep for its first position.
            z = out + i * k
            zmax = z[0]
            nan = False
            for j in range(k):
                zmax = z[j] if z[j] > zmax else zmax
                nan |= z[j] != z[j]
            best = 0
            while best < k - 1 and not (
                    (z[best] != z[best]) if nan else (z[best] == zmax)):
                best += 1
            hits += best == labels[rows[i]]
    elif loss_code == BCE:
        for i in range(n):
            z = out + i * k
            t = targets + rows[i] * k
            for j in range(k):
                hits += (z[j] > 0) == (t[j] >= 0.5)
    return hits


cdef void _prefetch_rows(
    const void *base,      # IN  (., row_bytes) bytes
    Py_ssize_t row_bytes,
    const int64_t *rows,   # IN  (n,) row indices
    Py_ssize_t n,
) noexcept nogil:
    """Ask for the cache lines of rows ``rows`` of ``base``: a hint, never a fault."""
    cdef:
        Py_ssize_t i, off
        const char *row
    for i in range(n):
        row = <const char *> base + rows[i] * row_bytes
        for off in range(0, row_bytes, 64):
            _prefetch(row + off)
        _prefetch(row + row_bytes - 1)


cdef inline floating *_shifted(floating *p, Py_ssize_t offset) noexcept nogil:
    """``p + offset``, or NULL for NULL (an unused optimizer buffer)."""
    return p + offset if p != NULL else NULL


cdef double _reduce_call(void *hook, int phase, int layer, double value, Py_ssize_t rows,
                         int *status) noexcept with gil:
    """``reduce(phase, layer, value, rows)`` of ``hook`` = [reduce, None] as a double
    (``fastnn.kernels.REDUCE_LOSS``); an exception goes to hook[1], status becomes 2."""
    cdef list box = <list> hook
    if status[0]:
        return 0.0
    try:
        return float(box[0](phase, layer, value, rows))
    except BaseException as exc:  # re-raised by train_epoch once the loop has ended
        box[1] = exc
        status[0] = 2
        return 0.0


cdef inline void _layer_step(
    int opt_code, const double *hyper, floating *params, const floating *grads,
    floating *state0, floating *state1, floating *state2,
    const Py_ssize_t *w_off, int layer, int n_layers, Py_ssize_t n_params, double lr,
    long t,
) noexcept nogil:
    """The optimizer update of layer ``layer``'s slice (W then b) of the flat buffers."""
    cdef Py_ssize_t start = w_off[layer]
    cdef Py_ssize_t stop = w_off[layer + 1] if layer + 1 < n_layers else n_params
    _optimizer_step(opt_code, hyper, params + start, grads + start,
                    _shifted(state0, start), _shifted(state1, start),
                    _shifted(state2, start), stop - start, lr, t)


cdef int _train_epoch_ptr(
    const floating *X,        # IN  (n_samples, widths[0]) all samples
    const int64_t *labels,    # IN  (.,) class labels, or NULL (non-label losses)
    const floating *targets,  # IN  (., widths[L]) targets, or NULL (label losses)
    const int64_t *order,     # IN  (m,) the samples to visit, in order
    Py_ssize_t n_samples, Py_ssize_t m, Py_ssize_t batch_size, int n_layers,
    const int64_t *widths,    # IN  (L+1,)
    const int64_t *acts,      # IN  (L,)
    const double *alphas,     # IN  (L,)
    const Py_ssize_t *w_off,  # IN  (L,) offset of W_l in params / grads
    const Py_ssize_t *b_off,  # IN  (L,) offset of b_l, or -1: no bias
    const Py_ssize_t *a_off,  # IN  (L+2,) sum(widths[:l]): a_l at rows * a_off[l]
    floating *params,         # IN/OUT (P,)
    floating *grads,          # scratch (P,): the gradients (untouched by plain SGD)
    floating *workspace,      # scratch (rows * (sum(widths) + 2 widest),)
    double *row_loss,         # scratch (min(batch_size, m),)
    double *db_parts,         # scratch (widest,)
    Py_ssize_t n_params, Py_ssize_t widest,
    int loss_code, double loss_param, int opt_code,
    const double *hyper,      # IN  optimizer hyper-parameters
    const double *lrs,        # IN  (n_batches,) learning rate of each update
    floating *state0, floating *state1, floating *state2,  # IN/OUT optimizer state
    long step,
    double *stats,            # OUT (4,)
    void *reduce,             # [reduce, None] (TrainEpochSpec.reduce), or NULL
    Py_ssize_t n_steps,       # steps of an epoch with reduce (len(lrs))
) noexcept nogil:
    """The body of ``train_epoch``: per batch gather, forward, loss, then per layer
    (last first) backward and update. Returns 0, or 1 when a batch holds a sample index
    outside [0, n_samples) or a label outside [0, widths[L]) (the epoch then ends before
    that batch's update), or 2 when ``reduce`` raised. With ``reduce``, each layer's
    reduction starts after its backward, and the updates wait for them (REDUCE_LOSS).

    Workspace of a batch of ``rows``: a_0 .. a_L (rows, widths[l]) packed, then two
    (rows, widest) gradient buffers that swap roles from layer to layer."""
    cdef:
        Py_ssize_t start = 0, size, next_size, i, b = 0, n_bad = 0
        Py_ssize_t d0 = widths[0], k_out = widths[n_layers]
        int layer
        double loss, share, global_loss
        int status = 0
        const int64_t *rows
        floating *out
        floating *dout
        floating *dprev
        floating *swap
        # Plain SGD (no momentum) updates each layer inside its backward: the dW gemm
        # writes straight into W (_dense_backward_sgd_ptr), and grads stay untouched.
        bint fold_sgd = opt_code == SGD and hyper[0] == 0 and reduce == NULL
    stats[0] = stats[1] = stats[2] = stats[3] = 0
    while start < m or (reduce != NULL and b < n_steps):
        size = min(batch_size, m - start)
        rows = order + start
        for i in range(size):
            if rows[i] < 0 or rows[i] >= n_samples:
                return 1
            memcpy(workspace + i * d0, X + rows[i] * d0, d0 * sizeof(floating))
        # Random batches miss the cache: ask for the next batch's samples meanwhile
        # (labels first: the loss waits on them one by one).
        next_size = min(batch_size, m - start - size)
        if (0 < next_size and next_size * (d0 + k_out) * <Py_ssize_t> sizeof(floating)
                <= _PREFETCH_BYTES):
            if labels != NULL:
                _prefetch_rows(labels, sizeof(int64_t), rows + size, next_size)
            if targets != NULL:
                _prefetch_rows(targets, k_out * sizeof(floating), rows + size,
                               next_size)
            _prefetch_rows(X, d0 * sizeof(floating), rows + size, next_size)
        for layer in range(n_layers):
            _dense_forward_ptr(
                workspace + size * a_off[layer], params + w_off[layer],
                params + b_off[layer] if b_off[layer] >= 0 else NULL, <int> acts[layer],
                <floating> alphas[layer], workspace + size * a_off[layer + 1],
                <int> size, <int> widths[layer], <int> widths[layer + 1], False)
        out = workspace + size * a_off[n_layers]
        dout = workspace + size * a_off[n_layers + 1]
        dprev = dout + size * widest
        loss = _loss_ptr(loss_code, loss_param, out, targets, labels, rows, NULL, dout,
                         row_loss, size, k_out, 1, &n_bad) if size > 0 else 0
        if n_bad:
            return 1
        stats[3] = loss
        if reduce != NULL:
            share = _reduce_call(reduce, REDUCE_LOSS, -1, loss, size, &status)
            if status:
                return status
            for i in range(size * k_out):
                dout[i] *= <floating> share
        elif not isfinite(loss):
            return 0
        stats[1] += _batch_hits(loss_code, out, labels, targets, rows, size, k_out)
        for layer in range(n_layers - 1, -1, -1):
            if fold_sgd:
                _dense_backward_sgd_ptr(
                    workspace + size * a_off[layer], params + w_off[layer],
                    params + b_off[layer] if b_off[layer] >= 0 else NULL,
                    workspace + size * a_off[layer + 1], dout, <int> acts[layer],
                    <floating> alphas[layer], dout, dprev if layer > 0 else NULL,
                    db_parts, <int> size, <int> widths[layer], <int> widths[layer + 1],
                    lrs[b], hyper[2])
            else:
                # Each layer's update follows its backward at once, while its gradient
                # is still in cache (dx has used the old W; the layers below need
                # only dx). The same arithmetic as one update of the whole buffer.
                _dense_backward_ptr(
                    workspace + size * a_off[layer], params + w_off[layer],
                    workspace + size * a_off[layer + 1], dout, <int> acts[layer],
                    <floating> alphas[layer], dout, dprev if layer > 0 else NULL,
                    grads + w_off[layer],
                    grads + b_off[layer] if b_off[layer] >= 0 else NULL, db_parts, 1,
                    <int> size, <int> widths[layer], <int> widths[layer + 1])
                if reduce == NULL:
                    _layer_step(opt_code, hyper, params, grads, state0, state1, state2,
                                w_off, layer, n_layers, n_params, lrs[b], step + b + 1)
                else:
                    _reduce_call(reduce, REDUCE_START, layer, 0, size, &status)
            swap = dout
            dout = dprev
            dprev = swap
        for layer in range(n_layers - 1 if reduce != NULL else -1, -1, -1):
            global_loss = _reduce_call(reduce, REDUCE_WAIT, layer, 0, size, &status)
            if status:
                return status
            if not isfinite(global_loss):
                stats[3] = global_loss
                return 0
            _layer_step(opt_code, hyper, params, grads, state0, state1, state2, w_off,
                        layer, n_layers, n_params, lrs[b], step + b + 1)
        stats[0] += loss * size
        stats[2] += 1
        start += size
        b += 1
    return 0


cdef inline floating *_data_or_null(floating[::1] a) noexcept:
    """The first element's address, or NULL for None or an empty buffer."""
    return &a[0] if a is not None and a.shape[0] > 0 else NULL


def _train_epoch(
    const floating[:, ::1] X,        # IN  (n, widths[0])
    const int64_t[::1] labels,       # IN  (n,) or None
    const floating[:, ::1] targets,  # IN  (n, widths[L]) or None
    const int64_t[::1] order,        # IN  (m,)
    Py_ssize_t batch_size,
    const int64_t[::1] widths,       # IN  (L+1,)
    const int64_t[::1] acts,         # IN  (L,)
    const double[::1] alphas,        # IN  (L,)
    const int64_t[::1] use_bias,     # IN  (L,)
    floating[::1] params,            # IN/OUT (P,)
    floating[::1] grads,             # scratch (P,)
    floating[::1] workspace,         # scratch
    int loss_code, double loss_param, int opt_code,
    const double[::1] hyper,         # IN
    const double[::1] lrs,           # IN  (n_batches,)
    floating[::1] state0,            # IN/OUT (P,), or None / empty when unused
    floating[::1] state1,
    floating[::1] state2,
    long step,
    double[::1] stats,               # OUT (4,)
    object reduce,                   # TrainEpochSpec.reduce, or None
):
    cdef:
        int n_layers = widths.shape[0] - 1, layer, status
        Py_ssize_t m = order.shape[0], widest = 0, width_sum = 0, p = 0
        Py_ssize_t rows = max(min(batch_size, m), 1), n = X.shape[0]
        Py_ssize_t *offsets
        Py_ssize_t *w_off
        Py_ssize_t *b_off
        Py_ssize_t *a_off
        double *scratch
        const int64_t *lab = NULL
        const floating *tgt = NULL
        const double *lrs_ = &lrs[0] if lrs.shape[0] > 0 else NULL
        floating *s0 = _data_or_null(state0)
        floating *s1 = _data_or_null(state1)
        floating *s2 = _data_or_null(state2)
        list hook = [reduce, None]
        bint ok = (n_layers >= 1 and batch_size >= 1 and acts.shape[0] == n_layers
                   and alphas.shape[0] == n_layers and use_bias.shape[0] == n_layers)
    # The O(L) checks of every size against widths (sample indices and labels are
    # checked in the loop).
    for layer in range(n_layers + 1):
        ok = ok and widths[layer] >= 1
        widest = max(widest, <Py_ssize_t> widths[layer])
        width_sum += widths[layer]
    for layer in range(n_layers if ok else 0):
        ok = ok and IDENTITY <= acts[layer] <= ELU
        p += widths[layer] * widths[layer + 1] + (widths[layer + 1] if use_bias[layer] else 0)
    if not (ok and X.shape[1] == widths[0] and params.shape[0] == p
            and grads.shape[0] == p and state0 is not None and state0.shape[0] == p
            and state1 is not None and state1.shape[0] == p
            and state2 is not None and state2.shape[0] == p
            and workspace.shape[0] >= batch_size * (width_sum + 2 * widest)
            and lrs.shape[0] >= (m + batch_size - 1) // batch_size
            and stats.shape[0] == 4 and SOFTMAX_CE <= loss_code <= HINGE
            and SGD <= opt_code <= ADAM and hyper.shape[0] == _HYPER_SIZES[opt_code]
            and (labels.shape[0] == n if labels is not None else targets is not None
                 and targets.shape[0] == n and targets.shape[1] == widths[n_layers])):
        _refuse()
    p = 0
    offsets = <Py_ssize_t *> malloc((3 * n_layers + 2) * sizeof(Py_ssize_t))
    w_off = offsets
    b_off = offsets + n_layers
    a_off = offsets + 2 * n_layers
    scratch = <double *> malloc((rows + widest) * sizeof(double))
    if offsets == NULL or scratch == NULL:
        free(offsets)
        free(scratch)
        raise MemoryError()
    a_off[0] = 0
    for layer in range(n_layers):
        w_off[layer] = p
        p += widths[layer] * widths[layer + 1]
        b_off[layer] = p if use_bias[layer] else -1
        if use_bias[layer]:
            p += widths[layer + 1]
        a_off[layer + 1] = a_off[layer] + widths[layer]
    a_off[n_layers + 1] = a_off[n_layers] + widths[n_layers]
    if labels is not None and labels.shape[0] > 0:
        lab = &labels[0]
    if targets is not None and targets.shape[0] > 0:
        tgt = &targets[0, 0]
    with nogil:
        status = _train_epoch_ptr(
            &X[0, 0] if n > 0 else NULL, lab, tgt, &order[0] if m > 0 else NULL, n, m,
            batch_size, n_layers, &widths[0], &acts[0], &alphas[0], w_off, b_off, a_off,
            &params[0], &grads[0], &workspace[0], scratch, scratch + rows,
            params.shape[0], widest, loss_code, loss_param, opt_code, &hyper[0], lrs_, s0,
            s1, s2, step, &stats[0], <void *> hook if reduce is not None else NULL,
            lrs.shape[0])
    free(offsets)
    free(scratch)
    if status == 2:
        raise hook[1]
    if status:
        _refuse()


def train_epoch(spec):
    """One epoch of mini-batch training of ``L`` dense layers in one call, GIL released.

    ``spec`` is a ``fastnn.kernels.TrainEpochSpec`` (the fields are documented there).
    Per batch of ``order`` (the last batch may be smaller): gather its rows of X into
    the workspace; forward ``a_l+1 = act_l(a_l @ W_l + b_l)`` (bias rows + gemm, one
    activation pass); loss and its gradient; backward (activation derivative and db in
    one pass, gemm for dW and dx, no dx for the first layer), each layer's update
    (lr ``lrs[b]``, update number ``t = step + b + 1``) right after its backward, while
    its gradient is in cache. Plain SGD (momentum 0) is folded into the backward:
    ``W = (1 - lr wd) W - lr a.T @ dz`` is the dW gemm itself, and ``grads`` (scratch)
    is left untouched (``_numpy.train_epoch`` says what each backend leaves there). ``stats`` float64 (4,) receives [sum of batch loss * batch rows,
    correct predictions, batches completed, the last batch's loss]; a non-finite batch
    loss ends the epoch before its update. ``reduce`` as in ``_numpy.train_epoch``: the
    nogil loop takes the GIL only for its calls.
    """
    try:
        optimizer = spec.optimizer
        label_loss = spec.loss_code == SOFTMAX_CE or spec.loss_code == HINGE
        _train_epoch(spec.X, spec.labels if label_loss else None,
                     None if label_loss else spec.targets, spec.order, spec.batch_size,
                     spec.widths, spec.acts, spec.alphas, spec.use_bias, spec.params,
                     spec.grads, spec.workspace, spec.loss_code, spec.loss_param,
                     optimizer.code, optimizer.hyper, spec.lrs, *optimizer.states,
                     spec.step, spec.stats, spec.reduce)
    except _REFUSED:
        _checks.train_epoch(spec)
        _checks.train_epoch_indices(spec)
        raise
