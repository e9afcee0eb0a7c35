/* fastnn's own GEMM for the products of a dense layer, row-major:
       C = alpha op(A) op(B) + beta C,   op(A) (m, k), op(B) (k, n), C (m, n),
   for ta, tb in {NN (forward x W), TN (dW = x^T dz), NT (dx = dz W^T)}, float32 and
   float64, in an AVX-512 and an AVX2+FMA variant.

   Design (BLIS's loops, tinyBLAS's "no packing where the matrices sit in L2"):
   - One register-blocked micro-kernel per ISA and precision: an MR x (NV vectors) tile
     of C in registers; per step p of the reduction it loads NV vectors of row p of
     op(B) and broadcasts MR elements of column p of op(A) (MR x NV FMAs). op(A) is read
     where it lies through two strides (NN: rows, TN: columns): A is never copied.
     op(B) is read in place by NN / TN products unless they are big with rows of B a
     page apart (FASTNN_GEMM_PACK_MIN_STRIDE; on AVX2, beyond L1 with rows over 128
     bytes apart); then, and always for NT products (their op(B) = W^T has strided
     columns), each KC x NC block of op(B) is first copied into NR-column panels,
     kc x NR contiguous, in a per-thread buffer that stays in that core's L2.
   - Loops around it: columns in blocks of NC (the B block KC x NC stays in L2), the
     reduction in blocks of KC, then MR-row strips of C (their A micro-panel, MR x KC,
     stays in L1) sweeping the NR-column tiles of the block. The last vector of a tile
     is masked, the last strip has fewer rows: every edge is a tile of its own size,
     no scalar clean-up loop.
   - Each element of C is reduced in the same order (p = 0 .. k-1, KC blocks added in
     turn) whatever tile, strip or column range computes it, so splitting C over threads
     by rows or columns (never by k) gives bit-identical results at any thread count.
   - Epilogue in the store of the last KC block: + bias (a row vector) and ReLU / leaky
     ReLU, so a forward layer is one pass over its output.
   - Software prefetch where the hardware's falls short: a TN strip reads one cache line
     of every row of A (rows a page or so apart), so its tiles ask for the next line of
     each row for a later strip (G_PF_COLS); the first strip of a block that reads op(B)
     in place asks for op(B)'s rows ahead (G_PFB_ROWS). Both matter most for data
     another CPU just wrote (a split first layer's inputs and weights). A caller that
     knows what it reads next from memory can have a product ask for it meanwhile
     (fastnn_gemm_epilogue.ahead, spread over the full tiles of its whole KC blocks,
     a few lines per tile), and have an NN product's strips of the first column block
     ask for the next strip's rows of A (a_ahead: A itself comes from memory).
   - Each variant is compiled with __attribute__((target)), so a FASTNN_PORTABLE=1 build
     has them too; fastnn_gemm_path_available() asks the CPU (fastnn_cpu.h).

   The body below is written once and instantiated per ISA x precision: this header
   includes itself with FASTNN_GEMM_BODY defined and the vector operations named. */
#ifndef FASTNN_GEMM_BODY
#ifndef FASTNN_GEMM_H
#define FASTNN_GEMM_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "fastnn_cpu.h"

/* The paths a product can take (fastnn.kernels._cython.set_gemm_path names them). */
#define FASTNN_GEMM_BLAS 0
#define FASTNN_GEMM_AVX2 1
#define FASTNN_GEMM_AVX512 2

/* Epilogue activations applied in the store (others: a pass after the product). */
#define FASTNN_EPI_NONE 0
#define FASTNN_EPI_RELU 1
#define FASTNN_EPI_LEAKY 2

static inline int fastnn_gemm_path_available(int path)
{
    switch (path) {
    case FASTNN_GEMM_BLAS: return 1;
    case FASTNN_GEMM_AVX2: return FASTNN_X86 && fastnn_cpu_has_avx2_fma();
    case FASTNN_GEMM_AVX512: return FASTNN_X86 && fastnn_cpu_has_avx512();
    default: return 0;
    }
}

/* The fastest own path this CPU runs, or FASTNN_GEMM_BLAS. */
static inline int fastnn_gemm_best_path(void)
{
    if (fastnn_gemm_path_available(FASTNN_GEMM_AVX512))
        return FASTNN_GEMM_AVX512;
    if (fastnn_gemm_path_available(FASTNN_GEMM_AVX2))
        return FASTNN_GEMM_AVX2;
    return FASTNN_GEMM_BLAS;
}

/* Whether the own kernel beats OpenBLAS 0.3.30 (1 thread) on this product, from the
   crossover table of `fastnn bench` on an AMD EPYC Zen 5 (OpenBLAS runs its Haswell
   kernels there). AVX-512: at every measured shape, reference and odd, up to
   4096 x 1024 x 3072 (1.1-6x). AVX2: while op(B), k x n, is smaller than a 1 MiB L2
   (1.3-2x at the digits and batch-32 shapes, 0.85-1.05x at the larger MNIST ones);
   beyond, BLAS's packed kernels win (CIFAR: 0.7-0.85x). The backward products (TN,
   NT) with one row or one column of C are matrix-vector products: BLAS's gemv streams
   the matrix (NT 1 x 3072 x 1024: 0.14 ms against 1.9 ms spent packing W^T; TN
   128 x 1 x 256: 2 against 16 us). The forward product (NN) stays on the own kernel:
   it computes every row of C with the same arithmetic whatever the other rows, so a
   sample's prediction does not depend on the batch it comes in (gemv for a single row
   would round differently). The choice does not depend on the thread count, so
   neither do the results. */
static inline int fastnn_gemm_own_wins(int path, size_t elem, char ta, char tb,
                                       long m, long n, long k)
{
    if ((m == 1 || n == 1) && (ta != 'N' || tb != 'N'))
        return 0;
    if (path == FASTNN_GEMM_AVX512)
        return 1;
    if (path == FASTNN_GEMM_AVX2)
        return (double) k * (double) n * (double) elem < 1024.0 * 1024.0;
    return 0;
}

#if FASTNN_X86
#include <immintrin.h>

#define FASTNN_GEMM_INLINE static inline __attribute__((always_inline))
/* NN and TN products copy each block of op(B) into panels first (NT products always
   do) when C has this many rows to pay for the copy and B's rows are a page or more
   apart (4 KiB strides alias in L1 and miss the TLB: CIFAR's n = 1024, +10-15%);
   with AVX-512 on Zen 5 (48 KiB L1) at the MNIST shapes reading B in place was as
   fast or faster (A/B, best of 5). The AVX2 path packs once op(B) outgrows a 32 KiB
   L1 and its rows are not already nearly contiguous (over 128 bytes apart): on an
   AVX2-only Zen 3 the in-place 16-column panel of MNIST's 784 x 256 weights (rows
   1 KiB apart, 4 L1 sets) misses L1 on every row, and packing took that forward
   product from 54 to 76 GFLOP/s at 128 rows; the digits net's products, which fit in
   L1, would lose to the copy. */
#define FASTNN_GEMM_PACK_MIN_ROWS 48
#define FASTNN_GEMM_PACK_MIN_STRIDE 4096
#define FASTNN_GEMM_PACK_MIN_STRIDE_AVX2 129
#define FASTNN_GEMM_PACK_MIN_BYTES_AVX2 (32 * 1024)
#define FASTNN_GEMM_TARGET_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define FASTNN_GEMM_TARGET_AVX2 "avx2,fma"

/* A per-thread buffer for the packed panels of op(B), grown on demand and kept
   (one per OpenMP worker: the pool's threads live as long as the process). */
static __thread void *fastnn_gemm_pack_buf = NULL;
static __thread size_t fastnn_gemm_pack_bytes = 0;

static inline void *fastnn_gemm_pack_buffer(size_t bytes)
{
    if (bytes > fastnn_gemm_pack_bytes) {
        size_t size = (bytes + 63) / 64 * 64;
        void *p = aligned_alloc(64, size);
        if (p == NULL)
            return NULL;
        free(fastnn_gemm_pack_buf);
        fastnn_gemm_pack_buf = p;
        fastnn_gemm_pack_bytes = size;
    }
    return fastnn_gemm_pack_buf;
}

/* ---- AVX-512, float32: 6 x 4 vectors of 16 ---- */
#define FASTNN_GEMM_BODY 1
#define G_T float
#define G_V __m512
#define G_VL 16
#define G_MR 6
#define G_NV 4
#define G_KC 256
#define G_NC 256
#define G_PACK_MIN_STRIDE FASTNN_GEMM_PACK_MIN_STRIDE
#define G_PACK_MIN_BYTES 0
#define G_MASK __mmask16
#define G_MASK_N(r) ((__mmask16) ((1u << (r)) - 1u))
#define G_MASK_FULL(k) ((k) == (__mmask16) 0xFFFF)
#define G_ZERO() _mm512_setzero_ps()
#define G_SET1(x) _mm512_set1_ps(x)
#define G_LOAD(p) _mm512_loadu_ps(p)
#define G_LOADM(p, k) _mm512_maskz_loadu_ps((k), (p))
#define G_STORE(p, v) _mm512_storeu_ps((p), (v))
#define G_STOREM(p, v, k) _mm512_mask_storeu_ps((p), (k), (v))
#define G_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define G_MUL(a, b) _mm512_mul_ps((a), (b))
#define G_ADD(a, b) _mm512_add_ps((a), (b))
#define G_MAX(a, b) _mm512_max_ps((a), (b))
#define G_LEAKY(v, s) _mm512_mask_mul_ps((v), _mm512_cmp_ps_mask((v), G_ZERO(), _CMP_LT_OQ), (v), (s))
#define G_TARGET FASTNN_GEMM_TARGET_AVX512
#define G_NAME(x) fastnn_gemm_##x##_avx512_f32
#include "fastnn_gemm.h"

/* ---- AVX-512, float64: 6 x 4 vectors of 8 ---- */
#define FASTNN_GEMM_BODY 1
#define G_T double
#define G_V __m512d
#define G_VL 8
#define G_MR 6
#define G_NV 4
#define G_KC 256
#define G_NC 128
#define G_PACK_MIN_STRIDE FASTNN_GEMM_PACK_MIN_STRIDE
#define G_PACK_MIN_BYTES 0
#define G_MASK __mmask8
#define G_MASK_N(r) ((__mmask8) ((1u << (r)) - 1u))
#define G_MASK_FULL(k) ((k) == (__mmask8) 0xFF)
#define G_ZERO() _mm512_setzero_pd()
#define G_SET1(x) _mm512_set1_pd(x)
#define G_LOAD(p) _mm512_loadu_pd(p)
#define G_LOADM(p, k) _mm512_maskz_loadu_pd((k), (p))
#define G_STORE(p, v) _mm512_storeu_pd((p), (v))
#define G_STOREM(p, v, k) _mm512_mask_storeu_pd((p), (k), (v))
#define G_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define G_MUL(a, b) _mm512_mul_pd((a), (b))
#define G_ADD(a, b) _mm512_add_pd((a), (b))
#define G_MAX(a, b) _mm512_max_pd((a), (b))
#define G_LEAKY(v, s) _mm512_mask_mul_pd((v), _mm512_cmp_pd_mask((v), G_ZERO(), _CMP_LT_OQ), (v), (s))
#define G_TARGET FASTNN_GEMM_TARGET_AVX512
#define G_NAME(x) fastnn_gemm_##x##_avx512_f64
#include "fastnn_gemm.h"

/* AVX2 masks: lanes whose index is below r, from a sliding window over a constant. */
static const int fastnn_gemm_mask_src[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 0, 0, 0, 0, 0, 0, 0};

/* ---- AVX2+FMA, float32: 6 x 2 vectors of 8 ---- */
#define FASTNN_GEMM_BODY 1
#define G_T float
#define G_V __m256
#define G_VL 8
#define G_MR 6
#define G_NV 2
#define G_KC 256
#define G_NC 256
#define G_PACK_MIN_STRIDE FASTNN_GEMM_PACK_MIN_STRIDE_AVX2
#define G_PACK_MIN_BYTES FASTNN_GEMM_PACK_MIN_BYTES_AVX2
#define G_MASK __m256i
#define G_MASK_N(r) _mm256_loadu_si256((const __m256i *) (fastnn_gemm_mask_src + 8 - (r)))
#define G_MASK_FULL(k) (_mm256_movemask_ps(_mm256_castsi256_ps(k)) == 0xFF)
#define G_ZERO() _mm256_setzero_ps()
#define G_SET1(x) _mm256_set1_ps(x)
#define G_LOAD(p) _mm256_loadu_ps(p)
#define G_LOADM(p, k) _mm256_maskload_ps((p), (k))
#define G_STORE(p, v) _mm256_storeu_ps((p), (v))
#define G_STOREM(p, v, k) _mm256_maskstore_ps((p), (k), (v))
#define G_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define G_MUL(a, b) _mm256_mul_ps((a), (b))
#define G_ADD(a, b) _mm256_add_ps((a), (b))
#define G_MAX(a, b) _mm256_max_ps((a), (b))
#define G_LEAKY(v, s) _mm256_blendv_ps((v), _mm256_mul_ps((v), (s)), _mm256_cmp_ps((v), G_ZERO(), _CMP_LT_OQ))
#define G_TARGET FASTNN_GEMM_TARGET_AVX2
#define G_NAME(x) fastnn_gemm_##x##_avx2_f32
#include "fastnn_gemm.h"

/* ---- AVX2+FMA, float64: 6 x 2 vectors of 4 ---- */
#define FASTNN_GEMM_BODY 1
#define G_T double
#define G_V __m256d
#define G_VL 4
#define G_MR 6
#define G_NV 2
#define G_KC 256
#define G_NC 128
#define G_PACK_MIN_STRIDE FASTNN_GEMM_PACK_MIN_STRIDE_AVX2
#define G_PACK_MIN_BYTES FASTNN_GEMM_PACK_MIN_BYTES_AVX2
#define G_MASK __m256i
#define G_MASK_N(r) _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *) (fastnn_gemm_mask_src + 8 - (r))))
#define G_MASK_FULL(k) (_mm256_movemask_pd(_mm256_castsi256_pd(k)) == 0xF)
#define G_ZERO() _mm256_setzero_pd()
#define G_SET1(x) _mm256_set1_pd(x)
#define G_LOAD(p) _mm256_loadu_pd(p)
#define G_LOADM(p, k) _mm256_maskload_pd((p), (k))
#define G_STORE(p, v) _mm256_storeu_pd((p), (v))
#define G_STOREM(p, v, k) _mm256_maskstore_pd((p), (k), (v))
#define G_FMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define G_MUL(a, b) _mm256_mul_pd((a), (b))
#define G_ADD(a, b) _mm256_add_pd((a), (b))
#define G_MAX(a, b) _mm256_max_pd((a), (b))
#define G_LEAKY(v, s) _mm256_blendv_pd((v), _mm256_mul_pd((v), (s)), _mm256_cmp_pd((v), G_ZERO(), _CMP_LT_OQ))
#define G_TARGET FASTNN_GEMM_TARGET_AVX2
#define G_NAME(x) fastnn_gemm_##x##_avx2_f64
#include "fastnn_gemm.h"

#endif /* FASTNN_X86 */

/* The product's epilogue: added bias and activation, applied where C is final. */
typedef struct {
    const void *bias;  /* (n,) row vector added to every row of C, or NULL */
    int act;           /* FASTNN_EPI_NONE / RELU / LEAKY */
    double slope;      /* leaky ReLU's negative slope */
    /* Not the epilogue, but what the product asks for (into L2) as it goes: */
    const void *ahead; /* ahead_bytes that the caller reads next, or NULL */
    size_t ahead_bytes;
    int a_ahead;       /* NN: each strip asks for the next strip's rows of A */
} fastnn_gemm_epilogue;

/* C[i0:i1, j0:j1] of the product, on an own path (AVX2 / AVX-512; the caller checks
   fastnn_gemm_path_available). With a bias, C is not read (as beta = 0) and gets
   alpha op(A) op(B) + bias. Returns 0, or -1 when the NT pack buffer cannot be
   allocated (nothing written). */
static inline int fastnn_sgemm_range(int path, char ta, char tb, int m, int n, int k,
                                     float alpha, const float *a, int lda, const float *b,
                                     int ldb, float beta, float *c, int ldc,
                                     const fastnn_gemm_epilogue *epi,
                                     int i0, int i1, int j0, int j1)
{
    (void) m;
    (void) n;
#if FASTNN_X86
    if (path == FASTNN_GEMM_AVX512)
        return fastnn_gemm_range_avx512_f32(ta, tb, k, alpha, a, lda, b, ldb, beta, c,
                                            ldc, epi->bias, epi->act, (float) epi->slope,
                                            i0, i1, j0, j1, epi->ahead, epi->ahead_bytes,
                                            epi->a_ahead);
    if (path == FASTNN_GEMM_AVX2)
        return fastnn_gemm_range_avx2_f32(ta, tb, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                          epi->bias, epi->act, (float) epi->slope, i0, i1,
                                          j0, j1, epi->ahead, epi->ahead_bytes,
                                          epi->a_ahead);
#endif
    (void) path; (void) ta; (void) tb; (void) k; (void) alpha; (void) a; (void) lda;
    (void) b; (void) ldb; (void) beta; (void) c; (void) ldc; (void) epi; (void) i0;
    (void) i1; (void) j0; (void) j1;
    return -1;
}

static inline int fastnn_dgemm_range(int path, char ta, char tb, int m, int n, int k,
                                     double alpha, const double *a, int lda,
                                     const double *b, int ldb, double beta, double *c,
                                     int ldc, const fastnn_gemm_epilogue *epi,
                                     int i0, int i1, int j0, int j1)
{
    (void) m;
    (void) n;
#if FASTNN_X86
    if (path == FASTNN_GEMM_AVX512)
        return fastnn_gemm_range_avx512_f64(ta, tb, k, alpha, a, lda, b, ldb, beta, c,
                                            ldc, epi->bias, epi->act, epi->slope, i0, i1,
                                            j0, j1, epi->ahead, epi->ahead_bytes,
                                            epi->a_ahead);
    if (path == FASTNN_GEMM_AVX2)
        return fastnn_gemm_range_avx2_f64(ta, tb, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                          epi->bias, epi->act, epi->slope, i0, i1, j0,
                                          j1, epi->ahead, epi->ahead_bytes,
                                          epi->a_ahead);
#endif
    (void) path; (void) ta; (void) tb; (void) k; (void) alpha; (void) a; (void) lda;
    (void) b; (void) ldb; (void) beta; (void) c; (void) ldc; (void) epi; (void) i0;
    (void) i1; (void) j0; (void) j1;
    return -1;
}

#endif /* FASTNN_GEMM_H */

#else /* FASTNN_GEMM_BODY: one ISA x precision, named by the G_* macros above */

/* The store of one vector of C from its accumulator: alpha acc, then (first KC block)
   + bias, or + beta C (C not read when beta = 0), or (later blocks) + C; on the final
   block the activation. tail: only the lanes of `last`. */
FASTNN_GEMM_INLINE __attribute__((target(G_TARGET))) void
G_NAME(store)(G_T *cv, G_V acc, G_V bias_v, int has_bias, int tail, G_MASK last,
              G_V va, G_V vb, G_V vs, G_T beta, int first, int final, int act)
{
    G_V x = G_MUL(acc, va);
    if (!first)
        x = G_ADD(tail ? G_LOADM(cv, last) : G_LOAD(cv), x);
    else if (has_bias)
        x = G_ADD(x, bias_v);
    else if (beta != 0)
        x = G_FMA(vb, tail ? G_LOADM(cv, last) : G_LOAD(cv), x);
    if (final && act == FASTNN_EPI_RELU)
        x = G_MAX(x, G_ZERO());
    else if (final && act == FASTNN_EPI_LEAKY)
        x = G_LEAKY(x, vs);
    if (tail)
        G_STOREM(cv, x, last);
    else
        G_STORE(cv, x);
}

/* One MR_ x NV_ tile of C: acc = sum_p op(A)[r, p] op(B)[p, :], p < kc, then the store.
   A_T: op(A)[r, p] = a[p * lda + r] (TN), else a[r * lda + p]. The last vector is
   masked with `last`. first: this is the first KC block (C = beta C + alpha acc, or
   alpha acc + bias); else C += alpha acc. final: apply the activation. pf (TN only, or
   NULL): every pf_every-th row p from p = pf_skip on, asks for pf[p * lda] (into L2),
   the cache line a later strip of op(A) = A^T reads there. pfb (or NULL): op(B)'s rows
   ahead, asked for row by row (into L1) while p < pfb_stop. side (or NULL): side_n
   lines from there, one every side_every rows p (into L2). pa (NN, or NULL): one line
   per row p (into L2) of pa_rows rows pa_stride bytes apart, pa_row bytes each. */
FASTNN_GEMM_INLINE __attribute__((target(G_TARGET))) void
G_NAME(tile)(const int MR_, const int NV_, const int A_T, int kc,
             const G_T *a, ptrdiff_t lda, const G_T *b, ptrdiff_t ldb,
             G_T *c, ptrdiff_t ldc, G_MASK last, G_T alpha, G_T beta, int first,
             const G_T *bias, int final, int act, G_T slope, const G_T *pf,
             int pf_every, int pf_skip, const G_T *pfb, int pfb_stop,
             const char *side, int side_n, int side_every,
             const char *pa, ptrdiff_t pa_stride, int pa_row, int pa_rows)
{
    G_V acc[G_MR][G_NV];
    int r, v, p, pf_wait = pf_skip + 1, side_wait = side_every, pa_col = 0;
#pragma GCC unroll 8
    for (r = 0; r < MR_; ++r)
#pragma GCC unroll 8
        for (v = 0; v < NV_; ++v)
            acc[r][v] = G_ZERO();
    for (p = 0; p < kc; ++p) {
        G_V bv[G_NV];
#pragma GCC unroll 8
        for (v = 0; v < NV_ - 1; ++v)
            bv[v] = G_LOAD(b + v * G_VL);
        bv[NV_ - 1] = G_LOADM(b + (NV_ - 1) * G_VL, last);
#pragma GCC unroll 8
        for (r = 0; r < MR_; ++r) {
            G_V av = G_SET1(A_T ? a[r] : a[r * lda]);
#pragma GCC unroll 8
            for (v = 0; v < NV_; ++v)
                acc[r][v] = G_FMA(av, bv[v], acc[r][v]);
        }
        if (pfb != NULL && p < pfb_stop) {
            int bytes;
#pragma GCC unroll 8
            for (bytes = 0; bytes < NV_ * G_VL * (int) sizeof(G_T); bytes += 64)
                __builtin_prefetch((const char *) pfb + bytes, 0, 3);
            pfb += ldb;
        }
        if (pa != NULL) {
            __builtin_prefetch(pa + pa_col, 0, 2);
            pa_col += 64;
            if (pa_col >= pa_row) {
                pa_col = 0;
                pa += pa_stride;
                if (--pa_rows == 0)
                    pa = NULL;
            }
        }
        if (side != NULL && --side_wait == 0) {
            __builtin_prefetch(side, 0, 2);
            side += 64;
            side_wait = side_every;
            if (--side_n == 0)
                side = NULL;
        }
        if (A_T && pf != NULL) {
            if (--pf_wait == 0) {
                __builtin_prefetch(pf, 0, 2);
                pf_wait = pf_every;
            }
            pf += lda;
        }
        a += A_T ? lda : 1;
        b += ldb;
    }
    {
        G_V va = G_SET1(alpha), vb = G_SET1(beta), vs = G_SET1(slope);
        G_V bias_v[G_NV] = {G_ZERO()};
        if (bias != NULL && first) {
#pragma GCC unroll 8
            for (v = 0; v < NV_ - 1; ++v)
                bias_v[v] = G_LOAD(bias + v * G_VL);
            bias_v[NV_ - 1] = G_LOADM(bias + (NV_ - 1) * G_VL, last);
        }
        /* A full last vector is stored plainly: AVX2's masked store is slow on AMD. */
        const int partial = !G_MASK_FULL(last);
#pragma GCC unroll 8
        for (r = 0; r < MR_; ++r)
#pragma GCC unroll 8
            for (v = 0; v < NV_; ++v)
                G_NAME(store)(c + r * ldc + v * G_VL, acc[r][v], bias_v[v], bias != NULL,
                              v == NV_ - 1 && partial, last, va, vb, vs, beta, first,
                              final, act);
    }
}

#define G_TILE_ARGS kc, a, lda, b, ldb, c, ldc, last, alpha, beta, first, bias, final, act, slope, \
    NULL, 1, 0, NULL, 0, NULL, 0, 1, NULL, 0, 0, 0
#define G_TILE_CASE(MR_, NV_) \
    case (MR_) * 8 + (NV_): \
        if (a_t) G_NAME(tile)(MR_, NV_, 1, G_TILE_ARGS); \
        else G_NAME(tile)(MR_, NV_, 0, G_TILE_ARGS); \
        break;

/* A tile of mr <= G_MR rows and nv <= G_NV vectors (the last masked by `last`). */
static __attribute__((target(G_TARGET), noinline)) void
G_NAME(tile_any)(int mr, int nv, int a_t, int kc, const G_T *a, ptrdiff_t lda,
                 const G_T *b, ptrdiff_t ldb, G_T *c, ptrdiff_t ldc, G_MASK last,
                 G_T alpha, G_T beta, int first, const G_T *bias, int final, int act,
                 G_T slope)
{
    switch (mr * 8 + nv) {
#if G_NV == 4
    G_TILE_CASE(1, 1) G_TILE_CASE(1, 2) G_TILE_CASE(1, 3) G_TILE_CASE(1, 4)
    G_TILE_CASE(2, 1) G_TILE_CASE(2, 2) G_TILE_CASE(2, 3) G_TILE_CASE(2, 4)
    G_TILE_CASE(3, 1) G_TILE_CASE(3, 2) G_TILE_CASE(3, 3) G_TILE_CASE(3, 4)
    G_TILE_CASE(4, 1) G_TILE_CASE(4, 2) G_TILE_CASE(4, 3) G_TILE_CASE(4, 4)
    G_TILE_CASE(5, 1) G_TILE_CASE(5, 2) G_TILE_CASE(5, 3) G_TILE_CASE(5, 4)
    G_TILE_CASE(6, 1) G_TILE_CASE(6, 2) G_TILE_CASE(6, 3) G_TILE_CASE(6, 4)
#else
    G_TILE_CASE(1, 1) G_TILE_CASE(1, 2) G_TILE_CASE(2, 1) G_TILE_CASE(2, 2)
    G_TILE_CASE(3, 1) G_TILE_CASE(3, 2) G_TILE_CASE(4, 1) G_TILE_CASE(4, 2)
    G_TILE_CASE(5, 1) G_TILE_CASE(5, 2) G_TILE_CASE(6, 1) G_TILE_CASE(6, 2)
#endif
    default: break;
    }
}

/* The single row of C of a product with m = 1 (a one-sample forward pass), read in
   place, in chunks of 4 NR columns: the same arithmetic per element as the tiles (an
   FMA chain over p, then the store), with 4x as many columns per walk down op(B),
   whose rows are often a page apart, and each row's chunk asked for 8 rows ahead.
   Returns the columns done (whole chunks); the strip does the rest. */
static __attribute__((target(G_TARGET), noinline)) int
G_NAME(row)(int a_t, int kc, const G_T *a, ptrdiff_t lda, const G_T *b, ptrdiff_t ldb,
            G_T *c, int width, G_T alpha, G_T beta, int first, const G_T *bias,
            int final, int act, G_T slope)
{
    enum { NW = 4 * G_NV };
    const int chunk = NW * G_VL;
    const ptrdiff_t astep = a_t ? lda : 1;
    G_V va = G_SET1(alpha), vb = G_SET1(beta), vs = G_SET1(slope);
    int j, p, v;
    for (j = 0; j + chunk <= width; j += chunk) {
        G_V acc[NW];
        const G_T *ap = a, *bp = b + j;
#pragma GCC unroll 16
        for (v = 0; v < NW; ++v)
            acc[v] = G_ZERO();
        for (p = 0; p < kc; ++p, ap += astep, bp += ldb) {
            G_V av = G_SET1(*ap);
            if (p + 8 < kc) {
                __builtin_prefetch(bp + 8 * ldb);
                __builtin_prefetch(bp + 8 * ldb + chunk / 2);
            }
#pragma GCC unroll 16
            for (v = 0; v < NW; ++v)
                acc[v] = G_FMA(av, G_LOAD(bp + v * G_VL), acc[v]);
        }
#pragma GCC unroll 16
        for (v = 0; v < NW; ++v)
            G_NAME(store)(c + j + v * G_VL, acc[v],
                          bias != NULL && first ? G_LOAD(bias + j + v * G_VL) : G_ZERO(),
                          bias != NULL, 0, G_MASK_N(G_VL), va, vb, vs, beta, first, final,
                          act);
    }
    return j;
}

/* One strip of mr rows of C across `width` columns: its NR-column tiles, the tile at
   column j reading op(B) at b + (j / NR) * bstep with row stride ldb (in place:
   bstep = NR, ldb = the matrix's; packed panels: bstep = kc * NR, ldb = NR). Full
   tiles are inlined here (the common case, no switch). pf (TN, or NULL): a column of
   A^T ahead whose cache lines the full tiles ask for between them, tile t of T every
   T-th row from row t, so that the strip asks for each row's line once. pfb_rows (or
   0): the full tiles ask for op(B)'s rows that far ahead (the first strip of a block
   read in place). */
static __attribute__((target(G_TARGET), noinline)) void
G_NAME(strip)(int a_t, int kc, const G_T *a, ptrdiff_t lda, const G_T *b, ptrdiff_t ldb,
              ptrdiff_t bstep, G_T *c, ptrdiff_t ldc, int mr, int width, G_T alpha,
              G_T beta, int first, const G_T *bias, int final, int act, G_T slope,
              const G_T *pf, int pfb_rows, const char *side, long side_lines,
              const G_T *pa, int pa_row, int pa_rows)
{
    const int nr = G_NV * G_VL;
    const int tiles = width / nr;
    int j = 0;
    G_MASK full = G_MASK_N(G_VL);
    /* side_lines shared by the full tiles, at most one a row p; pa by the first. */
    const int side_share = tiles > 0 ? (int) ((side_lines + tiles - 1) / tiles) : 0;
    if (mr == 1 && bstep == nr) {  /* one row, op(B) in place */
        j = G_NAME(row)(a_t, kc, a, lda, b, ldb, c, width, alpha, beta, first, bias,
                        final, act, slope);
        b += (j / nr) * bstep;
    }
    if (mr == G_MR) {
        for (; j + nr <= width; j += nr, b += bstep) {
            int side_n = side_lines < side_share ? (int) side_lines : side_share;
            if (side_n > kc)
                side_n = kc;
            if (side == NULL || side_n <= 0)
                side = NULL, side_n = 0;
            const int side_every = side_n > 0 ? kc / side_n : 1;
            if (a_t)
                G_NAME(tile)(G_MR, G_NV, 1, kc, a, lda, b, ldb, c + j, ldc, full,
                             alpha, beta, first, bias != NULL ? bias + j : NULL, final,
                             act, slope, pf, tiles, j / nr,
                             pfb_rows ? b + pfb_rows * ldb : NULL, kc - pfb_rows,
                             side, side_n, side_every,
                             (const char *) pa, lda * (ptrdiff_t) sizeof(G_T), pa_row,
                             pa_rows);
            else
                G_NAME(tile)(G_MR, G_NV, 0, kc, a, lda, b, ldb, c + j, ldc, full,
                             alpha, beta, first, bias != NULL ? bias + j : NULL, final,
                             act, slope, NULL, 1, 0,
                             pfb_rows ? b + pfb_rows * ldb : NULL, kc - pfb_rows,
                             side, side_n, side_every,
                             (const char *) pa, lda * (ptrdiff_t) sizeof(G_T), pa_row,
                             pa_rows);
            if (side != NULL)
                side += (ptrdiff_t) side_n * 64;
            side_lines -= side_n;
            pa = NULL;
        }
    }
    for (; j < width; j += nr, b += bstep) {
        int w = width - j < nr ? width - j : nr;
        int nv = (w + G_VL - 1) / G_VL;
        G_NAME(tile_any)(mr, nv, a_t, kc, a, lda, b, ldb, c + j, ldc,
                         G_MASK_N(w - (nv - 1) * G_VL), alpha, beta, first,
                         bias != NULL ? bias + j : NULL, final, act, slope);
    }
}

/* C[i, j] = beta C[i, j] (k = 0), beta = 0 writing zeros (C is not read, as BLAS),
   then the epilogue. */
static __attribute__((target(G_TARGET))) void
G_NAME(scale)(G_T *c, int ldc, G_T beta, const G_T *bias, int act, G_T slope,
              int i0, int i1, int j0, int j1)
{
    int i, j;
    for (i = i0; i < i1; ++i) {
        G_T *cr = c + (ptrdiff_t) i * ldc;
        for (j = j0; j < j1; ++j) {
            G_T x = bias != NULL ? bias[j] : beta != 0 ? beta * cr[j] : 0;
            if (act == FASTNN_EPI_RELU)
                x = x > 0 ? x : 0;
            else if (act == FASTNN_EPI_LEAKY)
                x = x < 0 ? x * slope : x;
            cr[j] = x;
        }
    }
}

/* Copies the block op(B)[pc : pc + kc, jc : jc + width] into NR-column panels, each
   kc x NR contiguous (the last one's unused columns are never read: masked loads).
   B is (k, n) row-major, or (n, k) when b_t (NT: op(B) = B^T). Streaming one panel
   from L2 beats rows a page apart (4 KiB strides alias in L1 and miss the TLB). */
static __attribute__((target(G_TARGET))) void
G_NAME(pack_b)(const G_T *b, ptrdiff_t ldb, int b_t, int pc, int kc, int jc, int width,
               G_T *dst)
{
    const int nr = G_NV * G_VL;
    int j, p, jj;
    for (j = 0; j < width; j += nr) {
        int w = width - j < nr ? width - j : nr;
        G_T *panel = dst + (ptrdiff_t) (j / nr) * kc * nr;
        if (b_t) {
            /* 16 rows of the panel at a time: they (16 x NR) stay in L1 while each
               row of B gives them a cache line */
            int p0, p1;
            for (p0 = 0; p0 < kc; p0 = p1) {
                p1 = kc - p0 < 16 ? kc : p0 + 16;
                for (jj = 0; jj < w; ++jj) {
                    const G_T *src = b + (ptrdiff_t) (jc + j + jj) * ldb + pc;
                    for (p = p0; p < p1; ++p)
                        panel[(ptrdiff_t) p * nr + jj] = src[p];
                }
            }
        } else {
            for (p = 0; p < kc; ++p)
                memcpy(panel + (ptrdiff_t) p * nr, b + (ptrdiff_t) (pc + p) * ldb + jc + j,
                       (size_t) w * sizeof(G_T));
        }
    }
}

/* How far ahead (columns of op(A) = A^T: one cache line) a TN strip asks for the lines
   of A that a later strip reads. A strip reads one line of each row of A, the rows a
   page or so apart, which the hardware prefetchers do not follow; and a line another
   CPU wrote last is slow to arrive, most of all from another core complex (the other
   rank's inputs in a split first layer: MNIST's 784 x 128 x 256 dW block took 247-269
   us there against 226-253 with this, 208-220 either way on one complex, measured with
   a second thread pinned to the other vCPU writing half of A before each product). */
#define G_PF_COLS ((int) (64 / sizeof(G_T)))
/* How far ahead (rows of op(B)) the first strip of a block asks for op(B)'s lines when
   it reads op(B) in place: it is the first to read them, and the hardware prefetchers
   run short of a line another CPU just wrote (the other rank's block of W1 in a split
   first layer's forward: 784 x 128 over 128 rows took 110-115 us far apart, 106 with
   this; 101-103 near, either way). */
#define G_PFB_ROWS 32

/* C[i0:i1, j0:j1]: columns in blocks of NC, k in blocks of KC, op(B)'s block packed
   into panels when NT (its columns are strided) or when enough rows reuse it. ahead
   (or NULL): ahead_bytes asked for by the full strips of the whole KC blocks (all of
   them when k < KC), an even share each; a_ahead (NN): each strip of the first
   column block asks for the next strip's rows of A (the last of a KC block for the
   next block's first). */
static __attribute__((target(G_TARGET))) int
G_NAME(range)(char ta, char tb, int k, G_T alpha, const G_T *a, int lda, const G_T *b,
              int ldb, G_T beta, G_T *c, int ldc, const void *bias_, int act, G_T slope,
              int i0, int i1, int j0, int j1, const void *ahead, size_t ahead_bytes,
              int a_ahead)
{
    const G_T *bias = (const G_T *) bias_;
    const long side_total = ahead != NULL ? (long) ((ahead_bytes + 63) / 64) : 0;
    long side_per = 0, side_at = 0;
    const int a_t = ta == 'T' || ta == 't', b_t = tb == 'T' || tb == 't';
    const int nr = G_NV * G_VL;
    const int pack = b_t || (i1 - i0 >= FASTNN_GEMM_PACK_MIN_ROWS
                             && (size_t) ldb * sizeof(G_T) >= G_PACK_MIN_STRIDE
                             && (size_t) k * (size_t) (j1 - j0) * sizeof(G_T)
                                >= G_PACK_MIN_BYTES);
    G_T *panels = NULL;
    int jc, pc, i;
    if (i1 <= i0 || j1 <= j0)
        return 0;
    if (k == 0) {
        G_NAME(scale)(c, ldc, beta, bias, act, slope, i0, i1, j0, j1);
        return 0;
    }
    if (pack) {
        int kcmax = k < G_KC ? k : G_KC;
        int ncmax = j1 - j0 < G_NC ? j1 - j0 : G_NC;
        panels = (G_T *) fastnn_gemm_pack_buffer(
            (size_t) kcmax * (size_t) ((ncmax + nr - 1) / nr * nr) * sizeof(G_T));
        if (panels == NULL)
            return -1;
    }
    if (side_total > 0) {
        long strips = (long) ((j1 - j0 + G_NC - 1) / G_NC) * (k < G_KC ? 1 : k / G_KC)
                      * ((i1 - i0) / G_MR);
        side_per = strips > 0 ? (side_total + strips - 1) / strips : 0;
    }
    for (jc = j0; jc < j1; jc += G_NC) {
        int width = j1 - jc < G_NC ? j1 - jc : G_NC;
        for (pc = 0; pc < k; pc += G_KC) {
            int kc = k - pc < G_KC ? k - pc : G_KC;
            int first = pc == 0, final = pc + kc == k;
            const G_T *bblock = b + (ptrdiff_t) pc * ldb + jc;
            ptrdiff_t ldbb = ldb, bstep = nr;
            if (pack) {
                G_NAME(pack_b)(b, ldb, b_t, pc, kc, jc, width, panels);
                bblock = panels;
                ldbb = nr;
                bstep = (ptrdiff_t) kc * nr;
            }
            for (i = i0; i < i1; i += G_MR) {
                int mr = i1 - i < G_MR ? i1 - i : G_MR;
                const G_T *astrip = a_t ? a + (ptrdiff_t) pc * lda + i
                                        : a + (ptrdiff_t) i * lda + pc;
                const int side_here = mr == G_MR && (kc == G_KC || k < G_KC)
                                      && side_at < side_total;
                const int next_kc = k - pc - kc < G_KC ? k - pc - kc : G_KC;
                const G_T *pa = !a_ahead || a_t || jc != j0 ? NULL
                                : i + G_MR < i1 ? astrip + (ptrdiff_t) G_MR * lda
                                : next_kc > 0 ? a + (ptrdiff_t) i0 * lda + pc + kc : NULL;
                G_NAME(strip)(a_t, kc, astrip, lda, bblock, ldbb, bstep,
                              c + (ptrdiff_t) i * ldc + jc, ldc, mr, width, alpha, beta,
                              first, bias != NULL ? bias + jc : NULL, final, act, slope,
                              a_t && i + G_PF_COLS < i1 ? astrip + G_PF_COLS : NULL,
                              i == i0 && !pack && kc > G_PFB_ROWS ? G_PFB_ROWS : 0,
                              side_here ? (const char *) ahead + side_at * 64 : NULL,
                              side_here ? (side_total - side_at < side_per
                                           ? side_total - side_at : side_per) : 0,
                              pa, (i + G_MR < i1 ? kc : next_kc) * (int) sizeof(G_T),
                              i + G_MR < i1 ? (i1 - i - G_MR < G_MR ? i1 - i - G_MR : G_MR)
                              : (i1 - i0 < G_MR ? i1 - i0 : G_MR));
                if (side_here)
                    side_at += side_per;
            }
        }
    }
    return 0;
}

#undef G_TILE_ARGS
#undef G_PF_COLS
#undef G_PFB_ROWS
#undef G_TILE_CASE
#undef FASTNN_GEMM_BODY
#undef G_T
#undef G_V
#undef G_VL
#undef G_MR
#undef G_NV
#undef G_KC
#undef G_NC
#undef G_PACK_MIN_STRIDE
#undef G_PACK_MIN_BYTES
#undef G_MASK
#undef G_MASK_N
#undef G_MASK_FULL
#undef G_ZERO
#undef G_SET1
#undef G_LOAD
#undef G_LOADM
#undef G_STORE
#undef G_STOREM
#undef G_FMA
#undef G_MUL
#undef G_ADD
#undef G_MAX
#undef G_LEAKY
#undef G_TARGET
#undef G_NAME

#endif /* FASTNN_GEMM_BODY */
