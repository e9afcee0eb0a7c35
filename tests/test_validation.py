"""Bad input at every public entry point: ValueError or TypeError naming the argument
(and what was expected); and input that is merely inconvenient (non-contiguous,
float64 for a float32 model, integer, lists) is converted, giving the same result."""
import os
import re
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest

import fastnn as fn
from _helpers import active_backend, mlp, rng  # noqa: F401  (active_backend: fixture)

pytestmark = pytest.mark.usefixtures("active_backend")

N, D, K = 12, 3, 4


@pytest.fixture
def data():
    gen = rng()
    return gen.normal(size=(N, D)).astype(np.float32), gen.integers(0, K, size=N)


@pytest.fixture
def model():
    return mlp([D, 5, K]).compile("cross_entropy", "adam", metrics=["accuracy"])


def regression_model(k=2, loss="mse"):
    return mlp([D, 5, k]).compile(loss)


# ---------------------------------------------------------------------------- X
@pytest.mark.parametrize("method", ["fit", "evaluate", "compute_gradients"])
def test_X_problems_are_named(model, data, method):
    X, y = data
    call = getattr(model, method)
    with pytest.raises(ValueError, match=r"X must be 2-D, got 1-D"):
        call(X[:, 0], y)
    with pytest.raises(ValueError, match=r"X must be 2-D, got 3-D"):
        call(X[:, :, None], y)
    with pytest.raises(ValueError, match=r"X has 2 features per sample, but the model expects 3"):
        call(X[:, :2], y)
    with pytest.raises(ValueError, match=r"X must not be empty"):
        call(X[:0], y[:0])
    for bad in (np.nan, np.inf, -np.inf):
        Xb = X.copy()
        Xb[3, 1] = bad
        with pytest.raises(ValueError, match=r"X contains 1 NaN or infinite value"):
            call(Xb, y)
    with pytest.raises(ValueError, match=r"y has 11 samples but X has 12"):
        call(X, y[:-1])
    with pytest.raises(TypeError, match=r"X must hold numbers"):
        call(np.array([["a"] * D] * N), y)
    with pytest.raises(TypeError, match=r"X must be array-like"):
        call(None, y)
    with pytest.raises(TypeError, match=r"X must be real"):
        call(X.astype(np.complex64), y)


@pytest.mark.parametrize("method", ["predict", "forward"])
def test_inference_input_problems(model, data, method):
    X, _ = data
    call = getattr(model, method)
    with pytest.raises(ValueError, match=r"X has 4 features per sample, but the model expects 3"):
        call(np.ones((2, 4)))
    with pytest.raises(ValueError, match="X must be 2-D"):
        call(np.ones(3))
    with pytest.raises(ValueError, match="X must not be empty"):
        call(np.ones((0, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        call(X, batch_size=0)


# ---------------------------------------------------------------------------- labels / targets
@pytest.mark.parametrize("loss", ["cross_entropy", "hinge"])
def test_class_labels_are_checked(data, loss):
    X, y = data
    model = mlp([D, 5, K]).compile(loss)
    with pytest.raises(ValueError, match=r"y must be class labels in \[0, 3\].*to 4"):
        model.fit(X, np.where(y == 0, K, y), verbose=0)
    with pytest.raises(ValueError, match=r"y must be class labels in \[0, 3\].*from -1"):
        model.evaluate(X, np.where(y == 0, -1, y))
    with pytest.raises(ValueError, match=r"y must hold integer class labels, got "
                                         r"non-integer values such as 3.5"):
        model.compute_gradients(X, y + 0.5)
    with pytest.raises(ValueError, match=r"y contains NaN"):
        model.fit(X, np.where(y == 0, np.nan, y), verbose=0)
    with pytest.raises(ValueError, match=r"y has 0 samples but X has 12"):
        model.evaluate(X, y[:0])


def test_label_shapes(model, data):
    X, y = data
    model.fit(X, y[:, None], epochs=1, verbose=0)  # a column of labels is fine
    with pytest.raises(ValueError, match=r"y probability rows must have 4 columns"):
        model.fit(X, np.ones((N, 3)) / 3, verbose=0)
    with pytest.raises(ValueError, match=r"y probability rows must lie in \[0, 1\]"):
        model.fit(X, np.full((N, K), 2.0), verbose=0)
    with pytest.raises(ValueError, match=r"y must be a 1-D vector of class labels"):
        mlp([D, 5, K]).compile("hinge").fit(X, np.ones((N, K)), verbose=0)


def test_binary_cross_entropy_targets_in_unit_interval(data):
    X, _ = data
    model = regression_model(k=2, loss="binary_cross_entropy")
    targets = (rng(1).random((N, 2)) < 0.5).astype(np.float32)
    model.fit(X, targets, epochs=1, verbose=0)
    for bad in (2.0, -0.5):
        t = targets.copy()
        t[0, 0] = bad
        with pytest.raises(ValueError, match=r"y for binary_cross_entropy must lie in \[0, 1\]"):
            model.fit(X, t, verbose=0)
    with pytest.raises(ValueError, match=r"y must have 2 column\(s\).*got shape \(12, 3\)"):
        model.fit(X, np.zeros((N, 3)), verbose=0)


def test_regression_targets(data):
    X, _ = data
    model = regression_model(k=1)
    model.fit(X, np.zeros(N), epochs=1, verbose=0)  # 1-D y for one output is a column
    with pytest.raises(ValueError, match=r"y must have 1 column\(s\).*got shape \(12, 2\)"):
        model.fit(X, np.zeros((N, 2)), verbose=0)
    with pytest.raises(ValueError, match=r"y contains 1 NaN or infinite"):
        model.fit(X, np.r_[np.inf, np.zeros(N - 1)], verbose=0)
    with pytest.raises(ValueError, match=r"y must be 2-D, got 3-D"):
        model.evaluate(X, np.zeros((N, 1, 1)))


def test_output_count_must_suit_the_loss():
    one = mlp([D, 1])
    with pytest.raises(ValueError, match=r"cross_entropy needs at least 2 outputs"):
        one.compile("cross_entropy")
    with pytest.raises(ValueError, match=r"hinge needs at least 2 outputs"):
        one.compile("hinge")


# ---------------------------------------------------------------------------- weights
def test_sample_weight_problems(model, data):
    X, y = data
    cases = [
        (-np.ones(N), ValueError, r"sample_weight must be non-negative"),
        (np.zeros(N), ValueError, r"sample_weight must have a positive sum"),
        (np.ones(N - 1), ValueError, r"sample_weight has 11 samples but X has 12"),
        (np.ones((N, 1)), ValueError, r"sample_weight must be 1-D of length 12"),
        (np.r_[np.nan, np.ones(N - 1)], ValueError, r"sample_weight contains 1 NaN"),
        ("heavy", TypeError, r"sample_weight must be array-like"),
    ]
    for w, exc, message in cases:
        with pytest.raises(exc, match=message):
            model.fit(X, y, sample_weight=w, verbose=0)
        with pytest.raises(exc, match=message):
            model.evaluate(X, y, sample_weight=w)
        with pytest.raises(exc, match=message):
            model.compute_gradients(X, y, sample_weight=w)


def test_class_weight_problems(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"class_weight must be a dict"):
        model.fit(X, y, class_weight=[1, 2], verbose=0)
    with pytest.raises(ValueError, match=r"class_weight key 7 is not a class in \[0, 3\]"):
        model.fit(X, y, class_weight={7: 1.0}, verbose=0)
    with pytest.raises(ValueError, match=r"class_weight\[1\] must be in \[0.0, inf\]"):
        model.fit(X, y, class_weight={1: -1.0}, verbose=0)
    with pytest.raises(ValueError, match=r"every sample zero weight"):
        model.fit(X, y, class_weight={c: 0.0 for c in range(K)}, verbose=0)
    with pytest.raises(ValueError, match=r"class_weight needs a classification loss"):
        regression_model(k=2).fit(X, np.zeros((N, 2)), class_weight={0: 1.0}, verbose=0)


# ---------------------------------------------------------------------------- fit arguments
def test_fit_argument_problems(model, data):
    X, y = data
    bad = [
        (dict(epochs=-1), ValueError, r"epochs must be >= 0, got -1"),
        (dict(epochs=2.5), TypeError, r"epochs must be an int, got float"),
        (dict(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
        (dict(batch_size="32"), TypeError, r"batch_size must be an int"),
        (dict(verbose=3), ValueError, r"verbose must be in \[0, 2\], got 3"),
        (dict(seed=-1), ValueError, r"seed must be >= 0"),
        (dict(validation_split=1.0), ValueError, r"validation_split must be in \[0.0, 1.0\)"),
        (dict(validation_split=0.01), ValueError, r"validation_split=0.01 leaves 0 validation"),
        (dict(validation_split=0.2, validation_data=(X, y)), ValueError,
         r"either validation_data or validation_split"),
        (dict(validation_data=X), TypeError, r"validation_data must be a tuple"),
        (dict(validation_data=(X, y, None, None)), TypeError, r"validation_data must be a tuple"),
        (dict(validation_data=(X[:, :2], y)), ValueError, r"X_val has 2 features per sample"),
        (dict(validation_data=(X, y[:-1])), ValueError, r"y_val has 11 samples but X has 12"),
        (dict(validation_data=(X, y + K)), ValueError, r"y_val must be class labels"),
        (dict(callbacks=[print]), TypeError, r"callbacks\[0\] must be a fastnn.callbacks.Callback"),
    ]
    for kwargs, exc, message in bad:
        with pytest.raises(exc, match=message):
            model.fit(X, y, **{"verbose": 0, **kwargs})


def test_validation_split_with_all_training_weight_zero(model, data):
    X, y = data
    w = np.r_[np.zeros(N - 3), np.ones(3)]
    with pytest.raises(ValueError, match=r"sample weights .* are all zero on the training part"):
        model.fit(X, y, sample_weight=w, validation_split=0.25, verbose=0)


def test_validation_split_with_all_validation_weight_zero(model, data):
    """Refused before training (it was a ZeroDivisionError after the first epoch)."""
    X, y = data
    w = np.r_[np.ones(N - 3), np.zeros(3)]
    before = model.params.copy()
    with pytest.raises(ValueError, match=r"sample weights .* are all zero on the "
                                         r"validation part \(the last 3 samples\)"):
        model.fit(X, y, sample_weight=w, validation_split=0.25, verbose=0)
    np.testing.assert_array_equal(model.params, before)


# ---------------------------------------------------------------------------- not compiled
@pytest.mark.parametrize("method", ["fit", "evaluate", "compute_gradients", "predict",
                                    "gradcheck"])
def test_use_before_compile(data, method):
    X, y = data
    model = mlp([D, 5, K])
    call = (lambda: fn.gradcheck(model, X, y)) if method == "gradcheck" else \
        (lambda: model.predict(X)) if method == "predict" else \
        (lambda: getattr(model, method)(X, y))
    with pytest.raises(fn.NotCompiledError, match=r"needs a compiled model: call model.compile"):
        call()
    assert issubclass(fn.NotCompiledError, RuntimeError)
    assert issubclass(fn.NotCompiledError, ValueError)
    model.forward(X)  # raw output needs no loss


def test_gradcheck_argument_problems(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"gradcheck needs a fastnn.Sequential"):
        fn.gradcheck("model", X, y)
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, inf\]"):
        fn.gradcheck(model, X, y, eps=0.0)
    with pytest.raises(ValueError, match=r"max_params must be >= 1"):
        fn.gradcheck(model, X, y, max_params=0)
    with pytest.raises(ValueError, match=r"y must be class labels"):
        fn.gradcheck(model, X, y + K)


# ---------------------------------------------------------------------------- names
def test_unknown_names_list_the_valid_ones():
    model = mlp([D, K])
    with pytest.raises(ValueError, match=r"unknown loss 'crossentropy'; expected one of "
                                         r"\[.*'binary_cross_entropy', 'cross_entropy'"):
        model.compile("crossentropy")
    with pytest.raises(TypeError, match=r"loss must be a name"):
        model.compile(None)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'; expected one of \[.*'adam'"):
        model.compile("mse", "adamm")
    with pytest.raises(TypeError, match=r"optimizer must be a name"):
        model.compile("mse", 0.1)
    with pytest.raises(ValueError, match=r"unknown metric 'precision'; expected one of "
                                         r"\['accuracy'"):
        model.compile("cross_entropy", metrics=["precision"])
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; expected one of "
                                         r"\[.*'elu', .*'relu'"):
        fn.Dense(2, 2, activation="swish")
    with pytest.raises(TypeError, match=r"activation must be a str"):
        fn.Dense(2, 2, activation=np.tanh)
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'"):
        fn.Activation("gelu")
    with pytest.raises(ValueError, match=r"unknown init 'xavier'; expected one of "
                                         r"\['auto', 'glorot_normal'"):
        fn.Dense(2, 2, init="xavier")
    with pytest.raises(ValueError, match=r"activation 'step' has no useful derivative"):
        fn.Dense(2, 2, activation="step")
    with pytest.raises(ValueError, match=r"activation 'step'"):
        fn.Activation("step")


def test_backend_names():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of"):
        fn.set_backend("cuda")
    with pytest.raises(TypeError, match=r"backend must be a str"):
        fn.set_backend(None)


def test_default_backend_imports_no_slower_backend():
    """Training on the default backend must not import the ones after it (numba's
    import alone costs ~0.15 s of startup)."""
    code = ("import sys, numpy as np, fastnn as fn\n"
            "m = fn.Sequential([fn.Dense(4, 3, activation='relu'), fn.Dense(3, 2)])\n"
            "m.compile(loss='cross_entropy', optimizer='sgd')\n"
            "m.fit(np.ones((8, 4), np.float32), np.zeros(8, np.int64), verbose=0)\n"
            "names = ('cython', 'numba', 'numpy')\n"
            "print(fn.get_backend(), ' '.join(n for n in names\n"
            "      if 'fastnn.kernels._' + n in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "FASTNN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), env=env, check=True).stdout.split()
    assert out[1:] == [out[0]], out  # the active backend, and no other, was imported


# ---------------------------------------------------------------------------- constructors
def test_layer_constructor_problems():
    bad = [
        (lambda: fn.Dense(0, 2), ValueError, r"in_features must be >= 1, got 0"),
        (lambda: fn.Dense(2, -1), ValueError, r"out_features must be >= 1"),
        (lambda: fn.Dense("3", 2), TypeError, r"in_features must be an int, got str"),
        (lambda: fn.Dense(2.0, 2), TypeError, r"in_features must be an int, got float"),
        (lambda: fn.Dense(2, 2, l2=-0.1), ValueError, r"l2 must be in \[0.0, inf\]"),
        (lambda: fn.Dense(2, 2, l1=float("nan")), ValueError, r"l1 must be finite"),
        (lambda: fn.Dense(2, 2, dtype="int32"), ValueError,
         r"dtype must be 'float32' or 'float64', got 'int32'"),
        (lambda: fn.Dense(2, 2, dtype=np.float16), ValueError, r"dtype must be 'float32'"),
        (lambda: fn.Dense(2, 2, use_bias=1), TypeError, r"use_bias must be a bool"),
        (lambda: fn.Dense(2, 2, seed=-3), ValueError, r"seed must be >= 0"),
        (lambda: fn.Dense(2, 2, activation="leaky_relu", alpha=-0.1), ValueError,
         r"alpha must be in \[0.0, inf\]"),
        (lambda: fn.Dropout(1.0), ValueError, r"rate must be in \[0.0, 1.0\), got 1.0"),
        (lambda: fn.Dropout(-0.1), ValueError, r"rate must be in"),
        (lambda: fn.Dropout("0.5"), TypeError, r"rate must be a number"),
        (lambda: fn.ELU(alpha="1"), TypeError, r"alpha must be a number"),
    ]
    for make, exc, message in bad:
        with pytest.raises(exc, match=message):
            make()


def test_sequential_construction_problems(tmp_path):
    with pytest.raises(TypeError, match=r"layers\[1\] must be a fastnn layer, got str"):
        fn.Sequential([fn.Dense(2, 3), "relu"])
    with pytest.raises(ValueError, match=r"at least one Dense layer"):
        fn.Sequential([fn.ReLU()])
    with pytest.raises(ValueError, match=r"Dense expects 4 input features, but the previous "
                                         r"layer gives 3"):
        fn.Sequential([fn.Dense(2, 3), fn.Dense(4, 1)])
    with pytest.raises(ValueError, match=r"all layers must share one dtype"):
        fn.Sequential([fn.Dense(2, 3), fn.Dense(3, 1, dtype="float64")])
    empty = fn.Sequential()
    for use in (lambda: empty.compile("mse"), lambda: empty.forward(np.ones((2, 2))),
                empty.summary, lambda: empty.save(tmp_path / "empty.npz")):
        with pytest.raises(ValueError, match=r"this Sequential is empty: add a fastnn.Dense"):
            use()
    assert not any(tmp_path.iterdir())
    model = fn.Sequential([fn.Dense(2, 3)])
    with pytest.raises(TypeError, match=r"layer must be a fastnn layer"):
        model.add(np.tanh)
    with pytest.raises(ValueError, match=r"Dense expects 5 input features"):
        model.add(fn.Dense(5, 1))


def test_optimizer_and_loss_hyperparameter_problems():
    bad = [
        (lambda: fn.optimizers.SGD(momentum=-0.5), ValueError, r"momentum must be in \[0.0"),
        (lambda: fn.optimizers.SGD(nesterov=True), ValueError, r"nesterov=True needs momentum"),
        (lambda: fn.optimizers.SGD(dampening=2.0), ValueError, r"dampening must be in"),
        (lambda: fn.optimizers.SGD(lr=-0.1), ValueError, r"lr must be in \(0.0, inf\]"),
        (lambda: fn.optimizers.SGD(lr="fast"), TypeError, r"lr must be a positive number"),
        (lambda: fn.optimizers.SGD(clipnorm=0.0), ValueError, r"clipnorm must be in \(0.0"),
        (lambda: fn.optimizers.Adam(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in"),
        (lambda: fn.optimizers.Adam(betas=0.9), TypeError, r"betas must be a pair"),
        (lambda: fn.optimizers.Adam(eps=-1e-8), ValueError, r"eps must be in"),
        (lambda: fn.optimizers.RMSprop(alpha=1.5), ValueError, r"alpha must be in \[0.0, 1.0\]"),
        (lambda: fn.optimizers.Adagrad(lr_decay=-1.0), ValueError, r"lr_decay must be in"),
        (lambda: fn.losses.Huber(delta=-1.0), ValueError, r"delta must be in \(0.0"),
        (lambda: fn.losses.Hinge(margin=-1.0), ValueError, r"margin must be in \[0.0"),
        (lambda: fn.callbacks.EarlyStopping(patience=-1), ValueError, r"patience must be >= 0"),
        (lambda: fn.callbacks.EarlyStopping(mode="best"), ValueError, r"mode must be 'auto'"),
        (lambda: fn.callbacks.EarlyStopping(monitor=1), TypeError, r"monitor must be a str"),
        (lambda: fn.callbacks.ReduceLROnPlateau(factor=1.0), ValueError,
         r"factor must be in \(0.0, 1.0\)"),
    ]
    for make, exc, message in bad:
        with pytest.raises(exc, match=message):
            make()


# ---------------------------------------------------------------------------- weights API
def test_set_weights_problems():
    model = mlp([D, 5, K])
    weights = model.get_weights()
    with pytest.raises(ValueError, match=r"weights must be a list of 4 arrays, got 2"):
        model.set_weights(weights[:2])
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape \(3, 5\), got \(5, 3\)"):
        model.set_weights([weights[0].T] + weights[1:])
    bad = [w.copy() for w in weights]
    bad[3][0] = np.nan
    with pytest.raises(ValueError, match=r"weights\[3\] contains 1 NaN"):
        model.set_weights(bad)
    np.testing.assert_array_equal(model.get_weights()[3], weights[3])  # nothing half-written
    with pytest.raises(TypeError, match=r"weights\[1\] must hold numbers"):
        model.set_weights([weights[0], ["x"] * 5] + weights[2:])


def test_layer_forward_problems():
    layer = fn.Dense(3, 2)
    with pytest.raises(ValueError, match=r"x has 4 features per sample, but the layer expects 3"):
        layer.forward(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        layer.forward(np.ones(3))
    with pytest.raises(ValueError, match=r"x contains 1 NaN"):
        layer.forward(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"x must not be empty"):
        fn.ReLU().forward(np.ones((0, 3)))
    layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dout must have the shape of the last output"):
        layer.backward(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"dout contains"):
        layer.backward(np.full((2, 2), np.inf))


# ---------------------------------------------------------------------------- conversion
def test_non_contiguous_and_float64_input_is_converted(model, data):
    X, y = data
    wide = np.asfortranarray(np.repeat(X.astype(np.float64), 2, axis=1))
    strided = wide[:, ::2]                                    # float64, non-contiguous
    assert not strided.flags.c_contiguous and strided.dtype == np.float64
    np.testing.assert_array_equal(strided, X)
    np.testing.assert_array_equal(model.predict(strided), model.predict(X))
    np.testing.assert_array_equal(model.forward(np.asfortranarray(X)), model.forward(X))
    assert model.evaluate(strided, y) == model.evaluate(X, y)
    loss_a, grads_a = model.compute_gradients(strided, y.astype(np.float64))
    loss_b, grads_b = model.compute_gradients(X, y)
    assert loss_a == loss_b
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)
    assert model.predict(X).dtype == np.float32


def test_fit_converts_inputs_identically(data):
    X, y = data
    a, b = mlp([D, 5, K]).compile("cross_entropy"), mlp([D, 5, K]).compile("cross_entropy")
    strided = np.repeat(X.astype(np.float64), 3, axis=0)[::3]
    ha = a.fit(strided, y.astype(np.int32).tolist(), epochs=3, batch_size=4, seed=0, verbose=0)
    hb = b.fit(X, y, epochs=3, batch_size=4, seed=0, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)
    assert ha.history == hb.history


def test_integer_and_list_inputs_are_accepted():
    model = regression_model(k=1)
    X = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(model.predict(X), model.predict(np.array(X, np.float32)))
    model.fit(np.array(X, dtype=np.int64), [1, 2], epochs=1, verbose=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_is_exact(dtype):
    from fastnn._validation import all_finite

    big = np.finfo(dtype).max
    a = np.array([[big, -big], [1.0, 0.0]], dtype=dtype)   # huge but finite
    assert all_finite(a)
    for bad in (np.nan, np.inf, -np.inf):
        for index in ((0, 0), (1, 1)):
            b = a.copy()
            b[index] = bad
            assert not all_finite(b), (bad, index)
    assert all_finite(np.array([1, 2, 3]))                  # integers are finite
    assert all_finite(np.zeros((0, 3), dtype))              # nothing to check
    assert all_finite(np.ones(5, dtype)[::2])               # strided: the exact test
    assert not all_finite(np.array([1.0, np.nan, 2.0], dtype)[1::2])  # strided NaN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dot_finite_is_true_only_for_finite_values(dtype):
    from fastnn._validation import dot_finite

    a = np.linspace(-3, 3, 1001, dtype=dtype).reshape(7, 143)
    assert dot_finite(a)
    for bad in (np.nan, np.inf, -np.inf):
        for index in ((0, 0), (3, 77), (6, 142)):
            b = a.copy()
            b[index] = bad
            assert not dot_finite(b), (bad, index)
    assert dot_finite(np.zeros((0, 4), dtype))
    assert not dot_finite(np.full(4, np.finfo(dtype).max, dtype))  # overflows: no answer


# ---------------------------------------------------------------------------- issue 18
def perceptron_fit_with_shuffle(shuffle, X, y):
    """fit checks ``shuffle`` again: it may have been set after construction."""
    perceptron = fn.Perceptron(max_epochs=1)
    perceptron.shuffle = shuffle
    return perceptron.fit(X, y)


def bool_parameters():
    """(name, make(value)) for every boolean parameter outside Sequential.fit."""
    X2, y2 = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    return [
        ("use_bias", lambda v: fn.Dense(2, 2, use_bias=v)),
        ("training", lambda v: fn.Dropout(0.5, seed=0).forward(np.ones((2, 2)), training=v)),
        ("nesterov", lambda v: fn.optimizers.SGD(momentum=0.9, nesterov=v)),
        ("centered", lambda v: fn.optimizers.RMSprop(centered=v)),
        ("amsgrad", lambda v: fn.optimizers.Adam(amsgrad=v)),
        ("amsgrad", lambda v: fn.optimizers.AdamW(amsgrad=v)),
        ("restore_best_weights", lambda v: fn.callbacks.EarlyStopping(restore_best_weights=v)),
        ("save_best_only", lambda v: fn.callbacks.ModelCheckpoint("m.npz", save_best_only=v)),
        ("append", lambda v: fn.callbacks.CSVLogger("log.csv", append=v)),
        ("shuffle", lambda v: perceptron_fit_with_shuffle(v, X2, y2)),
        ("scale", lambda v: fn.datasets.load_digits(scale=v)),
        ("stratify", lambda v: fn.datasets.train_test_split(X2, y2, 0.5, seed=0, stratify=v)),
    ]


@pytest.mark.parametrize("name, make", bool_parameters(),
                         ids=[f"{i}-{name}" for i, (name, _) in enumerate(bool_parameters())])
def test_boolean_parameters_take_bools_only(name, make):
    """Issue 18, item 9: 'no' and 'yes' were read as True (SGD(nesterov='no') turned
    Nesterov on); numpy bools stay accepted."""
    for value in ("no", "yes", "False", 1, 0, None, 1.0, np.int64(1), [True]):
        with pytest.raises(TypeError, match=rf"{name} must be a bool \(True or False\), got "
                                            rf"{type(value).__name__}"):
            make(value)
    for value in (True, False, np.True_, np.False_):
        make(value)


def test_check_bool_returns_a_python_bool():
    for value in (True, np.True_, False, np.False_):
        result = fn._validation.check_bool(value, "flag")
        assert type(result) is bool and result == bool(value)
    assert fn.optimizers.SGD(momentum=0.9, nesterov=np.True_).get_config()["nesterov"] is True
    assert fn.optimizers.SGD(momentum=0.9, nesterov=False).nesterov is False


@pytest.mark.parametrize("dtype", ["timedelta64[s]", "datetime64[D]"])
def test_time_arrays_are_refused_as_X_and_y(model, data, dtype):
    """Issue 18, item 11: timedelta64 (which numpy counts as an integer) was accepted."""
    X, y = data
    times = np.arange(N * D).reshape(N, D).astype(dtype)
    name = re.escape(dtype)
    for call in (lambda: model.fit(times, y, verbose=0), lambda: model.predict(times),
                 lambda: model.evaluate(times, y)):
        with pytest.raises(TypeError, match=rf"X must hold numbers, got dtype {name}"):
            call()
    with pytest.raises(TypeError, match=rf"y must hold numbers, got dtype {name}"):
        model.fit(X, np.arange(N).astype(dtype), verbose=0)
    with pytest.raises(TypeError, match=rf"y must hold numbers, got dtype {name}"):
        regression_model(k=1).fit(X, np.arange(N).astype(dtype), verbose=0)
    with pytest.raises(TypeError, match=rf"sample_weight must hold numbers, got dtype {name}"):
        model.fit(X, y, sample_weight=np.arange(N).astype(dtype), verbose=0)


def test_values_too_large_for_float32_are_reported_as_overflow(model, data):
    """Issue 18, item 12: 1e300 in float64 input was reported as 'NaN or infinite'."""
    X, y = data
    big = X.astype(np.float64)
    big[2, 1], big[5, 0] = 1e300, -3e200
    overflow = (r"X has 2 value\(s\) that overflow float32 \(largest magnitude 1e\+300, "
                r"float32 holds up to 3.40282e\+38\); scale the data or use dtype='float64'")
    for call in (lambda: model.fit(big, y, verbose=0), lambda: model.predict(big)):
        with pytest.raises(ValueError, match=overflow):
            call()
    with pytest.raises(ValueError, match="x" + overflow[1:]):
        fn.Dense(D, 2).forward(big)
    big[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"X contains 1 NaN or infinite value"):
        model.predict(big)
    wide = mlp([D, 5, K], dtype="float64").compile("cross_entropy")
    wide.fit(np.where(np.isnan(big), 0.0, big) * 1e-300, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"y has 1 value\(s\) that overflow float32 \(largest "
                                         r"magnitude 1e\+39"):
        regression_model(k=1).fit(X, np.r_[1e39, np.zeros(N - 1)], verbose=0)
    with pytest.raises(ValueError, match=r"sample_weight has 1 value\(s\) that overflow float32"):
        model.fit(X, y, sample_weight=np.r_[1e39, np.ones(N - 1)], verbose=0)


@pytest.mark.parametrize("loss", ["cross_entropy", "hinge"])
def test_out_of_range_labels_are_shown_as_given(data, loss):
    """Issue 18, item 12: 1e30 and uint64-max labels were shown after the int64
    conversion (-9223372036854775808, -1), with a RuntimeWarning from the cast."""
    X, y = data
    model = mlp([D, 5, K]).compile(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"y must be class labels in \[0, 3\] \(the model "
                                             r"has 4 outputs\), got values from 0 to 1e\+30$"):
            model.fit(X, np.where(y == 1, 1e30, 0.0), verbose=0)
        with pytest.raises(ValueError, match=r"got values from 0 to 18446744073709551615$"):
            model.fit(X, np.where(y == 1, np.iinfo(np.uint64).max, 0).astype(np.uint64),
                      verbose=0)
        with pytest.raises(ValueError, match=r"got values from -7 to 3$"):
            model.evaluate(X, np.where(y == 0, -7.0, y.astype(np.float64)))


def test_metrics_argument_is_named(data):
    """Issue 18, item 14: compile(metrics=5) said "'int' object is not iterable"."""
    X, y = data
    model = mlp([D, 5, K])
    with pytest.raises(TypeError, match=r"metrics must be a metric name or a list of names "
                                        r"from \['accuracy', 'mae', 'mse', 'r2'\], got int"):
        model.compile("cross_entropy", metrics=5)
    model.compile("cross_entropy", metrics="accuracy")
    assert model.metrics == ("accuracy",)
    assert set(model.evaluate(X, y)) == {"loss", "accuracy"}
    assert mlp([D, 2]).compile("mse", metrics=("mae", "r2")).metrics == ("mae", "r2")
