"""The one-call inference path of Sequential (``dense_stack_forward``).

``forward``, ``predict``, ``predict_classes`` and ``evaluate`` of a stack of Dense (and
Dropout) layers run one kernel call per chunk; each is compared here with the
layer-by-layer pass ``model._forward(X, training=False)`` it replaces, over backends,
dtypes, activations, bias and batch sizes (1 row, odd sizes, more rows than a chunk).
"""
import numpy as np
import pytest

import fastnn as fn
from fastnn import kernels, losses

ACTS = [name for name in kernels.ACTIVATIONS if name != "step"]
ROWS = (1, 7, 300)
CHUNK = 128  # batch_size of the tests: 300 rows take three chunks


@pytest.fixture(params=kernels.BACKENDS)
def backend_name(request):
    with fn.use_backend(request.param):
        yield request.param


def make_model(dtype, activation="relu", use_bias=True, loss="cross_entropy", dropout=False,
               widths=(11, 16, 9, 4)):
    layers = []
    for i, (d, k) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(fn.Dense(d, k, activation=None if last else activation,
                               use_bias=use_bias, seed=i, dtype=dtype))
        if dropout and not last:
            layers.append(fn.Dropout(0.5, seed=i, dtype=dtype))
    return fn.Sequential(layers).compile(loss, "sgd", metrics=["accuracy"]
                                         if loss in ("cross_entropy", "hinge") else None)


def layer_by_layer(model, X):
    return model._forward(np.ascontiguousarray(X, model.dtype), False).copy()


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_equals_the_layer_by_layer_pass(backend_name, dtype, activation, use_bias, n):
    model = make_model(dtype, activation, use_bias)
    X = np.random.default_rng(n).standard_normal((n, 11))
    assert model._dense_stack() is not None
    expected = layer_by_layer(model, X)
    out = model.forward(X, batch_size=CHUNK)
    assert out.dtype == model.dtype and out.shape == (n, 4)
    np.testing.assert_allclose(out, expected, **tolerance(model.dtype))
    np.testing.assert_allclose(model.forward(X), expected, **tolerance(model.dtype))


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "hinge", "mse",
                                  "huber"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_applies_the_link_of_the_loss(backend_name, dtype, loss):
    model = make_model(dtype, "tanh", loss=loss)
    X = np.random.default_rng(1).standard_normal((300, 11))
    expected = model.loss.link(layer_by_layer(model, X))
    for batch_size in (None, CHUNK, 1):
        pred = model.predict(X, batch_size=batch_size)
        np.testing.assert_allclose(pred, expected, **tolerance(model.dtype))
    if model.loss.classification:
        codes = model.loss.classes(layer_by_layer(model, X))
        np.testing.assert_array_equal(model.predict_classes(X, batch_size=CHUNK), codes)


def test_predict_with_a_link_defined_elsewhere(backend_name):
    class Doubled(losses.MeanSquaredError):
        def link(self, out):
            return 2 * out

    model = make_model("float64", loss=Doubled())
    X = np.random.default_rng(2).standard_normal((7, 11))
    np.testing.assert_allclose(model.predict(X), 2 * layer_by_layer(model, X), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_is_skipped_at_inference(backend_name, dtype):
    model = make_model(dtype, dropout=True)
    X = np.random.default_rng(3).standard_normal((300, 11))
    assert model._dense_stack() is not None
    np.testing.assert_allclose(model.forward(X, batch_size=CHUNK), layer_by_layer(model, X),
                               **tolerance(model.dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_evaluate_equals_the_layer_by_layer_loss(backend_name, dtype):
    model = make_model(dtype)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((300, 11)), rng.integers(0, 4, 300)
    out = layer_by_layer(model, X)
    expected_loss = model.loss(out, y.astype(np.int64), None, None)
    logs = model.evaluate(X, y, batch_size=CHUNK)
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert logs["accuracy"] == pytest.approx(np.mean(out.argmax(axis=1) == y))


def test_other_layers_take_the_layer_by_layer_path(backend_name):
    model = fn.Sequential([fn.Dense(5, 8, seed=0, dtype="float64"), fn.Tanh(dtype="float64"),
                           fn.Dense(8, 3, seed=1, dtype="float64")]).compile("mse", "sgd")
    X = np.random.default_rng(5).standard_normal((9, 5))
    assert model._dense_stack() is None
    np.testing.assert_allclose(model.predict(X), layer_by_layer(model, X), rtol=1e-12)


def test_weights_changed_in_place_are_used(backend_name):
    model = make_model("float64")
    X = np.random.default_rng(6).standard_normal((3, 11))
    model.forward(X)
    model.set_weights([2 * w for w in model.get_weights()])
    np.testing.assert_allclose(model.forward(X), layer_by_layer(model, X), rtol=1e-12)


def test_a_layer_added_after_a_prediction_is_used(backend_name):
    model = fn.Sequential([fn.Dense(5, 8, activation="relu", seed=0)]).compile("mse", "sgd")
    X = np.random.default_rng(7).standard_normal((3, 5)).astype(np.float32)
    model.predict(X)
    model.add(fn.Dense(8, 2, seed=1))
    assert model.predict(X).shape == (3, 2)
    np.testing.assert_allclose(model.predict(X), layer_by_layer(model, X), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_short_input_path_still_refuses_non_finite_values(backend_name, bad):
    model = make_model("float32")
    X = np.zeros((4, 11), np.float32)
    X[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict(X)


def test_values_whose_squares_overflow_are_accepted(backend_name):
    model = make_model("float32", "tanh")
    X = np.full((2, 11), 1e30, np.float32)
    np.testing.assert_allclose(model.forward(X), layer_by_layer(model, X), rtol=1e-5)


def test_repeated_calls_reuse_the_workspace(backend_name):
    model = make_model("float32")
    X = np.random.default_rng(8).standard_normal((5, 11)).astype(np.float32)
    model.predict(X)
    workspace = model._dense_stack()._workspace
    first = model.predict(X)
    assert model._dense_stack()._workspace is workspace
    assert model.predict(X) is not first
