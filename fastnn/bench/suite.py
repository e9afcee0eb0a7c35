"""Planning the ``fastnn bench`` run and the worker processes that time it.

Every configuration runs in a fresh interpreter (``python -m fastnn.bench --worker
SPEC``: a spawned process, never a fork, since fork() after OpenMP can hang), so peak
RSS and thread pools are its own. 1-thread runs are pinned to one CPU (the headline);
all-thread runs are reported separately. ``--quick`` runs all configurations of one
implementation in one worker (and resets the peak-RSS mark between them) so it
finishes in under a minute. A warm-up epoch on a few batches precedes the timing; the
figure is the median over ``repeats`` epochs.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import machine
from .baselines import LEARNING_RATES, OPTIMIZERS, RUNNERS, SEED, WARMUP_BATCHES, \
    impl_label, initial_weights
from .gemm import measure_gemm_table
from .report import threads_label

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
REPEATS, QUICK_REPEATS = 5, 3
#: Square sgemm size for the roofline (full run / --quick).
ROOFLINE_SIZE, QUICK_ROOFLINE_SIZE = 2048, 1024
RESULT_TAG = "FASTNN-BENCH-RESULT "


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


def _timed_epochs(run_epoch, repeats):
    seconds, losses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = run_epoch()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return seconds, losses


def run_training(cfg, threads, data=None):
    """Time one configuration in this process; returns its result record.

    ``cfg``: impl ("fastnn", "numpy", "torch", "matmuls"), backend (for fastnn), net,
    sizes, batch, optimizer, samples, repeats, dtype. ``data``: (X, y), made here when None.
    """
    dtype = np.dtype(cfg.get("dtype", "float32"))
    X, y = data if data is not None else synthetic_data(cfg["sizes"], cfg["samples"], dtype)
    weights = initial_weights(cfg["sizes"], dtype)
    reset, epoch = RUNNERS[cfg["impl"]](cfg, weights, threads)
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


def worker(spec):
    """Run a worker spec in this (fresh) process: pin, measure, return the results."""
    threads = spec["threads"]
    cpus = machine.pin_to_cpus(threads)
    if spec["kind"] == "roofline":
        return dict(machine.measure_sgemm(spec["size"], spec["repeats"], threads), cpus=cpus)
    if spec["kind"] == "gemm":
        from .. import set_num_threads

        # numpy's BLAS too: idle threads spinning on the one pinned CPU cost up to 100x.
        set_num_threads(threads)
        return {"records": measure_gemm_table(spec["nets"], spec["quick"]), "cpus": cpus}
    records, data = [], {}
    for cfg in spec["configs"]:
        key = (tuple(cfg["sizes"]), cfg["samples"], cfg.get("dtype", "float32"))
        if key not in data:
            data.clear()
            data[key] = synthetic_data(cfg["sizes"], cfg["samples"], np.dtype(key[2]))
        rss_reset = machine.reset_peak_rss()
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
        record["peak_rss_mb"] = machine.peak_rss_mb()
        record["peak_rss_since"] = "config" if rss_reset else "process start"
        record["cpus"] = cpus
        records.append(record)
    return {"records": records}


def _spawn(spec):
    """Run ``worker(spec)`` in a fresh interpreter; returns its result or {"error"}."""
    proc = subprocess.run([sys.executable, "-m", "fastnn.bench", "--worker",
                           json.dumps(spec)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    output = machine.output_tail(proc.stderr) or machine.output_tail(proc.stdout)
    return {"error": f"worker exited with code {proc.returncode}: {output}"}


_START = time.perf_counter()


def _log(message):
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def plan(nets, backends, optimizers, with_torch, quick, samples=None, repeats=None):
    """The training configurations, implementations side by side for each workload
    (the bf16 rows where this CPU has AVX512_BF16)."""
    bf16 = machine.bf16_supported()
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
                if bf16 and "cython" in backends:
                    impls.append(dict(base, impl="fastnn-bf16", backend="cython"))
                impls.append(dict(base, impl="numpy", backend=None))
                impls.append(dict(base, impl="matmuls", backend=None))
                if with_torch:
                    impls.append(dict(base, impl="torch", backend=None))
                if with_torch and bf16:
                    impls.append(dict(base, impl="torch-bf16", backend=None))
                configs += impls
    return configs


def run_suite(nets, backends, threads_list, with_torch, quick=False, samples=None,
              repeats=None, startup=True, optimizers=OPTIMIZERS, gemm=True):
    """Run the whole suite (roofline, GEMM crossover table, training, startup); returns
    the result dict."""
    configs = plan(nets, backends, optimizers, with_torch, quick, samples, repeats)
    result = {"machine": machine.machine_info(), "settings": {
        "quick": quick, "nets": {n: NETS[n] for n in nets}, "backends": list(backends),
        "threads": threads_list, "torch": with_torch, "optimizers": list(optimizers),
        "warmup_batches": WARMUP_BATCHES, "seed": SEED, "learning_rates": LEARNING_RATES},
        "roofline": {}, "gemm": [], "training": [], "startup": [], "skipped": [],
        "errors": []}
    if gemm and "cython" in backends:
        _log("GEMM crossover table: own kernel, OpenBLAS, numpy; 1 thread")
        table = _spawn({"kind": "gemm", "threads": 1, "quick": quick,
                        "nets": {n: {"sizes": NETS[n]["sizes"], "batches": NETS[n][
                            "quick_batches" if quick else "batches"]} for n in nets}})
        if table.get("error"):
            result["errors"].append(f"GEMM table: {table['error']}")
        result["gemm"] = table.get("records", [])
    for threads in threads_list:
        size = QUICK_ROOFLINE_SIZE if quick else ROOFLINE_SIZE
        _log(f"roofline: sgemm {size}^3, {threads_label(threads)}")
        roof = _spawn({"kind": "roofline", "threads": threads, "size": size,
                       "repeats": 3 if quick else 5})
        result["roofline"][str(threads)] = roof
        if roof.get("error"):
            result["errors"].append(f"roofline, {threads_label(threads)}: {roof['error']}")
        _train_in_workers(configs, threads, roof, quick, result)
    loaded = [b for b in backends if any(r.get("backend") == b for r in result["training"])]
    result["settings"]["backends"] = loaded
    if startup and loaded:
        # --quick: only the default backend (the first of kernels.BACKENDS that loads), warm.
        _log("startup: import fastnn + first training step" +
             ("" if quick else ", cold and warm numba cache"))
        measured = loaded[:1] if quick else loaded
        result["startup"] = machine.measure_startup(measured, cold=not quick,
                                                    warm_repeats=1 if quick else 3)
        result["errors"] += [f"startup {r['backend']} ({r['state']}): {r['error']}"
                             for r in result["startup"] if r.get("error")]
    return result


def _train_in_workers(configs, threads, roof, quick, result):
    """Time ``configs`` at ``threads`` threads in worker processes; adds their records
    (with ``roofline_pct`` against ``roof``), skips and errors to ``result``."""
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
        _log(f"{threads_label(threads)}, {i}/{len(batches)}: {what}")
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
                                        f"{threads_label(threads)}: {record['error']}")
            result["training"].append(record)
