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
# c) Matmuls go through `_gemm`: fastnn's own micro-kernels (kernels/fastnn_gemm.h,
#    AVX-512 / AVX2+FMA, picked at run time) where they beat BLAS for the shape, else
#    scipy.linalg.cython_blas sgemm / dgemm on row-major data by swapping the
#    operands (as sklearn/utils/_cython_blas.pyx); transposes go through the flags,
#    never copies. The bias and ReLU / leaky ReLU are the own kernel's store epilogue;
#    on BLAS `out` is prefilled with b and gemm runs with beta=1.
# d) Threads: work of at least _PARALLEL_MIN elements is split into one static chunk
#    per thread (prange); smaller work runs serially. The own GEMM splits C by columns
#    (rows when narrow), never k, so results do not depend on the thread count. BLAS
#    is never called inside a prange. Losses store one double per row and sum the
#    rows serially, so the loss does not depend on the thread count; db accumulates
#    per-chunk double rows.
# e) Elementwise math runs in the arrays' precision, as numpy does: float32 exp,
#    expm1, log1p and tanh inline (see the C block below), float64 libm; every
#    reduction (losses, db) accumulates in double.
# f) train_epoch composes those same helpers over a whole epoch in one nogil loop, on
#    pointer offsets into params / grads / workspace (no allocation per batch),
#    serially but for the matmuls, which thread as in d). Plain SGD is folded into
#    the weight-gradient gemm (beta = 1 - lr wd, alpha = -lr): dW is never stored
#    (except in a data-parallel epoch, whose `reduce` hook needs it).
#    dense_stack_forward (inference) runs the same dense forward helper per layer in
#    one nogil call, the hidden outputs alternating between two workspace halves.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport (
    NAN, exp, expm1, fabs, isfinite, isinf, log, log1p, sqrt, sqrtf, tanh,
)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

import time

import numpy as np

from . import _checks
from . import ACTIVATIONS as _ACTIVATIONS
from . import DEFAULT_ALPHA as _DEFAULT_ALPHA
from . import LOSS_CODES as _LOSS_CODES
from . import OPTIMIZER_CODES as _OPTIMIZER_CODES
from . import OPTIMIZER_HYPER as _OPTIMIZER_HYPER
from . import REDUCE_LOSS as _REDUCE_LOSS
from . import REDUCE_START as _REDUCE_START
from . import REDUCE_WAIT as _REDUCE_WAIT
from . import LAUNCHER_GONE as _LAUNCHER_GONE
from . import NODE_DATA as _NODE_DATA
from . import NODE_DONE as _NODE_DONE
from . import NODE_INIT as _NODE_INIT
from . import NODE_RELEASED as _NODE_RELEASED
from . import NODE_LOSS as _NODE_LOSS
from . import NODE_READY as _NODE_READY
from . import NODE_REDUCED as _NODE_REDUCED
from . import NodeSum as _NodeSum
from . import optimizer_states_used as _optimizer_states_used
from . import node_split_layout as _node_split_layout

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
cdef int NODE_READY = _NODE_READY
cdef int NODE_REDUCED = _NODE_REDUCED
cdef int NODE_DONE = _NODE_DONE
cdef int NODE_INIT = _NODE_INIT
cdef int NODE_RELEASED = _NODE_RELEASED
cdef Py_ssize_t NODE_LOSS = _NODE_LOSS
cdef Py_ssize_t NODE_DATA = _NODE_DATA

# Below this many elements a loop runs serially: a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN = 1 << 17

# Elements of a block that row-blocked passes keep in L1 between their sweeps.
cdef Py_ssize_t _L1_ELEMENTS = 2048

# train_epoch prefetches the next batch's sample rows while it computes this one when
# they take at most this many bytes (bigger batches would evict the weights from L2).
cdef Py_ssize_t _PREFETCH_BYTES = 1 << 16

# The gather asks for the row this many rows ahead of the one it copies, so that several
# random rows are on their way from memory at once (MNIST net, 1 process, batch 256: the
# gather takes 46-49 us a step instead of 71-81, timers in the kernel, ~2 % of a step).
cdef Py_ssize_t _GATHER_AHEAD = 8

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
# GEMM: fastnn's own kernels (kernels/fastnn_gemm.h) or BLAS
# ----------------------------------------------------------------------------------

cdef extern from "fastnn_gemm.h" nogil:
    enum:
        FASTNN_GEMM_BLAS
        FASTNN_GEMM_AVX2
        FASTNN_GEMM_AVX512
        FASTNN_EPI_NONE
        FASTNN_EPI_RELU
        FASTNN_EPI_LEAKY
    ctypedef struct fastnn_gemm_epilogue:
        const void *bias
        int act
        double slope
        const void *ahead
        size_t ahead_bytes
        int a_ahead
    int fastnn_gemm_path_available(int path)
    int fastnn_gemm_best_path()
    int fastnn_gemm_own_wins(int path, size_t elem, char ta, char tb, long m, long n,
                             long k)
    int fastnn_sgemm_range(int path, char ta, char tb, int m, int n, int k, float alpha,
                           const float *a, int lda, const float *b, int ldb, float beta,
                           float *c, int ldc, const fastnn_gemm_epilogue *epi, int i0,
                           int i1, int j0, int j1)
    int fastnn_dgemm_range(int path, char ta, char tb, int m, int n, int k, double alpha,
                           const double *a, int lda, const double *b, int ldb,
                           double beta, double *c, int ldc,
                           const fastnn_gemm_epilogue *epi, int i0, int i1, int j0,
                           int j1)

#: The GEMM paths by name (set_gemm_path / gemm_path).
_GEMM_PATHS = {"blas": FASTNN_GEMM_BLAS, "avx2": FASTNN_GEMM_AVX2,
               "avx512": FASTNN_GEMM_AVX512}

# The own path every product may take (BLAS: none), and whether the shape rule
# (fastnn_gemm_own_wins) still sends the products it loses on to BLAS ("auto").
cdef int _gemm_own_path = fastnn_gemm_best_path()
cdef bint _gemm_by_shape = True

# Below this many multiply-adds a product runs on one thread: a thread team costs
# more than it saves.
cdef double _GEMM_PARALLEL_MIN = 1 << 18

# Column splits between threads fall on multiples of this many columns (whole
# vectors: no masked tile inside a row).
cdef int _GEMM_SPLIT_ALIGN = 16


def set_gemm_path(str path):
    """Route every matmul through ``path``: "auto" (the fastest own kernel where it beats
    BLAS for the shape, BLAS elsewhere; the default), "avx512" or "avx2" (that own kernel
    for every shape) or "blas" (scipy's BLAS for every shape)."""
    global _gemm_own_path, _gemm_by_shape
    if path == "auto":
        _gemm_own_path, _gemm_by_shape = fastnn_gemm_best_path(), True
        return
    if path not in _GEMM_PATHS:
        raise ValueError(f"set_gemm_path: path must be one of 'auto', "
                         f"{', '.join(repr(p) for p in _GEMM_PATHS)}, got {path!r}")
    if not fastnn_gemm_path_available(_GEMM_PATHS[path]):
        raise ValueError(f"set_gemm_path: path {path!r} needs an instruction set this "
                         f"CPU (or this build) lacks; available: "
                         f"{', '.join(gemm_paths_available())}")
    _gemm_own_path, _gemm_by_shape = _GEMM_PATHS[path], False


def gemm_path():
    """The routing set by ``set_gemm_path``: "auto", "avx512", "avx2" or "blas"."""
    if _gemm_by_shape:
        return "auto"
    return next(name for name, code in _GEMM_PATHS.items() if code == _gemm_own_path)


def gemm_paths_available():
    """The GEMM paths this CPU and build run, fastest first (always ending in "blas")."""
    return [name for name in ("avx512", "avx2", "blas")
            if fastnn_gemm_path_available(_GEMM_PATHS[name])]


def gemm_choice(ta, tb, int m, int n, int k, dtype):
    """The path ("avx512", "avx2" or "blas") the current routing takes for the product
    ``op(A) (m, k) op(B) (k, n)`` in ``dtype`` (float32 / float64)."""
    cdef size_t elem = np.dtype(dtype).itemsize
    cdef int path = _gemm_choice(elem, ord(ta), ord(tb), m, n, k)
    return next(name for name, code in _GEMM_PATHS.items() if code == path)


cdef inline int _gemm_choice(
    size_t elem, char ta, char tb, int m, int n, int k,
) noexcept nogil:
    """The path of one product: the own kernel (forced, or winning by shape) or BLAS."""
    if _gemm_own_path == FASTNN_GEMM_BLAS:
        return FASTNN_GEMM_BLAS
    if _gemm_by_shape and not fastnn_gemm_own_wins(_gemm_own_path, elem, ta, tb, m, n, k):
        return FASTNN_GEMM_BLAS
    return _gemm_own_path


cdef inline void _gemm_blas(
    char ta, char tb, int m, int n, int k, floating alpha,
    const floating *a, int lda,  # IN  op(A) (m, k), row-major
    const floating *b, int ldb,  # IN  op(B) (k, n), row-major
    floating beta,
    floating *c, int ldc,        # OUT C (m, n), row-major
) noexcept nogil:
    """Row-major ``C = alpha op(A) op(B) + beta C`` by BLAS.

    A row-major matrix is its transpose in column-major order, so BLAS computes
    ``C.T = op(B).T op(A).T``: operands and their flags swap, shapes (n, m, k). A
    product with one row or one column of C is a matrix-vector product (gemv, which
    streams the matrix; gemm with m = 1 took 7x as long at CIFAR's 1 x 3072 x 1024).
    """
    cdef:
        int rows, cols, ld, inc, incy
        char trans
        const floating *mat
        const floating *vec
    if (m == 1 or n == 1) and k > 0:
        # C's row (m = 1): c = op(B).T a; C's column (n = 1): c = op(A) b. The matrix
        # (row-major, leading dimension ld) is the column-major (cols, rows), with
        # trans 'T' for a product with the matrix itself, 'N' for one with its transpose.
        if m == 1:
            mat, ld, vec, incy = b, ldb, a, 1
            trans = c"N" if tb == c"N" else c"T"
            rows, cols = (k, n) if tb == c"N" else (n, k)
            inc = 1 if ta == c"N" else lda
        else:
            mat, ld, vec, incy = a, lda, b, ldc
            trans = c"T" if ta == c"N" else c"N"
            rows, cols = (m, k) if ta == c"N" else (k, m)
            inc = ldb if tb == c"N" else 1
        if floating is float:
            sgemv(&trans, &cols, &rows, &alpha, <float *> mat, &ld, <float *> vec, &inc,
                  &beta, c, &incy)
        else:
            dgemv(&trans, &cols, &rows, &alpha, <double *> mat, &ld, <double *> vec, &inc,
                  &beta, c, &incy)
        return
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float *> b, &ldb, <float *> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double *> b, &ldb, <double *> a, &lda,
              &beta, c, &ldc)


cdef inline int _gemm_own_range(
    int path, char ta, char tb, int m, int n, int k, floating alpha,
    const floating *a, int lda, const floating *b, int ldb, floating beta,
    floating *c, int ldc, const fastnn_gemm_epilogue *epi,
    int i0, int i1, int j0, int j1,
) noexcept nogil:
    """``C[i0:i1, j0:j1]`` by the own kernel ``path``; 0, or -1 (no scratch memory)."""
    if floating is float:
        return fastnn_sgemm_range(path, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c,
                                  ldc, epi, i0, i1, j0, j1)
    else:
        return fastnn_dgemm_range(path, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c,
                                  ldc, epi, i0, i1, j0, j1)


cdef void _gemm_own_block_by_blas(
    char ta, char tb, int k, floating alpha,
    const floating *a, int lda, const floating *b, int ldb, floating beta,
    floating *c, int ldc, int i0, int i1, int j0, int j1,
) noexcept nogil:
    """``C[i0:i1, j0:j1]`` by BLAS (operands offset to the block): the fallback of a
    part whose own kernel found no scratch memory. Products with an epilogue never
    pack, so never land here."""
    _gemm_blas(ta, tb, i1 - i0, j1 - j0, k, alpha,
               a + (i0 if ta == c"T" else <Py_ssize_t> i0 * lda), lda,
               b + (<Py_ssize_t> j0 * ldb if tb == c"T" else j0), ldb, beta,
               c + <Py_ssize_t> i0 * ldc + j0, ldc)


cdef void _gemm_own(
    int path, char ta, char tb, int m, int n, int k, floating alpha,
    const floating *a, int lda, const floating *b, int ldb, floating beta,
    floating *c, int ldc, const fastnn_gemm_epilogue *epi,
) noexcept nogil:
    """The whole product on the own kernel ``path``, split over threads by columns
    (rows when C is narrow), never over k: each element is reduced in the same order
    at any thread count, so results are bit-identical. Each thread's columns of op(B)
    (the weights, in the forward and dx) stay in its core's L2."""
    cdef:
        int parts = 1, part, lo, hi
        bint by_columns = n >= 2 * _GEMM_SPLIT_ALIGN
        int status[64]
    if _num_threads > 1 and <double> m * n * k >= _GEMM_PARALLEL_MIN:
        parts = min(_num_threads, 64,
                    n // _GEMM_SPLIT_ALIGN if by_columns else max(m // 8, 1))
    if parts <= 1:
        if _gemm_own_range(path, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                           epi, 0, m, 0, n) != 0:
            _gemm_own_block_by_blas(ta, tb, k, alpha, a, lda, b, ldb, beta, c, ldc, 0,
                                    m, 0, n)
        return
    for part in prange(parts, schedule="static", num_threads=parts):
        if by_columns:
            lo = (n // _GEMM_SPLIT_ALIGN) * part // parts * _GEMM_SPLIT_ALIGN
            hi = (n if part == parts - 1 else
                  (n // _GEMM_SPLIT_ALIGN) * (part + 1) // parts * _GEMM_SPLIT_ALIGN)
            status[part] = _gemm_own_range(path, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                                           beta, c, ldc, epi, 0, m, lo, hi)
        else:
            lo = m * part // parts
            hi = m * (part + 1) // parts
            status[part] = _gemm_own_range(path, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                                           beta, c, ldc, epi, lo, hi, 0, n)
    # BLAS is never called inside the prange: failed parts are redone here.
    for part in range(parts):
        if status[part] == 0:
            continue
        if by_columns:
            lo = (n // _GEMM_SPLIT_ALIGN) * part // parts * _GEMM_SPLIT_ALIGN
            hi = (n if part == parts - 1 else
                  (n // _GEMM_SPLIT_ALIGN) * (part + 1) // parts * _GEMM_SPLIT_ALIGN)
            _gemm_own_block_by_blas(ta, tb, k, alpha, a, lda, b, ldb, beta, c, ldc, 0,
                                    m, lo, hi)
        else:
            _gemm_own_block_by_blas(ta, tb, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                    m * part // parts, m * (part + 1) // parts, 0, n)


cdef inline void _gemm(
    char ta, char tb, int m, int n, int k, floating alpha,
    const floating *a, int lda,  # IN  op(A) (m, k), row-major
    const floating *b, int ldb,  # IN  op(B) (k, n), row-major
    floating beta,
    floating *c, int ldc,        # OUT C (m, n), row-major
) noexcept nogil:
    """Row-major ``C = alpha op(A) op(B) + beta C`` on the path ``_gemm_choice`` picks
    (beta = 0: C is not read, as BLAS)."""
    cdef fastnn_gemm_epilogue epi
    cdef int path = _gemm_choice(sizeof(floating), ta, tb, m, n, k)
    if path == FASTNN_GEMM_BLAS:
        _gemm_blas(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    epi.bias = NULL
    epi.act = FASTNN_EPI_NONE
    epi.slope = 0
    epi.ahead = NULL
    epi.ahead_bytes = 0
    epi.a_ahead = 0
    _gemm_own(path, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, &epi)


def _gemm_product(str ta, str tb, double alpha, const floating[:, ::1] a,
                  const floating[:, ::1] b, double beta, floating[:, ::1] c,
                  int repeat):
    cdef:
        int r
        char ta_ = ord(ta), tb_ = ord(tb)
        int m = c.shape[0], n = c.shape[1]
        int k = a.shape[0] if ta == "T" else a.shape[1]
        int lda = max(a.shape[1], 1), ldb = max(b.shape[1], 1), ldc = max(n, 1)
        floating zero = 0
    if ((a.shape[1] if ta == "T" else a.shape[0]) != m
            or (b.shape[1] if tb == "T" else b.shape[0]) != k
            or (b.shape[0] if tb == "T" else b.shape[1]) != n):
        raise ValueError(f"gemm: op(a) {tuple(a.shape)[:2]} (ta={ta!r}), op(b) "
                         f"{tuple(b.shape)[:2]} (tb={tb!r}) and c {tuple(c.shape)[:2]} "
                         f"do not chain as c (m, n) = op(a) (m, k) op(b) (k, n)")
    if m == 0 or n == 0:
        return
    with nogil:
        for r in range(repeat):
            _gemm(ta_, tb_, m, n, k, <floating> alpha,
                  &a[0, 0] if a.shape[0] * a.shape[1] else &zero, lda,
                  &b[0, 0] if b.shape[0] * b.shape[1] else &zero, ldb, <floating> beta,
                  &c[0, 0], ldc)


def gemm(ta, tb, alpha, a, b, beta, c, repeat=1):
    """One matmul on the current path (``set_gemm_path``), for tests and benchmarks:
    ``c = alpha op(a) op(b) + beta c`` with op = transpose for "T", identity for "N";
    c (m, n) float32 / float64 C-contiguous, written in place; a, b the same dtype.
    ``repeat`` > 1 runs it that many times in one call (benchmarks: no per-call
    overhead in the timing)."""
    if ta not in ("N", "T") or tb not in ("N", "T"):
        raise ValueError(f"gemm: ta and tb must be 'N' or 'T', got {ta!r}, {tb!r}")
    if not (isinstance(c, np.ndarray) and c.dtype in (np.float32, np.float64)
            and a.dtype == c.dtype and b.dtype == c.dtype):
        raise TypeError(f"gemm: a, b and c must be float32 or float64 arrays of one "
                        f"dtype, got {getattr(a, 'dtype', type(a))}, "
                        f"{getattr(b, 'dtype', type(b))}, {getattr(c, 'dtype', type(c))}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"gemm: repeat must be a positive int, got {repeat!r}")
    _gemm_product(ta, tb, alpha, a, b, beta, c, repeat)


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

cdef inline bint _dense_product(
    int path,           # IN  _gemm_choice of the whole product
    const floating *x,  # IN  (n, d)
    const floating *w,  # IN  (d, k)
    const floating *b,  # IN  (k,), or NULL: no bias
    int act, floating alpha,
    floating *out,      # OUT (n, k), rows ldc apart
    int n, int d, int k, int ldc,
    const void *ahead=NULL,  # IN  ahead_bytes the caller reads next, or NULL
    size_t ahead_bytes=0,
    bint x_ahead=False,      # x comes from memory
) noexcept nogil:
    """``out = x @ w + b`` on ``path``, with ``act`` applied in the store when the own
    GEMM can (ReLU, leaky ReLU): returns whether it was. BLAS runs on bias rows with
    beta=1 (beta=0 without a bias). The own GEMM asks for ``ahead`` as it goes, and
    with ``x_ahead`` for each strip's next rows of x (fastnn_gemm_epilogue)."""
    cdef:
        Py_ssize_t i
        fastnn_gemm_epilogue epi
    if path != FASTNN_GEMM_BLAS:
        epi.bias = b
        epi.act = (FASTNN_EPI_RELU if act == RELU else
                   FASTNN_EPI_LEAKY if act == LEAKY_RELU else FASTNN_EPI_NONE)
        epi.slope = alpha
        epi.ahead = ahead
        epi.ahead_bytes = ahead_bytes
        epi.a_ahead = x_ahead
        _gemm_own(path, c"N", c"N", n, k, d, 1, x, d, w, k, 0, out, ldc, &epi)
        return epi.act != FASTNN_EPI_NONE
    if b != NULL:
        for i in range(n):
            memcpy(out + i * ldc, b, k * sizeof(floating))
    _gemm_blas(c"N", c"N", n, k, d, 1, x, d, w, k, 1 if b != NULL else 0, out, ldc)
    return False


cdef void _dense_forward_ptr(
    const floating *x,  # IN  (n, d)
    const floating *w,  # IN  (d, k)
    const floating *b,  # IN  (k,), or NULL: no bias
    int act, floating alpha,
    floating *out,      # OUT (n, k)
    int n, int d, int k, bint threaded,
) noexcept nogil:
    """``out = act(x @ w + b)``: the product and, on the own GEMM, ReLU / leaky ReLU in
    its store (``_dense_product``); other activations in one pass after, threaded when
    big unless ``threaded`` is False."""
    if _dense_product(_gemm_choice(sizeof(floating), c"N", c"N", n, k, d), x, w, b, act,
                      alpha, out, n, d, k, k) or act == IDENTITY:
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


cdef bint _dense_backward_shapes_ok(
    const Py_ssize_t *x, const Py_ssize_t *w, const Py_ssize_t *a, const Py_ssize_t *dout,
    const Py_ssize_t *dz, const Py_ssize_t *dw, Py_ssize_t db, const Py_ssize_t *dx,
    int act,
) noexcept:
    """dense_backward's O(1) check (float32 / float64 and bf16 alike): with x (n, d) and
    w (d, k), a, dout and dz are (n, k), dw (d, k), db (k,), dx (n, d) or NULL
    (skipped), and act a known activation code."""
    cdef Py_ssize_t n = x[0], d = x[1], k = w[1]
    return (w[0] == d and a[0] == n and a[1] == k and dout[0] == n and dout[1] == k
            and dz[0] == n and dz[1] == k and dw[0] == d and dw[1] == k and db == k
            and (dx == NULL or (dx[0] == n and dx[1] == d))
            and IDENTITY <= act <= ELU)


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
    if not _dense_backward_shapes_ok(x.shape, w.shape, a.shape, dout.shape, dz.shape,
                                     dw.shape, db.shape[0],
                                     dx.shape if dx is not None else NULL, act):
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
        floating gi, mi, vi, pi
        floating keep1 = 1 - beta1, keep2 = 1 - beta2, inv_bias2 = 1 / bias2_sqrt
    # Without amsgrad, one branch-free loop per case, so the compiler vectorises it
    # (decay * p is exact when decay == 1). L2 (wd != 0: sklearn's alpha) has its own
    # loop: the general one below runs scalar, ~5 ns a parameter.
    if vmax == NULL and wd == 0:
        for i in range(size):
            gi = g[i]
            mi = beta1 * m[i] + keep1 * gi
            vi = beta2 * v[i] + keep2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = decay * p[i] - step_size * mi / (_sqrt(vi) * inv_bias2 + eps)
        return
    if vmax == NULL:
        for i in range(size):
            pi = p[i] * decay
            gi = g[i] + wd * pi
            mi = beta1 * m[i] + keep1 * gi
            vi = beta2 * v[i] + keep2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = pi - step_size * mi / (_sqrt(vi) * inv_bias2 + eps)
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
# _gemm for the matmuls (threaded by columns when big). No allocation inside the loop, no GIL, no exceptions.
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


cdef extern from "fastnn_node.h" nogil:
    int64_t fastnn_flag_load(const int64_t *p)
    void fastnn_flag_store(int64_t *p, int64_t v)
    double fastnn_seconds()
    void fastnn_nap(double seconds)
    long fastnn_parent()
    double fastnn_cpu_round_trip(int cpu_a, int cpu_b, long rounds)
    void _publish "fastnn_publish"(void *dst, const void *src, size_t n)
    void _stream "fastnn_stream"(void *dst, const void *src, size_t n)
    void _stream_rows "fastnn_stream_rows"(void *dst, const void *src, size_t n)
    void _store_fence "fastnn_store_fence"()


# A NodeSum (fastnn.kernels.NodeSum) as the nogil loop reads it.
cdef struct _Node:
    char **segments            # (size,) every rank's segment: flags, loss slot, data
    int rank, size
    const double *global_rows  # (steps,) rows of each step over every rank
    double spin                # seconds a wait polls before it sleeps between polls
    const int64_t *row_starts  # (steps,) this rank's first row in each global batch
    Py_ssize_t split_rows      # rows of the largest global batch
    long parent                # the launcher's pid, or 0: not watched
    int *gone                  # set by a wait that found the launcher gone
    double stream_below        # bytes/s: a slower publish of W1 streams (_split_publish)

#: The largest block of W1 columns a rank of a split first layer updates in private
#: memory and publishes whole each step (_Split.own): the MNIST net's (784 x 128 float32,
#: 401 KB) publishes in 6 us near, 10 us far, and saves ~50 us of waiting for lines far;
#: the CIFAR net's (3072 x 512, 6.3 MB) would cost ~0.6 ms a step near, more than it
#: saves: a block this large is updated in place.
cdef Py_ssize_t SPLIT_PUBLISH_MAX_BYTES = 1 << 20

#: A rank that streams what it writes for the others (_Split.streaming) publishes its
#: block of W1 with a string move again every this many steps, to see whether it still
#: should (the host may have moved the CPUs).
cdef int64_t STREAM_CHECK_STEPS = 32

#: A block of W1 smaller than this never makes its rank stream: its copy's time is the
#: call's own, not the lines' (the tests' 5 x 3 blocks: ~0.6 GB/s).
cdef Py_ssize_t STREAM_MIN_BYTES = 64 << 10

#: How many rows ahead db asks for the rows of dz that a streaming rank (_Split.streaming)
#: reads from memory: 8 rows took the sum from 29 to 20 us a step on the Zen 4 VM (4: 22).
cdef Py_ssize_t SPLIT_DB_AHEAD = 8


#: A waiting rank's sleep between polls once it has polled for _Node.spin (the OS
#: rounds it up to ~50-60 us).
cdef double NODE_POLL_SECONDS = 2e-5


cdef inline int64_t *_node_flags(const _Node *node, int r) noexcept nogil:
    return <int64_t *> node.segments[r]


cdef inline double *_node_loss(const _Node *node, int r) noexcept nogil:
    return <double *> (node.segments[r] + NODE_LOSS)


cdef inline void _node_chunk(Py_ssize_t n, int parts, int index, Py_ssize_t *start,
                             Py_ssize_t *stop) noexcept nogil:
    """``fastnn.kernels.chunk``: part ``index`` of ``parts`` of range(n)."""
    cdef Py_ssize_t base = n // parts, extra = n % parts
    start[0] = index * base + min(<Py_ssize_t> index, extra)
    stop[0] = start[0] + base + (1 if index < extra else 0)


cdef void _node_wait(const _Node *node, int flag, int64_t step) noexcept nogil:
    """Until every rank's ``flag`` is >= ``step`` (flags only grow): poll for
    ``node.spin`` seconds, then sleep NODE_POLL_SECONDS between polls; give up, setting
    ``node.gone``, once this process's parent is no longer ``node.parent`` (the
    launcher was killed: the ranks waited for may never come). After that every wait
    returns at once."""
    cdef int r = 0
    cdef double deadline = -1.0
    while r < node.size and not node.gone[0]:
        if fastnn_flag_load(_node_flags(node, r) + flag) >= step:
            r += 1
        elif deadline < 0:
            deadline = fastnn_seconds() + node.spin
        elif fastnn_seconds() > deadline:
            if node.parent != 0 and fastnn_parent() != node.parent:
                node.gone[0] = 1
                return
            fastnn_nap(NODE_POLL_SECONDS)


cdef int64_t _node_begin(const _Node *node, double loss_rows) noexcept nogil:
    """Start a NodeSum step: once no rank still reads this rank's segment, put
    ``loss_rows`` in its loss slot; returns the step's number."""
    cdef int64_t done = _node_flags(node, node.rank)[NODE_DONE]  # only this rank writes it
    _node_wait(node, NODE_DONE, done)
    _node_loss(node, node.rank)[0] = loss_rows
    return done + 1


cdef struct _Split:
    # The first layer of a NodeSum epoch, split by columns (_split_update). In memory
    # every rank sees: W by columns, rank r's chunk(k, K, r) = [c0, c1) as a
    # (d, c1 - c0) block at element d * c0, then b (k,); the optimizer's states of
    # them laid out alike; and the global batch's x, dz.
    void *w
    void *states[3]       # the shared copy of each OptimizerSpec.states slot, or NULL:
                          # unused (kernels.optimizer_states_used)
    # This rank's private memory, published to the shared copies with fastnn_publish
    # (writes into lines the other CPUs have read are slow where they sit apart):
    void *own             # (d, nc) its columns of W, the copy it updates: private, or
                          # its block in w itself (SPLIT_PUBLISH_MAX_BYTES)
    void *grad            # (P - P1,) its gradient of the layers after the first
    void *dw              # (d * nc + nc,) its columns of dW then db, unless plain SGD
                          # folds the update into the gemm
    void *memory          # the allocation own, grad and dw are in
    void *x               # (2, split_rows, d) the global batch's inputs, by step parity
    void *dz              # (split_rows, k) the global batch's dz
    Py_ssize_t d, k, cols_start, cols_stop  # W (d, k); this rank's columns
    bint bias
    double *db            # scratch (k,)
    bint streaming        # write for the others with streaming stores (_split_publish)


cdef inline Py_ssize_t _line_bytes(Py_ssize_t n) noexcept nogil:
    """``n`` bytes rounded up to whole 64-byte cache lines (``node_split_layout``)."""
    return (n + 63) // 64 * 64


cdef inline void _split_write(const _Split *split, void *dst, const void *src,
                              size_t n) noexcept nogil:
    """Copy ``n`` bytes that the other ranks read next: streamed past the caches while
    ``split.streaming``, else with one string move (fastnn_publish)."""
    if split.streaming:
        _stream(dst, src, n)
    else:
        _publish(dst, src, n)


cdef void _split_publish(const _Node *node, _Split *split, void *dst, const void *src,
                         size_t n, int64_t s) noexcept nogil:
    """Publish this rank's block of W1 (``n`` bytes, step ``s``) and decide how it
    writes for the others until its next publish. A string move writes whole cache
    lines without fetching them on most CPUs, and the other CPU then reads them from
    the cache they are in (~400 KB in 6-10 us near or far on a Zen 5 VM, 10-12 us near
    on a Zen 4 one). Where it still waits for every line another CPU holds (that Zen 4
    VM with its two vCPUs in different core complexes: 100-230 us) the rank streams
    instead (fastnn_stream: 14-23 us, the readers then miss): its block, its dz, its
    gradient and its inputs, until a string move that it times again, at its first
    publish of an epoch and every STREAM_CHECK_STEPS steps, runs at ``node.stream_below``
    bytes per second or faster (a block under STREAM_MIN_BYTES never streams, unless
    ``stream_below`` is inf). How a rank writes changes no value."""
    cdef double start
    if split.streaming and s % STREAM_CHECK_STEPS != 0:
        _stream(dst, src, n)
        return
    start = fastnn_seconds()
    _publish(dst, src, n)
    split.streaming = isinf(node.stream_below) or (
        n >= STREAM_MIN_BYTES and (fastnn_seconds() - start) * node.stream_below > <double> n)


cdef void _split_take(const _Split *split, floating *region, const floating *flat,
                      Py_ssize_t w_at, Py_ssize_t b_at) noexcept nogil:
    """This rank's columns of the first layer in ``flat`` (W (d, k) at element ``w_at``,
    b at ``b_at``, or -1: none) into its block of ``region`` (laid out as split.w)."""
    cdef:
        Py_ssize_t d = split.d, k = split.k, lo = split.cols_start, i
        Py_ssize_t nc = split.cols_stop - lo
    for i in range(d):
        memcpy(region + d * lo + i * nc, flat + w_at + i * k + lo, nc * sizeof(floating))
    if b_at >= 0:
        memcpy(region + d * k + lo, flat + b_at + lo, nc * sizeof(floating))


cdef void _split_give(const _Node *node, const _Split *split, floating *flat,
                      const floating *region, Py_ssize_t w_at,
                      Py_ssize_t b_at) noexcept nogil:
    """Every rank's block of ``region`` into the first layer of ``flat`` (as
    _split_take)."""
    cdef:
        Py_ssize_t d = split.d, k = split.k, lo, hi, i
        int r
    for r in range(node.size):
        _node_chunk(k, node.size, r, &lo, &hi)
        for i in range(d):
            memcpy(flat + w_at + i * k + lo, region + d * lo + i * (hi - lo),
                   (hi - lo) * sizeof(floating))
    if b_at >= 0:
        memcpy(flat + b_at, region + d * k, k * sizeof(floating))


cdef void _split_update(const _Node *node, _Split *split, floating *w, Py_ssize_t rows,
                        int64_t s, int opt_code, const double *hyper, double lr,
                        long t) noexcept nogil:
    """This rank's columns of the first layer, over the whole global batch, on
    ``split.own`` (a private copy, then published as its block of ``w``, or that block
    itself): plain SGD folds its update into the gemm, ``W[:, c] = (1 - lr wd) W[:, c]
    - lr x.T @ dz[:, c]`` and ``b[c] -= lr (dz[:, c].sum(0) + wd b[c])``; any other
    optimizer takes its step from ``dW[:, c] = x.T @ dz[:, c]``, ``db[c] =
    dz[:, c].sum(0)`` and the columns' states in ``split.states``."""
    cdef:
        Py_ssize_t d = split.d, k = split.k, c0 = split.cols_start
        Py_ssize_t nc = split.cols_stop - c0, i, j
        const floating *x = <const floating *> split.x + (s % 2) * node.split_rows * d
        const floating *dz = <const floating *> split.dz
        floating *bias = w + d * k
        floating *dw = <floating *> split.dw
        floating *st[3]
        double *db = split.db
        double weight_decay = hyper[2]
        bint fold = opt_code == SGD and hyper[0] == 0
    if nc <= 0 or rows <= 0:
        return
    if split.bias:
        for j in range(nc):
            db[j] = 0
        for i in range(rows):
            if split.streaming and i + SPLIT_DB_AHEAD < rows:  # the other ranks' rows
                # come from memory then, not from their caches
                for j in range(0, nc * <Py_ssize_t> sizeof(floating), 64):
                    _prefetch(<const char *> (dz + (i + SPLIT_DB_AHEAD) * k + c0) + j)
            for j in range(nc):
                db[j] += dz[i * k + c0 + j]
    if fold:
        _gemm(c"T", c"N", <int> d, <int> nc, <int> rows, <floating> -lr, x, <int> d,
              dz + c0, <int> k, <floating> (1 - lr * weight_decay),
              <floating *> split.own, <int> nc)
    else:
        _gemm(c"T", c"N", <int> d, <int> nc, <int> rows, 1, x, <int> d, dz + c0,
              <int> k, 0, dw, <int> nc)
        for j in range(3):
            st[j] = (<floating *> split.states[j] + d * c0 if split.states[j] != NULL
                     else NULL)
        _optimizer_step(opt_code, hyper, <floating *> split.own, dw, st[0], st[1], st[2],
                        d * nc, lr, t)
    if split.own != <void *> (w + d * c0):
        _split_publish(node, split, w + d * c0, split.own, d * nc * sizeof(floating), s)
    if not split.bias:
        return
    if fold:
        for j in range(nc):
            bias[c0 + j] -= <floating> (lr * (db[j] + weight_decay * bias[c0 + j]))
        return
    for j in range(nc):
        dw[d * nc + j] = <floating> db[j]
    for j in range(3):
        st[j] = (<floating *> split.states[j] + d * k + c0 if split.states[j] != NULL
                 else NULL)
    _optimizer_step(opt_code, hyper, bias + c0, dw + d * nc, st[0], st[1], st[2], nc, lr,
                    t)


cdef void _split_forward(const _Node *node, const _Split *split, const floating *x,
                         const floating *b, int act, floating alpha, floating *out,
                         int n) noexcept nogil:
    """``out = act(x @ W + b)`` (x (n, d), out (n, k)) with W in column blocks: this
    rank's first, from its own copy, then the others' from ``split.w``, each product
    asking for the next block as it goes, and the first for its next rows of x (the
    other blocks and, while the rank streams, x come from memory or another CPU: 492-515
    us a step far apart on the Zen 4 VM, 466-467 with this; 458-465 near either way).
    Every block on the path the whole product takes, so on the own kernels each
    element is computed as ``_dense_forward_ptr`` computes it (through BLAS, a block
    may round differently: gemv for one column, a BLAS's own choices by shape)."""
    cdef:
        Py_ssize_t d = split.d, k = split.k, c0, c1, n0, n1
        int q, r
        bint fused = False
        int path = _gemm_choice(sizeof(floating), c"N", c"N", n, <int> k, <int> d)
    for q in range(node.size):
        r = (node.rank + q) % node.size
        _node_chunk(k, node.size, r, &c0, &c1)
        n0 = n1 = 0
        if q + 1 < node.size:
            _node_chunk(k, node.size, (r + 1) % node.size, &n0, &n1)
        if c1 > c0:
            fused = _dense_product(
                path, x, <const floating *> split.own if r == node.rank
                else <const floating *> split.w + d * c0, b + c0 if b != NULL else NULL,
                act, alpha, out + c0, n, <int> d, <int> (c1 - c0), <int> k,
                <const floating *> split.w + d * n0, d * (n1 - n0) * sizeof(floating),
                q == 0)
    if act != IDENTITY and not fused:
        _activation_forward_range(act, alpha, out, out, <Py_ssize_t> n * k)


cdef double _node_step(
    const _Node *node, int64_t s, Py_ssize_t b, Py_ssize_t first, Py_ssize_t n_params,
    int opt_code, const double *hyper, floating *params, floating *state0,
    floating *state1, floating *state2, double lr, long t, _Split *split,
) noexcept nogil:
    """End NodeSum step ``s`` (batch ``b``), the gradient written into this rank's
    segment: the global loss, every rank's gradient summed chunk by chunk, each chunk's
    update from its owner's sum (``fastnn.kernels.NodeSum``). Returns the global loss;
    a non-finite one updates nothing."""
    cdef:
        int me = node.rank, r
        Py_ssize_t start, stop, i
        int64_t *flags = _node_flags(node, me)
        floating *own = <floating *> (node.segments[me] + NODE_DATA)
        const floating *other
        double loss = 0.0
    fastnn_flag_store(flags + NODE_READY, s)
    _node_wait(node, NODE_READY, s)
    if node.gone[0]:
        return NAN
    for r in range(node.size):
        loss += _node_loss(node, r)[0]
    loss /= node.global_rows[b]
    _node_chunk(n_params - first, node.size, me, &start, &stop)
    start += first
    stop += first
    for r in range(node.size):
        if r != me:
            other = <const floating *> (node.segments[r] + NODE_DATA)
            for i in range(start, stop):
                own[i] += other[i]
    fastnn_flag_store(flags + NODE_REDUCED, s)
    if isfinite(loss):
        _optimizer_step(opt_code, hyper, params + start, own + start,
                        _shifted(state0, start), _shifted(state1, start),
                        _shifted(state2, start), stop - start, lr, t)
        if split != NULL:
            _split_update(node, split, <floating *> split.w,
                          <Py_ssize_t> node.global_rows[b], s, opt_code, hyper, lr, t)
        _node_wait(node, NODE_REDUCED, s)
        for r in range(node.size):
            if r != me:
                _node_chunk(n_params - first, node.size, r, &start, &stop)
                start += first
                stop += first
                other = <const floating *> (node.segments[r] + NODE_DATA)
                _optimizer_step(opt_code, hyper, params + start, other + start,
                                _shifted(state0, start), _shifted(state1, start),
                                _shifted(state2, start), stop - start, lr, t)
    fastnn_flag_store(flags + NODE_DONE, s)
    return loss


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


cdef int _gather_batch(
    const floating *X,        # IN  (n_samples, d0) all samples
    const int64_t *labels,    # IN  class labels, or NULL
    const floating *targets,  # IN  (., k_out) targets, or NULL
    const int64_t *rows,      # IN  (size + next_size,) this batch's, then the next's
    Py_ssize_t size, Py_ssize_t next_size, Py_ssize_t n_samples, Py_ssize_t d0,
    Py_ssize_t k_out,
    floating *batch,          # OUT (size, d0)
    bint streaming,           # IN  write batch with streaming stores (_split_publish)
) noexcept nogil:
    """Copy the batch's rows of X into ``batch``; returns 1 (nothing more done) when a
    sample index is outside [0, n_samples), else 0. Random batches miss the cache, so
    each copy asks for the row _GATHER_AHEAD rows on, and the next batch's samples are
    asked for meanwhile when they are few (labels first: the loss waits on them one by
    one)."""
    cdef Py_ssize_t i
    for i in range(size):
        if rows[i] < 0 or rows[i] >= n_samples:
            return 1
        if i + _GATHER_AHEAD < size and 0 <= rows[i + _GATHER_AHEAD] < n_samples:
            _prefetch_rows(X, d0 * sizeof(floating), rows + i + _GATHER_AHEAD, 1)
        if streaming:
            _stream_rows(batch + i * d0, X + rows[i] * d0, d0 * sizeof(floating))
        else:
            memcpy(batch + i * d0, X + rows[i] * d0, d0 * sizeof(floating))
    if streaming:
        _store_fence()
    if (0 < next_size and next_size * (d0 + k_out) * <Py_ssize_t> sizeof(floating)
            <= _PREFETCH_BYTES):
        if labels != NULL:
            _prefetch_rows(labels, sizeof(int64_t), rows + size, next_size)
        if targets != NULL:
            _prefetch_rows(targets, k_out * sizeof(floating), rows + size, next_size)
        _prefetch_rows(X, d0 * sizeof(floating), rows + size, next_size)
    return 0


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
    void *reduce,             # [reduce, None] (a callable TrainEpochSpec.reduce), or NULL
    const _Node *node,        # a NodeSum TrainEpochSpec.reduce, or NULL
    Py_ssize_t n_steps,       # steps of an epoch with reduce (len(lrs))
    _Split *split,            # the first layer split by columns (node only), or NULL
) noexcept nogil:
    """The body of ``train_epoch``: per batch gather, forward, loss, then per layer
    (last first) backward and update. Returns 0, or 1 when a batch holds a sample index
    outside [0, n_samples) or a label outside [0, widths[L]) (the epoch then ends before
    that batch's update), or 2 when ``reduce`` raised. With ``reduce``, each layer's
    reduction starts after its backward, and the updates wait for them (REDUCE_LOSS);
    with ``node``, the whole gradient is summed and applied in shared memory
    (``_node_step``), but for the first layer with ``split``: its inputs and dz go into
    the shared global batch, and each rank updates its columns over all of it
    (``_split_update``, ``kernels.NodeSum``). There each rank writes what the others
    read (its block of W up to SPLIT_PUBLISH_MAX_BYTES, its dz, its gradient) in its
    private memory first and then copies it over whole (fastnn_publish).

    Workspace of a batch of ``rows``: a_0 .. a_L (rows, widths[l]) packed, then two
    (rows, widest) gradient buffers that swap roles from layer to layer."""
    cdef:
        Py_ssize_t start = 0, size, i, b = 0, n_bad = 0
        Py_ssize_t d0 = widths[0], k_out = widths[n_layers]
        int layer
        double loss, share, global_loss
        int status = 0
        int64_t node_step = 0
        const int64_t *rows
        floating *out
        floating *dout
        floating *dprev
        floating *swap
        # Plain SGD (no momentum) updates each layer inside its backward: the dW gemm
        # writes straight into W (_dense_backward_sgd_ptr), and grads stay untouched.
        bint fold_sgd = opt_code == SGD and hyper[0] == 0 and reduce == NULL and node == NULL
        # The first layer's input, weights and bias: in shared memory when split.
        floating *x0 = workspace
        floating *w0 = params + w_off[0]
        floating *b0 = params + b_off[0] if b_off[0] >= 0 else NULL
        Py_ssize_t first = 0, p0 = (w_off[1] if n_layers > 1 else n_params) - w_off[0]
        Py_ssize_t lo, hi
        int64_t s = 0
        # The gradient of the layers the ranks sum, from element ``first`` of the
        # parameters on: private with a split first layer, else grads.
        floating *gw = <floating *> split.grad if split != NULL else grads
        floating *full_states[3]
    full_states[0], full_states[1], full_states[2] = state0, state1, state2
    stats[0] = stats[1] = stats[2] = stats[3] = 0
    if split != NULL:
        w0 = <floating *> split.w
        b0 = w0 + d0 * widths[1] if b_off[0] >= 0 else NULL
        first = p0
        # Once every rank has copied out the epochs before, each rank takes its columns
        # of the first layer (and of the optimizer's states of it) into its block of
        # the shared one and into its own copy; every rank waits for all of them before
        # its first forward.
        _node_wait(node, NODE_RELEASED, _node_flags(node, node.rank)[NODE_RELEASED])
        s = _node_flags(node, node.rank)[NODE_DONE] + 1
        lo, hi = split.cols_start, split.cols_stop
        _split_take(split, w0, params, w_off[0], b_off[0])
        if split.own != <void *> (w0 + d0 * lo):
            memcpy(split.own, w0 + d0 * lo, d0 * (hi - lo) * sizeof(floating))
        for i in range(3):
            if split.states[i] != NULL:
                _split_take(split, <floating *> split.states[i], full_states[i], w_off[0],
                            b_off[0])
        fastnn_flag_store(_node_flags(node, node.rank) + NODE_INIT, s)
        _node_wait(node, NODE_INIT, s)
    while start < m or ((reduce != NULL or node != NULL) and b < n_steps):
        size = min(batch_size, m - start)
        rows = order + start
        if split != NULL:
            s = _node_flags(node, node.rank)[NODE_DONE] + 1
            x0 = (<floating *> split.x + ((s % 2) * node.split_rows
                                          + node.row_starts[b]) * d0)
        if _gather_batch(X, labels, targets, rows, size, min(batch_size, m - start - size),
                         n_samples, d0, k_out, x0, split != NULL and split.streaming):
            return 1
        if split != NULL:  # every rank's first layer of the last step is written
            _node_wait(node, NODE_DONE, s - 1)
        for layer in range(n_layers):
            if layer == 0 and split != NULL:
                _split_forward(node, split, x0, b0, <int> acts[0], <floating> alphas[0],
                               workspace + size * a_off[1], <int> size)
                continue
            _dense_forward_ptr(
                x0 if layer == 0 else workspace + size * a_off[layer],
                w0 if layer == 0 else params + w_off[layer],
                b0 if layer == 0 else
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
        if reduce != NULL or node != NULL:
            if node != NULL:
                node_step = _node_begin(node, loss * size)
                share = size / node.global_rows[b] if node.global_rows[b] > 0 else 0.0
            else:
                share = _reduce_call(reduce, REDUCE_LOSS, -1, loss, size, &status)
                if status:
                    return status
            for i in range(size * k_out):
                dout[i] *= <floating> share
        elif not isfinite(loss):
            return 0
        stats[1] += _batch_hits(loss_code, out, labels, targets, rows, size, k_out)
        for layer in range(n_layers - 1, -1, -1):
            if layer == 0 and split != NULL:
                _dz_rows(<int> acts[0], <floating> alphas[0],
                         workspace + size * a_off[1], dout, dprev, NULL,
                         size, widths[1])
                _split_write(split, <floating *> split.dz + node.row_starts[b] * widths[1],
                             dprev, size * widths[1] * sizeof(floating))
            elif fold_sgd:
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
                    gw + (w_off[layer] - first),
                    gw + (b_off[layer] - first) if b_off[layer] >= 0 else NULL,
                    db_parts, 1,
                    <int> size, <int> widths[layer], <int> widths[layer + 1])
                if reduce != NULL:
                    _reduce_call(reduce, REDUCE_START, layer, 0, size, &status)
                elif node == NULL:
                    _layer_step(opt_code, hyper, params, grads, state0, state1, state2,
                                w_off, layer, n_layers, n_params, lrs[b], step + b + 1)
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
        if node != NULL:
            if split != NULL:
                _split_write(split, grads + first, gw, (n_params - first) * sizeof(floating))
            global_loss = _node_step(node, node_step, b, first, n_params, opt_code, hyper,
                                     params, state0, state1, state2, lrs[b], step + b + 1,
                                     split)
            if not isfinite(global_loss):
                stats[3] = global_loss
                break
        stats[0] += loss * size
        stats[2] += 1
        start += size
        b += 1
    if split != NULL:  # every rank's last update written: the first layer's new values
        # (and its states) from the ranks' blocks
        _node_wait(node, NODE_DONE, _node_flags(node, node.rank)[NODE_DONE])
        if not node.gone[0]:
            _split_give(node, split, params, w0, w_off[0], b_off[0])
            for i in range(3):
                if split.states[i] != NULL:
                    _split_give(node, split, full_states[i],
                                <const floating *> split.states[i], w_off[0], b_off[0])
            fastnn_flag_store(_node_flags(node, node.rank) + NODE_RELEASED,
                              _node_flags(node, node.rank)[NODE_RELEASED] + 1)
    return 3 if node != NULL and node.gone[0] else 0


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
    bint bf16,                       # the products in bf16 (float32 only)
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
        uint32_t *bf16_scratch = NULL
        list hook = [reduce, None]
        _Node node
        _Split split
        _Split *split_ptr = NULL
        uint8_t[::1] shared
        Py_ssize_t lo, hi, x_at = 0, dz_at = 0, item = sizeof(floating), own_bytes
        Py_ssize_t states_at, end, grad_bytes, dw_bytes, i
        tuple used
        int rank, gone = 0
        bint node_sum = isinstance(reduce, _NodeSum)
        const double[::1] global_rows
        const int64_t[::1] row_starts_
        uint8_t[::1] segment
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
    if node_sum:
        global_rows = reduce.global_rows
        node.size = len(reduce.segments)
        node.rank = reduce.rank
        node.spin = reduce.spin
        node.global_rows = &global_rows[0] if global_rows.shape[0] > 0 else NULL
        if not (not bf16 and 0 <= node.rank < node.size
                and global_rows.shape[0] >= lrs.shape[0]):
            _refuse()
        node.parent = reduce.parent
        node.gone = &gone
        node.stream_below = reduce.stream_below
        if node.parent < 0 or not node.stream_below >= 0:
            _refuse()
        node.split_rows = reduce.split_rows
        node.row_starts = NULL
        if node.split_rows:
            # the layout of kernels.node_split_layout; O(steps): every step's rows of
            # this rank inside the shared global batch
            shared = reduce.shared
            row_starts_ = reduce.row_starts
            used = _optimizer_states_used(opt_code, hyper)
            _, states_at, x_at, dz_at, end = _node_split_layout(
                widths, node.split_rows, item, len(used))
            ok = (node.split_rows > 0 and row_starts_.shape[0] >= lrs.shape[0]
                  and shared.shape[0] >= end and (<size_t> &shared[0]) % 64 == 0)
            for lo in range(lrs.shape[0] if ok else 0):
                hi = min(batch_size, max(m - lo * batch_size, 0))
                ok = (ok and row_starts_[lo] >= 0
                      and row_starts_[lo] + hi <= global_rows[lo] <= node.split_rows)
            if not ok:
                _refuse()
        node.segments = <char **> malloc(node.size * sizeof(char *))
        if node.segments == NULL:
            raise MemoryError()
        for rank in range(node.size):
            segment = reduce.segments[rank]
            node.segments[rank] = <char *> &segment[0]
            if (segment.shape[0] < NODE_DATA + p * <Py_ssize_t> sizeof(floating)
                    or (<size_t> node.segments[rank]) % 8 != 0
                    or (rank == node.rank
                        and <char *> &grads[0] != node.segments[rank] + NODE_DATA)):
                free(node.segments)
                _refuse()
        if node.split_rows:
            node.row_starts = &row_starts_[0]
            split.d, split.k = widths[0], widths[1]
            split.w = &shared[0]
            split.x = &shared[x_at]
            split.dz = &shared[dz_at]
            _node_chunk(split.k, node.size, node.rank, &lo, &hi)
            split.cols_start, split.cols_stop = lo, hi
            split.bias = use_bias[0] != 0
            split.streaming = False
            for i in range(3):
                split.states[i] = NULL
            for i in range(len(used)):
                split.states[<int> used[i]] = &shared[states_at + i * states_at]
            # own (unless it is the block in the shared region itself), grad, then dw
            # (unless plain SGD folds its update), each on whole cache lines
            own_bytes = widths[0] * (hi - lo) * item
            own_bytes = _line_bytes(own_bytes) if own_bytes <= SPLIT_PUBLISH_MAX_BYTES else 0
            grad_bytes = _line_bytes(
                (p - widths[0] * widths[1] - (widths[1] if use_bias[0] else 0)) * item)
            dw_bytes = (0 if opt_code == SGD and hyper[0] == 0
                        else _line_bytes((widths[0] + 1) * (hi - lo) * item))
            split.memory = malloc(own_bytes + grad_bytes + dw_bytes + 64)
            if split.memory == NULL:
                free(node.segments)
                raise MemoryError()
            split.own = <void *> ((<size_t> split.memory + 63) // 64 * 64)
            split.grad = <char *> split.own + own_bytes
            split.dw = <char *> split.grad + grad_bytes
            if own_bytes == 0:
                split.own = &shared[widths[0] * lo * item]
            split_ptr = &split
    p = 0
    offsets = <Py_ssize_t *> malloc((3 * n_layers + 2) * sizeof(Py_ssize_t))
    w_off = offsets
    b_off = offsets + n_layers
    a_off = offsets + 2 * n_layers
    scratch = <double *> malloc((rows + widest) * sizeof(double))
    if offsets == NULL or scratch == NULL:
        free(offsets)
        free(scratch)
        if node_sum:
            free(node.segments)
        if split_ptr != NULL:
            free(split.memory)
        raise MemoryError()
    split.db = scratch + rows   # the layers' db_parts: free once the backward is done
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
    if bf16:
        if floating is float and reduce is None:
            bf16_scratch = _bf16_scratch(_bf16_epoch_words(rows, widths))
            with nogil:
                status = _bf16_train_epoch_ptr(
                    &X[0, 0] if n > 0 else NULL, lab, tgt, &order[0] if m > 0 else NULL,
                    n, m, batch_size, n_layers, &widths[0], &acts[0], &alphas[0], w_off,
                    b_off, a_off, &params[0], &grads[0], &workspace[0], scratch,
                    scratch + rows, params.shape[0], widest, loss_code, loss_param,
                    opt_code, &hyper[0], lrs_, s0, s1, s2, step, &stats[0], bf16_scratch)
            _bf16_free(bf16_scratch)
        else:
            status = 1
        free(offsets)
        free(scratch)
        if status:
            _refuse()
        return
    with nogil:
        status = _train_epoch_ptr(
            &X[0, 0] if n > 0 else NULL, lab, tgt, &order[0] if m > 0 else NULL, n, m,
            batch_size, n_layers, &widths[0], &acts[0], &alphas[0], w_off, b_off, a_off,
            &params[0], &grads[0], &workspace[0], scratch, scratch + rows,
            params.shape[0], widest, loss_code, loss_param, opt_code, &hyper[0], lrs_, s0,
            s1, s2, step, &stats[0],
            <void *> hook if reduce is not None and not node_sum else NULL,
            &node if node_sum else NULL, lrs.shape[0], split_ptr)
    free(offsets)
    free(scratch)
    if node_sum:
        free(node.segments)
        if split_ptr != NULL:
            free(split.memory)
    if status == 2:
        raise hook[1]
    if status == 3:
        raise RuntimeError(_LAUNCHER_GONE.format(node.parent))
    if status:
        _refuse()


#: _train_epoch's specialisation for each X dtype, called directly: the fused-type
#: dispatcher first matches every argument against the signatures, ~1 us of a ~3 us
#: call that a fit makes once per epoch. Any other dtype goes through the dispatcher
#: (and its refusal through _checks).
_TRAIN_EPOCH_BY_DTYPE = {np.dtype(np.float32): _train_epoch["float"],
                         np.dtype(np.float64): _train_epoch["double"]}


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
    nogil loop takes the GIL only for its calls; a ``NodeSum`` runs with no GIL at all,
    its split first layer updating each rank's columns from their gemm over the global
    batch (plain SGD folded into it).
    """
    try:
        optimizer = spec.optimizer
        label_loss = spec.loss_code == SOFTMAX_CE or spec.loss_code == HINGE
        _TRAIN_EPOCH_BY_DTYPE.get(spec.X.dtype, _train_epoch)(
            spec.X, spec.labels if label_loss else None,
            None if label_loss else spec.targets, spec.order, spec.batch_size, spec.widths,
            spec.acts, spec.alphas, spec.use_bias, spec.params, spec.grads, spec.workspace,
            spec.loss_code, spec.loss_param, optimizer.code, optimizer.hyper, spec.lrs,
            *optimizer.states, spec.step, spec.stats, _bf16_epoch(spec), spec.reduce)
    except _REFUSED:
        _checks.train_epoch(spec)
        _checks.train_epoch_indices(spec)
        raise


# ----------------------------------------------------------------------------------
# bfloat16 products with float32 accumulation (kernels/fastnn_bf16.h, AVX512_BF16)
#
# The same layers as above with every Dense product (x @ w, x.T @ dz, dz @ w.T) in
# bf16 on vdpbf16ps; biases, activations and their derivatives, losses and optimizer
# steps stay float32 (the helpers above). Operands are rounded and packed into the
# header's pair layouts in scratch: x once per call (once per batch in train_epoch),
# w once per call (once per step: every layer's packs at the start of the batch).
# float32 only. A CPU without AVX512_BF16 gets RuntimeError naming it: there is no
# silent fp32 fallback (the numpy backend emulates bf16 exactly, anywhere).
# ----------------------------------------------------------------------------------

cdef extern from "fastnn_bf16.h":
    int FASTNN_BF16
    int fastnn_cpu_has_avx512_bf16() noexcept nogil
    void *_bf16_alloc "fastnn_bf16_alloc"(size_t nbytes) noexcept nogil
    void _bf16_free "fastnn_bf16_free"(void *p) noexcept nogil
    void _bf16_round "fastnn_bf16_round_f32"(
        const float *src, float *dst, Py_ssize_t n) noexcept nogil
    void _bf16_pack_rows "fastnn_bf16_pack_rows"(
        const float *src, Py_ssize_t ld, int rows, int cols, uint16_t *dst,
        Py_ssize_t ldd) noexcept nogil
    Py_ssize_t _b_words "fastnn_bf16_b_words"(Py_ssize_t kp, Py_ssize_t n) noexcept nogil
    void _bf16_pack_pairs "fastnn_bf16_pack_pairs"(
        const float *src, Py_ssize_t ld, int rows, int cols, uint32_t *dst) noexcept nogil
    void _bf16_pack_pairs_t "fastnn_bf16_pack_pairs_t"(
        const float *src, Py_ssize_t ld, int rows, int cols, uint32_t *dst) noexcept nogil
    void _bf16_gemm "fastnn_bf16_gemm"(
        int m, int n, int kp, const uint32_t *a, Py_ssize_t lda, const uint32_t *b,
        float *c, Py_ssize_t ldc, float alpha, float beta, const float *bias,
        int relu) noexcept nogil
    void _bf16_peak_tile "fastnn_bf16_peak_tile"(
        int kp, const uint32_t *a, const uint32_t *b, float *c) noexcept nogil

#: Whether this build has the bf16 kernels and this CPU runs them.
_BF16 = bool(FASTNN_BF16) and bool(fastnn_cpu_has_avx512_bf16())


def bf16_available():
    """True when this CPU has AVX512_BF16 (vdpbf16ps) and the build has its kernels."""
    return _BF16


cdef int _require_bf16() except -1:
    if not _BF16:
        raise RuntimeError("the bf16 kernels need a CPU with AVX512_BF16 (vdpbf16ps: AMD "
                           "Zen 4, Intel Cooper Lake / Sapphire Rapids and later) and an "
                           "x86-64 GCC >= 10 or clang build; this one has none. Use "
                           "precision='fp32', or the numpy backend, which emulates bf16")


cdef inline Py_ssize_t _pairs(Py_ssize_t k) noexcept nogil:
    """Pair words along a reduction of length k."""
    return (k + 1) // 2


cdef inline Py_ssize_t _wp_words(Py_ssize_t d, Py_ssize_t k) noexcept nogil:
    """Words of w (d, k) packed for the forward (``_bf16_pack_weights``)."""
    return _b_words(_pairs(d), k)


cdef inline Py_ssize_t _wtp_words(Py_ssize_t d, Py_ssize_t k) noexcept nogil:
    """Words of w^T packed for dx (``_bf16_pack_weights``)."""
    return _b_words(_pairs(k), d)


cdef Py_ssize_t _bf16_forward_words(Py_ssize_t n, Py_ssize_t d, Py_ssize_t k) noexcept:
    """Scratch words of one bf16 dense forward: x rounded, then w packed."""
    return _whole_lines(n * _pairs(d)) + _wp_words(d, k)


cdef inline Py_ssize_t _whole_lines(Py_ssize_t words) noexcept nogil:
    """``words`` rounded up to whole 64-byte cache lines: the next buffer in a scratch
    block starts on a line, so no 64-byte load of a packed operand splits two."""
    return (words + 15) // 16 * 16


cdef void _bf16_dense_forward_ptr(
    const float *x,      # IN  (n, d)
    const uint32_t *wp,  # IN  w (d, k) packed by _bf16_pack_pairs
    const float *b,      # IN  (k,), or NULL: no bias
    int act, float alpha,
    float *out,          # OUT (n, k)
    uint32_t *xb,        # scratch (n * _pairs(d),)
    int n, int d, int k,
) noexcept nogil:
    """``out = act(bf16(x) @ bf16(w) + b)``: bias and relu in the gemm's epilogue, the
    other activations in one pass after it."""
    cdef Py_ssize_t kp = _pairs(d)
    _bf16_pack_rows(x, d, n, d, <uint16_t *> xb, 2 * kp)
    _bf16_gemm(n, k, <int> kp, xb, kp, wp, out, k, 1, 0, b, act == RELU)
    if act != IDENTITY and act != RELU:
        _activation_forward_range(act, alpha, out, out, <Py_ssize_t> n * k)


cdef void _bf16_dense_backward_ptr(
    const float *x,       # IN  (n, d)
    const uint32_t *wtp,  # IN  w^T packed by _bf16_pack_pairs_t, or NULL when dx is NULL
    const float *a,       # IN  (n, k) forward output
    const float *dout,    # IN  (n, k)
    int act, float alpha,
    float *dz,            # OUT (n, k), may alias dout
    float *dx,            # OUT (n, d), or NULL: skipped
    float *dw,            # OUT (d, k): dw = dw_alpha bf16(x).T @ bf16(dz) + dw_beta dw
    float dw_alpha, float dw_beta,
    double *db,           # OUT (k,) accumulated, or NULL: no column sums
    uint32_t *scratch,    # (_bf16_backward_words(n, d, k),)
    int n, int d, int k,
) noexcept nogil:
    """``dz = dout * act'(a)`` and ``db += dz.sum(0)`` in float32 (one pass, as
    ``_dz_rows``); ``dx = bf16(dz) @ bf16(w).T``; then the dW product into ``dw`` with
    the given scale, so the SGD step is its epilogue (dw = w, alpha = -lr,
    beta = 1 - lr wd)."""
    cdef:
        Py_ssize_t kz = _pairs(k), np_ = _pairs(n)
        uint32_t *xp = scratch                   # x^T as a packed A
        uint32_t *dzp = xp + _b_words(np_, d)    # dz as a packed B
        uint32_t *dzb = dzp + _b_words(np_, k)   # dz rounded, row-major
    _dz_rows(act, alpha, a, dout, dz, db, n, k)
    if dx != NULL:
        _bf16_pack_rows(dz, k, n, k, <uint16_t *> dzb, 2 * kz)
        _bf16_gemm(n, d, <int> kz, dzb, kz, wtp, dx, d, 1, 0, NULL, 0)
    _bf16_pack_pairs(x, d, n, d, xp)
    _bf16_pack_pairs(dz, k, n, k, dzp)
    _bf16_gemm(d, k, <int> np_, xp, 0, dzp, dw, k, dw_alpha, dw_beta, NULL, 0)


cdef Py_ssize_t _bf16_backward_words(Py_ssize_t n, Py_ssize_t d, Py_ssize_t k) noexcept:
    """Scratch words of ``_bf16_dense_backward_ptr``."""
    return _b_words(_pairs(n), d) + _b_words(_pairs(n), k) + n * _pairs(k)


cdef void _bf16_pack_weights(
    const float *w,  # IN  (d, k)
    uint32_t *wp,    # OUT (_wp_words(d, k),) for the forward
    uint32_t *wtp,   # OUT (_wtp_words(d, k),) for dx, or NULL: not needed
    int d, int k,
) noexcept nogil:
    _bf16_pack_pairs(w, k, d, k, wp)
    if wtp != NULL:
        _bf16_pack_pairs_t(w, k, d, k, wtp)


cdef uint32_t *_bf16_scratch(Py_ssize_t words) except NULL:
    """``words`` of scratch on 64-byte lines (free with ``_bf16_free``)."""
    cdef uint32_t *p = <uint32_t *> _bf16_alloc(<size_t> max(words, 1) * sizeof(uint32_t))
    if p == NULL:
        raise MemoryError()
    return p


def _bf16_round_array(const float[::1] x, float[::1] out):
    if out.shape[0] != x.shape[0]:
        _refuse()
    if x.shape[0] == 0:
        return
    with nogil:
        _bf16_round(&x[0], &out[0], x.shape[0])


def bf16_round(x, out):
    """``out = x`` rounded to bfloat16 (nearest even; NaN, inf kept; subnormals to
    signed zero), as float32. x and out float32 of one shape; out may be x."""
    _require_bf16()
    _checks.bf16_round(x, out)  # first: reshape would copy a non-contiguous out
    _bf16_round_array(x.reshape(-1), out.reshape(-1))


def _dense_forward_bf16(
    const float[:, ::1] x,  # IN  (n, d)
    const float[:, ::1] w,  # IN  (d, k)
    const float[::1] b,     # IN  (k,)
    int act,
    float[:, ::1] out,      # OUT (n, k)
    alpha,
):
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1]
        float alpha_ = _resolve_alpha(act, alpha)
        uint32_t *scratch
    if (w.shape[0] != d or b.shape[0] != k or out.shape[0] != n or out.shape[1] != k
            or not IDENTITY <= act <= ELU):
        _refuse()
    if n == 0 or k == 0:
        return
    if d == 0:
        raise ValueError(f"dense_forward_bf16: x and w must have at least one column, "
                         f"got x {tuple(x.shape)[:2]}")
    scratch = _bf16_scratch(_bf16_forward_words(n, d, k))
    with nogil:
        _bf16_pack_weights(&w[0, 0], scratch + _whole_lines(n * _pairs(d)), NULL, d, k)
        _bf16_dense_forward_ptr(&x[0, 0], scratch + _whole_lines(n * _pairs(d)), &b[0],
                                act, alpha_,
                                &out[0, 0], scratch, n, d, k)
    _bf16_free(scratch)


def dense_forward_bf16(x, w, b, act, out, alpha=None):
    """``out = act(bf16(x) @ bf16(w) + b)``, the product on vdpbf16ps with float32
    accumulation, bias and activation in float32. float32 x (n, d), w (d, k), b (k,),
    out (n, k)."""
    _require_bf16()
    try:
        _dense_forward_bf16(x, w, b, act, out, alpha)
    except _REFUSED:
        _checks.dense_forward(x, w, b, act, out)
        _checks.float32_only("dense_forward_bf16", x)
        raise


def _dense_backward_bf16(
    const float[:, ::1] x,     # IN  (n, d)
    const float[:, ::1] w,     # IN  (d, k)
    const float[:, ::1] a,     # IN  (n, k) forward output
    const float[:, ::1] dout,  # IN  (n, k)
    int act,
    float[:, ::1] dz,          # OUT (n, k), may alias dout
    float[:, ::1] dx,          # OUT (n, d), None: skipped
    float[:, ::1] dw,          # OUT (d, k)
    float[::1] db,             # OUT (k,)
    alpha,
):
    cdef:
        int n = x.shape[0], d = x.shape[1], k = w.shape[1], j
        float alpha_ = _resolve_alpha(act, alpha)
        float *dx_ = NULL
        uint32_t *scratch
        uint32_t *wtp = NULL
        double *sums
    if not _dense_backward_shapes_ok(x.shape, w.shape, a.shape, dout.shape, dz.shape,
                                     dw.shape, db.shape[0],
                                     dx.shape if dx is not None else NULL, act):
        _refuse()
    if n == 0:  # no rows: zero gradients, as numpy's sums over nothing
        dw[:, :] = 0
        db[:] = 0
        return
    if d == 0 or k == 0:
        raise ValueError(f"dense_backward_bf16: x and w must have at least one column, "
                         f"got x {tuple(x.shape)[:2]}, w {tuple(w.shape)[:2]}")
    scratch = _bf16_scratch(_bf16_backward_words(n, d, k) + _wtp_words(d, k))
    sums = <double *> calloc(k, sizeof(double))
    if sums == NULL:
        _bf16_free(scratch)
        raise MemoryError()
    if dx is not None:
        dx_ = &dx[0, 0]
        wtp = scratch + _bf16_backward_words(n, d, k)
    with nogil:
        if wtp != NULL:
            _bf16_pack_pairs_t(&w[0, 0], k, d, k, wtp)
        _bf16_dense_backward_ptr(&x[0, 0], wtp, &a[0, 0], &dout[0, 0], act, alpha_,
                                 &dz[0, 0], dx_, &dw[0, 0], 1, 0, sums, scratch, n, d, k)
        for j in range(k):
            db[j] = <float> sums[j]
    free(sums)
    _bf16_free(scratch)


def dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha=None):
    """``dz = dout * act'(a)`` and ``db = dz.sum(0)`` in float32; ``dw = bf16(x).T @
    bf16(dz)`` and ``dx = bf16(dz) @ bf16(w).T`` (skipped when dx is None) on
    vdpbf16ps with float32 accumulation. float32, shapes as ``dense_backward``."""
    _require_bf16()
    try:
        _dense_backward_bf16(x, w, a, dout, act, dz, dx, dw, db, alpha)
    except _REFUSED:
        _checks.dense_backward(x, w, a, dout, act, dz, dx, dw, db)
        _checks.float32_only("dense_backward_bf16", x)
        raise


def _dense_stack_forward_bf16(
    const float[:, ::1] x,         # IN  (n, widths[0])
    const float[::1] params,       # IN  (P,)
    const int64_t[::1] widths,     # IN  (L+1,)
    const int64_t[::1] acts,       # IN  (L,)
    const double[::1] alphas,      # IN  (L,)
    const int64_t[::1] use_bias,   # IN  (L,)
    float[::1] workspace,          # scratch
    float[:, ::1] out,             # OUT (n, widths[L])
):
    cdef:
        int n_layers = widths.shape[0] - 1, layer, d, k
        Py_ssize_t n = x.shape[0], hidden = 0, p = 0, words = 0, half
        bint ok = (n_layers >= 1 and acts.shape[0] == n_layers
                   and alphas.shape[0] == n_layers and use_bias.shape[0] == n_layers)
        uint32_t *scratch
        const float *src
        float *dst
    for layer in range(n_layers + 1 if ok else 0):
        ok = ok and widths[layer] >= 1
        if 0 < layer < n_layers:
            hidden = max(hidden, <Py_ssize_t> widths[layer])
    for layer in range(n_layers if ok else 0):
        ok = ok and IDENTITY <= acts[layer] <= ELU
        p += widths[layer] * widths[layer + 1] + (widths[layer + 1] if use_bias[layer] else 0)
        words = max(words, _bf16_forward_words(n, widths[layer], widths[layer + 1]))
    if not (ok and x.shape[1] == widths[0] and params.shape[0] == p
            and workspace.shape[0] >= 2 * n * hidden and out.shape[0] == n
            and out.shape[1] == widths[n_layers]):
        _refuse()
    if n == 0:
        return
    scratch = _bf16_scratch(words)
    half = n * hidden
    with nogil:
        p = 0
        src = &x[0, 0]
        for layer in range(n_layers):
            d = <int> widths[layer]
            k = <int> widths[layer + 1]
            dst = &out[0, 0] if layer == n_layers - 1 else &workspace[0] + (layer % 2) * half
            _bf16_pack_weights(&params[p], scratch + _whole_lines(n * _pairs(d)), NULL, d,
                               k)
            _bf16_dense_forward_ptr(src, scratch + _whole_lines(n * _pairs(d)),
                                    &params[p + d * k] if use_bias[layer] else NULL,
                                    <int> acts[layer], <float> alphas[layer], dst, scratch,
                                    <int> n, d, k)
            p += <Py_ssize_t> d * k + (k if use_bias[layer] else 0)
            src = dst
    _bf16_free(scratch)


def dense_stack_forward_bf16(x, params, widths, acts, alphas, use_bias, workspace, out):
    """The inference pass of ``dense_stack_forward`` with every product in bf16
    (``dense_forward_bf16`` per layer), GIL released. float32; shapes and layout as
    ``_numpy.dense_stack_forward``."""
    _require_bf16()
    try:
        _dense_stack_forward_bf16(x, params, widths, acts, alphas, use_bias, workspace,
                                  out)
    except _REFUSED:
        _checks.dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace,
                                    out)
        _checks.float32_only("dense_stack_forward_bf16", x)
        raise


cdef int _bf16_train_epoch_ptr(
    const float *X, const int64_t *labels, const float *targets, const int64_t *order,
    Py_ssize_t n_samples, Py_ssize_t m, Py_ssize_t batch_size, int n_layers,
    const int64_t *widths, const int64_t *acts, const double *alphas,
    const Py_ssize_t *w_off, const Py_ssize_t *b_off, const Py_ssize_t *a_off,
    float *params, float *grads, float *workspace, double *row_loss, double *db_parts,
    Py_ssize_t n_params, Py_ssize_t widest, int loss_code, double loss_param,
    int opt_code, const double *hyper, const double *lrs,
    float *state0, float *state1, float *state2, long step, double *stats,
    uint32_t *scratch,  # (_bf16_epoch_words(batch_size, widths),)
) noexcept nogil:
    """``_train_epoch_ptr`` with the Dense products in bf16: per batch, every layer's
    weights packed once (``_bf16_pack_weights``), then forward, loss, and per layer
    (last first) the bf16 backward with its update right after (plain SGD in the dW
    epilogue). Arguments, workspace and return value as ``_train_epoch_ptr``; scratch
    holds per layer the packed w and w^T (none for the first: it has no dx), then the
    rounded activations and the backward's pair buffers, shared by the layers."""
    cdef:
        Py_ssize_t start = 0, size, i, j, b = 0, n_layer, n_bad = 0, pos = 0
        Py_ssize_t d0 = widths[0], k_out = widths[n_layers], d, k
        int layer
        double loss, lr
        const int64_t *rows
        float *out
        float *dout
        float *dprev
        float *swap
        float *bias
        uint32_t *shared
        bint fold_sgd = opt_code == SGD and hyper[0] == 0
    for layer in range(n_layers):
        pos += _wp_words(widths[layer], widths[layer + 1])
        if layer > 0:
            pos += _wtp_words(widths[layer], widths[layer + 1])
    shared = scratch + pos
    stats[0] = stats[1] = stats[2] = stats[3] = 0
    while start < m:
        size = min(batch_size, m - start)
        rows = order + start
        if _gather_batch(X, labels, targets, rows, size, min(batch_size, m - start - size),
                         n_samples, d0, k_out, workspace, False):
            return 1
        pos = 0
        for layer in range(n_layers):
            d = widths[layer]
            k = widths[layer + 1]
            _bf16_pack_weights(params + w_off[layer], scratch + pos,
                               scratch + pos + _wp_words(d, k) if layer > 0 else NULL,
                               <int> d, <int> k)
            _bf16_dense_forward_ptr(
                workspace + size * a_off[layer], scratch + pos,
                params + b_off[layer] if b_off[layer] >= 0 else NULL, <int> acts[layer],
                <float> alphas[layer], workspace + size * a_off[layer + 1], shared,
                <int> size, <int> d, <int> k)
            pos += _wp_words(d, k) + (_wtp_words(d, k) if layer > 0 else 0)
        out = workspace + size * a_off[n_layers]
        dout = workspace + size * a_off[n_layers + 1]
        dprev = dout + size * widest
        loss = _loss_ptr(loss_code, loss_param, out, targets, labels, rows, NULL, dout,
                         row_loss, size, k_out, 1, &n_bad)
        if n_bad:
            return 1
        stats[3] = loss
        if not isfinite(loss):
            return 0
        stats[1] += _batch_hits(loss_code, out, labels, targets, rows, size, k_out)
        lr = lrs[b]
        for layer in range(n_layers - 1, -1, -1):
            d = widths[layer]
            k = widths[layer + 1]
            pos -= _wp_words(d, k) + (_wtp_words(d, k) if layer > 0 else 0)
            bias = params + b_off[layer] if b_off[layer] >= 0 else NULL
            if bias != NULL:
                memset(db_parts, 0, k * sizeof(double))
            _bf16_dense_backward_ptr(
                workspace + size * a_off[layer],
                scratch + pos + _wp_words(d, k) if layer > 0 else NULL,
                workspace + size * a_off[layer + 1], dout, <int> acts[layer],
                <float> alphas[layer], dout, dprev if layer > 0 else NULL,
                params + w_off[layer] if fold_sgd else grads + w_off[layer],
                <float> -lr if fold_sgd else 1, <float> (1 - lr * hyper[2]) if fold_sgd
                else 0, db_parts if bias != NULL else NULL, shared, <int> size, <int> d,
                <int> k)
            if fold_sgd:
                for j in range(k if bias != NULL else 0):
                    bias[j] -= <float> (lr * (db_parts[j] + hyper[2] * bias[j]))
            else:
                for j in range(k if bias != NULL else 0):
                    grads[b_off[layer] + j] = <float> db_parts[j]
                n_layer = (w_off[layer + 1] if layer + 1 < n_layers
                           else n_params) - w_off[layer]
                _optimizer_step(opt_code, hyper, params + w_off[layer],
                                grads + w_off[layer], _shifted(state0, w_off[layer]),
                                _shifted(state1, w_off[layer]),
                                _shifted(state2, w_off[layer]), n_layer, lr,
                                step + b + 1)
            swap = dout
            dout = dprev
            dprev = swap
        stats[0] += loss * size
        stats[2] += 1
        start += size
        b += 1
    return 0


cdef Py_ssize_t _bf16_epoch_words(Py_ssize_t rows, const int64_t[::1] widths) noexcept:
    """Scratch words of ``_bf16_train_epoch_ptr`` for batches of ``rows``: the packed
    weights, then the largest forward or backward buffer of any layer."""
    cdef:
        Py_ssize_t total = 0, shared = 0, d, k
        int layer
    for layer in range(widths.shape[0] - 1):
        d = widths[layer]
        k = widths[layer + 1]
        total += _wp_words(d, k) + (_wtp_words(d, k) if layer > 0 else 0)
        shared = max(shared, rows * _pairs(d), _bf16_backward_words(rows, d, k))
    return total + shared


def bf16_peak_flops(Py_ssize_t repeats=20000):
    """The vdpbf16ps peak of one core, in flop/s: the GEMM's 6 x 64 register tile over
    96 pairs with A and B in L1 (26 KB), ``repeats`` times (a micro-benchmark; 2 flops
    per bf16 product-add, as a float32 FMA counts 2)."""
    _require_bf16()
    cdef:
        int kp = 96
        Py_ssize_t r
        uint32_t *a = <uint32_t *> _bf16_alloc((kp * 6 + kp * 64) * sizeof(uint32_t))
        float *c = <float *> malloc(6 * 64 * sizeof(float))
    if a == NULL or c == NULL:
        _bf16_free(a)
        free(c)
        raise MemoryError()
    memset(a, 0, (kp * 6 + kp * 64) * sizeof(uint32_t))
    start = time.perf_counter()
    with nogil:
        for r in range(repeats):
            _bf16_peak_tile(kp, a, a + kp * 6, c)
    seconds = time.perf_counter() - start
    _bf16_free(a)
    free(c)
    return 2.0 * 6 * 64 * 2 * kp * repeats / seconds


def bf16_gemm_flops(int m, int n, int k, bint pair_a=False, Py_ssize_t repeats=10):
    """The bf16 GEMM's rate at one shape, in flop/s: ``C (m, n) = A (m, k) B (k, n)``
    on packed operands (packing not timed), A row-major (the forward and dx layout) or,
    with ``pair_a``, packed in panels (the dW layout); the best of
    ``repeats`` calls after two warm-up calls (the first ones on fresh pages run up to
    twice slower on TLB misses; a micro-benchmark, beside ``bf16_peak_flops``)."""
    _require_bf16()
    cdef:
        Py_ssize_t kp = _pairs(k), a_words = _b_words(kp, m), r
        Py_ssize_t words = a_words + _b_words(kp, n)
        uint32_t *a = <uint32_t *> _bf16_alloc(words * sizeof(uint32_t))
        float *c = <float *> malloc(<size_t> max(m * n, 1) * sizeof(float))
    if a == NULL or c == NULL:
        _bf16_free(a)
        free(c)
        raise MemoryError()
    memset(a, 0, words * sizeof(uint32_t))  # touched: real pages, not the zero page
    seconds = []
    for r in range(repeats + 2):
        start = time.perf_counter()
        with nogil:
            _bf16_gemm(m, n, <int> kp, a, 0 if pair_a else kp, a + a_words, c, n, 1, 0,
                       NULL, 0)
        seconds.append(time.perf_counter() - start)
    _bf16_free(a)
    free(c)
    return 2.0 * m * n * k / min(seconds[2:])


def cpu_round_trip_seconds(int cpu_a, int cpu_b, long rounds=20000):
    """Seconds for a cache line to go from CPU ``cpu_a`` to CPU ``cpu_b`` and back: two
    threads pinned to them hand a flag to each other ``rounds`` times (the caller's own
    affinity is untouched). Each NodeSum step hands lines between the ranks' CPUs, so
    where the CPUs sit (one core complex, or two) sets what a step costs; a VM's host
    may move its vCPUs between the two (``fastnn bench --mpi`` measures it each round).
    None where it cannot be measured (not Linux, or a CPU this process may not use)."""
    cdef double seconds
    if cpu_a == cpu_b or cpu_a < 0 or cpu_b < 0 or rounds < 1:
        raise ValueError(f"cpu_round_trip_seconds needs two different CPUs and rounds >= 1,"
                         f" got {cpu_a}, {cpu_b} and {rounds}")
    with nogil:
        seconds = fastnn_cpu_round_trip(cpu_a, cpu_b, rounds)
    return None if seconds < 0 else seconds


def _bf16_epoch(spec):
    """Whether ``train_epoch`` runs ``spec`` in bf16 (raising where the CPU cannot)."""
    if spec.bf16:
        _require_bf16()
    return bool(spec.bf16)
