/* The CPU's instruction sets, read at run time, for the kernels that dispatch on them
   (the own GEMM, the bf16 products). Each variant is compiled with a target attribute,
   so a FASTNN_PORTABLE=1 build still has them and picks the fastest one the CPU runs.
   __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
   Compilers without it (MSVC) and non-x86 CPUs report none: the BLAS path runs. */
#ifndef FASTNN_CPU_H
#define FASTNN_CPU_H

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTNN_X86 1
static inline int fastnn_cpu_has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static inline int fastnn_cpu_has_avx512(void)  /* F + VL + BW + DQ, as Skylake-X on */
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
static inline int fastnn_cpu_has_avx512_bf16(void)  /* vdpbf16ps, vcvtne2ps2bf16 */
{
    return fastnn_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#else
#define FASTNN_X86 0
static inline int fastnn_cpu_has_avx2_fma(void) { return 0; }
static inline int fastnn_cpu_has_avx512(void) { return 0; }
static inline int fastnn_cpu_has_avx512_bf16(void) { return 0; }
#endif

#endif /* FASTNN_CPU_H */
