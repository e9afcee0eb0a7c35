"""The machine ``fastnn bench`` runs on: CPUs, pinning, peak RSS, versions, the sgemm
roofline and the start-up time.

The roofline is this machine's square-sgemm rate, measured in the same run, that the
training GFLOP/s are compared with. Start-up is timed in fresh interpreters, pinned to
one CPU, with a cold and a warm numba cache.
"""
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .._backend import usable_cpus
from ..model import bf16_supported
from .baselines import SEED


def pin_to_cpus(threads):
    """Restrict every thread of this process to the first ``threads`` usable CPUs;
    returns the CPU list (empty where the OS has no affinity API)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cpus = set(usable_cpus()[:threads])
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass
    return sorted(cpus)


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident set size of this process in MB (since the last reset_peak_rss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module):
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


def machine_info():
    """CPU, thread counts, BLAS and library versions."""
    from threadpoolctl import threadpool_info

    import scipy.linalg.cython_blas  # noqa: F401  (load scipy's BLAS so it is listed)

    blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture",
                                     "threading_layer", "filepath")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(usable_cpus()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("fastnn", "numpy", "scipy", "numba", "threadpoolctl", "torch")},
        "blas": blas,
    }


def torch_available():
    """Whether PyTorch is installed (found without importing it)."""
    return importlib.util.find_spec("torch") is not None


def measure_sgemm(size, repeats, threads):
    """GFLOP/s of a (size x size) @ (size x size) float32 matmul through scipy's BLAS
    (scipy.linalg.blas.sgemm, the BLAS the compiled backends call), numpy.matmul and,
    where the Cython backend loads, fastnn's own GEMM (its fastest path), at ``threads``
    threads: {"scipy": ..., "numpy": ..., "fastnn": ... or None, "roofline": the
    fastest of them}. OpenBLAS may not use the CPU's widest vectors (0.3.30 runs its
    Haswell kernels on Zen 5), so the best of the three is the honest roofline."""
    import fastnn as fn
    from scipy.linalg.blas import sgemm

    fn.set_num_threads(threads)
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    fa, fb = np.asfortranarray(a), np.asfortranarray(b)
    fc = np.zeros((size, size), dtype=np.float32, order="F")
    out = np.empty((size, size), dtype=np.float32)
    calls = {"scipy": lambda: sgemm(1.0, fa, fb, beta=0.0, c=fc, overwrite_c=1),
             "numpy": lambda: np.matmul(a, b, out=out)}
    try:
        cython = fn.kernels.load("cython")
    except ImportError:
        cython = None
    if cython is not None and cython.gemm_paths_available()[0] != "blas":
        calls["fastnn"] = lambda: cython.gemm("N", "N", 1.0, a, b, 0.0, out)
    flop = 2.0 * size ** 3
    result = {"size": size, "threads": threads, "fastnn": None}
    for name, call in calls.items():
        call()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        result[name] = flop / statistics.median(seconds) / 1e9
        result[name + "_best"] = flop / min(seconds) / 1e9
    result["roofline"] = max(result[name] for name in calls)
    if bf16_supported():  # the bf16 GEMM's ceiling and its rate at the reference shapes
        from fastnn.kernels import _cython

        # Capability, not load: a co-tenant on the core's other hyperthread slows both
        # the peak and the shapes by the moment, so each is its best of several runs,
        # interleaved.
        peaks, rates = [], {name: [] for name in BF16_GEMM_SHAPES}
        for _ in range(repeats):
            for name, shape in BF16_GEMM_SHAPES.items():
                peaks.append(_cython.bf16_peak_flops(5000))
                rates[name].append(_cython.bf16_gemm_flops(*shape, repeats=3))
        result["bf16_peak"] = max(peaks) / 1e9
        result["bf16_gemm"] = {name: max(r) / 1e9 for name, r in rates.items()}
    return result


#: The bf16 products timed against the vdpbf16ps peak: the largest layer of each
#: reference net at its bench batch, named m x k x n: (m, n, k, A pair-interleaved as
#: in dW).
BF16_GEMM_SHAPES = {
    "mnist x@W 128x784x256": (128, 256, 784, False),
    "mnist dW 784x128x256": (784, 256, 128, True),
    "mnist dx 128x128x256": (128, 256, 128, False),
    "cifar x@W 256x3072x1024": (256, 1024, 3072, False),
    "cifar dW 3072x256x1024": (3072, 1024, 256, True),
}



_STARTUP_SCRIPT = """
import os, sys, time, json
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
t0 = time.perf_counter()
import fastnn as fn
t1 = time.perf_counter()
fn.set_backend(sys.argv[1])
t2 = time.perf_counter()
import numpy as np
rng = np.random.default_rng(0)
X = rng.standard_normal((32, 64), dtype=np.float32)
y = rng.integers(0, 10, 32)
model = fn.Sequential([fn.Dense(64, 32, activation="relu", seed=0), fn.Dense(32, 10, seed=1)])
model.compile(loss="cross_entropy", optimizer=fn.optimizers.SGD(lr=0.01))
model.fit(X, y, epochs=1, batch_size=32, verbose=0)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "backend_s": t2 - t1, "first_step_s": t3 - t2}))
"""


def measure_startup(backends, cold=True, warm_repeats=1):
    """Seconds to ``import fastnn``, load a backend and run the first training step, in
    a fresh interpreter pinned to one CPU. Cold: numba's cache in a new, empty
    directory (NUMBA_CACHE_DIR), so every kernel compiles; warm: the same directory
    again (``cold=False``: numba's usual cache). One record per backend and state."""
    records = []
    cache_dir = tempfile.mkdtemp(prefix="fastnn-bench-numba-cache-")
    try:
        for backend in backends:
            # Warm only: numba's usual cache, which the training runs have filled.
            env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(cache_dir, backend)) \
                if cold else dict(os.environ)
            runs = ([("cold", 1)] if cold else []) + [("warm", warm_repeats)]
            for state, repeats in runs:
                samples = [_startup_once(backend, env) for _ in range(repeats)]
                ok = [s for s in samples if s.get("error") is None]
                if not ok:
                    records.append(dict(samples[0], backend=backend, state=state))
                    continue
                record = {"backend": backend, "state": state, "runs": len(ok), "error": None}
                for key in ("import_s", "backend_s", "first_step_s", "process_s"):
                    record[key] = statistics.median(s[key] for s in ok)
                record["total_s"] = record["import_s"] + record["backend_s"] + \
                    record["first_step_s"]
                records.append(record)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return records


def _startup_once(backend, env):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, backend], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": output_tail(proc.stderr)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    result["error"] = None
    return result


def output_tail(text, lines=8):
    """The last ``lines`` lines of a process's output (where its error is)."""
    return "\n".join(text.strip().splitlines()[-lines:])

