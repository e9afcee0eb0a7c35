"""fastnn's own GEMM (kernels/fastnn_gemm.h) against numpy, on every path this CPU runs.

Each path is forced in turn (``set_gemm_path``): "avx512" and "avx2" are the own
micro-kernels, "blas" is scipy's BLAS, "auto" picks by shape. A path the CPU lacks is
skipped with the reason. Whole training runs must agree across paths to float tolerance,
and across thread counts bit for bit (the own kernels split C over threads, never k).
"""
import numpy as np
import pytest

import fastnn as fn
from fastnn import kernels

cython = kernels.load("cython")

PATHS = ("avx512", "avx2", "blas", "auto")
EDGE = (1, 2, 7, 15, 16, 17, 31, 33, 127, 129, 1000)
#: The three products of a dense layer: forward x W, dW = x^T dz, dx = dz W^T.
PRODUCTS = (("N", "N"), ("T", "N"), ("N", "T"))
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-11}


@pytest.fixture(params=PATHS)
def gemm_path(request):
    """Force each GEMM path in turn (skipping those this CPU lacks); restores "auto"."""
    path = request.param
    if path != "auto" and path not in cython.gemm_paths_available():
        pytest.skip(f"this CPU / build has no {path} path")
    cython.set_gemm_path(path)
    yield path
    cython.set_gemm_path("auto")


def edge_shapes():
    """(m, n, k): every edge size in each position, the other two cycling through the
    edge sizes (no two of 1000, to keep the run short)."""
    small = [s for s in EDGE if s != 1000]
    shapes = []
    for i, s in enumerate(EDGE):
        u, v = small[(3 * i + 1) % len(small)], small[(5 * i + 2) % len(small)]
        shapes += [(s, u, v), (u, s, v), (u, v, s)]
    return shapes


def operands(ta, tb, m, n, k, dtype, gen):
    a = gen.standard_normal((k, m) if ta == "T" else (m, k)).astype(dtype)
    b = gen.standard_normal((n, k) if tb == "T" else (k, n)).astype(dtype)
    return a, b


def reference(ta, tb, alpha, a, b, beta, c):
    """alpha op(a) op(b) + beta c in float64 (beta = 0: c is not read)."""
    prod = (a.T if ta == "T" else a).astype(np.float64) @ (b.T if tb == "T" else b)
    return alpha * prod + (beta * c if beta != 0 else 0)


def check(actual, desired, k, dtype, msg):
    """Agreement as BLAS results agree: relative to the size of the k-term sums."""
    scale = np.sqrt(max(k, 1)) * 4
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * scale, err_msg=msg)


@pytest.mark.parametrize("ta,tb", PRODUCTS, ids=["".join(p) for p in PRODUCTS])
def test_gemm_matches_numpy_on_edge_shapes(gemm_path, dtype, ta, tb):
    gen = np.random.default_rng(0)
    for m, n, k in edge_shapes():
        a, b = operands(ta, tb, m, n, k, dtype, gen)
        c = gen.standard_normal((m, n)).astype(dtype)
        alpha, beta = (1.0, 0.0) if (m + n + k) % 2 else (-0.75, 1.5)
        expected = reference(ta, tb, alpha, a, b, beta, c)
        cython.gemm(ta, tb, alpha, a, b, beta, c)
        check(c, expected, k, dtype, f"{gemm_path} {ta}{tb} m={m} n={n} k={k}")


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (-0.01, 0.99), (2.0, -1.0), (0.0, 0.5)])
def test_gemm_alpha_beta(gemm_path, dtype, alpha, beta):
    gen = np.random.default_rng(1)
    for ta, tb in PRODUCTS:
        # Blocks of k and n; B rows a page apart (packed into panels); a single term.
        for m, n, k in ((33, 129, 300), (60, 1030, 270), (7, 17, 1)):
            a, b = operands(ta, tb, m, n, k, dtype, gen)
            c = gen.standard_normal((m, n)).astype(dtype)
            expected = reference(ta, tb, alpha, a, b, beta, c)
            cython.gemm(ta, tb, alpha, a, b, beta, c)
            check(c, expected, k, dtype, f"{gemm_path} {ta}{tb} alpha={alpha} beta={beta}")


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_gemm_with_k_zero_scales_c(gemm_path, dtype, beta):
    for ta, tb in PRODUCTS:
        a = np.zeros((0, 5) if ta == "T" else (5, 0), dtype)
        b = np.zeros((7, 0) if tb == "T" else (0, 7), dtype)
        c = np.arange(35, dtype=dtype).reshape(5, 7)
        expected = beta * c
        cython.gemm(ta, tb, 1.0, a, b, beta, c)
        np.testing.assert_array_equal(c, expected)


def test_gemm_beta_zero_does_not_read_c(gemm_path, dtype):
    gen = np.random.default_rng(2)
    for ta, tb in PRODUCTS:
        a, b = operands(ta, tb, 20, 40, 9, dtype, gen)
        c = np.full((20, 40), np.nan, dtype)
        cython.gemm(ta, tb, 1.0, a, b, 0.0, c)
        check(c, reference(ta, tb, 1.0, a, b, 0.0, c), 9, dtype, f"{ta}{tb}")


def test_gemm_rejects_bad_arguments():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="ta and tb"):
        cython.gemm("X", "N", 1.0, a, a.T.copy(), 0.0, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="do not chain"):
        cython.gemm("N", "N", 1.0, a, a, 0.0, np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="one dtype"):
        cython.gemm("N", "N", 1.0, a, a.T.astype(np.float64), 0.0,
                    np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="repeat must be a positive int, got 0"):
        cython.gemm("N", "T", 1.0, a, a, 0.0, np.zeros((3, 3), np.float32), repeat=0)


def test_gemm_repeat_runs_the_same_product(gemm_path):
    gen = np.random.default_rng(4)
    a, b = operands("T", "N", 40, 70, 30, np.float32, gen)
    once, thrice = np.zeros((40, 70), np.float32), np.zeros((40, 70), np.float32)
    cython.gemm("T", "N", 1.0, a, b, 0.0, once)
    cython.gemm("T", "N", 1.0, a, b, 0.0, thrice, repeat=3)
    np.testing.assert_array_equal(thrice, once)
    cython.gemm("T", "N", 1.0, a, b, 1.0, thrice, repeat=2)
    check(thrice, 3 * reference("T", "N", 1.0, a, b, 0.0, once), 30, np.dtype(np.float32),
          "beta = 1, repeat = 2")


def test_set_gemm_path_names_the_choices():
    with pytest.raises(ValueError, match="'auto', 'blas', 'avx2', 'avx512'.*got 'sse'"):
        cython.set_gemm_path("sse")
    assert cython.gemm_path() == "auto"
    assert cython.gemm_paths_available()[-1] == "blas"
    for path in cython.gemm_paths_available():
        cython.set_gemm_path(path)
        assert cython.gemm_path() == path
    cython.set_gemm_path("auto")
    assert cython.gemm_path() == "auto"


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
def test_dense_layer_on_each_path_matches_the_oracle(gemm_path, dtype, act):
    oracle = kernels.load("numpy")
    code = kernels.ACTIVATIONS[act]
    gen = np.random.default_rng(3)
    for n, d, k in ((32, 64, 10), (129, 33, 17), (5, 300, 70)):
        x = gen.standard_normal((n, d)).astype(dtype)
        w = gen.standard_normal((d, k)).astype(dtype)
        b = gen.standard_normal(k).astype(dtype)
        outs = [np.empty((n, k), dtype) for _ in range(2)]
        for module, out in zip((cython, oracle), outs):
            module.dense_forward(x, w, b, code, out)
        check(outs[0], outs[1], d, dtype, f"forward {act} {n}x{d}x{k}")
        dout = gen.standard_normal((n, k)).astype(dtype)
        grads = []
        for module in (cython, oracle):
            g = [np.empty((n, k), dtype), np.empty((n, d), dtype), np.empty((d, k), dtype),
                 np.empty(k, dtype)]
            module.dense_backward(x, w, outs[1], dout, code, *g)
            grads.append(g)
        for name, got, want in zip(("dz", "dx", "dw", "db"), *grads):
            check(got, want, max(n, k), dtype, f"{name} {act} {n}x{d}x{k}")


@pytest.mark.parametrize("k_out", [1, 10, 300])
def test_a_row_of_the_forward_product_does_not_depend_on_the_batch(dtype, k_out):
    """On the own paths, x W computes each row with the same arithmetic whatever the
    other rows: a sample's prediction is bit for bit the same alone, in a small batch
    and in a big one (sklearn's check_methods_subset_invariance), one output or many."""
    paths = [p for p in ("avx512", "avx2") if p in cython.gemm_paths_available()]
    if not paths:
        pytest.skip("no own GEMM path on this CPU / build")
    gen = np.random.default_rng(5)
    x = gen.standard_normal((300, 129)).astype(dtype)
    w = gen.standard_normal((129, k_out)).astype(dtype)
    b = gen.standard_normal(k_out).astype(dtype)
    relu = kernels.ACTIVATIONS["relu"]
    try:
        for path in paths + ["auto"]:
            cython.set_gemm_path(path)
            whole = np.empty((300, k_out), dtype)
            cython.dense_forward(x, w, b, relu, whole)
            for rows in (slice(7, 8), slice(0, 5), slice(100, 160)):
                part = np.empty((rows.stop - rows.start, k_out), dtype)
                cython.dense_forward(np.ascontiguousarray(x[rows]), w, b, relu, part)
                assert np.array_equal(part, whole[rows]), (path, rows)
    finally:
        cython.set_gemm_path("auto")


def digits_fit(fused, optimizer, sizes=(64, 32, 10), threads=None, samples=256,
               batch_size=32, epochs=2):
    """Parameters after ``fit`` of a ReLU MLP on the digits (cython backend)."""
    X, y = fn.datasets.load_digits(scale=True)
    if sizes[0] != X.shape[1]:
        X = np.tile(X, (1, -(-sizes[0] // X.shape[1])))[:, :sizes[0]]
    with fn.use_backend("cython"):
        model = fn.Sequential([
            fn.Dense(d, k, activation="relu" if i < len(sizes) - 2 else None, seed=i)
            for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:]))])
        model.compile("cross_entropy", optimizer)
        model.use_fused_epoch = fused
        previous = fn.get_num_threads()
        if threads is not None:
            fn.set_num_threads(threads)
        try:
            model.fit(X[:samples], y[:samples], epochs=epochs, batch_size=batch_size,
                      verbose=0, seed=3)
        finally:
            fn.set_num_threads(previous)
        return model.params.copy()


OPTIMIZERS = {"sgd": lambda: fn.optimizers.SGD(lr=0.05),
              "adam": lambda: fn.optimizers.Adam(lr=1e-3)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "general"])
def test_training_agrees_across_paths(gemm_path, optimizer, fused):
    got = digits_fit(fused, OPTIMIZERS[optimizer]())
    cython.set_gemm_path("blas")
    want = digits_fit(fused, OPTIMIZERS[optimizer]())
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_training_is_bit_identical_at_one_and_two_threads(optimizer):
    if cython.gemm_paths_available() == ["blas"]:
        pytest.skip("no own GEMM path on this CPU: BLAS splits k between threads")
    if len(fn._backend.usable_cpus()) < 2:
        pytest.skip("one usable CPU")
    mnist = (784, 256, 128, 10)
    one = digits_fit(True, OPTIMIZERS[optimizer](), mnist, threads=1, samples=300,
                     batch_size=128)
    two = digits_fit(True, OPTIMIZERS[optimizer](), mnist, threads=2, samples=300,
                     batch_size=128)
    np.testing.assert_array_equal(one, two)


def test_crossover_table_times_every_product_of_the_nets():
    from fastnn.bench import gemm as bench_gemm
    from fastnn.bench import report

    nets = {"tiny": {"sizes": (8, 5, 3), "batches": (4,)}}
    records = bench_gemm.measure_gemm_table(nets, quick=True)
    products = [(r["shape"], r["m"], r["n"], r["k"]) for r in records]
    assert products[:5] == [("tiny b4 8x5 forward", 4, 5, 8), ("tiny b4 8x5 dW", 8, 5, 4),
                            ("tiny b4 5x3 forward", 4, 3, 5), ("tiny b4 5x3 dW", 5, 3, 4),
                            ("tiny b4 5x3 dx", 4, 5, 3)]
    assert len(records) == 5 + len(bench_gemm.QUICK_ODD_SHAPES)
    own = cython.gemm_paths_available()[0]
    for r in records:
        assert r["blas"] > 0 and r["numpy"] > 0
        assert (r["own"] is None) == (own == "blas") and r["own_path"] == own
        assert r["chosen"] in cython.gemm_paths_available()
    lines = report._gemm_table(records)
    assert lines[0].split()[:4] == ["product", "m", "n", "k"]
    assert len(lines) == 2 + len(records)
    assert cython.gemm_path() == "auto"
