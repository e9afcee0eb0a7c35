"""Layers on their own: Dense, the activation layers, Dropout and the initializers.

Each forward is checked against numpy written from the pre-activation (independently of
the kernels, which differentiate from the output), each backward against numpy and
against central differences in float64.
"""
import numpy as np
import pytest

import fastnn as fn
from _helpers import ACTIVATIONS, active_backend, rng  # noqa: F401  (active_backend: fixture)
from fastnn.layers import init_weights, layer_from_config
from fastnn.gradcheck import numerical_gradient

pytestmark = pytest.mark.usefixtures("active_backend")

TOL = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-12, atol=1e-12)}


def act_reference(name, z, alpha=None):
    """(act(z), act'(z)) from the pre-activation z, in float64."""
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z, np.ones_like(z)
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s, s * (1 - s)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1 - t ** 2
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(float)
    if name == "leaky_relu":
        a = 0.01 if alpha is None else alpha
        return np.where(z > 0, z, a * z), np.where(z > 0, 1.0, a)
    if name == "softplus":
        return np.log1p(np.exp(z)), 1 / (1 + np.exp(-z))
    if name == "elu":
        a = 1.0 if alpha is None else alpha
        return np.where(z > 0, z, a * np.expm1(z)), np.where(z > 0, 1.0, a * np.exp(z))
    raise AssertionError(name)


def away_from_zero(shape, gen, low=0.1, high=2.0):
    """Values with |v| in [low, high]: no input sits on a kink of relu / leaky_relu."""
    return gen.uniform(low, high, size=shape) * gen.choice([-1.0, 1.0], size=shape)


# ---------------------------------------------------------------------------- Dense
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_backward_match_numpy(activation, dtype):
    gen = rng()
    layer = fn.Dense(6, 4, activation=activation, dtype=dtype, seed=1)
    layer.b[...] = gen.normal(size=4)
    x = gen.normal(size=(9, 6)).astype(dtype)
    dout = gen.normal(size=(9, 4)).astype(dtype)
    W, b = layer.W.astype(np.float64), layer.b.astype(np.float64)
    z = x.astype(np.float64) @ W + b
    a_ref, da_ref = act_reference(activation, z)

    out = layer.forward(x)
    assert out.shape == (9, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, a_ref, **TOL[dtype])

    dx = layer.backward(dout)
    dz = dout * da_ref
    np.testing.assert_allclose(layer.dW, x.T.astype(np.float64) @ dz, **TOL[dtype])
    np.testing.assert_allclose(layer.db, dz.sum(axis=0), **TOL[dtype])
    np.testing.assert_allclose(dx, dz @ W.T, **TOL[dtype])
    assert dx.shape == x.shape and dx.dtype == np.dtype(dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_backward_matches_finite_differences(activation):
    gen = rng(1)
    layer = fn.Dense(3, 2, activation=activation, dtype="float64", seed=2)
    x = gen.normal(size=(5, 3))
    # Move every pre-activation off the relu / leaky_relu kink at 0.
    z = x @ layer.W
    layer.b[...] = np.where(np.abs(z).min(axis=0) < 0.05, 0.3, 0.0)
    dout = gen.normal(size=(5, 2))

    def objective():
        return float((layer.forward(x) * dout).sum())

    objective()
    dx = layer.backward(dout)
    dW, db = layer.dW.copy(), layer.db.copy()
    np.testing.assert_allclose(dW, numerical_gradient(objective, layer.W), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numerical_gradient(objective, layer.b), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dx, numerical_gradient(objective, x), rtol=1e-6, atol=1e-8)


def test_dense_without_bias():
    layer = fn.Dense(3, 2, use_bias=False, seed=0, dtype="float64")
    x = rng().normal(size=(4, 3))
    np.testing.assert_allclose(layer.forward(x), x @ layer.W, rtol=1e-12)
    assert len(layer.parameters()) == 1 and len(layer.gradients()) == 1
    layer.backward(np.ones((4, 2)))
    np.testing.assert_allclose(layer.dW, x.T @ np.ones((4, 2)), rtol=1e-12)


def test_dense_custom_alpha():
    x = np.array([[-2.0, 3.0]])
    leaky = fn.Dense(2, 2, activation="leaky_relu", alpha=0.2, init="zeros", dtype="float64")
    leaky.W[...] = np.eye(2)
    np.testing.assert_allclose(leaky.forward(x), [[-0.4, 3.0]])
    elu = fn.Dense(2, 2, activation="elu", alpha=0.5, init="zeros", dtype="float64")
    elu.W[...] = np.eye(2)
    np.testing.assert_allclose(elu.forward(x), [[0.5 * np.expm1(-2.0), 3.0]])


def test_forward_returns_a_fresh_array():
    layer = fn.Dense(2, 2, seed=0)
    first = layer.forward(np.ones((3, 2)))
    kept = first.copy()
    layer.forward(np.zeros((3, 2)))
    np.testing.assert_array_equal(first, kept)


def test_dense_repr_and_config_round_trip():
    layer = fn.Dense(4, 3, activation="relu", l2=0.01, seed=7)
    assert repr(layer) == "Dense(4, 3, activation='relu')"
    assert repr(fn.Dense(4, 3)) == "Dense(4, 3)"
    clone = layer_from_config(layer.get_config())
    assert isinstance(clone, fn.Dense)
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone.W, layer.W)  # same seed, same draw


def test_backward_before_forward_raises():
    with pytest.raises(ValueError, match="needs a forward pass first"):
        fn.Dense(2, 2).backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match="needs a forward pass first"):
        fn.ReLU().backward(np.ones((1, 2)))


def test_backward_checks_dout_shape():
    layer = fn.Dense(2, 3)
    layer.forward(np.ones((4, 2)))
    with pytest.raises(ValueError, match="dout"):
        layer.backward(np.ones((4, 2)))


# ---------------------------------------------------------------------------- activations
NAMED = {"identity": fn.Identity, "sigmoid": fn.Sigmoid, "tanh": fn.Tanh, "relu": fn.ReLU,
         "leaky_relu": fn.LeakyReLU, "softplus": fn.Softplus, "elu": fn.ELU}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_layer_forward(name):
    z = away_from_zero((6, 5), rng(2)) * 3
    for layer in (NAMED[name](dtype="float64"), fn.Activation(name, dtype="float64")):
        np.testing.assert_allclose(layer.forward(z), act_reference(name, z)[0],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_layer_backward_matches_finite_differences(name):
    gen = rng(3)
    z = away_from_zero((4, 5), gen)
    dout = gen.normal(size=(4, 5))
    layer = NAMED[name](dtype="float64")

    def objective():
        return float((layer.forward(z) * dout).sum())

    objective()
    dz = layer.backward(dout)
    np.testing.assert_allclose(dz, numerical_gradient(objective, z), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dz, dout * act_reference(name, z)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls, alpha", [(fn.LeakyReLU, 0.2), (fn.ELU, 0.5)])
def test_activation_layer_alpha(cls, alpha):
    name = "leaky_relu" if cls is fn.LeakyReLU else "elu"
    z = away_from_zero((3, 4), rng(4))
    layer = cls(alpha, dtype="float64")
    out, deriv = act_reference(name, z, alpha)
    np.testing.assert_allclose(layer.forward(z), out, rtol=1e-12)
    np.testing.assert_allclose(layer.backward(np.ones_like(z)), deriv, rtol=1e-10)


def test_activation_layer_float32():
    z = away_from_zero((3, 4), rng(5)).astype(np.float32)
    out = fn.Tanh().forward(z)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.tanh(z), rtol=1e-6)


def test_activation_config_round_trip():
    layer = fn.LeakyReLU(0.3, dtype="float64")
    clone = layer_from_config(layer.get_config())
    assert clone.activation == "leaky_relu" and clone.alpha == 0.3
    assert clone.dtype == np.float64
    assert repr(layer) == "Activation('leaky_relu')"


@pytest.mark.parametrize("activation", [None, "identity", "sigmoid", "tanh", "relu",
                                        "softplus"])
def test_alpha_is_refused_for_activations_without_one(activation):
    """Issue 18, item 10: Dense(..., activation='relu', alpha=5) ignored alpha silently."""
    name = activation or "identity"
    message = (r"alpha applies only to the activations \['leaky_relu', 'elu'\]; activation "
               rf"'{name}' has none, got alpha=5")
    with pytest.raises(ValueError, match=message):
        fn.Dense(2, 3, activation=activation, alpha=5)
    with pytest.raises(ValueError, match=message):
        fn.Activation(name, 5)
    with pytest.raises(ValueError, match=r"activation 'relu' has none, got alpha=0.0"):
        fn.Activation("relu", alpha=0.0)
    layer = fn.Dense(2, 3, activation=activation)
    assert layer.get_config()["alpha"] is None
    assert layer_from_config(layer.get_config()).get_config() == layer.get_config()
    assert fn.Activation(name).get_config()["alpha"] is None


def test_configs_saved_with_alpha_zero_for_no_alpha_activation_still_load():
    """Model files written before configs stored None there hold alpha 0.0."""
    dense = layer_from_config({"class": "Dense", "in_features": 2, "out_features": 3,
                               "activation": "relu", "alpha": 0.0})
    assert dense.activation == "relu" and dense.get_config()["alpha"] is None
    tanh = layer_from_config({"class": "Activation", "name": "tanh", "alpha": 0.0,
                              "dtype": "float32"})
    assert tanh.activation == "tanh" and tanh.get_config()["alpha"] is None
    with pytest.raises(ValueError, match=r"activation 'relu' has none, got alpha=0.5"):
        layer_from_config({"class": "Dense", "in_features": 2, "out_features": 3,
                           "activation": "relu", "alpha": 0.5})


@pytest.mark.parametrize("activation, alpha", [("leaky_relu", 0.0), ("leaky_relu", 0.3),
                                               ("elu", 2.0)])
def test_alpha_activations_keep_their_alpha(activation, alpha):
    layer = fn.Dense(2, 3, activation=activation, alpha=alpha)
    assert layer.alpha == alpha == layer.get_config()["alpha"]
    assert layer_from_config(layer.get_config()).alpha == alpha


# ---------------------------------------------------------------------------- Dropout
def test_dropout_is_identity_at_inference():
    x = rng(6).normal(size=(50, 8)).astype(np.float32)
    layer = fn.Dropout(0.5, seed=0)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), np.ones_like(x))


def test_dropout_inverted_scaling_in_training():
    rate = 0.3
    x = np.ones((400, 50), dtype=np.float32)
    layer = fn.Dropout(rate, seed=1)
    out = layer.forward(x)
    dropped = out == 0
    assert abs(dropped.mean() - rate) < 0.02
    np.testing.assert_allclose(out[~dropped], 1 / (1 - rate), rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.03  # the expected activation is preserved
    # The backward pass uses the same mask and scale.
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), out)


def test_dropout_is_seeded():
    x = np.ones((20, 30), dtype=np.float32)
    a, b, c = fn.Dropout(0.5, seed=3), fn.Dropout(0.5, seed=3), fn.Dropout(0.5, seed=4)
    first = a.forward(x)
    np.testing.assert_array_equal(first, b.forward(x))
    assert not np.array_equal(first, c.forward(x))
    assert not np.array_equal(first, a.forward(x))  # a fresh mask each call


def test_dropout_rate_zero_is_identity():
    x = rng(7).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(fn.Dropout(0.0).forward(x), x)


# ---------------------------------------------------------------------------- initializers
@pytest.mark.parametrize("init, variance", [
    ("he_uniform", 2 / 400), ("he_normal", 2 / 400),
    ("glorot_uniform", 2 / 700), ("glorot_normal", 2 / 700),
])
def test_initializer_variance(init, variance):
    W = fn.Dense(400, 300, init=init, seed=0, dtype="float64").W
    assert abs(W.mean()) < 0.02 * np.sqrt(variance)
    assert W.var() == pytest.approx(variance, rel=0.03)
    if init.endswith("uniform"):
        limit = np.sqrt(3 * variance)
        assert np.abs(W).max() <= limit
        assert np.abs(W).max() > 0.99 * limit
    else:
        assert np.abs(W).max() > 3.5 * np.sqrt(variance)  # tails: not a uniform draw


@pytest.mark.parametrize("activation, expected", [
    ("relu", "he_uniform"), ("leaky_relu", "he_uniform"), ("elu", "he_uniform"),
    ("tanh", "glorot_uniform"), ("sigmoid", "glorot_uniform"), (None, "glorot_uniform"),
    ("softplus", "glorot_uniform"),
])
def test_auto_init_picks_he_for_the_relu_family(activation, expected):
    auto = fn.Dense(50, 40, activation=activation, seed=5).W
    explicit = fn.Dense(50, 40, activation=activation, init=expected, seed=5).W
    np.testing.assert_array_equal(auto, explicit)


def test_zeros_init_and_seeded_reproducibility():
    assert not fn.Dense(3, 4, init="zeros").W.any()
    np.testing.assert_array_equal(fn.Dense(5, 6, seed=9).W, fn.Dense(5, 6, seed=9).W)
    assert not np.array_equal(fn.Dense(5, 6, seed=9).W, fn.Dense(5, 6, seed=10).W)
    assert not fn.Dense(5, 6, seed=9).b.any()


def test_init_weights_dtype_and_shape():
    W = init_weights("he_normal", 7, 3, "relu", np.random.default_rng(0), np.float32)
    assert W.shape == (7, 3) and W.dtype == np.float32 and W.flags.c_contiguous
