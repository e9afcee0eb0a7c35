/* bfloat16 products with float32 accumulation on AVX512_BF16 (vdpbf16ps).

   bf16 is the upper half of a float32: 8 exponent bits, 7 mantissa bits. The rounding
   is the hardware's (vcvtneps2bf16): round to nearest, ties to even; NaN stays NaN
   (quieted: bit 6 of the bf16 set); inf stays inf; subnormal inputs are treated as
   signed zero (the instruction's DAZ; bf16 subnormals never reach vdpbf16ps, which
   would flush them too). kernels/_numpy.py (_bf16) emulates exactly this.

   vdpbf16ps adds, per float32 lane i, a[2i] b[2i] + a[2i+1] b[2i+1] to the lane, the
   bf16 pair (element 2i in the low half of the 32-bit word). A product of two bf16 is
   exact in float32, so a bf16 GEMM matches a float32 GEMM of the rounded inputs to
   float32 accumulation order. Every operand here is a matrix of such 32-bit pair
   words, the pairs running along the reduction index k:
   - A (m rows, kp pairs), either row-major: word (i, q) at a[i lda + q], a bf16 matrix
     with rows padded to even length (fastnn_bf16_pack_rows), the forward's x and
     dx's dz; or (lda = 0) packed like B below, as the transpose of a B: dW's x^T, made
     by fastnn_bf16_pack_pairs from x itself;
   - B (kp pairs, n columns), pair-interleaved, in panels of 64 columns: word (q, j),
     holding (B[2q][j], B[2q+1][j]), at b[(j / 64) 64 kp + 64 q + j % 64]
     (fastnn_bf16_b_words(kp, n) words; fastnn_bf16_pack_pairs from a row-major (k, n)
     matrix, fastnn_bf16_pack_pairs_t from its transpose). A panel is one contiguous
     stream: no page change from one pair to the next (a row of B for k = 3072 and
     n = 1024 would be a 4 KB stride), which the TLB and the prefetchers need.
   Missing halves (odd k, padding columns) are zeros.

   C = alpha A B + beta C (+ bias) (relu) in float32 (fastnn_bf16_gemm): register tiles
   of up to 6 rows x 64 columns (24 zmm accumulators, 4 B loads and 6 broadcasts per
   pair). The loop over 64-column panels is outside the loop over row tiles: the
   panel of B stays in L2 while the row tiles stream A. The whole k runs at once
   (no partial sums in memory, so the epilogue may update C in place: the SGD step
   W = (1 - lr wd) W - lr X^T dZ is one call), except in a plain product with a deep
   k, split into blocks of FASTNN_BF16_KC pairs (see there).

   Every function is compiled for AVX512_BF16 by a target attribute, so builds for
   the baseline ISA (FASTNN_PORTABLE=1) keep them; callers check
   fastnn_cpu_has_avx512_bf16() first. On other compilers and CPUs they are absent
   (FASTNN_BF16 is 0) and the callers raise. */
#ifndef FASTNN_BF16_H
#define FASTNN_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include "fastnn_cpu.h"

/* Scratch for packed operands on 64-byte lines (a 64-byte load that straddles two
   lines costs two), freed by fastnn_bf16_free. */
#ifdef _MSC_VER
#include <malloc.h>
static inline void *fastnn_bf16_alloc(size_t bytes) { return _aligned_malloc(bytes, 64); }
static inline void fastnn_bf16_free(void *p) { _aligned_free(p); }
#else
static inline void *fastnn_bf16_alloc(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}
static inline void fastnn_bf16_free(void *p) { free(p); }
#endif

/* Words of a packed B of kp pairs and n columns (whole 64-column panels). */
static inline ptrdiff_t fastnn_bf16_b_words(ptrdiff_t kp, ptrdiff_t n)
{
    return kp * ((n + 63) / 64 * 64);
}

#if FASTNN_X86 && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define FASTNN_BF16 1
#include <immintrin.h>

#define FASTNN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define FASTNN_BF16_INLINE FASTNN_BF16_TARGET static inline __attribute__((always_inline))

/* 16 floats (the first `count` of src, zeros after) rounded to bf16. */
FASTNN_BF16_INLINE __m256i fastnn_bf16_load16(const float *src, int count)
{
    __mmask16 mask = count >= 16 ? (__mmask16) 0xffff : (__mmask16) ((1u << count) - 1u);
    return (__m256i) _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src));
}

/* dst[:n] = src[:n] rounded to bf16 and widened back to float32 (may alias). */
FASTNN_BF16_TARGET static void fastnn_bf16_round_f32(const float *src, float *dst,
                                                     ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i += 16) {
        int count = n - i >= 16 ? 16 : (int) (n - i);
        __m512i wide = _mm512_slli_epi32(
            _mm512_cvtepu16_epi32(fastnn_bf16_load16(src + i, count)), 16);
        _mm512_mask_storeu_ps(dst + i, count >= 16 ? (__mmask16) 0xffff
                              : (__mmask16) ((1u << count) - 1u), _mm512_castsi512_ps(wide));
    }
}

/* dst (rows, ldd) bf16 = src (rows, cols) rounded, row-major, columns cols..ldd-1
   zero (ldd even: whole pair words). */
FASTNN_BF16_TARGET static void fastnn_bf16_pack_rows(
    const float *src, ptrdiff_t ld, int rows, int cols, uint16_t *dst, ptrdiff_t ldd)
{
    for (int i = 0; i < rows; i++) {
        const float *s = src + i * ld;
        uint16_t *d = dst + i * ldd;
        int j = 0;
        for (; j + 16 <= cols; j += 16)
            _mm256_storeu_si256((__m256i *) (d + j), fastnn_bf16_load16(s + j, 16));
        if (j < cols) {
            __mmask16 mask = (__mmask16) ((1u << (cols - j)) - 1u);
            _mm256_mask_storeu_epi16(d + j, mask, fastnn_bf16_load16(s + j, cols - j));
        }
        for (j = cols; j < ldd; j++)
            d[j] = 0;
    }
}

/* The pair words of 16 columns: low half from row r0, high half from row r1 (NULL:
   zeros). */
FASTNN_BF16_INLINE __m512i fastnn_bf16_pair16(const float *r0, const float *r1, int count)
{
    __m512i lo = _mm512_cvtepu16_epi32(fastnn_bf16_load16(r0, count));
    if (r1 == NULL)
        return lo;
    __m512i hi = _mm512_cvtepu16_epi32(fastnn_bf16_load16(r1, count));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* dst, packed B (kp = ceil(rows / 2) pairs, cols columns) = src (rows, cols) pair-
   interleaved down its rows: word (q, j) = (src[2q][j], src[2q+1][j]); a missing row
   2q+1 and the columns up to the next multiple of 16 are zeros. */
FASTNN_BF16_TARGET static void fastnn_bf16_pack_pairs(
    const float *src, ptrdiff_t ld, int rows, int cols, uint32_t *dst)
{
    ptrdiff_t kp = (rows + 1) / 2;
    for (ptrdiff_t q = 0; q < kp; q++) {
        const float *r0 = src + 2 * q * ld;
        const float *r1 = 2 * q + 1 < rows ? r0 + ld : NULL;
        for (int j = 0; j < cols; j += 16) {
            int count = cols - j >= 16 ? 16 : cols - j;
            _mm512_storeu_si512(dst + (j / 64) * 64 * kp + 64 * q + j % 64,
                                fastnn_bf16_pair16(r0 + j, r1 ? r1 + j : NULL, count));
        }
    }
}

/* 16 x 16 transpose of 32-bit words in registers: lane q of r[j] goes to lane j of
   r[q] (unpack within 128-bit lanes, then two rounds of lane shuffles). */
FASTNN_BF16_INLINE void fastnn_bf16_transpose16(__m512i r[16])
{
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int c = 0; c < 4; c++) {
            t[8 * i + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
            t[8 * i + 4 + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    }
}

/* dst, packed B (kp = ceil(cols / 2) pairs, rows columns) = src^T pair-interleaved,
   for src (rows, cols): word (q, j) = (src[j][2q], src[j][2q+1]), the words of src's
   row j rounded to bf16 (row-major bf16 already pairs along a row); the columns up to
   the next multiple of 16 are zeros. Blocks of 16 rows x 16 words go through a
   register transpose, so every store is a whole 64-byte segment. */
FASTNN_BF16_TARGET static void fastnn_bf16_pack_pairs_t(
    const float *src, ptrdiff_t ld, int rows, int cols, uint32_t *dst)
{
    ptrdiff_t kp = (cols + 1) / 2;
    for (ptrdiff_t j0 = 0; j0 < rows; j0 += 16) {
        for (int c = 0; c < cols; c += 32) {
            int count = cols - c >= 32 ? 32 : cols - c;
            __m512i r[16];
            for (int t = 0; t < 16; t++) {
                r[t] = _mm512_setzero_si512();
                if (j0 + t < rows) {
                    const float *s = src + (j0 + t) * ld + c;
                    r[t] = _mm512_inserti64x4(
                        _mm512_castsi256_si512(fastnn_bf16_load16(s, count >= 16 ? 16 : count)),
                        fastnn_bf16_load16(s + 16, count > 16 ? count - 16 : 0), 1);
                }
            }
            fastnn_bf16_transpose16(r);
            for (int q = 0; q < (count + 1) / 2; q++)
                _mm512_storeu_si512(dst + (j0 / 64) * 64 * kp + 64 * (c / 2 + q) + j0 % 64,
                                    r[q]);
        }
    }
}

/* One register tile: rows [0, MR) x NV zmm columns of C from A (kp pairs) and a B
   panel (pair rows ldb words apart), then the epilogue. `ncols` valid columns in the last
   zmm (1..16). */
FASTNN_BF16_INLINE void fastnn_bf16_tile(
    int MR, int NV, int kp, const uint32_t *a, ptrdiff_t sai, ptrdiff_t saq,
    const uint32_t *b, ptrdiff_t ldb, float *c, ptrdiff_t ldc, int ncols,
    float alpha, float beta, const float *bias, int relu)
{
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (int q = 0; q < kp; q++) {
        __m512bh bv[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            bv[v] = (__m512bh) _mm512_loadu_si512(b + q * ldb + 16 * v);
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            __m512bh av = (__m512bh) _mm512_set1_epi32((int) a[r * sai + q * saq]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
        }
    }
    __m512 valpha = _mm512_set1_ps(alpha), vbeta = _mm512_set1_ps(beta);
    __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) {
        __mmask16 mask = v < NV - 1 || ncols >= 16 ? (__mmask16) 0xffff
                         : (__mmask16) ((1u << ncols) - 1u);
        __m512 vb = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * v) : zero;
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            float *dst = c + r * ldc + 16 * v;
            __m512 x = alpha == 1.0f ? acc[r][v] : _mm512_mul_ps(valpha, acc[r][v]);
            if (beta != 0.0f)
                x = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(mask, dst), x);
            x = _mm512_add_ps(x, vb);
            if (relu)  /* max(0, x) returns x when x is NaN: NaN propagates */
                x = _mm512_max_ps(zero, x);
            _mm512_mask_storeu_ps(dst, mask, x);
        }
    }
}

#define FASTNN_BF16_TILE_ARGS int kp, const uint32_t *a, ptrdiff_t sai, ptrdiff_t saq, \
    const uint32_t *b, ptrdiff_t ldb, float *c, ptrdiff_t ldc, int ncols, float alpha, \
    float beta, const float *bias, int relu
#define FASTNN_BF16_TILE(MR, NV) \
    FASTNN_BF16_TARGET static void fastnn_bf16_tile_##MR##x##NV(FASTNN_BF16_TILE_ARGS) \
    { fastnn_bf16_tile(MR, NV, kp, a, sai, saq, b, ldb, c, ldc, ncols, alpha, beta, bias, \
                       relu); }
#define FASTNN_BF16_TILE_ROW(MR) FASTNN_BF16_TILE(MR, 1) FASTNN_BF16_TILE(MR, 2) \
    FASTNN_BF16_TILE(MR, 3) FASTNN_BF16_TILE(MR, 4)
FASTNN_BF16_TILE_ROW(1)
FASTNN_BF16_TILE_ROW(2)
FASTNN_BF16_TILE_ROW(3)
FASTNN_BF16_TILE_ROW(4)
FASTNN_BF16_TILE_ROW(5)
FASTNN_BF16_TILE_ROW(6)

typedef void (*fastnn_bf16_tile_fn)(FASTNN_BF16_TILE_ARGS);
#define FASTNN_BF16_TILE_FNS(MR) {fastnn_bf16_tile_##MR##x1, fastnn_bf16_tile_##MR##x2, \
    fastnn_bf16_tile_##MR##x3, fastnn_bf16_tile_##MR##x4}
static const fastnn_bf16_tile_fn fastnn_bf16_tiles[6][4] = {
    FASTNN_BF16_TILE_FNS(1), FASTNN_BF16_TILE_FNS(2), FASTNN_BF16_TILE_FNS(3),
    FASTNN_BF16_TILE_FNS(4), FASTNN_BF16_TILE_FNS(5), FASTNN_BF16_TILE_FNS(6)};

/* Pairs of k per block when C can hold partial sums (alpha = 1, beta = 0): a block
   of A (m x 256 words) and the B panel block (256 x 64 words, 64 KB) then share L2
   while every panel reuses the A block; a deeper k streams A from L3 once per panel. */
#define FASTNN_BF16_KC 256

/* C (m, n) = alpha A B + beta C + bias (row vector, or NULL), then max(0, .) when
   relu; A (row-major with lda > 0, packed in panels with lda = 0) and B (packed) as
   described at the top, kp pairs deep. beta = 0 never reads C. */
FASTNN_BF16_TARGET static void fastnn_bf16_gemm(
    int m, int n, int kp, const uint32_t *a, ptrdiff_t lda, const uint32_t *b,
    float *c, ptrdiff_t ldc, float alpha, float beta, const float *bias, int relu)
{
    /* Partial sums go to C only for a plain product (its epilogue needs no old C). */
    int kc = alpha == 1.0f && beta == 0.0f && kp > 3 * FASTNN_BF16_KC / 2
             ? FASTNN_BF16_KC : kp;
    for (int k0 = 0; k0 < kp; k0 += kc) {
        int depth = kp - k0 < kc ? kp - k0 : kc;
        int last = k0 + depth >= kp;
        float block_beta = k0 == 0 ? beta : 1.0f;
        for (int j = 0; j < n; j += 64) {
            int width = n - j >= 64 ? 64 : n - j;
            int nv = (width + 15) / 16;
            int ncols = width - 16 * (nv - 1);
            for (int i = 0, mr; i < m; i += mr) {
                mr = m - i >= 6 ? 6 : m - i;
                const uint32_t *tile_a = a + i * lda + k0;
                if (lda == 0) {  /* a tile stays inside its 64-row panel */
                    mr = mr < 64 - i % 64 ? mr : 64 - i % 64;
                    tile_a = a + (ptrdiff_t) (i / 64) * 64 * kp + i % 64 + 64 * (ptrdiff_t) k0;
                }
                fastnn_bf16_tiles[mr - 1][nv - 1](
                    depth, tile_a, lda ? lda : 1, lda ? 1 : 64,
                    b + (ptrdiff_t) j * kp + 64 * (ptrdiff_t) k0, 64,
                    c + i * ldc + j, ldc, ncols, alpha, block_beta,
                    last && bias ? bias + j : NULL, last && relu);
            }
        }
    }
}

/* Seconds per call of the 6 x 64 tile over kp pairs with A and B in L1: the
   vdpbf16ps peak this core reaches (2 * 6 * 64 * 2 kp flops per call). */
FASTNN_BF16_TARGET static void fastnn_bf16_peak_tile(int kp, const uint32_t *a,
                                                     const uint32_t *b, float *c)
{
    fastnn_bf16_tile_6x4(kp, a, kp, 1, b, 64, c, 64, 16, 1.0f, 0.0f, NULL, 0);
}

#else
#define FASTNN_BF16 0
/* No kernels without the instructions: _cython.pyx refuses every bf16 call first
   (bf16_available() is False), so these names only have to compile. */
#define fastnn_bf16_round_f32(src, dst, n) ((void) 0)
#define fastnn_bf16_pack_rows(src, ld, rows, cols, dst, ldd) ((void) 0)
#define fastnn_bf16_pack_pairs(src, ld, rows, cols, dst) ((void) 0)
#define fastnn_bf16_pack_pairs_t(src, ld, rows, cols, dst) ((void) 0)
#define fastnn_bf16_gemm(m, n, kp, a, lda, b, c, ldc, alpha, beta, bias, relu) ((void) 0)
#define fastnn_bf16_peak_tile(kp, a, b, c) ((void) 0)
#endif

#endif /* FASTNN_BF16_H */
