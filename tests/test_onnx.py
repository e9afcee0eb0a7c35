"""fastnn.onnx: onnxruntime reproduces predict for every activation, dtype and output link;
load(export(m)) gives back the same weights; graphs from skl2onnx and torch.onnx load."""
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fastnn as fn  # noqa: E402
from fastnn import onnx as fonnx  # noqa: E402
from _helpers import ACTIVATIONS, rng  # noqa: E402

# float64: onnxruntime's Softplus, Elu and LeakyRelu differ from fastnn's in the last
# ~1e-10 (other formulas), not in float64 rounding alone.
TOL = {"float32": 1e-5, "float64": 1e-9}
LINKS = ("cross_entropy", "binary_cross_entropy", "mse")


#: Valid ONNX that onnxruntime has no CPU kernel for; onnx's reference runtime runs it.
NO_ORT_KERNEL = {("softplus", "float64"), ("elu", "float64")}


def run(proto, X):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})


def run_reference(proto, X):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(proto).run(None, {"X": X})


def network(activation, dtype, loss, n_out=3):
    model = fn.Sequential([
        fn.Dense(5, 7, activation=activation, dtype=dtype, seed=1),
        fn.Dropout(0.5, dtype=dtype),
        fn.Dense(7, 6, dtype=dtype, seed=2),
        fn.Activation(activation, dtype=dtype),
        fn.Dense(6, n_out, dtype=dtype, seed=3),
    ])
    return model.compile(loss=loss)


@pytest.mark.parametrize("loss", LINKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_onnxruntime_reproduces_predict(activation, dtype, loss):
    model = network(activation, dtype, loss)
    X = rng().normal(size=(20, 5)).astype(dtype)
    runtime = run_reference if (activation, dtype) in NO_ORT_KERNEL else run
    (out,) = runtime(fonnx.to_onnx(model), X)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, model.predict(X), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_activation_alpha_is_exported(activation):
    model = fn.Sequential([fn.Dense(3, 4, activation=activation, alpha=0.3, seed=0),
                           fn.Dense(4, 2, seed=1)]).compile(loss="mse")
    X = rng().normal(size=(30, 3)).astype(np.float32) * 3
    (out,) = run(fonnx.to_onnx(model), X)
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-5, atol=1e-5)
    assert fonnx.load(fonnx.to_onnx(model)).layers[0].alpha == pytest.approx(0.3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", LINKS)
def test_load_of_export_round_trips_weights_exactly(tmp_path, dtype, loss):
    model = network("elu", dtype, loss)
    model.add(fn.Dense(3, 2, use_bias=False, dtype=dtype, seed=4))
    path = tmp_path / "model.onnx"
    fonnx.export(model, path)
    back = fonnx.load(path)
    assert back.loss.name == loss and back.dtype == np.dtype(dtype)
    # Dropout is gone; the Activation after a linear Dense comes back fused into it.
    assert [type(layer).__name__ for layer in back.layers] == ["Dense"] * 4
    assert [layer.activation for layer in back.layers] == ["elu", "elu", "identity", "identity"]
    assert [layer.use_bias for layer in back.layers] == [True, True, True, False]
    for a, b in zip(back.get_weights(), model.get_weights()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    X = rng().normal(size=(9, 5)).astype(dtype)
    np.testing.assert_array_equal(back.predict(X), model.predict(X))
    back.fit(X, np.zeros((9, 2), dtype) if loss != "cross_entropy" else np.zeros(9, int),
             epochs=1, verbose=0)  # trainable


def test_uncompiled_model_exports_raw_output():
    model = fn.Sequential([fn.Dense(4, 3, activation="tanh", seed=0), fn.Dense(3, 2, seed=1)])
    X = rng().normal(size=(5, 4)).astype(np.float32)
    (out,) = run(fonnx.to_onnx(model), X)
    np.testing.assert_allclose(out, model.forward(X), rtol=1e-5, atol=1e-6)
    assert fonnx.load(fonnx.to_onnx(model)).loss.name == "mse"


# ----------------------------------------------------------------------------------
# The sklearn estimators: label + probabilities, or the regression values
# ----------------------------------------------------------------------------------

sklearn_estimators = pytest.importorskip("fastnn.sklearn")


def fitted(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(X, y)


@pytest.mark.parametrize("labels", [
    np.array([0, 1, 2]), np.array(["a", "b", "c"]), np.array([-1, 1]),
    np.array(["no", "yes"], dtype=object), np.array([2.0, 7.0])],
    ids=["int", "str", "minus-plus-one", "object", "float"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_classifier_label_and_probabilities(labels, dtype):
    X = rng().normal(size=(60, 4))
    y = labels[(X[:, 0] > 0).astype(int) + (len(labels) > 2) * (X[:, 1] > 0.5)]
    model = fitted(sklearn_estimators.MLPClassifier((8,), max_iter=30, random_state=0,
                                                    dtype=dtype), X, y)
    label, prob = run(fonnx.to_onnx(model), X.astype(dtype))
    np.testing.assert_allclose(prob, model.predict_proba(X), rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(label, model.predict(X))


def test_multilabel_classifier_exports_indicator_labels():
    X = rng().normal(size=(50, 3)).astype(np.float32)
    Y = (X > 0).astype(int)
    model = fitted(sklearn_estimators.MLPClassifier((8,), max_iter=50, random_state=0), X, Y)
    label, prob = run(fonnx.to_onnx(model), X)
    np.testing.assert_allclose(prob, model.predict_proba(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(label, model.predict(X))


@pytest.mark.parametrize("n_outputs", [1, 2])
def test_regressor_exports_values(n_outputs):
    X = rng().normal(size=(40, 3)).astype(np.float32)
    y = X[:, :n_outputs] * 2 + 1
    model = fitted(sklearn_estimators.MLPRegressor(hidden_layer_sizes=(8,), max_iter=30, random_state=0), X,
                   y[:, 0] if n_outputs == 1 else y)
    (out,) = run(fonnx.to_onnx(model), X)
    np.testing.assert_allclose(out.reshape(model.predict(X).shape), model.predict(X),
                               rtol=1e-5, atol=1e-5)


def test_export_needs_a_fitted_fastnn_model():
    with pytest.raises(TypeError, match="not fitted"):
        fonnx.to_onnx(sklearn_estimators.MLPClassifier())
    with pytest.raises(TypeError, match="model must be a fastnn Sequential"):
        fonnx.to_onnx(object())


# ----------------------------------------------------------------------------------
# Import of other producers' graphs, and what is refused
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "multiclass", "regressor"])
def test_import_from_skl2onnx(kind):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn import neural_network

    X = rng().normal(size=(60, 4)).astype(np.float32)
    if kind == "regressor":
        est = neural_network.MLPRegressor(hidden_layer_sizes=(6, 5), activation="tanh", max_iter=50,
                                          random_state=0)
        y = X[:, 0] - X[:, 1]
    else:
        est = neural_network.MLPClassifier((6,), activation="logistic", max_iter=50,
                                           random_state=0)
        y = (X[:, 0] > 0).astype(int) + (kind == "multiclass") * (X[:, 1] > 0)
    fitted(est, X, y)
    options = None if kind == "regressor" else {id(est): {"zipmap": False}}
    model = fonnx.load(skl2onnx.to_onnx(est, X[:1], options=options))
    assert model.loss.name == {"binary": "binary_cross_entropy",
                               "multiclass": "cross_entropy", "regressor": "mse"}[kind]
    out = model.predict(X)
    if kind == "regressor":
        np.testing.assert_allclose(out[:, 0], est.predict(X), rtol=1e-4, atol=1e-5)
    else:
        expected = est.predict_proba(X)
        np.testing.assert_allclose(out, expected[:, 1:] if kind == "binary" else expected,
                                   rtol=1e-4, atol=1e-5)


def test_import_from_torch_onnx(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5),
                              torch.nn.LeakyReLU(0.2), torch.nn.Linear(5, 3))
    path = tmp_path / "torch.onnx"
    torch.onnx.export(net, torch.zeros(1, 4), str(path), input_names=["X"],
                      dynamic_axes={"X": {0: "n"}}, dynamo=False)
    model = fonnx.load(path)
    X = rng().normal(size=(10, 4)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-5, atol=1e-5)


def graph_with(op):
    """X -> Gemm -> ``op`` -> Gemm."""
    h = onnx.helper
    W = onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    nodes = [h.make_node("Gemm", ["X", "W"], ["a"]), h.make_node(op, ["a"], ["b"]),
             h.make_node("Gemm", ["b", "W"], ["y"])]
    value = h.make_tensor_value_info
    graph = h.make_graph(nodes, "g", [value("X", onnx.TensorProto.FLOAT, [None, 2])],
                         [value("y", onnx.TensorProto.FLOAT, [None, 2])], [W])
    return h.make_model(graph)


def test_unsupported_op_is_named():
    with pytest.raises(ValueError, match="unsupported ONNX op 'Abs'"):
        fonnx.load(graph_with("Abs"))
    assert [layer.activation for layer in fonnx.load(graph_with("Relu")).layers] == \
        ["relu", "identity"]


def test_single_class_classifier_is_not_exported():
    X = rng().normal(size=(10, 2))
    model = fitted(sklearn_estimators.MLPClassifier(max_iter=2), X, ["a"] * 10)
    with pytest.raises(ValueError, match="single class"):
        fonnx.to_onnx(model)


def test_gemm_attributes_as_torch_writes_them():
    # torch.onnx writes Linear as Gemm(x, W (out, in), b, transB=1); alpha and beta scale.
    h = onnx.helper
    W = rng().normal(size=(3, 4)).astype(np.float32)
    b = rng(1).normal(size=3).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(W, "W"), onnx.numpy_helper.from_array(b, "b")]
    nodes = [h.make_node("Flatten", ["X"], ["x"]),
             h.make_node("Gemm", ["x", "W", "b"], ["z"], transB=1, alpha=2.0, beta=0.5),
             h.make_node("Tanh", ["z"], ["y"])]
    value = h.make_tensor_value_info
    graph = h.make_graph(nodes, "g", [value("X", onnx.TensorProto.FLOAT, [None, 4])],
                         [value("y", onnx.TensorProto.FLOAT, [None, 3])], inits)
    model = fonnx.load(h.make_model(graph))
    X = rng(2).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(X), np.tanh(2 * X @ W.T + 0.5 * b), rtol=1e-5,
                               atol=1e-6)
    assert model.layers[0].activation == "tanh" and model.loss.name == "mse"
