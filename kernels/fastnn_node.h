/* The flags a NodeSum epoch (fastnn.kernels.NodeSum) polls in memory shared between
 * processes: acquire loads and release stores of int64 flags, a monotonic clock, a
 * short sleep and the parent process's id (0 where there is none to watch). A release store orders every store before it (the gradient, the loss
 * slot) before the flag; an acquire load orders every load after it after the flag.
 */
#ifndef FASTNN_NODE_H
#define FASTNN_NODE_H
#include <stdint.h>

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

#endif
