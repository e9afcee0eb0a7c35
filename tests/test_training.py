"""End to end: gradients checked numerically for every activation x loss, and real
learning tasks (XOR, digits, a noisy sine, multi-label, hinge), every batching mode,
every optimizer name and a schedule, on every backend."""
import numpy as np
import pytest

import fastnn as fn
from _helpers import (  # noqa: F401  (active_backend: fixture)
    ACTIVATIONS,
    LOSSES,
    active_backend,
    blobs,
    linear_threshold_task,
    mlp,
    noisy_sine,
    rng,
    targets_for,
)

pytestmark = pytest.mark.usefixtures("active_backend")

GRADCHECK_TOL = 1e-6


# ---------------------------------------------------------------------------- gradcheck
def gradcheck_case(activation, loss, dtype="float64", n=7, k=3, offset=0, **dense_kwargs):
    gen = rng(offset)
    model = mlp([4, 5, k], activation=activation, dtype=dtype, **dense_kwargs).compile(loss)
    model.layers[0].b[...] = gen.normal(size=5) * 0.5
    return model, gen.normal(size=(n, 4)), targets_for(loss, n, k, gen)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_every_activation_and_loss(activation, loss):
    # Every other case carries l1 + l2 regularization on all weights.
    regularize = (ACTIVATIONS.index(activation) + LOSSES.index(loss)) % 2 == 0
    kwargs = dict(l1=0.003, l2=0.02) if regularize else {}
    model, X, y = gradcheck_case(activation, loss, **kwargs)
    assert fn.gradcheck(model, X, y) <= GRADCHECK_TOL


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_gradcheck_float32_model(loss):
    """gradcheck runs on a float64 copy, so float32 models are checked just as tightly."""
    model, X, y = gradcheck_case("tanh", loss, dtype="float32", l2=0.01, offset=1)
    assert model.dtype == np.float32
    before = model.params.copy()
    assert fn.gradcheck(model, X.astype(np.float32), y) <= GRADCHECK_TOL
    np.testing.assert_array_equal(model.params, before)  # the model itself is untouched


def test_gradcheck_dropout_model_runs_in_inference_mode():
    gen = rng(2)
    model = fn.Sequential([fn.Dense(4, 6, activation="relu", dtype="float64", seed=0),
                           fn.Dropout(0.5, seed=0, dtype="float64"),
                           fn.Dense(6, 3, dtype="float64", seed=1)])
    model.compile("cross_entropy")
    X, y = gen.normal(size=(8, 4)), gen.integers(0, 3, size=8)
    assert fn.gradcheck(model, X, y) <= GRADCHECK_TOL


def test_gradcheck_deep_model_with_activation_layers_and_no_bias():
    gen = rng(3)
    model = fn.Sequential([
        fn.Dense(3, 5, dtype="float64", seed=0), fn.ELU(0.7, dtype="float64"),
        fn.Dense(5, 4, activation="softplus", dtype="float64", seed=1, use_bias=False),
        fn.Sigmoid(dtype="float64"), fn.Dense(4, 2, dtype="float64", seed=2, l1=0.01)])
    model.compile({"name": "huber", "delta": 0.5})
    X, y = gen.normal(size=(6, 3)), 2 * gen.normal(size=(6, 2))
    assert fn.gradcheck(model, X, y) <= GRADCHECK_TOL


def test_gradcheck_with_sample_weight_and_probability_rows():
    gen = rng(4)
    model, X, _ = gradcheck_case("leaky_relu", "cross_entropy", offset=5)
    rows = gen.dirichlet(np.ones(3), size=len(X))
    w = gen.uniform(0, 2, size=len(X))
    assert fn.gradcheck(model, X, rows, sample_weight=w) <= GRADCHECK_TOL


def test_gradcheck_on_a_subset_of_a_large_model():
    gen = rng(6)
    model = mlp([10, 40, 3], activation="tanh", dtype="float64").compile("cross_entropy")
    assert model.n_params > 300
    X, y = gen.normal(size=(5, 10)), gen.integers(0, 3, size=5)
    assert fn.gradcheck(model, X, y, max_params=60) <= GRADCHECK_TOL


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    model, X, y = gradcheck_case("tanh", "mse", offset=7, l2=0.01)
    original = fn.Dense.add_regularization_gradient

    def wrong(layer):
        original(layer)
        layer.dW *= 1.01

    monkeypatch.setattr(fn.Dense, "add_regularization_gradient", wrong)
    assert fn.gradcheck(model, X, y) > 1e-3


# ---------------------------------------------------------------------------- learning tasks
def test_xor_is_solved_by_a_two_layer_mlp():
    X, y = fn.datasets.xor()
    model = mlp([2, 8, 2], activation="tanh")
    model.compile("cross_entropy", fn.optimizers.Adam(lr=0.05), metrics=["accuracy"])
    model.fit(X, y, epochs=300, batch_size=None, verbose=0, seed=0)
    np.testing.assert_array_equal(model.predict(X).argmax(axis=1), y)
    assert model.evaluate(X, y)["loss"] < 0.05


def test_digits_reach_96_percent():
    X, y = fn.datasets.load_digits(scale=True)
    X_train, X_test, y_train, y_test = fn.datasets.train_test_split(
        X, y, test_size=0.25, seed=0, stratify=True)
    model = mlp([64, 128, 64, 10], activation="relu")
    model.compile("cross_entropy", fn.optimizers.Adam(lr=1e-3), metrics=["accuracy"])
    model.fit(X_train, y_train, epochs=30, batch_size=32, verbose=0, seed=0)
    assert model.evaluate(X_test, y_test)["accuracy"] >= 0.96


def test_regression_fits_a_noisy_sine():
    gen = rng(7)
    x, y = noisy_sine(300, gen, noise=0.1)
    x_test, y_test = noisy_sine(200, gen, noise=0.1)
    model = mlp([1, 32, 1], activation="tanh")
    model.compile("mse", fn.optimizers.Adam(lr=0.02), metrics=["r2", "mae"])
    history = model.fit(x, y, epochs=80, batch_size=32, verbose=0, seed=0)
    assert history.history["r2"][-1] >= 0.95
    assert model.evaluate(x_test, y_test)["r2"] >= 0.95


def test_multilabel_binary_cross_entropy():
    X, Y = linear_threshold_task(600, rng(8))
    model = mlp([5, 16, 3], activation="relu")
    model.compile("binary_cross_entropy", fn.optimizers.Adam(lr=0.01), metrics=["accuracy"])
    model.fit(X[:400], Y[:400], epochs=20, batch_size=32, verbose=0, seed=0)
    assert model.evaluate(X[400:], Y[400:])["accuracy"] >= 0.9
    prob = model.predict(X[400:])
    assert prob.shape == (200, 3) and ((prob >= 0) & (prob <= 1)).all()
    assert np.mean((prob > 0.5) == (Y[400:] > 0.5)) >= 0.9


def test_hinge_loss_classifier():
    X, y = fn.datasets.spirals(n=100, classes=3, noise=0.2, seed=0)
    X_train, X_test, y_train, y_test = fn.datasets.train_test_split(
        X, y, seed=0, stratify=True)
    model = mlp([2, 32, 3], activation="relu")
    model.compile("hinge", fn.optimizers.Adam(lr=0.01), metrics=["accuracy"])
    model.fit(X_train, y_train, epochs=100, batch_size=32, verbose=0, seed=0)
    assert model.evaluate(X_test, y_test)["accuracy"] >= 0.85  # chance is 1/3


def small_classification():
    return blobs(20, rng(9))


@pytest.mark.parametrize("replacement", [False, True], ids=["permutation", "replacement"])
@pytest.mark.parametrize("batch_size", [None, 1, 16], ids=["full", "sgd", "minibatch"])
def test_every_batching_mode_trains(batch_size, replacement):
    X, y = small_classification()
    model = mlp([2, 8, 3])
    model.compile("cross_entropy", fn.optimizers.SGD(lr=0.02, momentum=0.9),
                  metrics=["accuracy"])
    before = model.evaluate(X, y)["loss"]
    epochs = {None: 150, 1: 8, 16: 40}[batch_size]
    history = model.fit(X, y, epochs=epochs, batch_size=batch_size, replacement=replacement,
                        verbose=0, seed=0)
    steps_per_epoch = {None: 1, 1: 60, 16: 4}[batch_size]
    assert model.optimizer.iterations == epochs * steps_per_epoch
    after = model.evaluate(X, y)
    assert after["loss"] < 0.1 * before
    assert after["accuracy"] >= 0.95
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_unshuffled_minibatches_train():
    X, y = small_classification()
    model = mlp([2, 8, 3]).compile("cross_entropy", fn.optimizers.Adam(lr=0.05),
                                   metrics=["accuracy"])
    model.fit(X, y, epochs=30, batch_size=16, shuffle=False, verbose=0)
    assert model.evaluate(X, y)["accuracy"] >= 0.95


@pytest.mark.parametrize("name", sorted(fn.optimizers.OPTIMIZERS))
def test_every_optimizer_name_trains(name):
    X, y = small_classification()
    model = mlp([2, 8, 3]).compile("cross_entropy", name, metrics=["accuracy"])
    before = model.evaluate(X, y)["loss"]
    model.fit(X, y, epochs=30, batch_size=8, verbose=0, seed=0)
    after = model.evaluate(X, y)
    assert after["loss"] < 0.5 * before
    assert after["accuracy"] >= 0.95


def test_inverse_sqrt_schedule_trains():
    X, y = small_classification()
    optimizer = fn.optimizers.SGD(lr=fn.schedules.InverseSqrt(0.5))
    model = mlp([2, 8, 3]).compile("cross_entropy", optimizer, metrics=["accuracy"])
    model.fit(X, y, epochs=20, batch_size=8, verbose=0, seed=0)
    assert optimizer.iterations == 20 * 8
    assert optimizer.current_lr() == pytest.approx(0.5 / np.sqrt(161))
    assert model.evaluate(X, y)["accuracy"] >= 0.95


def test_dropout_and_float64_models_train():
    X, y = small_classification()
    model = fn.Sequential([fn.Dense(2, 16, activation="relu", seed=0, dtype="float64"),
                           fn.Dropout(0.2, seed=0, dtype="float64"),
                           fn.Dense(16, 3, seed=1, dtype="float64")])
    model.compile("cross_entropy", fn.optimizers.Adam(lr=0.02), metrics=["accuracy"])
    model.fit(X, y, epochs=40, batch_size=8, verbose=0, seed=0)
    assert model.params.dtype == np.float64
    assert model.evaluate(X, y)["accuracy"] >= 0.95


# ---------------------------------------------------------------------------- epochs=0
@pytest.mark.parametrize("optimizer", sorted(fn.optimizers.OPTIMIZERS) + sorted(fn.solvers.SOLVERS))
def test_zero_epochs_leave_the_weights_untouched(optimizer):
    gen = rng(40)
    X, y = gen.normal(size=(30, 3)), gen.normal(size=(30, 2))
    model = mlp([3, 4, 2], dtype="float64").compile("mse", optimizer)
    before = model.get_weights()
    history = model.fit(X, y, epochs=0, verbose=0)
    assert history.epoch == [] and history.n_evaluations <= 1
    for w, w0 in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, w0)


# ---------------------------------------------------------------------------- zero weights
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_a_batch_whose_weights_are_all_zero_makes_no_step(optimizer):
    """A mini-batch of zero weight mass carries no data: no loss (not 0/0 = NaN), no
    update, momentum and update count untouched; the fit equals one without it."""
    gen = rng(43)
    X, y = gen.normal(size=(48, 3)), gen.integers(0, 3, 48)
    w = gen.uniform(0.5, 2.0, 48)
    w[16:32] = 0.0  # the second batch of 16

    def fitted(X, y, w):
        opt = (fn.optimizers.SGD(lr=0.1, momentum=0.9) if optimizer == "sgd_momentum"
               else fn.optimizers.Adam(lr=0.01))
        model = mlp([3, 5, 3], dtype="float64").compile("cross_entropy", opt, ["accuracy"])
        history = model.fit(X, y, epochs=3, batch_size=16, shuffle=False,
                            sample_weight=w, verbose=0)
        return model, history

    model, history = fitted(X, y, w)
    keep = np.r_[0:16, 32:48]
    alone, history_alone = fitted(X[keep], y[keep], w[keep])
    assert model.optimizer.iterations == alone.optimizer.iterations == 6
    assert history.n_evaluations == 6
    np.testing.assert_allclose(model.params, alone.params, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(history.history["loss"], history_alone.history["loss"],
                               rtol=1e-12)
    # accuracy counts the samples of the steps made
    np.testing.assert_allclose(history.history["accuracy"], history_alone.history["accuracy"])


def test_an_epoch_that_draws_only_zero_weights_stops_with_a_clear_error():
    """With replacement an epoch may draw no sample that weighs anything: no step, no
    loss (0/0); fit says so instead of logging NaN."""
    gen = rng(44)
    X, y = gen.normal(size=(40, 3)), gen.integers(0, 3, 40)
    w = np.zeros(40)
    w[7] = 1.0  # an epoch of 40 draws misses sample 7 with probability 0.36
    model = mlp([3, 5, 3], dtype="float64").compile("cross_entropy", "sgd", ["accuracy"])
    with pytest.raises(ValueError, match="every sample drawn in this epoch has sample "
                                         "weight 0.*replacement=False"):
        model.fit(X, y, epochs=50, batch_size=40, replacement=True, sample_weight=w,
                  verbose=0, seed=3)
    assert model.optimizer.iterations == 5  # epochs 1-5 drew sample 7, epoch 6 did not
    assert len(model.history.history["loss"]) == 5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_steps_counted_after_a_divergence_leave_out_zero_weight_batches():
    """History.n_evaluations counts the steps made; the message names the batch."""
    gen = rng(45)
    X, y = gen.normal(size=(16, 3)), gen.normal(size=(16, 2))
    y[12:] = 1e200  # batch 4 of 4 overflows the squared error
    w = np.ones(16)
    w[4:8] = 0.0    # batch 2 weighs nothing
    model = mlp([3, 4, 2], dtype="float64").compile("mse", "sgd")
    history = model.fit(X, y, epochs=2, batch_size=4, shuffle=False, sample_weight=w,
                        verbose=0, callbacks=[fn.callbacks.TerminateOnNaN()])
    assert "at epoch 1, batch 4" in history.stop_reason
    assert history.n_evaluations == model.optimizer.iterations == 2


def test_a_refused_fit_fixes_no_class_labels():
    """The labels a refused fit would have coded do not constrain the next fit."""
    gen = rng(46)
    X = gen.normal(size=(30, 3))
    names = np.array(["ant", "bee", "cat"])[gen.integers(0, 3, 30)]
    model = mlp([3, 5, 3], dtype="float64").compile("cross_entropy", "sgd")
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(X[:20], np.where(names[:20] == "cat", "bee", names[:20]),
                  validation_split=1.5, verbose=0)
    assert model.class_labels is None
    model.fit(X, names, epochs=1, verbose=0)
    assert model.class_labels.classes.tolist() == ["ant", "bee", "cat"]


# ---------------------------------------------------------------------------- class_weight
@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_class_weight_is_refused_for_regression_losses(loss):
    gen = rng(41)
    X, y = gen.normal(size=(20, 3)), gen.uniform(-1, 0, size=(20, 1))
    model = mlp([3, 4, 1]).compile(loss, "sgd")
    with pytest.raises(ValueError, match="class_weight needs a classification loss.*"
                                         + loss):
        model.fit(X, y, class_weight={0: 1.0, 1: 2.0}, verbose=0)


def test_class_weight_refuses_soft_binary_targets():
    gen = rng(42)
    X, y = gen.normal(size=(20, 3)), gen.uniform(0, 1, size=(20, 1))
    model = mlp([3, 4, 1]).compile("binary_cross_entropy", "sgd")
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        model.fit(X, y, class_weight={0: 1.0, 1: 2.0}, verbose=0)


# ---------------------------------------------------------------------------- Keras parity
def small_classifier(k=3, loss="cross_entropy"):
    return mlp([2, 8, k], activation="relu").compile(loss, fn.optimizers.Adam(lr=0.05),
                                                      metrics=["accuracy"])


def test_summary_prints_the_table(capsys):
    small_classifier().summary()
    out = capsys.readouterr().out
    assert "Dense(2, 8, activation='relu')" in out and "Total params: 51 (float32)" in out


@pytest.mark.parametrize("verbose, prints", [(False, False), (True, True)])
def test_verbose_accepts_bools(capsys, monkeypatch, verbose, prints):
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    X, y = blobs(14, rng(50))
    small_classifier().fit(X, y, epochs=2, verbose=verbose)
    assert (capsys.readouterr().out != "") is prints


def test_history_values_are_python_floats():
    X, y = blobs(14, rng(51))
    history = small_classifier().fit(X, y, epochs=2, validation_split=0.25, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(type(v) is float for values in history.history.values() for v in values)


def test_stop_reason_names_the_callback_that_stopped():
    class StopAfterFour(fn.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:
                self.model.stop_training = True

    X, y = blobs(14, rng(52))
    history = small_classifier().fit(X, y, epochs=10, callbacks=[StopAfterFour()], verbose=0)
    assert len(history.epoch) == 4
    assert history.stop_reason == "stopped by StopAfterFour after epoch 4"


def test_predict_classes_returns_labels():
    X, y = blobs(20, rng(53))
    model = small_classifier()
    model.fit(X, y, epochs=30, verbose=0, seed=0)
    classes = model.predict_classes(X)
    assert classes.shape == (60,) and classes.dtype.kind == "i"
    np.testing.assert_array_equal(classes, model.predict(X).argmax(axis=1))
    assert np.mean(classes == y) > 0.9
    binary = mlp([2, 4, 1]).compile("binary_cross_entropy")
    np.testing.assert_array_equal(binary.predict_classes(X), binary.predict(X)[:, 0] > 0.5)
    multi = mlp([2, 4, 3]).compile("binary_cross_entropy")
    assert multi.predict_classes(X).shape == (60, 3)
    with pytest.raises(ValueError, match="predict_classes needs a classification loss.*'mse'"):
        mlp([2, 4, 1]).compile("mse").predict_classes(X)


def test_class_weight_balanced_uses_sklearns_formula():
    X = rng(54).normal(size=(40, 2))
    y = np.array([0] * 30 + [1] * 8 + [2] * 2)
    model = small_classifier()
    balanced = {0: 40 / (3 * 30), 1: 40 / (3 * 8), 2: 40 / (3 * 2)}
    model.set_weights(small_classifier().get_weights())
    start = model.get_weights()
    a = model.fit(X, y, epochs=2, class_weight="balanced", seed=1, verbose=0).history["loss"]
    model.set_weights(start)
    model.compile("cross_entropy", fn.optimizers.Adam(lr=0.05), metrics=["accuracy"])
    b = model.fit(X, y, epochs=2, class_weight=balanced, seed=1, verbose=0).history["loss"]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="'balanced', got 'balance'"):
        model.fit(X, y, class_weight="balance", verbose=0)


def test_progress_bar_per_epoch_keeps_a_line_with_validation_metrics(capsys):
    pytest.importorskip("tqdm")
    X, y = blobs(14, rng(55))
    small_classifier().fit(X, y, epochs=3, validation_split=0.25, verbose=1)
    err = capsys.readouterr().err
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3 - loss=" in err
    assert err.count("val_loss=") == 3


def test_solver_progress_counts_iterations(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    x = np.linspace(-2, 2, 30).reshape(-1, 1)
    model = mlp([1, 6, 1], dtype="float64").compile("mse", "lbfgs")
    history = model.fit(x, np.sin(x), epochs=3, verbose=2)
    assert history.unit == "iteration"
    assert capsys.readouterr().out.startswith("iteration 1/3 - loss=")


def test_history_plot_lr_log_axis_and_solver_labels(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = blobs(14, rng(56))
    cb = fn.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5,
                                        min_delta=10.0)
    history = small_classifier().fit(X, y, epochs=3, callbacks=[cb], verbose=0)
    assert "lr" in history.history
    fig = history.plot(tmp_path / "h.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "lr" in titles
    assert fig.axes[titles.index("lr")].get_yscale() == "log"
    assert fig.axes[titles.index("loss")].get_yscale() == "linear"
    x = np.linspace(-2, 2, 30).reshape(-1, 1)
    solver = mlp([1, 6, 1], dtype="float64").compile("mse", "lbfgs")
    fig = solver.fit(x, np.sin(x), epochs=3, verbose=0).plot(tmp_path / "s.png")
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_xlabel() == "iteration"


# ---------------------------------------------------------------------------- fit arguments
@pytest.mark.parametrize("name", ["shuffle", "replacement"])
@pytest.mark.parametrize("value", ["no", "yes", 1, None])
def test_fit_flags_take_bools_only(name, value):
    X, y = blobs(5, rng(57))
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        small_classifier().fit(X, y, verbose=0, **{name: value})


def test_fit_accepts_numpy_bools_and_a_single_callback():
    X, y = blobs(5, rng(58))
    stopper = fn.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=100.0)
    history = small_classifier().fit(X, y, epochs=5, shuffle=np.bool_(False),
                                     callbacks=stopper, verbose=0)
    assert history.stop_reason.startswith("early stopping")


def test_fit_refuses_a_callback_class_and_non_callbacks_by_name():
    X, y = blobs(5, rng(59))
    with pytest.raises(TypeError, match=r"callbacks\[0\] is the class TerminateOnNaN"):
        small_classifier().fit(X, y, callbacks=[fn.callbacks.TerminateOnNaN], verbose=0)
    with pytest.raises(TypeError, match="callbacks must be a fastnn.callbacks.Callback"):
        small_classifier().fit(X, y, callbacks=5, verbose=0)


def test_a_failed_compile_leaves_the_model_as_it_was():
    X, y = blobs(5, rng(64))
    model = small_classifier()
    loss, optimizer, metrics = model.loss, model.optimizer, model.metrics
    with pytest.raises(ValueError, match="LevenbergMarquardt needs a sum-of-squares loss"):
        model.compile("hinge", fn.solvers.LevenbergMarquardt(), metrics=["accuracy"])
    assert (model.loss, model.optimizer, model.metrics) == (loss, optimizer, metrics)
    fresh = mlp([2, 3])
    with pytest.raises(ValueError):
        fresh.compile("cross_entropy", fn.solvers.LevenbergMarquardt())
    assert fresh.loss is None and fresh.optimizer is None
    model.fit(X, y, epochs=1, verbose=0)


def test_prepared_data_trains_as_checked_data():
    """fit(prepared=True), for callers that checked X and the target themselves (the
    sklearn estimators), trains exactly as the checked path on the same data."""
    from fastnn import _training

    X, y = blobs(30, rng(2))
    histories, weights = [], []
    for prepared in (False, True):
        model = mlp([X.shape[1], 8, 3], seed=0).compile(
            "cross_entropy", fn.optimizers.Adam(lr=0.01), metrics=["accuracy"])
        data, target = model._prepare(X, y, None)[:2]
        histories.append(_training.fit(model, data, target, epochs=3, batch_size=16,
                                       verbose=0, seed=5, prepared=prepared).history)
        weights.append(model.params.copy())
    assert histories[0] == histories[1]
    np.testing.assert_array_equal(weights[0], weights[1])
