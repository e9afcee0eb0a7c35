"""Sequential: structure, the flat buffers, compile, forward/predict/evaluate, weights,
compute_gradients, fit's History / weights / verbosity, summary, repr, save/load."""
import copy
import os
import sys

import numpy as np
import pytest

import fastnn as fn
from _helpers import active_backend, blobs, mlp, rng  # noqa: F401  (active_backend: fixture)

pytestmark = pytest.mark.usefixtures("active_backend")


def classifier(dtype="float32", seed=0, **kwargs):
    model = mlp([2, 8, 3], activation="relu", dtype=dtype, seed=seed)
    return model.compile("cross_entropy", kwargs.pop("optimizer", "adam"),
                         metrics=kwargs.pop("metrics", ["accuracy"]))


def blob_data(n_per_class=20, offset=0):
    return blobs(n_per_class, rng(offset))


def numpy_forward(model, X):
    """The network by hand for Dense(tanh/relu) + Dense(identity) stacks."""
    a = np.asarray(X, dtype=np.float64)
    for layer in model.layers:
        z = a @ layer.W.astype(np.float64) + layer.b.astype(np.float64)
        a = {"identity": z, "relu": np.maximum(z, 0), "tanh": np.tanh(z)}[layer.activation]
    return a


# ---------------------------------------------------------------------------- structure
def test_layers_are_views_into_one_flat_buffer():
    model = mlp([4, 5, 3])
    assert model.n_params == 4 * 5 + 5 + 5 * 3 + 3 == model.params.size
    assert (model.n_features, model.n_outputs) == (4, 3)
    offset = 0
    for p, g in zip(model.parameters(), (g for layer in model.layers for g in layer.gradients())):
        assert np.shares_memory(p, model.params) and np.shares_memory(g, model.grads)
        np.testing.assert_array_equal(p.ravel(), model.params[offset:offset + p.size])
        offset += p.size
    model.params[0] = 42.0
    assert model.layers[0].W[0, 0] == 42.0


def test_construction_keeps_layer_weights_and_add_extends():
    first = fn.Dense(3, 4, activation="tanh", seed=1)
    W = first.W.copy()
    model = fn.Sequential([first])
    np.testing.assert_array_equal(model.layers[0].W, W)
    model.add(fn.Dense(4, 2, seed=2))
    np.testing.assert_array_equal(model.layers[0].W, W)
    assert model.n_outputs == 2 and model.n_params == 3 * 4 + 4 + 4 * 2 + 2


@pytest.mark.parametrize("bad_layer, message", [
    (lambda: fn.Dense(5, 2, seed=3), r"Dense expects 5 input features, but the previous "
                                     r"layer gives 3"),
    (lambda: fn.Dense(3, 2, dtype="float64"), r"all layers must share one dtype"),
])
def test_failed_add_leaves_the_model_exactly_as_it_was(bad_layer, message):
    """Issue 18, item 1: the refused layer used to stay in ``layers``, and the next fit
    wrote past the end of the flat buffer (heap corruption on cython)."""
    model = fn.Sequential([fn.Dense(2, 3, seed=0)]).compile("mse", "adam")
    X, y = rng(30).normal(size=(20, 2)), rng(31).normal(size=(20, 3))
    model.fit(X, y, epochs=1, verbose=0)
    layers, params, grads = list(model.layers), model.params, model.grads
    saved, state = params.copy(), {k: v.copy() for k, v in model.optimizer.state.items()}
    expected = model.predict(X)
    bad = bad_layer()
    for _ in range(3):
        with pytest.raises(ValueError, match=message):
            model.add(bad)
    assert model.layers == layers and len(model.layers) == 1
    assert model.params is params and model.grads is grads and params.size == 9
    assert (model.n_features, model.n_outputs, model.dtype) == (2, 3, np.float32)
    np.testing.assert_array_equal(params, saved)
    for name, value in model.optimizer.state.items():
        np.testing.assert_array_equal(value, state[name])
    assert bad.model is None
    np.testing.assert_array_equal(model.predict(X), expected)
    for _ in range(5):
        model.fit(X, y, epochs=2, batch_size=4, verbose=0)
    assert model.predict(X).shape == (20, 3)
    model.add(fn.Dense(3, 2, seed=4))  # a fitting layer is still accepted afterwards
    assert model.n_outputs == 2 and model.n_params == 9 + 8


def test_failed_construction_claims_no_layer():
    first, second = fn.Dense(2, 3), fn.Dense(4, 1)
    with pytest.raises(ValueError, match=r"Dense expects 4 input features"):
        fn.Sequential([first, second])
    assert first.model is None and second.model is None
    assert fn.Sequential([first, fn.Dense(3, 1)]).layers[0] is first


def test_one_layer_instance_belongs_to_one_model():
    """Issue 18, item 3: one instance in two places trained something that save and
    load_model did not reproduce; it is refused, and a deep copy is a new layer."""
    dense = fn.Dense(2, 3, seed=0)
    with pytest.raises(ValueError, match=r"layers\[2\] Dense\(2, 3\) is already in this "
                                         r"model; .*copy.deepcopy\(layer\)"):
        fn.Sequential([dense, fn.ReLU(), dense])
    assert dense.model is None
    model = fn.Sequential([dense])
    assert dense.model is model
    with pytest.raises(ValueError, match=r"layers\[0\] Dense\(2, 3\) is already part of "
                                         r"another model"):
        fn.Sequential([dense])
    relu = fn.ReLU()
    model.add(relu)
    with pytest.raises(ValueError, match=r"layer Activation\('relu'\) is already in this model"):
        model.add(relu)
    other = fn.Sequential([fn.Dense(2, 3)])
    with pytest.raises(ValueError, match=r"layer Dense\(2, 3\) is already part of another"):
        other.add(dense)
    assert len(model.layers) == 2 and len(other.layers) == 1
    copied = copy.deepcopy(dense)
    assert copied.model is None
    twin = fn.Sequential([copied])
    assert copied.model is twin and dense.model is model
    np.testing.assert_array_equal(twin.params, model.params[:9])
    twin.params[...] = 0.0
    assert not np.shares_memory(twin.params, model.params) and model.params.any()


def test_activation_and_dropout_layers_in_a_model():
    model = fn.Sequential([fn.Dense(3, 4, seed=0), fn.Tanh(), fn.Dropout(0.5, seed=0),
                           fn.Dense(4, 2, seed=1)])
    model.compile("mse")
    X = rng().normal(size=(5, 3))
    W1, b1, W2, b2 = model.get_weights()
    np.testing.assert_allclose(model.forward(X), np.tanh(X @ W1 + b1) @ W2 + b2, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(X), model.forward(X))  # dropout off


def test_compile_returns_model_and_resolves_names():
    model = mlp([2, 3])
    assert model.compile("huber", "momentum", metrics="mae") is model
    assert isinstance(model.loss, fn.losses.Huber)
    assert isinstance(model.optimizer, fn.optimizers.SGD) and model.optimizer.momentum == 0.9
    assert model.metrics == ("mae",)
    adam = fn.optimizers.Adam(lr=0.01)
    model.compile(fn.losses.Huber(delta=2.0), adam)
    assert model.optimizer is adam and model.loss.delta == 2.0
    assert adam.state["exp_avg"].shape == (model.n_params,)


# ---------------------------------------------------------------------------- inference
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_matches_numpy(dtype):
    model = mlp([4, 6, 5, 3], activation="tanh", dtype=dtype)
    X = rng(1).normal(size=(11, 4))
    out = model.forward(X)
    assert out.shape == (11, 3) and out.dtype == np.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out, numpy_forward(model, X), rtol=tol, atol=tol)
    # Chunks may take a different BLAS path (e.g. a 1-row gemv): equal up to rounding.
    np.testing.assert_allclose(model.forward(X, batch_size=4), out, rtol=tol, atol=tol)


def test_predict_goes_through_the_link():
    X = rng(2).normal(size=(7, 2))
    model = mlp([2, 4, 3], dtype="float64")
    out = model.forward(X)
    model.compile("cross_entropy")
    e = np.exp(out - out.max(1, keepdims=True))
    np.testing.assert_allclose(model.predict(X), e / e.sum(1, keepdims=True), rtol=1e-12)
    model.compile("binary_cross_entropy")
    np.testing.assert_allclose(model.predict(X), 1 / (1 + np.exp(-out)), rtol=1e-12)
    for loss in ("hinge", "mse"):
        model.compile(loss)
        np.testing.assert_array_equal(model.predict(X), out)
    np.testing.assert_allclose(model.predict(X, batch_size=3), out, rtol=1e-12, atol=1e-15)


def test_forward_does_not_alias_internal_buffers():
    model = classifier()
    X, _ = blob_data()
    first = model.forward(X[:5])
    kept = first.copy()
    model.forward(X[5:10])
    model.predict(X[5:10])
    np.testing.assert_array_equal(first, kept)


# ---------------------------------------------------------------------------- weights
def test_get_weights_returns_copies():
    model = mlp([3, 4, 2])
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(3, 4), (4,), (4, 2), (2,)]
    weights[0][...] = 7.0
    assert not (model.layers[0].W == 7.0).any()


def test_set_weights_copies_in_and_checks_shapes():
    model = mlp([3, 4, 2], dtype="float64")
    new = [rng(3).normal(size=w.shape) for w in model.get_weights()]
    model.set_weights(new)
    for got, want in zip(model.get_weights(), new):
        np.testing.assert_array_equal(got, want)
    new[0][...] = 0.0  # the model holds copies
    assert model.layers[0].W.any()
    np.testing.assert_allclose(model.forward(np.eye(3)), numpy_forward(model, np.eye(3)))
    with pytest.raises(ValueError, match="list of 4 arrays, got 3"):
        model.set_weights(new[:3])
    with pytest.raises(ValueError, match=r"weights\[2\] must have shape \(4, 2\), got \(2, 4\)"):
        model.set_weights([new[0], new[1], new[2].T, new[3]])
    with pytest.raises(ValueError, match=r"weights\[1\] must be 1-D"):
        model.set_weights([new[0], new[1][None], new[2], new[3]])


def test_set_weights_names_a_non_list_argument():
    """Issue 18, item 14: "'NoneType' object is not iterable" named no argument."""
    model = mlp([2, 3])
    with pytest.raises(TypeError, match=r"weights must be a list of 2 arrays shaped like "
                                        r"get_weights\(\) \[\(2, 3\), \(3,\)\], got NoneType"):
        model.set_weights(None)
    with pytest.raises(TypeError, match=r"weights must be a list .* got one ndarray of shape "
                                        r"\(2, 3\)"):
        model.set_weights(model.get_weights()[0])
    model.set_weights(tuple(w + 1 for w in model.get_weights()))  # any iterable of arrays


def test_sequential_names_a_layer_passed_without_a_list():
    with pytest.raises(TypeError, match=r"layers must be a list of fastnn layers, got a single "
                                        r"Dense; pass \[layer\]"):
        fn.Sequential(fn.Dense(4, 3))
    with pytest.raises(TypeError, match=r"layers must be a list of fastnn layers, got int"):
        fn.Sequential(5)
    assert fn.Sequential((fn.Dense(4, 3), fn.ReLU())).n_outputs == 3


def test_use_bias_false_weights():
    model = fn.Sequential([fn.Dense(3, 2, use_bias=False, seed=0), fn.Dense(2, 1, seed=1)])
    assert [w.shape for w in model.get_weights()] == [(3, 2), (2, 1), (1,)]
    assert model.n_params == 6 + 2 + 1


# ---------------------------------------------------------------------------- gradients
def finite_difference_grads(model, X, y, eps=1e-6):
    """Central differences of evaluate()["loss"], one weight at a time, via set_weights."""
    weights = model.get_weights()
    grads = []
    for w in weights:
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            saved = w[idx]
            w[idx] = saved + eps
            model.set_weights(weights)
            up = model.evaluate(X, y)["loss"]
            w[idx] = saved - eps
            model.set_weights(weights)
            down = model.evaluate(X, y)["loss"]
            w[idx] = saved
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    model.set_weights(weights)
    return grads


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_compute_gradients_match_finite_differences(loss):
    gen = rng(4)
    X = gen.normal(size=(9, 3))
    y = gen.integers(0, 2, size=9) if loss == "cross_entropy" else gen.normal(size=(9, 2))
    model = mlp([3, 4, 2], activation="tanh", dtype="float64", l2=0.01, l1=0.005).compile(loss)
    value, grads = model.compute_gradients(X, y)
    assert [g.shape for g in grads] == [w.shape for w in model.get_weights()]
    assert value == pytest.approx(model.evaluate(X, y)["loss"], rel=1e-12)
    for g, numeric in zip(grads, finite_difference_grads(model, X, y)):
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


def test_compute_gradients_runs_in_inference_mode():
    gen = rng(20)
    X, y = gen.normal(size=(8, 3)), gen.integers(0, 2, size=8)
    dense = [fn.Dense(3, 4, activation="relu", dtype="float64", seed=0),
             fn.Dense(4, 2, dtype="float64", seed=1)]
    plain = fn.Sequential(dense).compile("cross_entropy")
    dropped = fn.Sequential([fn.Dropout(0.5, seed=0, dtype="float64"), copy.deepcopy(dense[0]),
                             fn.Dropout(0.5, seed=1, dtype="float64"), copy.deepcopy(dense[1])])
    dropped.compile("cross_entropy")
    dropped.set_weights(plain.get_weights())
    loss_a, grads_a = plain.compute_gradients(X, y)
    loss_b, grads_b = dropped.compute_gradients(X, y)
    assert loss_a == loss_b
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)


def test_leading_layers_without_parameters():
    gen = rng(21)
    X, y = gen.normal(size=(8, 3)), gen.integers(0, 2, size=8)
    model = fn.Sequential([fn.Dropout(0.3, seed=0, dtype="float64"), fn.Tanh(dtype="float64"),
                           fn.Dense(3, 2, dtype="float64", seed=0)])
    model.compile("cross_entropy", fn.optimizers.Adam(lr=0.05))
    assert model.n_features == 3 and len(model.get_weights()) == 2
    W, b = model.get_weights()
    np.testing.assert_allclose(model.forward(X), np.tanh(X) @ W + b, rtol=1e-12)
    assert fn.gradcheck(model, X, y) <= 1e-6
    history = model.fit(X, y, epochs=20, batch_size=None, verbose=0, seed=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_compute_gradients_returns_copies():
    model = classifier(dtype="float64")
    X, y = blob_data()
    _, grads = model.compute_gradients(X, y)
    kept = [g.copy() for g in grads]
    model.compute_gradients(X[:5], y[:5])
    for g, k in zip(grads, kept):
        np.testing.assert_array_equal(g, k)


def test_regularization_in_loss_and_gradient():
    gen = rng(5)
    X = gen.normal(size=(10, 3))
    y = gen.normal(size=(10, 1))
    l1, l2 = 0.03, 0.02
    plain = mlp([3, 4, 1], dtype="float64").compile("mse")
    regular = mlp([3, 4, 1], dtype="float64", l1=l1, l2=l2).compile("mse")
    regular.set_weights(plain.get_weights())
    base, base_grads = plain.compute_gradients(X, y)
    value, grads = regular.compute_gradients(X, y)
    W1, b1, W2, b2 = plain.get_weights()
    penalty = sum(l2 * (W ** 2).sum() + l1 * np.abs(W).sum() for W in (W1, W2))
    assert value == pytest.approx(base + penalty, rel=1e-12)
    assert regular.evaluate(X, y)["loss"] == pytest.approx(base + penalty, rel=1e-12)
    for i, W in ((0, W1), (2, W2)):
        np.testing.assert_allclose(grads[i], base_grads[i] + 2 * l2 * W + l1 * np.sign(W),
                                   rtol=1e-12, atol=1e-15)
    for i in (1, 3):  # biases are not regularized
        np.testing.assert_array_equal(grads[i], base_grads[i])


# ---------------------------------------------------------------------------- sample weights
def test_zero_weight_on_half_equals_training_on_the_other_half():
    X, y = blob_data(offset=6)
    half = len(y) // 2
    w = np.r_[np.zeros(half), np.ones(len(y) - half)]
    weighted, subset = classifier(dtype="float64"), classifier(dtype="float64")
    lw, gw = weighted.compute_gradients(X, y, sample_weight=w)
    ls, gs = subset.compute_gradients(X[half:], y[half:])
    assert lw == pytest.approx(ls, rel=1e-12)
    for a, b in zip(gw, gs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    hw = weighted.fit(X, y, sample_weight=w, epochs=5, batch_size=None, verbose=0)
    hs = subset.fit(X[half:], y[half:], epochs=5, batch_size=None, verbose=0)
    np.testing.assert_allclose(weighted.params, subset.params, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hw.history["loss"], hs.history["loss"], rtol=1e-9)


def test_class_weight_equals_the_matching_sample_weight():
    X, y = blob_data(offset=7)
    class_weight = {0: 2.0, 1: 0.5}
    by_class, by_sample = classifier(dtype="float64"), classifier(dtype="float64")
    by_class.fit(X, y, class_weight=class_weight, epochs=3, batch_size=8, seed=1, verbose=0)
    factors = np.array([2.0, 0.5, 1.0])[y]
    by_sample.fit(X, y, sample_weight=factors, epochs=3, batch_size=8, seed=1, verbose=0)
    np.testing.assert_array_equal(by_class.params, by_sample.params)


def test_class_weight_combines_with_sample_weight():
    X, y = blob_data(offset=8)
    sw = rng(9).uniform(0.5, 2.0, size=len(y))
    a, b = classifier(dtype="float64"), classifier(dtype="float64")
    a.fit(X, y, sample_weight=sw, class_weight={2: 3.0}, epochs=2, batch_size=None, verbose=0)
    b.fit(X, y, sample_weight=sw * np.where(y == 2, 3.0, 1.0), epochs=2, batch_size=None,
          verbose=0)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-12)


# ---------------------------------------------------------------------------- fit / History
def test_fit_returns_history_with_metrics_and_validation():
    X, y = blob_data(offset=10)
    Xv, yv = blob_data(5, offset=11)
    model = classifier()
    history = model.fit(X, y, epochs=4, validation_data=(Xv, yv), verbose=0, seed=0)
    assert isinstance(history, fn.History) and model.history is history
    assert history.epoch == [0, 1, 2, 3]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 4 for v in history.history.values())
    assert history.history["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv)["loss"])
    assert history.stop_reason == "completed 4 epochs"
    assert repr(history) == "History(epochs=4, keys=['accuracy', 'loss', 'val_accuracy', " \
                            "'val_loss'])"


def test_fit_with_validation_split_holds_out_the_last_samples():
    X, y = blob_data(offset=12)
    model = classifier()
    history = model.fit(X, y, epochs=2, validation_split=0.25, verbose=0, seed=0)
    assert {"val_loss", "val_accuracy"} <= set(history.history)
    n_val = int(round(len(y) * 0.25))
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(X[-n_val:], y[-n_val:])["loss"])


def test_fit_validation_data_with_weights():
    X, y = blob_data(offset=13)
    wv = np.ones(len(y))
    wv[: len(y) // 2] = 0
    model = classifier(dtype="float64")
    history = model.fit(X, y, epochs=1, validation_data=(X, y, wv), verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(
        model.evaluate(X, y, sample_weight=wv)["loss"], rel=1e-12)


def test_train_loss_is_the_sample_mean_over_the_epoch():
    X, y = blob_data(offset=14)
    model = classifier(dtype="float64", optimizer=fn.optimizers.SGD(lr=1e-12))
    before = model.evaluate(X, y)
    history = model.fit(X, y, epochs=1, batch_size=7, verbose=0, seed=0)
    assert history.history["loss"][0] == pytest.approx(before["loss"], rel=1e-9)
    assert history.history["accuracy"][0] == before["accuracy"]


def test_epochs_zero_trains_nothing():
    model = classifier()
    X, y = blob_data()
    before = model.params.copy()
    history = model.fit(X, y, epochs=0, verbose=0)
    assert history.epoch == [] and history.history == {}
    np.testing.assert_array_equal(model.params, before)


def test_verbose_0_prints_nothing(capsys):
    X, y = blob_data()
    classifier().fit(X, y, epochs=2, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_verbose_2_prints_one_line_per_epoch(capsys):
    X, y = blob_data()
    classifier().fit(X, y, epochs=3, verbose=2, validation_split=0.2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3") and "loss=" in lines[0] and "val_loss=" in lines[0]


def test_verbose_1_shows_a_progress_bar_on_stderr(capsys):
    pytest.importorskip("tqdm")
    X, y = blob_data()
    classifier().fit(X, y, epochs=2, verbose=1)
    captured = capsys.readouterr()
    assert captured.out == "" and "epoch 2/2" in captured.err


def test_verbose_1_without_tqdm_prints_epoch_lines(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, y = blob_data()
    classifier().fit(X, y, epochs=2, verbose=1)
    assert capsys.readouterr().out.startswith("epoch 1/2 - loss=")


def test_history_plot_needs_matplotlib(monkeypatch):
    X, y = blob_data()
    history = classifier().fit(X, y, epochs=1, verbose=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"matplotlib.*pip install 'fastnn\[plot\]'"):
        history.plot()


def test_history_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    X, y = blob_data()
    history = classifier().fit(X, y, epochs=2, validation_split=0.2, verbose=0)
    path = tmp_path / "curves.png"
    fig = history.plot(path)
    try:
        assert path.stat().st_size > 0
        assert len(fig.axes) == 2  # loss and accuracy, each with its val_ curve
        assert {line.get_label() for line in fig.axes[0].lines} == {"loss", "val_loss"}
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- determinism
def trained(seed, dropout_seed=0):
    X, y = blob_data(offset=15)
    model = fn.Sequential([fn.Dense(2, 8, activation="relu", seed=0),
                           fn.Dropout(0.2, seed=dropout_seed), fn.Dense(8, 3, seed=1)])
    model.compile("cross_entropy", "adam", metrics=["accuracy"])
    history = model.fit(X, y, epochs=3, batch_size=8, seed=seed, verbose=0)
    return model, history


def test_same_seed_gives_bit_identical_runs():
    a, ha = trained(seed=3)
    b, hb = trained(seed=3)
    np.testing.assert_array_equal(a.params, b.params)
    assert ha.history == hb.history


def test_different_seeds_differ():
    a, ha = trained(seed=3)
    b, hb = trained(seed=4)
    assert not np.array_equal(a.params, b.params)
    assert ha.history["loss"] != hb.history["loss"]


# ---------------------------------------------------------------------------- summary / repr
def test_summary_and_repr():
    model = fn.Sequential([fn.Dense(64, 128, activation="relu"), fn.Dropout(0.1),
                           fn.Dense(128, 10)])
    assert repr(model) == "Sequential([Dense(64, 128, activation='relu'), Dropout(0.1), " \
                          "Dense(128, 10)])"
    printed = []
    assert model.summary(print_fn=printed.append) is None
    (text,) = printed
    assert "Dense(64, 128, activation='relu')" in text and "(None, 128)" in text
    assert "8,320" in text and "1,290" in text
    assert f"Total params: {model.n_params:,} (float32)" in text


# ---------------------------------------------------------------------------- save / load
def trained_for_saving(optimizer=None):
    X, y = blob_data(offset=16)
    model = classifier(optimizer=optimizer or fn.optimizers.Adam(lr=0.01))
    model.fit(X, y, epochs=2, batch_size=8, seed=0, verbose=0)
    return model, X, y


def test_save_load_round_trip_predictions_and_state(tmp_path):
    model, X, y = trained_for_saving()
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fn.load_model(path)
    assert repr(loaded) == repr(model)
    np.testing.assert_array_equal(loaded.params, model.params)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.evaluate(X, y) == model.evaluate(X, y)
    assert loaded.loss.get_config() == model.loss.get_config()
    assert loaded.metrics == model.metrics
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.iterations == model.optimizer.iterations > 0
    for name, buf in model.optimizer.state.items():
        np.testing.assert_array_equal(loaded.optimizer.state[name], buf)
    assert os.listdir(tmp_path) == ["model.npz"]  # no temp file left behind


@pytest.mark.parametrize("optimizer", [
    fn.optimizers.Adam(lr=0.01, amsgrad=True),
    fn.optimizers.SGD(lr=fn.schedules.InverseSqrt(0.1), momentum=0.9, nesterov=True),
    fn.optimizers.RMSprop(lr=0.01, momentum=0.5, centered=True),
], ids=["adam", "sgd_schedule", "rmsprop"])
def test_load_then_fit_continues_bit_identically(tmp_path, optimizer):
    model, X, y = trained_for_saving(optimizer)
    model.optimizer.lr_scale = 0.5  # as ReduceLROnPlateau would leave it
    model.save(tmp_path / "m.npz")
    loaded = fn.load_model(tmp_path / "m.npz")
    assert loaded.optimizer.lr_scale == 0.5
    ha = model.fit(X, y, epochs=2, batch_size=8, seed=5, verbose=0)
    hb = loaded.fit(X, y, epochs=2, batch_size=8, seed=5, verbose=0)
    np.testing.assert_array_equal(loaded.params, model.params)
    assert ha.history == hb.history


def test_save_uncompiled_model(tmp_path):
    model = fn.Sequential([fn.Dense(3, 4, activation="elu", alpha=0.5, dtype="float64"),
                           fn.LeakyReLU(0.2, dtype="float64"), fn.Dense(4, 2, dtype="float64",
                                                                        use_bias=False)])
    model.save(str(tmp_path / "raw.npz"))
    loaded = fn.load_model(str(tmp_path / "raw.npz"))
    assert loaded.loss is None and loaded.dtype == np.float64
    X = rng(17).normal(size=(4, 3))
    np.testing.assert_array_equal(loaded.forward(X), model.forward(X))
    with pytest.raises(fn.NotCompiledError):
        loaded.predict(X)


def test_save_overwrites_atomically(tmp_path):
    model, X, _ = trained_for_saving()
    path = tmp_path / "m.npz"
    model.save(path)
    model.params[...] = 0
    model.save(path)
    np.testing.assert_array_equal(fn.load_model(path).params, 0)
    assert os.listdir(tmp_path) == ["m.npz"]


def test_failing_save_keeps_the_existing_file(tmp_path, monkeypatch):
    model, X, _ = trained_for_saving()
    path = tmp_path / "m.npz"
    model.save(path)
    expected = model.predict(X)
    original = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    model.params[...] = 0
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["m.npz"]
    np.testing.assert_array_equal(fn.load_model(path).predict(X), expected)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        fn.load_model(tmp_path / "absent.npz")


def test_load_rejects_corrupt_truncated_and_foreign_files(tmp_path):
    model, _, _ = trained_for_saving()
    good = tmp_path / "good.npz"
    model.save(good)
    data = good.read_bytes()
    files = {
        "truncated.npz": data[: len(data) // 2],
        "corrupt.npz": bytes(rng(18).integers(0, 256, size=len(data), dtype=np.uint8)),
        "text.npz": b"this is not a model\n",
        "empty.npz": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "foreign.npz", a=rng(19).normal(size=(3, 3)), b=np.arange(4))
    np.savez(tmp_path / "foreign_meta.npz", meta=np.array('{"format": "keras"}'),
             params=np.zeros(3))
    np.savez(tmp_path / "not_json.npz", meta=np.array("{not json"), params=np.zeros(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    for name in list(files) + ["foreign.npz", "foreign_meta.npz", "not_json.npz", "array.npy"]:
        with pytest.raises(ValueError, match="fastnn model file") as info:
            fn.load_model(tmp_path / name)
        assert name in str(info.value)
        assert "pickle" not in str(info.value)  # no hint to load a stranger's file unsafely


def test_load_rejects_damaged_contents(tmp_path):
    model, _, _ = trained_for_saving()
    model.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as data:
        arrays = {k: data[k] for k in data.files}
    import json

    meta = json.loads(str(arrays["meta"]))
    wrong_version = dict(meta, version=99)
    np.savez(tmp_path / "version.npz", **dict(arrays, meta=np.array(json.dumps(wrong_version))))
    with pytest.raises(ValueError, match="version 99"):
        fn.load_model(tmp_path / "version.npz")
    np.savez(tmp_path / "short.npz", **dict(arrays, params=arrays["params"][:-1]))
    with pytest.raises(ValueError, match="parameter vector"):
        fn.load_model(tmp_path / "short.npz")
    no_layers = dict(meta, config={})
    np.savez(tmp_path / "nolayers.npz", **dict(arrays, meta=np.array(json.dumps(no_layers))))
    with pytest.raises(ValueError, match="damaged fastnn model file"):
        fn.load_model(tmp_path / "nolayers.npz")
    del arrays["optimizer/exp_avg"]
    np.savez(tmp_path / "nostate.npz", **arrays)
    with pytest.raises(ValueError, match="damaged fastnn model file"):
        fn.load_model(tmp_path / "nostate.npz")


def test_saved_file_is_plain_npz_without_pickle(tmp_path):
    model, _, _ = trained_for_saving()
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:
        assert {"params", "meta"} <= set(data.files)
        assert data["params"].dtype == np.float32
