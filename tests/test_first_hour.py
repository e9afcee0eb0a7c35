"""What a newcomer from Keras or scikit-learn meets first: Keras names, and errors that
say how to fix the mistake."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn as fn
from _helpers import blobs, mlp, rng


@pytest.mark.parametrize("alias, name", [
    ("sparse_categorical_crossentropy", "cross_entropy"),
    ("categorical_crossentropy", "cross_entropy"),
    ("binary_crossentropy", "binary_cross_entropy"),
    ("mean_squared_error", "mse"),
    ("mean_absolute_error", "mae"),
])
def test_keras_loss_names(alias, name):
    assert fn.losses.get(alias).name == name


def test_categorical_crossentropy_takes_one_hot_rows():
    X, y = blobs(10, rng(60))
    model = mlp([2, 6, 3]).compile("categorical_crossentropy", "adam")
    one_hot = np.eye(3)[y]
    np.testing.assert_allclose(model.evaluate(X, one_hot)["loss"],
                               model.evaluate(X, y)["loss"], rtol=1e-6)


def test_a_class_instead_of_an_instance_says_to_call_it():
    model = mlp([2, 3])
    with pytest.raises(TypeError, match=r"got the class Adam: call it, Adam\(\)"):
        model.compile("mse", fn.optimizers.Adam)
    with pytest.raises(TypeError, match=r"got the class LBFGS: call it, LBFGS\(\)"):
        model.compile("mse", fn.solvers.LBFGS)
    with pytest.raises(TypeError, match=r"got the class Huber: call it, Huber\(\)"):
        model.compile(fn.losses.Huber, "sgd")


def test_importing_the_source_checkout_explains_itself(tmp_path):
    # A checkout: fastnn/ beside kernels/, which only an install maps to fastnn.kernels.
    package = tmp_path / "checkout" / "fastnn"
    package.mkdir(parents=True)
    shutil.copy(Path(fn.__file__), package / "__init__.py")
    (tmp_path / "checkout" / "kernels").mkdir()
    (tmp_path / "checkout" / "kernels" / "_numpy.py").write_text("")
    # -S: no site-packages, so no installed fastnn (and no editable finder) to fall back on
    result = subprocess.run([sys.executable, "-S", "-c", "import fastnn"], text=True,
                            cwd=tmp_path / "checkout", capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "imported from its source checkout" in result.stderr
    assert "pip install -e ." in result.stderr


def test_keras_metric_names_log_under_fastnns_names():
    X, y = blobs(10, rng(61))
    model = mlp([2, 6, 3]).compile("cross_entropy", "adam", metrics=["acc"])
    assert model.metrics == ("accuracy",)
    assert set(model.fit(X, y, epochs=1, verbose=0).history) == {"loss", "accuracy"}
    reg = mlp([2, 3, 1]).compile("mse", "adam", metrics=["mean_absolute_error"])
    assert reg.metrics == ("mae",)


# ---------------------------------------------------------------------------- Dense(units)
def test_dense_units_infers_input_sizes_from_the_previous_layer_and_input_shape():
    model = fn.Sequential([fn.Dense(16, activation="relu", input_shape=(4,)),
                           fn.Dense(8, "tanh"), fn.Dropout(0.1), fn.Dense(3)])
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(4, 16), (16,), (16, 8), (8,), (8, 3), (3,)]
    assert repr(model.layers[1]) == "Dense(16, 8, activation='tanh')"
    explicit = fn.Sequential([fn.Dense(4, 16, "relu", seed=0)])
    keras = fn.Sequential([fn.Dense(16, "relu", input_shape=(4,), seed=0)])
    np.testing.assert_array_equal(keras.get_weights()[0], explicit.get_weights()[0])


def test_dense_units_first_layer_is_built_by_the_first_batch(tmp_path):
    X, y = blobs(10, rng(62))
    model = fn.Sequential([fn.Dense(8, activation="relu", seed=0), fn.Dense(3, seed=1)])
    model.compile("cross_entropy", "adam", metrics=["accuracy"])
    with pytest.raises(ValueError, match="get_weights needs the model's input size"):
        model.get_weights()
    with pytest.raises(ValueError, match="input_shape"):
        model.summary()
    model.fit(X, y, epochs=2, verbose=0, seed=0)
    assert model.n_features == 2 and model.n_params == 2 * 8 + 8 + 8 * 3 + 3
    reference = fn.Sequential([fn.Dense(2, 8, "relu", seed=0), fn.Dense(8, 3, seed=1)])
    reference.compile("cross_entropy", "adam", metrics=["accuracy"])
    reference.fit(X, y, epochs=2, verbose=0, seed=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    model.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(fn.load_model(tmp_path / "m.npz").predict(X),
                                  model.predict(X))
    with pytest.raises(ValueError, match="X has 3 features per sample, but the model expects 2"):
        model.predict(np.zeros((2, 3)))


def test_dense_units_argument_problems():
    with pytest.raises(TypeError, match="activation given twice"):
        fn.Dense(8, "relu", activation="tanh")
    with pytest.raises(TypeError, match="input_shape goes with Dense"):
        fn.Dense(4, 8, input_shape=(4,))
    with pytest.raises(ValueError, match=r"input_shape must be a tuple of one int"):
        fn.Dense(8, input_shape=(4, 4))


# ---------------------------------------------------------------------------- softmax
def test_softmax_on_the_last_layer_is_folded_into_cross_entropy():
    X, y = blobs(10, rng(63))
    with_softmax = fn.Sequential([fn.Dense(2, 8, "relu", seed=0),
                                  fn.Dense(8, 3, activation="softmax", seed=1)])
    logits = fn.Sequential([fn.Dense(2, 8, "relu", seed=0), fn.Dense(8, 3, seed=1)])
    for model in (with_softmax, logits):
        model.compile("sparse_categorical_crossentropy", fn.optimizers.Adam(lr=0.05),
                      metrics=["accuracy"])
    a = with_softmax.fit(X, y, epochs=3, seed=0, verbose=0).history
    b = logits.fit(X, y, epochs=3, seed=0, verbose=0).history
    assert a == b
    probabilities = with_softmax.predict(X)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probabilities, logits.predict(X))


def test_softmax_elsewhere_is_refused():
    with pytest.raises(ValueError, match="softmax' goes on the last Dense layer only"):
        fn.Sequential([fn.Dense(2, 8, "softmax"), fn.Dense(8, 3)])
    model = fn.Sequential([fn.Dense(2, 3, "softmax")])
    with pytest.raises(ValueError, match="needs the cross_entropy loss.*'mse'"):
        model.compile("mse")


# ---------------------------------------------------------------------------- errors that say how
def test_layers_as_separate_arguments_or_classes_say_what_to_do():
    with pytest.raises(TypeError, match=r"one list: Sequential\(\[layer1, layer2, \.\.\.\]\)"):
        fn.Sequential(fn.Dense(2, 3), fn.Dense(3, 1))
    with pytest.raises(TypeError, match=r"layers\[0\] is the class Dense; create a layer"):
        fn.Sequential([fn.Dense])


def test_ragged_sparse_and_string_inputs_say_what_to_do():
    model = mlp([2, 3]).compile("cross_entropy")
    with pytest.raises(ValueError, match="X is a ragged nested sequence"):
        model.predict([[1.0, 2.0], [3.0]])
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match=r"sparse input is not supported; convert it with "
                                        r"X\.toarray\(\)"):
        model.predict(scipy_sparse.csr_matrix(np.ones((2, 2))))
    regression = mlp([2, 1]).compile("mse")
    with pytest.raises(TypeError, match=r"X must hold numbers, got strings.*one-hot"):
        regression.fit([["a", "b"]], [1.0], verbose=0)
    with pytest.raises(TypeError, match=r"y must hold numbers, got strings"):
        regression.fit(np.ones((2, 2)), ["1.5", "2"], verbose=0)


@pytest.mark.parametrize("make", [np.array, list, lambda v: np.array(v, dtype=object)])
def test_string_labels_are_mapped_and_kept_with_the_model(make, tmp_path):
    X, codes = blobs(10, rng(65))
    names = np.array(["cat", "dog", "emu"])
    y = make(names[codes].tolist())
    model = fn.Sequential([fn.Dense(2, 8, "relu", seed=0), fn.Dense(8, 3, seed=1)])
    model.compile("cross_entropy", fn.optimizers.Adam(lr=0.05), metrics=["accuracy"])
    reference = fn.Sequential([fn.Dense(2, 8, "relu", seed=0), fn.Dense(8, 3, seed=1)])
    reference.compile("cross_entropy", fn.optimizers.Adam(lr=0.05), metrics=["accuracy"])
    history = model.fit(X, y, epochs=20, seed=0, verbose=0, validation_data=(X, y))
    assert history.history == reference.fit(X, codes, epochs=20, seed=0, verbose=0,
                                            validation_data=(X, codes)).history
    assert model.class_labels.classes.tolist() == ["cat", "dog", "emu"]
    predicted = model.predict_classes(X)
    assert predicted.tolist() == names[reference.predict_classes(X)].tolist()
    assert model.evaluate(X, y) == reference.evaluate(X, codes)
    model.save(tmp_path / "m.npz")
    loaded = fn.load_model(tmp_path / "m.npz")
    assert loaded.predict_classes(X).tolist() == predicted.tolist()
    with pytest.raises(ValueError, match=r"not among the classes \['cat', 'dog', 'emu'\]"):
        model.evaluate(X[:2], ["cat", "yak"])
    with pytest.raises(TypeError, match="labels like the classes the model was trained on"):
        model.evaluate(X[:2], [0, 1])


def test_binary_string_labels_and_too_many_classes():
    X = rng(66).normal(size=(20, 2)).astype(np.float32)
    y = np.where(X[:, 0] > 0, "yes", "no")
    model = mlp([2, 4, 1]).compile("binary_cross_entropy", fn.optimizers.Adam(lr=0.05))
    model.fit(X, y, epochs=30, verbose=0, seed=0)
    assert set(model.predict_classes(X).tolist()) <= {"no", "yes"}
    too_many = mlp([2, 4, 2]).compile("cross_entropy")
    with pytest.raises(ValueError, match="y has 3 classes, but the model has 2 output"):
        too_many.fit(X[:3], ["a", "b", "c"], verbose=0)


def test_one_based_labels_suggest_y_minus_1():
    model = mlp([2, 3]).compile("cross_entropy")
    with pytest.raises(ValueError, match="labels look 1-based: pass y - 1"):
        model.fit(np.ones((3, 2)), [1, 2, 3], verbose=0)
    with pytest.raises(ValueError) as info:
        model.fit(np.ones((3, 2)), [0, 1, 5], verbose=0)
    assert "1-based" not in str(info.value)


def test_pandas_inputs_work_in_the_core_api():
    pd = pytest.importorskip("pandas")
    X, codes = blobs(10, rng(67))
    frame = pd.DataFrame(X, columns=["a", "b"])
    labels = pd.Series(np.array(["x", "y", "z"])[codes])
    model = mlp([2, 6, 3]).compile("cross_entropy", metrics=["accuracy"])
    model.fit(frame, labels, epochs=2, verbose=0)
    assert model.predict_classes(frame).tolist()[0] in {"x", "y", "z"}
    assert set(model.evaluate(frame, labels)) == {"loss", "accuracy"}


def test_save_refuses_other_extensions(tmp_path):
    model = mlp([2, 3]).compile("cross_entropy")
    for name in ("model.h5", "model.keras", "model"):
        with pytest.raises(ValueError, match=r"fastnn writes \.npz model files"):
            model.save(tmp_path / name)
        assert not (tmp_path / name).exists()
    model.save(tmp_path / "model.NPZ")
    assert fn.load_model(tmp_path / "model.NPZ").n_params == model.n_params
