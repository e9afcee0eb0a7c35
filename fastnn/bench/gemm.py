"""The GEMM crossover table of ``fastnn bench``: fastnn's own kernel against OpenBLAS
(scipy's, the BLAS the Cython backend calls) and numpy.matmul, product by product.

Rows: the three products of every layer of the reference nets (forward ``x W`` "NN",
``dW = x^T dz`` "TN", ``dx = dz W^T`` "NT", the first layer's dx left out as training
leaves it out), then some odd and large shapes. Columns: GFLOP/s of the fastest own
path this CPU runs (forced), of BLAS (forced), of ``numpy.matmul`` on the transposed
views, and the path "auto" chooses (the shape rule ``fastnn_gemm_own_wins`` in
kernels/fastnn_gemm.h, which this table is the measurement behind). Each figure is
the median of ``repeats`` timings of a loop of calls lasting ``min_seconds``, the
three side by side per row, in one process pinned to one CPU. The own kernel and
BLAS loop inside one call (``gemm(..., repeat=)``), so the small products measure the
kernels, not Python's call overhead; numpy.matmul pays that overhead (a few
microseconds), as its users do.
"""
import statistics
import time

import numpy as np

#: Shapes beyond the reference nets: the edge sizes, a square product, a 4096-row
#: predict on the MNIST net's first layer, CIFAR's first layer at 4096 rows.
ODD_SHAPES = (("NN", 7, 7, 7), ("NN", 17, 33, 15), ("NT", 129, 127, 33),
              ("TN", 31, 1000, 129), ("NN", 1000, 1000, 1000), ("NN", 4096, 256, 784),
              ("NN", 4096, 1024, 3072))
QUICK_ODD_SHAPES = ODD_SHAPES[:4]
PRODUCT_NAMES = {"NN": "forward", "TN": "dW", "NT": "dx"}


def reference_products(nets):
    """(label, "NN" / "TN" / "NT", m, n, k) for the products of each layer of ``nets``
    ({name: {"sizes", "batches"}}) at each batch size."""
    rows = []
    for name, spec in nets.items():
        sizes = spec["sizes"]
        for batch in spec["batches"]:
            for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:])):
                where = f"{name} b{batch} {d}x{k}"
                rows.append((f"{where} forward", "NN", batch, k, d))
                rows.append((f"{where} dW", "TN", d, k, batch))
                if i:
                    rows.append((f"{where} dx", "NT", batch, d, k))
    return rows


def _operands(trans, m, n, k, dtype, rng):
    a = rng.standard_normal((k, m) if trans[0] == "T" else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans[1] == "T" else (k, n)).astype(dtype)
    return a, b, np.zeros((m, n), dtype)


def _gflops(call, flop, repeats, min_seconds):
    """Median GFLOP/s of ``call(loops)``, which runs the product ``loops`` times, over
    ``repeats`` timings of about ``min_seconds`` each."""
    call(1)
    start = time.perf_counter()
    call(1)
    once = max(time.perf_counter() - start, 1e-7)
    loops = max(1, int(min_seconds / once))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(loops)
        rates.append(flop * loops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def _numpy_loop(opa, opb, c):
    def call(loops):
        for _ in range(loops):
            np.matmul(opa, opb, out=c)
    return call


def measure_gemm_table(nets, quick, dtype="float32"):
    """The crossover table as a list of records (see the module docstring), at the
    current thread count (``fastnn bench`` runs it at one)."""
    from ..kernels import load

    cython = load("cython")
    own = cython.gemm_paths_available()[0]
    repeats, min_seconds = (5, 0.004) if quick else (7, 0.02)
    shapes = reference_products(nets) + [
        (f"odd {m}x{n}x{k} {PRODUCT_NAMES[t]}", t, m, n, k)
        for t, m, n, k in (QUICK_ODD_SHAPES if quick else ODD_SHAPES)]
    rng = np.random.default_rng(0)
    records = []
    try:
        for label, trans, m, n, k in shapes:
            a, b, c = _operands(trans, m, n, k, dtype, rng)
            opa = a.T if trans[0] == "T" else a
            opb = b.T if trans[1] == "T" else b
            flop = 2.0 * m * n * k
            cython.set_gemm_path("auto")
            record = {"shape": label, "trans": trans, "m": m, "n": n, "k": k,
                      "own_path": own, "chosen": cython.gemm_choice(
                          trans[0], trans[1], m, n, k, dtype)}
            for column, path in (("own", own), ("blas", "blas")):
                record[column] = None
                if column == "blas" or path != "blas":  # no own path: BLAS only
                    cython.set_gemm_path(path)
                    record[column] = _gflops(
                        lambda loops: cython.gemm(trans[0], trans[1], 1.0, a, b, 0.0, c,
                                                  loops), flop, repeats, min_seconds)
            record["numpy"] = _gflops(_numpy_loop(opa, opb, c), flop, repeats, min_seconds)
            records.append(record)
    finally:
        cython.set_gemm_path("auto")
    return records

