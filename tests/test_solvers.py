"""Full-batch and second-order solvers (fastnn.solvers) on every backend."""
import numpy as np
import pytest

import fastnn as fn
from fastnn import kernels
from fastnn.solvers import Objective


@pytest.fixture(params=kernels.BACKENDS)
def active_backend(request):
    with fn.use_backend(request.param):
        yield request.param


def noisy_sine(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(-3, 3, n)[:, None]
    return x, np.sin(x) + 0.1 * rng.standard_normal(x.shape)


def sine_net(l2=0.0):
    return fn.Sequential([
        fn.Dense(1, 16, activation="tanh", dtype="float64", seed=0, l2=l2),
        fn.Dense(16, 1, dtype="float64", seed=1),
    ])


SOLVERS = {
    "gradient_descent": lambda: fn.solvers.GradientDescent(lr=0.2),
    "lbfgs": lambda: fn.solvers.LBFGS(),
    "bfgs": lambda: fn.solvers.BFGS(),
    "cg_polak_ribiere": lambda: fn.solvers.ConjugateGradient("polak-ribiere"),
    "cg_fletcher_reeves": lambda: fn.solvers.ConjugateGradient("fletcher-reeves"),
    "lm_dense": lambda: fn.solvers.LevenbergMarquardt(matrix_free=False),
    "lm_matrix_free": lambda: fn.solvers.LevenbergMarquardt(matrix_free=True),
    "newton": lambda: fn.solvers.Newton(),
    "newton_cg": lambda: fn.solvers.NewtonCG(),
}


def adam_loss_after(n_steps, x, y):
    model = sine_net()
    model.compile("mse", fn.optimizers.Adam())
    return model.fit(x, y, epochs=n_steps, batch_size=None, verbose=0).history["loss"][-1]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_beats_adam_with_equal_gradient_evaluations(active_backend, name):
    x, y = noisy_sine()
    model = sine_net()
    model.compile("mse", SOLVERS[name](), metrics=["r2"])
    history = model.fit(x, y, epochs=40, verbose=0)
    solver_loss = history.history["loss"][-1]
    assert np.isfinite(solver_loss)
    assert history.n_evaluations >= len(history.epoch) >= 1
    assert solver_loss < adam_loss_after(history.n_evaluations, x, y), (name, solver_loss)
    assert solver_loss == pytest.approx(model.evaluate(x, y)["loss"], rel=1e-9)


@pytest.mark.parametrize("name", ["lbfgs", "cg_polak_ribiere"])
def test_lbfgs_and_cg_train_digits(active_backend, name):
    X, y = fn.datasets.load_digits(scale=True)
    X_train, X_test, y_train, y_test = fn.datasets.train_test_split(X, y, seed=0,
                                                                    stratify=True)
    model = fn.Sequential([fn.Dense(64, 32, activation="tanh", seed=0, l2=1e-4),
                           fn.Dense(32, 10, seed=1)])
    model.compile("cross_entropy", SOLVERS[name](), metrics=["accuracy"])
    model.fit(X_train, y_train, epochs=150, verbose=0)
    assert model.evaluate(X_test, y_test)["accuracy"] >= 0.95


def test_per_sample_grad_kernel_matches_numpy(active_backend):
    rng = np.random.default_rng(3)
    ref = kernels.load("numpy")
    k = kernels.load(active_backend)
    for dtype, rtol in ((np.float32, 1e-6), (np.float64, 1e-12)):
        for n, d, m in ((1, 1, 1), (7, 13, 5), (32, 64, 10)):
            x = rng.standard_normal((n, d)).astype(dtype)
            dz = rng.standard_normal((n, m)).astype(dtype)
            for use_bias in (True, False):
                width = 3 + d * m + m + 2
                expected = np.full((n, width), 7.0, dtype=dtype)
                got = expected.copy()
                ref.dense_per_sample_grad(x, dz, expected, 3, use_bias)
                x.setflags(write=False)
                k.dense_per_sample_grad(x, dz, got, 3, use_bias)
                x.setflags(write=True)
                np.testing.assert_allclose(got, expected, rtol=rtol,
                                           err_msg=f"{dtype} {n}x{d}->{m} bias={use_bias}")


@pytest.mark.parametrize("weighted", [False, True])
def test_jacobian_matches_finite_differences(active_backend, weighted):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((9, 3))
    y = rng.standard_normal((9, 2))
    w = rng.uniform(0.5, 2.0, 9) if weighted else None
    model = fn.Sequential([fn.Dense(3, 4, activation="elu", dtype="float64", seed=0),
                           fn.Activation("tanh", dtype="float64"),
                           fn.Dense(4, 2, activation="sigmoid", dtype="float64", seed=1),
                           fn.Dense(2, 2, dtype="float64", seed=2, use_bias=False)])
    model.compile("mse", fn.solvers.LevenbergMarquardt())
    X, target, weights = model._prepare(X, y, w)
    objective = Objective(model, X, target, weights)
    p0 = model.params.copy()
    J = objective.jacobian(p0)
    scale = objective._residual_scale()

    def residuals(p):
        model.params[...] = p
        return ((model.forward(X) - y) * scale[:, None]).T.ravel()

    eps = 1e-6
    numeric = np.empty_like(J)
    for i in range(p0.size):
        e = np.zeros_like(p0)
        e[i] = eps
        numeric[:, i] = (residuals(p0 + e) - residuals(p0 - e)) / (2 * eps)
    np.testing.assert_allclose(J, numeric, rtol=1e-6, atol=1e-8)
    # and the products used by the matrix-free mode agree with the dense J
    model.params[...] = p0
    model._forward(X, False)
    v = rng.standard_normal(p0.size)
    u = rng.standard_normal((9, 2))
    np.testing.assert_allclose(objective.jvp(v).T.ravel(), J @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(objective.jtvp(u), J.T @ u.T.ravel(), rtol=1e-9, atol=1e-12)


def test_matrix_free_lm_matches_dense_steps(active_backend):
    x, y = noisy_sine(60)
    runs = {}
    for matrix_free in (False, True):
        model = sine_net(l2=1e-3)
        model.compile("mse", fn.solvers.LevenbergMarquardt(matrix_free=matrix_free))
        steps = []
        for _ in range(5):
            model.fit(x, y, epochs=1, verbose=0)
            steps.append(model.params.copy())
        runs[matrix_free] = np.array(steps)
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-6, atol=1e-8)


def test_lm_auto_switches_to_matrix_free_when_dense_is_too_big():
    x, y = noisy_sine(50)
    model = sine_net()
    solver = fn.solvers.LevenbergMarquardt(max_dense_bytes=1000)
    model.compile("mse", solver)
    model.fit(x, y, epochs=2, verbose=0)
    assert solver.uses_matrix_free
    solver = fn.solvers.LevenbergMarquardt()
    model.compile("mse", solver)
    model.fit(x, y, epochs=2, verbose=0)
    assert not solver.uses_matrix_free


def test_convergence_reasons_are_reported():
    x, y = noisy_sine(50)
    model = sine_net()
    model.compile("mse", fn.solvers.LBFGS(tol=1e-3))
    history = model.fit(x, y, epochs=500, verbose=0)
    assert history.stop_reason.startswith("converged"), history.stop_reason
    assert len(history.epoch) < 500

    model = sine_net()
    model.compile("mse", fn.solvers.GradientDescent(lr=0.05))
    history = model.fit(x, y, epochs=3, verbose=0)
    assert history.stop_reason == "reached the maximum of 3 iterations"

    model = sine_net()
    model.compile("mse", fn.solvers.LevenbergMarquardt(ftol=1e-3))
    history = model.fit(x, y, epochs=500, verbose=0)
    assert "converged" in history.stop_reason and "ftol" in history.stop_reason


def test_solvers_honour_callbacks_validation_and_history(tmp_path):
    x, y = noisy_sine(80)
    model = sine_net()
    model.compile("mse", fn.solvers.LBFGS(), metrics=["mae"])
    ckpt = tmp_path / "best.npz"
    history = model.fit(x, y, epochs=300, verbose=0, validation_data=(x[::3], y[::3]),
                        callbacks=[fn.callbacks.EarlyStopping(monitor="loss", patience=0,
                                                              min_delta=1.0),
                                   fn.callbacks.ModelCheckpoint(ckpt)])
    assert len(history.epoch) == 2  # the second iteration does not improve by min_delta
    assert history.stop_reason.startswith("early stopping")
    assert set(history.history) == {"loss", "mae", "val_loss", "val_mae"}
    assert ckpt.exists()
    reloaded = fn.load_model(ckpt)
    assert isinstance(reloaded.optimizer, fn.solvers.LBFGS)


def test_solvers_use_sample_weights_and_regularization():
    x, y = noisy_sine(40)
    w = np.r_[np.ones(20), np.zeros(20)]
    weighted = sine_net(l2=1e-2)
    weighted.compile("mse", fn.solvers.LevenbergMarquardt())
    weighted.fit(x, y, sample_weight=w, epochs=5, verbose=0)
    half = sine_net(l2=1e-2)
    half.compile("mse", fn.solvers.LevenbergMarquardt())
    half.fit(x[:20], y[:20], epochs=5, verbose=0)
    np.testing.assert_allclose(weighted.params, half.params, rtol=1e-7, atol=1e-10)


def test_solvers_refuse_unsuitable_losses_and_oversized_models():
    classifier = fn.Sequential([fn.Dense(4, 3, seed=0)])
    with pytest.raises(ValueError, match="sum-of-squares"):
        classifier.compile("cross_entropy", fn.solvers.LevenbergMarquardt())
    regressor = fn.Sequential([fn.Dense(4, 1, seed=0)])
    for loss in ("mae", "huber"):
        with pytest.raises(ValueError, match="sum-of-squares"):
            regressor.compile(loss, "levenberg_marquardt")
    big = fn.Sequential([fn.Dense(100, 100, seed=0)])
    with pytest.raises(ValueError, match="max_params"):
        big.compile("mse", fn.solvers.Newton())
    with pytest.raises(ValueError, match="beta"):
        fn.solvers.ConjugateGradient(beta="hestenes")
    with pytest.raises(ValueError, match="unknown optimizer"):
        regressor.compile("mse", "quasi-newton")


def test_solver_names_and_save_load_roundtrip(tmp_path):
    x, y = noisy_sine(50)
    for name in sorted(fn.solvers.SOLVERS):
        model = sine_net()
        model.compile("mse", name)
        assert isinstance(model.optimizer, fn.solvers.SOLVERS[name])
        model.fit(x, y, epochs=2, verbose=0)
        path = tmp_path / f"{name}.npz"
        model.save(path)
        loaded = fn.load_model(path)
        assert type(loaded.optimizer) is type(model.optimizer)
        assert loaded.optimizer.get_config() == model.optimizer.get_config()
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_float32_model_trains_with_lbfgs():
    x, y = noisy_sine(100)
    model = fn.Sequential([fn.Dense(1, 16, activation="tanh", seed=0), fn.Dense(16, 1, seed=1)])
    model.compile("mse", "lbfgs", metrics=["r2"])
    history = model.fit(x, y, epochs=200, verbose=0)
    assert model.params.dtype == np.float32
    assert history.history["r2"][-1] > 0.95
