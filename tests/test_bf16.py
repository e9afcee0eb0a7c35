"""precision="bf16": every Dense product in bfloat16 with float32 accumulation.

The numpy backend is the oracle: it rounds to bf16 exactly as AVX512_BF16 does
(``_numpy._bf16``) and multiplies the rounded float32 values, exact products summed in
float32, so the compiled kernels match it to float32 accumulation order. Tests of the
compiled kernels skip, with the reason, on a CPU without AVX512_BF16.
"""
import numpy as np
import pytest

import fastnn as fn
from _helpers import mlp, rng
from fastnn import kernels
from fastnn.cli import main
from fastnn.kernels import _numpy
from fastnn.model import bf16_supported

needs_bf16 = pytest.mark.skipif(
    not bf16_supported(), reason="this CPU has no AVX512_BF16 (vdpbf16ps), or the Cython "
                                 "kernels are not built: the compiled bf16 kernels cannot run")
#: The backends whose bf16 kernels run here: numpy (the emulation) always.
BACKENDS = [pytest.param(name, marks=needs_bf16) if name != "numpy" else name
            for name in kernels.BACKENDS]
COMPILED = [pytest.param(name, marks=needs_bf16) for name in ("cython", "numba")]
EDGE_SIZES = (1, 2, 7, 15, 16, 17, 31, 33, 127, 129)
#: Each edge size as the rows, the inputs and the outputs of a layer, plus the MNIST
#: and CIFAR layer shapes.
SHAPES = ([(s, 17, 33) for s in EDGE_SIZES] + [(7, s, 16) for s in EDGE_SIZES]
          + [(31, 15, s) for s in EDGE_SIZES] + [(128, 784, 256), (256, 3072, 10)])
RELU, TANH, IDENTITY = (kernels.ACTIVATIONS[a] for a in ("relu", "tanh", "identity"))


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def floats(words):
    return np.array(words, np.uint32).view(np.float32)


def close(actual, desired, terms):
    """``actual`` within float32 accumulation error of ``desired``: ``terms`` is the sum
    of the products' magnitudes (|x| @ |w|), which bounds the error of any order."""
    np.testing.assert_array_less(np.abs(actual - desired), 1e-5 * terms + 1e-30)


# ------------------------------------------------------------------------- rounding
ROUNDING = [  # (float32 bits, bf16 bits as float32 bits, what)
    (0x3F800000, 0x3F800000, "1.0 exact"),
    (0x3F808000, 0x3F800000, "tie, even below: down"),
    (0x3F818000, 0x3F820000, "tie, odd below: up"),
    (0x3F808001, 0x3F810000, "above the tie: up"),
    (0x3F807FFF, 0x3F800000, "below the tie: down"),
    (0xBF818000, 0xBF820000, "negative tie to even"),
    (0x7F7FFFFF, 0x7F800000, "largest float32: rounds to inf"),
    (0x7F7F7FFF, 0x7F7F0000, "largest bf16 kept"),
    (0x7F800000, 0x7F800000, "inf"),
    (0xFF800000, 0xFF800000, "-inf"),
    (0x7FC00000, 0x7FC00000, "quiet NaN"),
    (0x7F800001, 0x7FC00000, "signalling NaN: quieted, stays NaN"),
    (0xFFA00000, 0xFFE00000, "negative NaN with payload: quieted"),
    (0x00000001, 0x00000000, "smallest subnormal: zero"),
    (0x007FFFFF, 0x00000000, "largest subnormal: zero (treated as zero, not rounded)"),
    (0x80400000, 0x80000000, "negative subnormal: -0"),
    (0x00800000, 0x00800000, "smallest normal kept"),
    (0x80000000, 0x80000000, "-0"),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rounding_special_values(backend_name):
    x = floats([r[0] for r in ROUNDING])
    out = np.empty_like(x)
    kernels.load(backend_name).bf16_round(x, out)
    for got, (_, want, what) in zip(bits(out), ROUNDING):
        assert got == want, f"{what}: got {got:#010x}, want {want:#010x}"


@needs_bf16
def test_rounding_matches_the_hardware_on_a_sweep_of_all_float32():
    x = np.arange(0, 2 ** 32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    want = np.empty_like(x)
    got = np.empty_like(x)
    _numpy.bf16_round(x, want)
    kernels.load("cython").bf16_round(x, got)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rounding_refuses_a_non_contiguous_output(backend_name):
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.load(backend_name).bf16_round(x[:, :2], np.empty((4, 4), np.float32)[:, :2])


def test_rounding_is_idempotent_and_in_place():
    x = rng().standard_normal((5, 7)).astype(np.float32)
    once = _numpy._bf16(x)
    assert np.all(bits(once) & 0xFFFF == 0)
    np.testing.assert_array_equal(bits(_numpy._bf16(once)), bits(once))
    _numpy.bf16_round(x, x)
    np.testing.assert_array_equal(bits(x), bits(once))


# -------------------------------------------------------------------------- kernels
def layer_data(n, d, k, offset=0):
    gen = rng(offset)
    x = gen.standard_normal((n, d)).astype(np.float32)
    w = (gen.standard_normal((d, k)) / np.sqrt(d)).astype(np.float32)
    b = gen.standard_normal(k).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("act", [IDENTITY, RELU, TANH])
def test_dense_forward_bf16_matches_the_fp32_oracle_on_rounded_inputs(backend_name, n, d,
                                                                       k, act):
    x, w, b = layer_data(n, d, k)
    out = np.empty((n, k), np.float32)
    kernels.load(backend_name).dense_forward_bf16(x, w, b, act, out)
    xr, wr = _numpy._bf16(x), _numpy._bf16(w)
    z = xr.astype(np.float64) @ wr + b
    terms = np.abs(xr) @ np.abs(wr) + np.abs(b)
    if act == IDENTITY:
        close(out, z, terms)
    elif act == RELU:
        close(out, np.maximum(z, 0), terms)
    else:  # tanh is 1-Lipschitz; plus its float32 evaluation
        close(out, np.tanh(z), terms + 20)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_dense_backward_bf16_matches_the_fp32_oracle_on_rounded_inputs(backend_name, n, d,
                                                                        k):
    x, w, b = layer_data(n, d, k, 1)
    a = np.maximum(rng(2).standard_normal((n, k)), 0).astype(np.float32)
    dout = rng(3).standard_normal((n, k)).astype(np.float32)
    dz, dx = np.empty_like(dout), np.empty_like(x)
    dw, db = np.empty_like(w), np.empty_like(b)
    kernels.load(backend_name).dense_backward_bf16(x, w, a, dout, RELU, dz, dx, dw, db)
    dz_exact = dout * (a > 0)
    np.testing.assert_array_equal(dz, dz_exact)  # elementwise float32: identical
    xr, wr, dzr = _numpy._bf16(x), _numpy._bf16(w), _numpy._bf16(dz_exact)
    close(dw, xr.T.astype(np.float64) @ dzr, np.abs(xr.T) @ np.abs(dzr))
    close(dx, dzr.astype(np.float64) @ wr.T, np.abs(dzr) @ np.abs(wr.T))
    close(db, dz_exact.sum(0, dtype=np.float64), np.abs(dz_exact).sum(0))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_dense_backward_bf16_without_dx_and_without_rows(backend_name):
    module = kernels.load(backend_name)
    x, w, b = layer_data(9, 5, 3)
    a = dout = np.ones((9, 3), np.float32)
    dz, dw, db = np.empty_like(a), np.empty_like(w), np.empty_like(b)
    module.dense_backward_bf16(x, w, a, dout, IDENTITY, dz, None, dw, db)
    close(dw, _numpy._bf16(x).T.astype(np.float64) @ dout, np.abs(x).T @ dout * 1.01)
    empty = np.empty((0, 5), np.float32)
    module.dense_backward_bf16(empty, w, empty[:, :3], empty[:, :3], IDENTITY,
                               empty[:, :3].copy(), None, dw, db)
    assert not dw.any() and not db.any()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n", [1, 17, 128])
def test_dense_stack_forward_bf16_is_the_layers_in_sequence(backend_name, n):
    module = kernels.load(backend_name)
    model = mlp([33, 31, 17, 5], activation="relu")
    x = rng(4).standard_normal((n, 33)).astype(np.float32)
    widths = np.array([33, 31, 17, 5], np.int64)
    acts = np.array([RELU, RELU, IDENTITY], np.int64)
    alphas = np.zeros(3)
    use_bias = np.ones(3, np.int64)
    workspace = np.empty(kernels.dense_stack_workspace_size(n, widths), np.float32)
    out = np.empty((n, 5), np.float32)
    module.dense_stack_forward_bf16(x, model.params, widths, acts, alphas, use_bias,
                                    workspace, out)
    a = x
    for i, layer in enumerate(model.layers):
        nxt = np.empty((n, layer.out_features), np.float32)
        module.dense_forward_bf16(a, layer.W, layer.b, int(acts[i]), nxt)
        a = nxt
    np.testing.assert_array_equal(out, a)  # the same per-layer kernel, the same bits


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bf16_kernels_refuse_float64(backend_name):
    module = kernels.load(backend_name)
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="float32"):
        module.dense_forward_bf16(x, np.ones((3, 2)), np.ones(2), IDENTITY,
                                  np.empty((2, 2)))


@needs_bf16
def test_bf16_micro_benchmarks_report_a_rate():
    module = kernels.load("cython")
    assert module.bf16_peak_flops(200) > 1e9
    assert module.bf16_gemm_flops(7, 33, 17, repeats=1) > 0
    assert module.bf16_gemm_flops(129, 70, 31, pair_a=True, repeats=1) > 0


# ------------------------------------------------------------------------- training
def epoch_spec(module_dtype, optimizer, n=45, batch=8, sizes=(17, 16, 7, 3), seed=0):
    model = mlp(list(sizes), activation="relu", seed=seed)
    with fn.use_backend("numpy"):  # bf16 compiles there on any CPU; the spec is raw
        model.compile("cross_entropy", optimizer, precision="bf16")
    gen = rng(5 + seed)
    X = gen.standard_normal((n, sizes[0])).astype(module_dtype)
    y = gen.integers(0, sizes[-1], n).astype(np.int64)
    model.optimizer.build(model.n_params, model.dtype, owner=model)
    widths = np.array(sizes, np.int64)
    spec = kernels.TrainEpochSpec(
        X, y, np.empty((0, sizes[-1]), np.float32), gen.permutation(n).astype(np.int64),
        batch, widths, np.array([RELU] * (len(sizes) - 2) + [IDENTITY], np.int64),
        np.zeros(len(sizes) - 1), np.ones(len(sizes) - 1, np.int64), model.params.copy(),
        np.zeros(model.n_params, np.float32),
        np.empty(kernels.train_epoch_workspace_size(batch, widths), np.float32),
        kernels.LOSS_CODES["cross_entropy"], 0.0, model.optimizer.kernel_spec(),
        np.full(-(-n // batch), 0.05), 0, np.zeros(4), bf16=True)
    return spec


def copied(spec):
    opt = spec.optimizer
    return spec._replace(params=spec.params.copy(), stats=np.zeros(4),
                         optimizer=opt._replace(states=tuple(s.copy() for s in opt.states)))


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_train_epoch_bf16_matches_the_numpy_oracle(backend_name, optimizer):
    opt = {"sgd": fn.optimizers.SGD(lr=0.05),
           "momentum": fn.optimizers.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
           "adam": fn.optimizers.Adam(lr=1e-3)}[optimizer]
    spec = epoch_spec(np.float32, opt)
    ours, oracle = copied(spec), copied(spec)
    kernels.load(backend_name).train_epoch(ours)
    _numpy.train_epoch(oracle)
    # Sums in another order can round a hidden value to the neighbouring bf16 (one
    # unit in 2^8 of one term), so the comparison is at that scale, not float32's.
    np.testing.assert_allclose(ours.params, oracle.params, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(ours.stats[[0, 3]], oracle.stats[[0, 3]], rtol=2e-3)
    assert ours.stats[2] == oracle.stats[2] == 6
    assert not np.array_equal(ours.params, spec.params)


@needs_bf16
def test_train_epoch_bf16_refuses_float64():
    spec = epoch_spec(np.float32, fn.optimizers.SGD(lr=0.1))
    spec = spec._replace(X=spec.X.astype(np.float64), params=spec.params.astype(np.float64))
    with pytest.raises(ValueError):
        kernels.load("cython").train_epoch(spec)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_train_epoch_bf16_refuses_a_reduce_hook(backend_name):
    """A data-parallel epoch reduces in the float32 loop only: the bf16 epoch has no
    hook, so a distributed bf16 fit runs step by step (fastnn/_epochs.py)."""
    calls = []
    spec = epoch_spec(np.float32, fn.optimizers.SGD(lr=0.1))._replace(
        reduce=lambda *args: calls.append(args) or 1.0)
    before = spec.params.copy()
    with pytest.raises(ValueError, match="bf16 epoch takes no reduce hook"):
        kernels.load(backend_name).train_epoch(spec)
    assert not calls
    np.testing.assert_array_equal(spec.params, before)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_and_general_paths_train_alike(backend_name):
    X = rng(6).standard_normal((96, 20)).astype(np.float32)
    y = rng(7).integers(0, 4, 96)
    weights = []
    with fn.use_backend(backend_name):
        for fused in (True, False):
            model = mlp([20, 24, 4], activation="tanh")
            model.use_fused_epoch = fused
            model.compile("cross_entropy", fn.optimizers.SGD(lr=0.1, momentum=0.5),
                          precision="bf16")
            model.fit(X, y, epochs=2, batch_size=16, verbose=0, seed=0)
            weights.append(model.params.copy())
    np.testing.assert_allclose(weights[0], weights[1], rtol=2e-3, atol=2e-4)


#: Documented bound on the relative L2 error of bf16 gradients against fp32 ones, over
#: the whole gradient vector of the MNIST net at its initial weights (measured 3.9 %:
#: 6 % for the first layer's dW, whose sums over the batch cancel most, 0.2 % for the
#: last layer's; the numpy emulation gives the same figures, so it is bf16's, not the
#: kernels').
GRADIENT_BOUND = 0.1


def mnist_net_gradients(backend_name, precision):
    X = rng(8).standard_normal((128, 784)).astype(np.float32)
    y = rng(9).integers(0, 10, 128)
    with fn.use_backend(backend_name):
        model = mlp([784, 256, 128, 10], activation="relu")
        model.compile("cross_entropy", "sgd", precision=precision)
        return np.concatenate([g.ravel() for g in model.compute_gradients(X, y)[1]])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gradient_relative_error_against_fp32(backend_name):
    bf16 = mnist_net_gradients(backend_name, "bf16")
    fp32 = mnist_net_gradients(backend_name, "fp32")
    error = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < error < GRADIENT_BOUND


@pytest.mark.parametrize("backend_name", COMPILED)
def test_bf16_gradients_match_the_numpy_oracle(backend_name):
    ours = mnist_net_gradients(backend_name, "bf16")
    oracle = mnist_net_gradients("numpy", "bf16")
    assert np.linalg.norm(ours - oracle) / np.linalg.norm(oracle) < 1e-4


# ---------------------------------------------------------------------- the model API
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_predict_and_evaluate_follow_the_precision(backend_name):
    X = rng(10).standard_normal((50, 12)).astype(np.float32)
    y = rng(11).integers(0, 3, 50)
    with fn.use_backend(backend_name):
        model = mlp([12, 9, 3], activation="relu")
        model.compile("cross_entropy", "sgd", metrics=["accuracy"], precision="bf16")
        logits = model.forward(X)
        layer_by_layer = model._forward(X, False)
        np.testing.assert_array_equal(logits, layer_by_layer)
        np.testing.assert_allclose(model.predict(X).sum(1), 1, rtol=1e-6)
        loss = model.evaluate(X, y)["loss"]
        model.compile("cross_entropy", "sgd", metrics=["accuracy"])
        fp32 = model.forward(X)
    assert not np.array_equal(logits, fp32)
    np.testing.assert_allclose(logits, fp32, rtol=0.05, atol=0.05)
    assert np.isfinite(loss)


def test_compile_checks_the_precision():
    model = mlp([4, 3])
    with pytest.raises(ValueError, match="precision must be one of"):
        model.compile("mse", "sgd", precision="bfloat16")
    with pytest.raises(ValueError, match="needs a float32 model"):
        mlp([4, 3], dtype="float64").compile("mse", "sgd", precision="bf16")
    assert model.precision == "fp32"


@pytest.mark.parametrize("solver", sorted(fn.solvers.SOLVERS))
def test_solvers_refuse_bf16(solver):
    model = mlp([4, 3])
    with fn.use_backend("numpy"), pytest.raises(ValueError, match="needs precision='fp32'"):
        model.compile("mse", solver, precision="bf16")  # numpy: bf16 on any CPU
    assert model.loss is None


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_save_and_load_keep_the_precision(backend_name, tmp_path):
    X = rng(12).standard_normal((30, 6)).astype(np.float32)
    y = rng(13).integers(0, 3, 30)
    with fn.use_backend(backend_name):
        model = mlp([6, 8, 3], activation="relu")
        model.compile("cross_entropy", "adam", precision="bf16")
        model.fit(X, y, epochs=2, batch_size=8, verbose=0, seed=0)
        model.save(tmp_path / "m.npz")
        loaded = fn.load_model(tmp_path / "m.npz")
        assert loaded.precision == "bf16"
        np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
        model.fit(X, y, epochs=1, batch_size=8, verbose=0, seed=1)
        loaded.fit(X, y, epochs=1, batch_size=8, verbose=0, seed=1)
        np.testing.assert_array_equal(loaded.params, model.params)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cli_trains_in_bf16(backend_name, capsys):
    code = main(["train", "--precision", "bf16", "--epochs", "3", "--quiet", "--backend",
                 backend_name])
    out = capsys.readouterr().out
    assert code == 0 and "bf16 products" in out
    assert float(out.split("test accuracy ")[1].split()[0]) > 0.8


# ------------------------------------------------------------------------- accuracy
@pytest.fixture
def one_thread():
    """1 thread: on a loaded machine, BLAS threads of the fp32 runs contend (seconds)."""
    before = fn.get_num_threads()
    fn.set_num_threads(1)
    yield
    fn.set_num_threads(before)


def accuracy_gap(X, y, sizes, epochs, batch, lr, seeds=5):
    """Mean test accuracy (in points) of fp32 minus bf16 over ``seeds`` splits / inits."""
    gaps = []
    for seed in range(seeds):
        split = fn.datasets.train_test_split(X, y, test_size=0.25, seed=seed)
        X_train, X_test, y_train, y_test = split
        scores = {}
        for precision in ("fp32", "bf16"):
            model = mlp(sizes, activation="relu", seed=10 * seed)
            model.compile("cross_entropy", fn.optimizers.SGD(lr=lr, momentum=0.9),
                          metrics=["accuracy"], precision=precision)
            model.fit(X_train, y_train, epochs=epochs, batch_size=batch, verbose=0,
                      seed=seed)
            scores[precision] = 100 * model.evaluate(X_test, y_test)["accuracy"]
        assert scores["bf16"] > 80, scores
        gaps.append(scores["fp32"] - scores["bf16"])
    print(f"accuracy gap fp32 - bf16 per seed (points): {np.round(gaps, 2).tolist()}")
    return float(np.mean(gaps))


def mnist_shaped_task(n, gen, latent_dim=6):
    """A harder synthetic task of MNIST's shape: 784 correlated features in (0, 1)
    (a sigmoid of random mixtures of ``latent_dim`` latent factors), 10 classes from a
    random linear teacher on the latent factors, which the net must recover."""
    latent = gen.standard_normal((n, latent_dim))
    basis = gen.standard_normal((latent_dim, 784)) / np.sqrt(latent_dim)
    X = 1 / (1 + np.exp(-(latent @ basis)))
    y = np.argmax(latent @ gen.standard_normal((latent_dim, 10)), axis=1)
    return X.astype(np.float32), y


@needs_bf16
@pytest.mark.usefixtures("one_thread")
def test_accuracy_on_digits_within_half_a_point_of_fp32():
    X, y = fn.datasets.load_digits()
    with fn.use_backend("cython"):
        assert accuracy_gap(X / 16, y, [64, 128, 10], epochs=20, batch=32, lr=0.05) < 0.5


@needs_bf16
@pytest.mark.usefixtures("one_thread")
def test_accuracy_on_a_harder_mnist_shaped_task_within_half_a_point_of_fp32():
    X, y = mnist_shaped_task(8000, rng(14))
    with fn.use_backend("cython"):
        assert accuracy_gap(X, y, [784, 128, 10], epochs=12, batch=64, lr=0.01) < 0.5
