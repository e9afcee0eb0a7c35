/* The flags a NodeSum epoch (fastnn.kernels.NodeSum) polls in memory shared between
 * processes: acquire loads and release stores of int64 flags, a monotonic clock, a
 * short sleep and the parent process's id (0 where there is none to watch). A release
 * store orders every store before it (the gradient, the loss slot) before the flag; an
 * acquire load orders every load after it after the flag.
 *
 * A copy for another CPU to read (fastnn_publish), or streamed past the caches
 * (fastnn_stream, fastnn_stream_rows). And what every hand-off between two CPUs costs:
 * fastnn_cpu_round_trip, a cache line sent from one CPU to another and back (Linux;
 * elsewhere -1).
 */
#ifndef FASTNN_NODE_H
#define FASTNN_NODE_H
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
/* MSVC's volatile accesses are acquire loads and release stores (/volatile:ms, the
 * default on x86 and x64). */
static inline int64_t fastnn_flag_load(const int64_t *p) { return *(volatile const int64_t *)p; }
static inline void fastnn_flag_store(int64_t *p, int64_t v) { *(volatile int64_t *)p = v; }
static inline double fastnn_seconds(void)
{
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (double)t.QuadPart / (double)f.QuadPart;
}
static inline void fastnn_nap(double seconds) { (void)seconds; Sleep(0); }
static inline long fastnn_parent(void) { return 0; }
#else
#include <time.h>
#include <unistd.h>
static inline long fastnn_parent(void) { return (long)getppid(); }
static inline int64_t fastnn_flag_load(const int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void fastnn_flag_store(int64_t *p, int64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline double fastnn_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static inline void fastnn_nap(double seconds)
{
    struct timespec t;
    t.tv_sec = 0;
    t.tv_nsec = (long)(seconds * 1e9);
    nanosleep(&t, NULL);
}
#endif

/* Copies n bytes that another CPU will read next, for a rank whose peers have read the
 * previous values: x86's string move writes whole cache lines without first fetching
 * each from the CPU that read it last (an ordinary store waits for that fetch, ~60 us
 * per 400 KB when the two CPUs sit in different core complexes, against ~10 us this
 * way; on one complex both take ~6-10 us). Elsewhere memcpy. The stores of one string
 * move may land in any order among themselves, but all before any later store: the
 * release store of the flag the readers wait on orders them, as it orders memcpy's. */
static inline void fastnn_publish(void *dst, const void *src, size_t n)
{
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
#else
    memcpy(dst, src, n);
#endif
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

/* Copies n bytes with non-temporal (streaming) stores: whole cache lines go to memory
 * without being fetched first and without waiting for the CPUs that hold them to give
 * them up; the reader then takes them from memory. Where a string move still fetches
 * every line (an AMD Zen 4 VM whose two vCPUs sat in different core complexes: 400 KB
 * the other CPU had read took 175-230 us with rep movsb or memcpy, 14 us streamed,
 * the other CPU's read of them 15.5 and 11 us) this is the faster hand-off; where the
 * CPUs share a cache it is the slower one (the reader misses). The stores are not
 * ordered with later ones: fastnn_store_fence must come between them and the flag the
 * readers wait on. x86-64 (SSE2, AVX or AVX-512 as compiled for); elsewhere memcpy. */
static inline void fastnn_stream_rows(void *dst, const void *src, size_t n)
{
#if defined(__x86_64__) || defined(_M_X64)
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((__m512i *)d, _mm512_loadu_si512((const void *)s));
#elif defined(__AVX__)
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
#else
        for (int i = 0; i < 64; i += 16)
            _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
#endif
    }
    memcpy(d, s, n);
#else
    memcpy(dst, src, n);
#endif
}

/* Orders the streaming stores before it before every store after it (x86 sfence). */
static inline void fastnn_store_fence(void)
{
#if defined(__x86_64__) || defined(_M_X64)
    _mm_sfence();
#endif
}

/* fastnn_stream_rows, then fastnn_store_fence. */
static inline void fastnn_stream(void *dst, const void *src, size_t n)
{
    fastnn_stream_rows(dst, src, n);
    fastnn_store_fence();
}

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>

/* One side of fastnn_cpu_round_trip. */
typedef struct {
    int64_t *lines;  /* lines[0]: ping, lines[8]: pong (own cache lines), lines[16+side]: ready */
    int cpu, side;
    long rounds;
    double seconds;
} fastnn_trip_side;

static void *fastnn_trip_run(void *arg)
{
    fastnn_trip_side *a = (fastnn_trip_side *)arg;
    int64_t *ping = a->lines, *pong = a->lines + 8, *ready = a->lines + 16;
    int other = 1 - a->side;
    long i;
    double start;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(a->cpu, &set);
    /* Both sides pinned, or neither plays: a side that could not pin says so. */
    fastnn_flag_store(ready + a->side,
                      pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0 ? 1 : -1);
    while (fastnn_flag_load(ready + other) == 0)
        ;
    if (fastnn_flag_load(ready + other) < 0 || fastnn_flag_load(ready + a->side) < 0) {
        a->seconds = -1.0;
        return NULL;
    }
    start = fastnn_seconds();
    for (i = 1; i <= a->rounds; i++) {
        if (a->side == 0) {
            fastnn_flag_store(ping, i);
            while (fastnn_flag_load(pong) != i)
                ;
        } else {
            while (fastnn_flag_load(ping) != i)
                ;
            fastnn_flag_store(pong, i);
        }
    }
    a->seconds = (fastnn_seconds() - start) / (double)a->rounds;
    return NULL;
}

/* Seconds per round trip of a cache line between CPUs cpu_a and cpu_b: a thread pinned
 * to each stores a flag the other waits for, ``rounds`` times each way (the calling
 * thread's own affinity is untouched); -1 when a thread cannot be made or pinned. */
static inline double fastnn_cpu_round_trip(int cpu_a, int cpu_b, long rounds)
{
    int64_t lines[24] __attribute__((aligned(64))) = {0};
    fastnn_trip_side sides[2] = {{lines, cpu_a, 0, rounds, -1.0},
                                 {lines, cpu_b, 1, rounds, -1.0}};
    pthread_t threads[2];
    int made = 0;
    for (; made < 2; made++)
        if (pthread_create(&threads[made], NULL, fastnn_trip_run, &sides[made]) != 0)
            break;
    if (made < 2) {  /* the one thread made waits for a partner: tell it none comes */
        if (made == 1) {
            fastnn_flag_store(lines + 17, -1);
            pthread_join(threads[0], NULL);
        }
        return -1.0;
    }
    pthread_join(threads[0], NULL);
    pthread_join(threads[1], NULL);
    return sides[1].seconds < 0 ? -1.0 : sides[0].seconds;
}
#else
static inline double fastnn_cpu_round_trip(int cpu_a, int cpu_b, long rounds)
{
    (void)cpu_a; (void)cpu_b; (void)rounds;
    return -1.0;
}
#endif

#endif
