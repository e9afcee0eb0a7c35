/* The flags a NodeSum epoch (fastnn.kernels.NodeSum) polls in memory shared between
 * processes: acquire loads and release stores of int64 flags, a monotonic clock, a
 * short sleep and the parent process's id (0 where there is none to watch). A release
 * store orders every store before it (the gradient, the loss slot) before the flag; an
 * acquire load orders every load after it after the flag.
 *
 * A copy for another CPU to read (fastnn_publish). And what every hand-off between two
 * CPUs costs: fastnn_cpu_round_trip, a cache line sent from one CPU to another and
 * back (Linux; elsewhere -1).
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
