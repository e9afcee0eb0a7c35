"""End-to-end benchmarks: what fastnn buys on this machine (``fastnn bench``).

One epoch of SGD and of Adam on synthetic data shaped like three reference nets, timed
for fastnn with each kernel backend, for a plain-numpy MLP written the way a careful
numpy user would (``NumpyMLP``), and for PyTorch eager on the CPU when ``torch`` is
importable (never a dependency). Also measured in the same run: this machine's sgemm
rate (the roofline the GFLOP/s are compared with) and the startup time (``import
fastnn`` plus the first training step, with a cold and a warm numba cache).

Design:

* Every configuration runs in a fresh interpreter (``python -m fastnn.benchmarks
  --worker SPEC``), so peak RSS and thread pools are its own. 1-thread runs are pinned
  to one CPU (the headline); all-thread runs are reported separately. The thread count
  reaches fastnn through ``fastnn.set_num_threads``, which limits the BLAS that the
  numpy baseline uses too; PyTorch gets ``torch.set_num_threads``. ``--quick`` runs all
  configurations of one implementation in one worker (and resets the peak-RSS mark
  between them) so it finishes in under a minute.
* Every implementation starts from the same weights and visits the same batches in the
  same order (``numpy.random.default_rng(seed).permutation(n)``, as ``fit`` does), so
  their epoch losses agree: the loss column is a sanity check.
* A warm-up epoch on a few batches precedes the timing (numba compilation, buffer
  allocation); the figure is the median over ``repeats`` epochs. Speedups are ratios
  of medians measured side by side in one run: > 1 means fastnn is faster.
* The benchmark measures and reports; it never fails because the machine is slow.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .kernels import BACKENDS

#: The reference nets: layer sizes, batch sizes, samples per full / --quick epoch.
NETS = {
    "digits": {"sizes": (64, 32, 10), "batches": (32,), "samples": 60000,
               "quick_batches": (32,), "quick_samples": 16384},
    "mnist": {"sizes": (784, 256, 128, 10), "batches": (32, 128, 512), "samples": 60000,
              "quick_batches": (128,), "quick_samples": 4096},
    "cifar": {"sizes": (3072, 1024, 10), "batches": (256,), "samples": 10000,
              "quick_batches": (256,), "quick_samples": 1024},
}
QUICK_NETS = ("digits", "mnist")
OPTIMIZERS = ("sgd", "adam")
#: Learning rates: fastnn's (and torch's) SGD / Adam defaults.
LEARNING_RATES = {"sgd": 0.01, "adam": 1e-3}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
SEED = 0
WARMUP_BATCHES = 3
REPEATS, QUICK_REPEATS = 5, 3
#: A configuration whose slowest timed epoch exceeds its fastest by this factor is
#: flagged in the notes: on a VM whose vCPUs are not always scheduled, its median may
#: not be typical.
UNEVEN_SPREAD = 1.25
#: Square sgemm size for the roofline (full run / --quick).
ROOFLINE_SIZE, QUICK_ROOFLINE_SIZE = 2048, 1024
RESULT_TAG = "FASTNN-BENCH-RESULT "


# ----------------------------------------------------------------------------------
# The numpy baseline
# ----------------------------------------------------------------------------------

def initial_weights(sizes, dtype=np.float32, seed=SEED):
    """[W1, b1, W2, b2, ...] of a ReLU MLP, drawn as fastnn's default ("auto") init:
    He uniform (limit sqrt(6/d)) for the hidden layers, Glorot uniform (limit
    sqrt(6/(d+k))) for the output layer; biases zero. Layer i uses rng(seed + i)."""
    weights = []
    last = len(sizes) - 2
    for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:])):
        limit = math.sqrt(6.0 / (d + k) if i == last else 6.0 / d)
        w = np.random.default_rng(seed + i).uniform(-limit, limit, size=(d, k))
        weights += [np.ascontiguousarray(w, dtype=dtype), np.zeros(k, dtype=dtype)]
    return weights


class NumpyMLP:
    """A ReLU MLP with softmax cross-entropy, trained in plain numpy, carefully.

    The baseline fastnn is measured against: parameters and gradients in one flat
    buffer each (views per layer), activations and deltas preallocated per batch size,
    ``np.matmul(out=)``, ReLU and its mask in place, the softmax-CE gradient fused in
    one buffer, SGD / Adam updated in place with one scratch buffer.

    Shape:
        weights: [W1 (d0, d1), b1 (d1,), W2 (d1, d2), ...]; X (n, d0); y int64 (n,).
    """

    def __init__(self, weights, optimizer="sgd", lr=None):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.dtype = weights[0].dtype
        self.optimizer = optimizer
        self.lr = LEARNING_RATES[optimizer] if lr is None else lr
        total = sum(w.size for w in weights)
        self.params = np.empty(total, dtype=self.dtype)
        self.grads = np.empty(total, dtype=self.dtype)
        self.W, self.b, self.dW, self.db = [], [], [], []
        offset = 0
        for i, w in enumerate(weights):
            view, grad = (buf[offset:offset + w.size].reshape(w.shape)
                          for buf in (self.params, self.grads))
            view[...] = w
            offset += w.size
            (self.W if i % 2 == 0 else self.b).append(view)
            (self.dW if i % 2 == 0 else self.db).append(grad)
        self.sizes = [self.W[0].shape[0]] + [w.shape[1] for w in self.W]
        self.scratch = np.empty(total, dtype=self.dtype)
        self.exp_avg = np.zeros(total, dtype=self.dtype)
        self.exp_avg_sq = np.zeros(total, dtype=self.dtype)
        self.t = 0
        self._buffers = {}

    def get_weights(self):
        return [p.copy() for pair in zip(self.W, self.b) for p in pair]

    def _batch_buffers(self, n):
        bufs = self._buffers.get(n)
        if bufs is None:
            widths = self.sizes[1:]
            bufs = self._buffers[n] = {
                "x": np.empty((n, self.sizes[0]), dtype=self.dtype),
                "y": np.empty(n, dtype=np.int64),
                "rows": np.arange(n),
                "act": [np.empty((n, k), dtype=self.dtype) for k in widths],
                "delta": [np.empty((n, k), dtype=self.dtype) for k in widths],
                "mask": [np.empty((n, k), dtype=bool) for k in widths[:-1]],
                "rowmax": np.empty(n, dtype=self.dtype),
                "rowsum": np.empty(n, dtype=self.dtype),
            }
        return bufs

    def _loss_and_grad(self, bufs):
        """Forward, fused softmax-CE loss and gradient, backward into ``self.grads``."""
        x, y, rows = bufs["x"], bufs["y"], bufs["rows"]
        act, delta, mask = bufs["act"], bufs["delta"], bufs["mask"]
        last = len(self.W) - 1
        a = x
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            z = act[i]
            np.matmul(a, w, out=z)
            z += b
            if i < last:
                np.maximum(z, 0, out=z)
            a = z
        logits, dz = act[last], delta[last]
        rowmax, rowsum = bufs["rowmax"], bufs["rowsum"]
        np.max(logits, axis=1, out=rowmax)
        np.subtract(logits, rowmax[:, None], out=dz)
        loss = -float(np.mean(dz[rows, y], dtype=np.float64))
        np.exp(dz, out=dz)
        np.sum(dz, axis=1, out=rowsum)
        loss += float(np.mean(np.log(rowsum), dtype=np.float64))
        dz /= rowsum[:, None]
        dz[rows, y] -= 1
        dz *= self.dtype.type(1.0 / x.shape[0])
        for i in range(last, -1, -1):
            a_prev = x if i == 0 else act[i - 1]
            np.matmul(a_prev.T, delta[i], out=self.dW[i])
            np.sum(delta[i], axis=0, out=self.db[i])
            if i > 0:
                np.matmul(delta[i], self.W[i].T, out=delta[i - 1])
                np.greater(a_prev, 0, out=mask[i - 1])
                np.multiply(delta[i - 1], mask[i - 1], out=delta[i - 1])
        return loss

    def _update(self):
        """One in-place step over the flat buffers (torch.optim.SGD / Adam rules)."""
        p, g, tmp = self.params, self.grads, self.scratch
        dt = self.dtype.type
        if self.optimizer == "sgd":
            np.multiply(g, dt(self.lr), out=tmp)
            p -= tmp
            return
        self.t += 1
        beta1, beta2 = ADAM_BETAS
        m, v = self.exp_avg, self.exp_avg_sq
        m *= dt(beta1)
        np.multiply(g, dt(1 - beta1), out=tmp)
        m += tmp
        v *= dt(beta2)
        np.multiply(g, g, out=tmp)
        tmp *= dt(1 - beta2)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp *= dt(1 / math.sqrt(1 - beta2 ** self.t))
        tmp += dt(ADAM_EPS)
        np.divide(m, tmp, out=tmp)
        tmp *= dt(self.lr / (1 - beta1 ** self.t))
        p -= tmp

    def fit_epoch(self, X, y, batch_size, seed=SEED):
        """One epoch over ``X`` in the order ``default_rng(seed).permutation(n)`` (as
        ``Sequential.fit(seed=seed)``); returns the sample-weighted mean batch loss."""
        n = X.shape[0]
        order = np.random.default_rng(seed).permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            bufs = self._batch_buffers(idx.size)
            np.take(X, idx, axis=0, out=bufs["x"])
            np.take(y, idx, out=bufs["y"])
            loss = self._loss_and_grad(bufs)
            self._update()
            total += loss * idx.size
        return total / n


# ----------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------

def synthetic_data(sizes, n, dtype=np.float32, seed=SEED):
    """(X, y): standard-normal features and labels from a random linear teacher, so a
    net of layer ``sizes`` can learn them. X (n, sizes[0]); y int64 (n,) in [0, k)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0]), dtype=np.float32).astype(dtype, copy=False)
    teacher = rng.standard_normal((sizes[0], sizes[-1]), dtype=np.float32)
    y = np.argmax(X.astype(np.float32, copy=False) @ teacher, axis=1).astype(np.int64)
    return X, y


def flops_per_sample(sizes):
    """Matmul FLOPs of one training step per sample: per layer 2dk forward, 2dk for dW
    and 2dk for dx (except the first layer, whose dx is not needed)."""
    return sum((6 if i else 4) * d * k for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:])))


def impl_label(impl, backend=None):
    return f"fastnn[{backend}]" if impl == "fastnn" else impl


def _timed_epochs(run_epoch, repeats):
    seconds, losses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = run_epoch()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return seconds, losses


def _fastnn_runner(cfg, weights, threads):
    import fastnn as fn

    fn.set_backend(cfg["backend"])
    fn.set_num_threads(threads)
    sizes = cfg["sizes"]
    last = len(sizes) - 2
    model = fn.Sequential([fn.Dense(d, k, activation=None if i == last else "relu",
                                    dtype=weights[0].dtype)
                           for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:]))])

    def reset():
        model.set_weights(weights)
        lr = LEARNING_RATES[cfg["optimizer"]]
        optimizer = (fn.optimizers.SGD(lr=lr) if cfg["optimizer"] == "sgd" else
                     fn.optimizers.Adam(lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS))
        model.compile(loss="cross_entropy", optimizer=optimizer)

    def epoch(X, y):
        history = model.fit(X, y, epochs=1, batch_size=cfg["batch"], shuffle=True,
                            verbose=0, seed=SEED)
        return history.history["loss"][0]

    return reset, epoch


def _numpy_runner(cfg, weights, threads):
    import fastnn as fn

    fn.set_num_threads(threads)  # the same BLAS limit fastnn runs under
    state = {}

    def reset():
        state["mlp"] = NumpyMLP(weights, cfg["optimizer"])

    def epoch(X, y):
        return state["mlp"].fit_epoch(X, y, cfg["batch"], seed=SEED)

    return reset, epoch


def _torch_runner(cfg, weights, threads):
    import torch

    import fastnn as fn

    torch.set_num_threads(threads)
    fn.set_num_threads(threads)
    dtype = torch.float64 if weights[0].dtype == np.float64 else torch.float32
    state = {}

    def reset():
        layers = []
        for i in range(0, len(weights), 2):
            w, b = weights[i], weights[i + 1]
            linear = torch.nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                linear.bias.copy_(torch.from_numpy(b))
            layers += [linear, torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        lr = LEARNING_RATES[cfg["optimizer"]]
        state["optimizer"] = (torch.optim.SGD(model.parameters(), lr=lr)
                              if cfg["optimizer"] == "sgd" else
                              torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS,
                                               eps=ADAM_EPS))
        state["model"] = model

    def epoch(X, y):
        model, optimizer = state["model"], state["optimizer"]
        criterion = torch.nn.CrossEntropyLoss()
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        n, batch = X.shape[0], cfg["batch"]
        order = torch.from_numpy(np.random.default_rng(SEED).permutation(n))
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = Xt.index_select(0, idx), yt.index_select(0, idx)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
        return total / n

    return reset, epoch


def _matmuls_runner(cfg, weights, threads):
    """Only the epoch's matmuls, at the net's shapes, through scipy's sgemm (the BLAS the
    compiled backends call) on preallocated buffers: the ceiling a training step built on
    this BLAS can reach at these shapes. Row-major calls made the way fastnn makes them:
    per layer z = a W (forward), dW = a^T dz, and dx = dz W^T for all but the first."""
    import fastnn as fn
    from scipy.linalg import blas

    fn.set_num_threads(threads)
    gemm = blas.dgemm if weights[0].dtype == np.float64 else blas.sgemm
    sizes, batch, n = cfg["sizes"], cfg["batch"], cfg["samples"]
    rng = np.random.default_rng(SEED)

    def buffers(rows):
        acts = [rng.standard_normal((rows, d)).astype(weights[0].dtype) for d in sizes]
        return acts, [np.empty_like(a) for a in acts]

    Ws = [w for w in weights[0::2]]
    dWs = [np.empty_like(w) for w in Ws]
    by_rows = {rows: buffers(rows) for rows in {batch, n % batch} if rows}

    def step(rows):
        # A row-major (r, c) array is its (c, r) transpose in column-major order, so
        # row-major C = A B is column-major C^T = B^T A^T: operands swap.
        acts, grads = by_rows[rows]
        for i, W in enumerate(Ws):
            gemm(1.0, W.T, acts[i].T, c=acts[i + 1].T, overwrite_c=1)  # z = a W
        for i in reversed(range(len(Ws))):
            gemm(1.0, grads[i + 1].T, acts[i].T, trans_b=1, c=dWs[i].T,
                 overwrite_c=1)                                      # dW = a^T dz
            if i:
                gemm(1.0, Ws[i].T, grads[i + 1].T, trans_a=1, c=grads[i].T,
                     overwrite_c=1)                                  # dx = dz W^T

    def reset():
        pass

    def epoch(X, y):
        for _ in range(len(X) // batch):
            step(batch)
        if len(X) % batch:
            step(len(X) % batch)
        return float("nan")

    return reset, epoch


_RUNNERS = {"fastnn": _fastnn_runner, "numpy": _numpy_runner, "torch": _torch_runner,
            "matmuls": _matmuls_runner}


def run_training(cfg, threads, data=None):
    """Time one configuration in this process; returns its result record.

    ``cfg``: impl ("fastnn", "numpy", "torch", "matmuls"), backend (for fastnn), net, sizes, batch,
    optimizer, samples, repeats, dtype. ``data``: (X, y), made here when None.
    """
    dtype = np.dtype(cfg.get("dtype", "float32"))
    X, y = data if data is not None else synthetic_data(cfg["sizes"], cfg["samples"], dtype)
    weights = initial_weights(cfg["sizes"], dtype)
    reset, epoch = _RUNNERS[cfg["impl"]](cfg, weights, threads)
    warm = min(X.shape[0], WARMUP_BATCHES * cfg["batch"])
    reset()
    epoch(X[:warm], y[:warm])
    reset()
    seconds, losses = _timed_epochs(lambda: epoch(X, y), cfg["repeats"])
    return _record(cfg, threads, seconds, losses)


def _record(cfg, threads, seconds, losses):
    median = statistics.median(seconds)
    n = cfg["samples"]
    gflop = flops_per_sample(cfg["sizes"]) * n / 1e9
    return dict(cfg, threads=threads, label=impl_label(cfg["impl"], cfg.get("backend")),
                seconds=seconds, seconds_per_epoch=median, samples_per_s=n / median,
                gflop_per_epoch=gflop, gflop_per_s=gflop / median, epoch_losses=losses,
                loss=losses[0], error=None)


# ----------------------------------------------------------------------------------
# Roofline and startup
# ----------------------------------------------------------------------------------

def measure_sgemm(size, repeats, threads):
    """GFLOP/s of a (size x size) @ (size x size) float32 matmul through scipy's BLAS
    (scipy.linalg.blas.sgemm, the BLAS the compiled backends call) and numpy.matmul,
    at ``threads`` threads: {"scipy": ..., "numpy": ..., "roofline": max of the two}."""
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
    flop = 2.0 * size ** 3
    result = {"size": size, "threads": threads}
    for name, call in calls.items():
        call()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        result[name] = flop / statistics.median(seconds) / 1e9
        result[name + "_best"] = flop / min(seconds) / 1e9
    result["roofline"] = max(result["scipy"], result["numpy"])
    return result


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
        return {"error": _tail(proc.stderr)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    result["error"] = None
    return result


# ----------------------------------------------------------------------------------
# Machine information, pinning, peak RSS
# ----------------------------------------------------------------------------------

def usable_cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


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


# ----------------------------------------------------------------------------------
# Workers and the orchestrator
# ----------------------------------------------------------------------------------

def worker(spec):
    """Run a worker spec in this (fresh) process: pin, measure, return the results."""
    threads = spec["threads"]
    cpus = pin_to_cpus(threads)
    if spec["kind"] == "roofline":
        return dict(measure_sgemm(spec["size"], spec["repeats"], threads), cpus=cpus)
    records, data = [], {}
    for cfg in spec["configs"]:
        key = (tuple(cfg["sizes"]), cfg["samples"], cfg.get("dtype", "float32"))
        if key not in data:
            data.clear()
            data[key] = synthetic_data(cfg["sizes"], cfg["samples"], np.dtype(key[2]))
        rss_reset = reset_peak_rss()
        try:
            record = run_training(cfg, threads, data[key])
        except ImportError as exc:
            if cfg["impl"] != "fastnn":
                raise
            records.append(dict(cfg, threads=threads, skipped=str(exc),
                                label=impl_label(cfg["impl"], cfg["backend"])))
            continue
        except Exception as exc:  # reported in the table, not raised: the run goes on
            record = dict(cfg, threads=threads, error=f"{type(exc).__name__}: {exc}",
                          label=impl_label(cfg["impl"], cfg.get("backend")))
        record["peak_rss_mb"] = peak_rss_mb()
        record["peak_rss_since"] = "config" if rss_reset else "process start"
        record["cpus"] = cpus
        records.append(record)
    return {"records": records}


def _tail(text, lines=8):
    return "\n".join(text.strip().splitlines()[-lines:])


def _spawn(spec):
    """Run ``worker(spec)`` in a fresh interpreter; returns its result or {"error"}."""
    proc = subprocess.run([sys.executable, "-m", "fastnn.benchmarks", "--worker",
                           json.dumps(spec)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"worker exited with code {proc.returncode}: "
                     f"{_tail(proc.stderr) or _tail(proc.stdout)}"}


_START = time.perf_counter()


def _log(message):
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def plan(nets, backends, optimizers, with_torch, quick, samples=None, repeats=None):
    """The training configurations, implementations side by side for each workload."""
    configs = []
    for net in nets:
        spec = NETS[net]
        n = samples or spec["quick_samples" if quick else "samples"]
        for batch in spec["quick_batches" if quick else "batches"]:
            for optimizer in optimizers:
                base = {"net": net, "sizes": list(spec["sizes"]), "batch": batch,
                        "optimizer": optimizer, "samples": n, "dtype": "float32",
                        "repeats": repeats or (QUICK_REPEATS if quick else REPEATS)}
                impls = [dict(base, impl="fastnn", backend=b) for b in backends]
                impls.append(dict(base, impl="numpy", backend=None))
                impls.append(dict(base, impl="matmuls", backend=None))
                if with_torch:
                    impls.append(dict(base, impl="torch", backend=None))
                configs += impls
    return configs


def run_suite(nets, backends, threads_list, with_torch, quick=False, samples=None,
              repeats=None, startup=True, optimizers=OPTIMIZERS):
    """Run the whole suite (roofline, training, startup); returns the result dict."""
    configs = plan(nets, backends, optimizers, with_torch, quick, samples, repeats)
    result = {"machine": machine_info(), "settings": {
        "quick": quick, "nets": {n: NETS[n] for n in nets}, "backends": list(backends),
        "threads": threads_list, "torch": with_torch, "optimizers": list(optimizers),
        "warmup_batches": WARMUP_BATCHES, "seed": SEED, "learning_rates": LEARNING_RATES},
        "roofline": {}, "training": [], "startup": [], "skipped": [], "errors": []}
    for threads in threads_list:
        size = QUICK_ROOFLINE_SIZE if quick else ROOFLINE_SIZE
        _log(f"roofline: sgemm {size}^3, {_threads(threads)}")
        roof = _spawn({"kind": "roofline", "threads": threads, "size": size,
                       "repeats": 3 if quick else 5})
        result["roofline"][str(threads)] = roof
        if roof.get("error"):
            result["errors"].append(f"roofline, {_threads(threads)}: {roof['error']}")
        if quick:  # one worker per implementation, all its configurations in sequence
            groups = {}
            for cfg in configs:
                groups.setdefault(impl_label(cfg["impl"], cfg["backend"]), []).append(cfg)
            batches = list(groups.values())
        else:
            batches = [[cfg] for cfg in configs]
        for i, batch in enumerate(batches, 1):
            first = batch[0]
            what = (impl_label(first["impl"], first["backend"]) if len(batch) > 1 else
                    f"{impl_label(first['impl'], first['backend'])} {first['net']} "
                    f"b{first['batch']} {first['optimizer']}")
            _log(f"{_threads(threads)}, {i}/{len(batches)}: {what}")
            out = _spawn({"kind": "train", "threads": threads, "configs": batch})
            records = out.get("records") or [
                dict(cfg, threads=threads, error=out.get("error"),
                     label=impl_label(cfg["impl"], cfg["backend"])) for cfg in batch]
            for record in records:
                if record.get("skipped"):
                    if record["skipped"] not in result["skipped"]:
                        result["skipped"].append(record["skipped"])
                    continue
                rate = roof.get("roofline")
                if record.get("error") is None and rate:
                    record["roofline_pct"] = 100.0 * record["gflop_per_s"] / rate
                elif record.get("error"):
                    result["errors"].append(f"{record['label']} {record['net']} "
                                            f"b{record['batch']} {record['optimizer']}, "
                                            f"{_threads(threads)}: {record['error']}")
                result["training"].append(record)
    loaded = [b for b in backends if any(r.get("backend") == b for r in result["training"])]
    result["settings"]["backends"] = loaded
    if startup and loaded:
        # --quick: only the default backend (the first of kernels.BACKENDS that loads), warm.
        _log("startup: import fastnn + first training step" +
             ("" if quick else ", cold and warm numba cache"))
        result["startup"] = measure_startup(loaded[:1] if quick else loaded, cold=not quick,
                                            warm_repeats=1 if quick else 3)
        result["errors"] += [f"startup {r['backend']} ({r['state']}): {r['error']}"
                             for r in result["startup"] if r.get("error")]
    return result


# ----------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------

def speedups(result):
    """One row per (threads, workload, fastnn backend, baseline): the speedup
    t_baseline / t_fastnn (> 1: fastnn is faster)."""
    seconds = {}
    for r in result["training"]:
        if r.get("error") is None:
            seconds[(r["threads"], r["net"], r["batch"], r["optimizer"], r["label"])] = \
                r["seconds_per_epoch"]
    rows = []
    for (threads, net, batch, optimizer, label), t in seconds.items():
        if not label.startswith("fastnn["):
            continue
        for baseline in ("numpy", "torch"):
            t_base = seconds.get((threads, net, batch, optimizer, baseline))
            if t_base is not None:
                rows.append({"threads": threads, "net": net, "batch": batch,
                             "optimizer": optimizer, "backend": label[7:-1],
                             "baseline": baseline, "speedup": t_base / t})
    return rows


def _threads(n):
    return f"{n} thread{'' if n == 1 else 's'}"


def _threads_title(threads, records):
    cpus = next((r.get("cpus") for r in records if r.get("cpus")), None)
    where = f", pinned to CPU {cpus[0]}" if threads == 1 and cpus else \
        (f", CPUs {','.join(map(str, cpus))}" if cpus else ", unpinned")
    return _threads(threads) + where


def format_report(result):
    """The printed report: machine, roofline, per-implementation table, speedups."""
    m = result["machine"]
    v = m["versions"]
    lines = [f"fastnn {v['fastnn']} benchmark — {m['cpu']}, {m['usable_cpus']} usable of "
             f"{m['logical_cpus']} logical CPUs; python {m['python']}, numpy {v['numpy']}, "
             f"scipy {v['scipy']}, numba {v['numba']}, torch {v['torch'] or 'not installed'}"]
    if m["blas"]:
        lines.append("BLAS: " + "; ".join(f"{b['internal_api']} {b['version']} "
                                          f"({b['architecture']})" for b in m["blas"]))
    for threads, roof in result["roofline"].items():
        threads = int(threads)
        if roof.get("error"):
            lines.append(f"sgemm roofline, {_threads(threads)}: error")
        else:
            lines.append(f"sgemm roofline, {_threads(threads)}: {roof['roofline']:.1f} GFLOP/s "
                         f"(scipy sgemm {roof['scipy']:.1f}, numpy matmul {roof['numpy']:.1f}; "
                         f"{roof['size']}^3, median)")
    ratios = speedups(result)
    for threads in result["settings"]["threads"]:
        records = [r for r in result["training"] if r["threads"] == threads]
        if not records:
            continue
        lines += ["", f"== One training epoch, float32, {_threads_title(threads, records)} =="]
        lines += _detail_table(records)
        rows = [r for r in ratios if r["threads"] == threads]
        if rows:
            lines += ["", f"== Speedup of fastnn, {_threads(threads)}: t_baseline / t_fastnn "
                          "(> 1 = fastnn faster) =="]
            lines += _ratio_table(rows, result["settings"]["backends"])
    if result["startup"]:
        lines += ["", "== Startup: import fastnn + load backend + first training step "
                      "(fresh interpreter, 1 CPU) =="]
        lines += _startup_table(result["startup"])
    lines += [""] + _notes(result)
    return "\n".join(lines)


def _table(header, rows, align):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*map(str, row)) for row in rows]
    return out


def _detail_table(records):
    """One row per implementation, the implementations of a workload together."""
    header = ("net", "batch", "opt", "impl", "s/epoch", "samples/s", "GFLOP/s", "%sgemm",
              "%matmuls", "RSS MB", "loss")
    workloads = list(dict.fromkeys((r["net"], r["batch"], r["optimizer"]) for r in records))
    impls = [impl_label("fastnn", b) for b in BACKENDS] + ["numpy", "torch", "matmuls"]
    records = sorted(records, key=lambda r: (
        workloads.index((r["net"], r["batch"], r["optimizer"])), impls.index(r["label"])))
    matmuls = {(r["net"], r["batch"], r["optimizer"]): r["seconds_per_epoch"]
               for r in records if r["label"] == "matmuls" and not r.get("error")}
    rows, previous = [], None
    for r in records:
        key = (r["net"], r["batch"], r["optimizer"])
        lead = key if key != previous else ("", "", "")
        previous = key
        if r.get("error"):
            cells = ("error",) + ("",) * 6
        else:
            pct = r.get("roofline_pct")
            t_matmuls = matmuls.get(key)
            cells = (f"{r['seconds_per_epoch']:.3f}", f"{r['samples_per_s']:,.0f}",
                     f"{r['gflop_per_s']:.1f}", "" if pct is None else f"{pct:.0f}%",
                     "" if t_matmuls is None else
                     f"{100 * t_matmuls / r['seconds_per_epoch']:.0f}%",
                     f"{r.get('peak_rss_mb', 0):.0f}",
                     "-" if math.isnan(r["loss"]) else f"{r['loss']:.4f}")
        rows.append(lead + (r["label"],) + cells)
    return _table(header, rows, "<><<>>>>>>>")


def _ratio_table(rows, backends):
    baselines = [b for b in ("numpy", "torch") if any(r["baseline"] == b for r in rows)]
    columns = [(b, base) for base in baselines for b in backends]
    header = ("net", "batch", "opt") + tuple(f"{b}/{base}" for b, base in columns)
    cells, order = {}, []
    for r in rows:
        key = (r["net"], r["batch"], r["optimizer"])
        if key not in cells:
            cells[key] = {}
            order.append(key)
        cells[key][(r["backend"], r["baseline"])] = r["speedup"]
    table = []
    for key in order:
        table.append(key + tuple(f"{cells[key][c]:.2f}x" if c in cells[key] else "-"
                                 for c in columns))
    return _table(header, table, "<><" + ">" * len(columns))


def _startup_table(records):
    header = ("backend", "numba cache", "import fastnn", "load backend", "first step",
              "total", "process")
    rows = []
    for r in records:
        if r.get("error"):
            rows.append((r["backend"], r["state"], "error", "", "", "", ""))
        else:
            rows.append((r["backend"], r["state"], f"{r['import_s']:.2f} s",
                         f"{r['backend_s']:.2f} s", f"{r['first_step_s']:.3f} s",
                         f"{r['total_s']:.2f} s", f"{r['process_s']:.2f} s"))
    return _table(header, rows, "<<>>>>>")


def _notes(result):
    s = result["settings"]
    notes = ["Notes:",
             "- fastnn: Sequential.fit(epochs=1, shuffle=True, seed=0), its fused train_epoch "
             f"path, after a warm-up fit on {WARMUP_BATCHES} batches; numpy: NumpyMLP "
             "(fastnn.benchmarks), preallocated buffers, in-place ops, float32; all start "
             "from the same weights and batch order.",
             "- s/epoch: median of the repeats; GFLOP/s counts the matmuls (2ndk forward, "
             "2ndk dW, 2ndk dx but the first layer); %sgemm: of the roofline above.",
             "- matmuls: only the epoch's matmuls, at the net's shapes, through scipy's "
             "sgemm on preallocated buffers, called from Python (a few us of call "
             "overhead each, which dominates on small nets); %matmuls: its time over "
             "the row's time.",
             "- RSS MB: peak resident set of the configuration's process (data included)."]
    if s["torch"]:
        notes.append("- torch: eager CPU (nn.Sequential, CrossEntropyLoss, torch.optim), "
                     "included because it is importable (--no-torch leaves it out).")
    else:
        notes.append("- torch: not included (not installed, or --no-torch): "
                     "pip install torch adds the PyTorch column.")
    if s["quick"]:
        notes.append("- --quick: fewer samples, nets and repeats, 1 thread unless --threads; "
                     "startup of the default backend, warm only. `fastnn bench` runs the "
                     "full suite.")
    uneven = [r for r in result["training"] if r.get("error") is None
              and max(r["seconds"]) > UNEVEN_SPREAD * min(r["seconds"])]
    if uneven:
        notes.append(
            f"- uneven epochs (slowest > {UNEVEN_SPREAD}x the fastest: the machine was "
            "busy elsewhere or a vCPU was descheduled; rerun these to confirm): " +
            "; ".join(f"{_threads(r['threads'])} {r['net']} b{r['batch']} {r['optimizer']} "
                      f"{r['label']} {min(r['seconds']):.3f}-{max(r['seconds']):.3f} s"
                      for r in uneven))
    for reason in result.get("skipped", ()):
        notes.append(f"- skipped: {reason}")
    for error in result["errors"]:
        notes.append(f"- ERROR {error}")
    return notes


def plot_speedups(result, path):
    """Bar chart of the speedups (one panel per thread count and baseline) to ``path``."""
    matplotlib = _import_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(result)
    panels = sorted({(r["threads"], r["baseline"]) for r in rows})
    backends = result["settings"]["backends"]
    workloads = list(dict.fromkeys((r["net"], r["batch"], r["optimizer"]) for r in rows))
    fig, axes = plt.subplots(max(len(panels), 1), 1, squeeze=False,
                             figsize=(max(6, 1.1 * len(workloads) + 2), 3.2 * max(len(panels), 1)))
    width = 0.8 / max(len(backends), 1)
    for ax, (threads, baseline) in zip(axes[:, 0], panels):
        for j, backend in enumerate(backends):
            values = {(r["net"], r["batch"], r["optimizer"]): r["speedup"] for r in rows
                      if (r["threads"], r["baseline"], r["backend"]) ==
                      (threads, baseline, backend)}
            xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(workloads))]
            ax.bar(xs, [values.get(w, 0.0) for w in workloads], width, label=f"fastnn[{backend}]")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([f"{n}\nb{b} {o}" for n, b, o in workloads], fontsize=8)
        ax.set_ylabel(f"speedup vs {baseline}")
        ax.set_title(f"fastnn vs {baseline}, {_threads(threads)} (> 1: fastnn faster)")
        ax.legend(fontsize=8)
    fig.suptitle(f"fastnn bench — {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _import_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'fastnn[plot]'") from exc
    return matplotlib


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def _csv(choices):
    def parse(text):
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in names if s not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                             f"{','.join(choices)}, got {text!r}")
        return names
    return parse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under a minute): fewer samples, nets and repeats")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine "
                        "info to PATH")
    parser.add_argument("--plot", metavar="PNG", help="bar chart of the speedups (matplotlib)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="only this thread count (default: 1, pinned, and all usable "
                             "CPUs; --quick: 1)")
    torch_group = parser.add_mutually_exclusive_group()
    torch_group.add_argument("--vs-torch", action="store_true",
                             help="require the PyTorch comparison (default: included when "
                                  "torch is importable)")
    torch_group.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--nets", type=_csv(tuple(NETS)), metavar="LIST",
                        help=f"reference nets to run (default: {','.join(NETS)}; --quick: "
                             f"{','.join(QUICK_NETS)})")
    parser.add_argument("--backends", type=_csv(BACKENDS), metavar="LIST",
                        help="fastnn backends to run (default: every one that loads)")
    parser.add_argument("--optimizers", type=_csv(OPTIMIZERS), metavar="LIST",
                        default=list(OPTIMIZERS), help="sgd,adam (default: both)")
    parser.add_argument("--samples", type=_positive_int, metavar="N",
                        help="samples per epoch for every net (default: per net)")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help=f"timed epochs per configuration; the median is reported "
                             f"(default {REPEATS}; --quick {QUICK_REPEATS})")
    parser.add_argument("--no-startup", action="store_true", help="skip the startup timing")
    return parser


def add_parser(subparsers):
    """Add the ``bench`` subcommand to the ``fastnn`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="benchmark fastnn against numpy and PyTorch on this machine",
        description="Time one training epoch of three reference nets for fastnn (each "
                    "backend), a careful numpy MLP and PyTorch (when installed); print "
                    "seconds/epoch, samples/s, GFLOP/s against this machine's sgemm rate, "
                    "peak RSS, startup time and the speedups.")
    return add_arguments(parser)


def torch_available():
    """Whether PyTorch is installed (found without importing it)."""
    return importlib.util.find_spec("torch") is not None


def run(args):
    """Run ``fastnn bench`` from parsed arguments; returns the exit code."""
    with_torch = torch_available()
    if args.vs_torch and not with_torch:
        print("fastnn bench: --vs-torch needs PyTorch, which is not installed "
              "(pip install torch; fastnn itself never needs it)", file=sys.stderr)
        return 2
    with_torch = with_torch and not args.no_torch
    if args.plot:
        try:
            _import_matplotlib()
        except ImportError as exc:
            print(f"fastnn bench: {exc}", file=sys.stderr)
            return 2
    cpus = len(usable_cpus())
    if args.threads is not None and args.threads > cpus:
        print(f"fastnn bench: --threads must be between 1 and {cpus} (usable CPUs), got "
              f"{args.threads}", file=sys.stderr)
        return 2
    if args.threads is not None:
        threads_list = [args.threads]
    else:
        threads_list = [1] if args.quick or cpus == 1 else [1, cpus]
    if args.backends:  # asked for by name: each must load (the workers skip others)
        from . import kernels

        for name in args.backends:
            try:
                kernels.load(name)
            except ImportError as exc:
                print(f"fastnn bench: {exc}", file=sys.stderr)
                return 2
    backends = [b for b in BACKENDS if b in (args.backends or BACKENDS)]
    nets = args.nets or list(QUICK_NETS if args.quick else NETS)
    result = run_suite(nets, backends, threads_list, with_torch, quick=args.quick,
                       samples=args.samples, repeats=args.repeats,
                       startup=not args.no_startup, optimizers=args.optimizers)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(result, args.plot)
        print(f"wrote {args.plot}")
    return 1 if result["errors"] else 0


def main(argv=None):
    """``python -m fastnn.benchmarks``: the same options as ``fastnn bench``."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m fastnn.benchmarks",
        description="Benchmark fastnn against numpy and PyTorch on this machine (the same "
                    "program as `fastnn bench`)."))
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
