"""fastnn.Perceptron: Rosenblatt's rule, checked by hand, on iris, XOR and digits, per backend."""
import numpy as np
import pytest

import fastnn.datasets
from _helpers import active_backend  # noqa: F401  (fixture: each backend active in turn)
from fastnn._labels import ClassLabels
from fastnn.perceptron import NotFittedError, Perceptron


def reference_perceptron(X, y, lr, epochs):
    """The textbook rule, one sample at a time in the given order, no shortcuts."""
    classes, codes = np.unique(y, return_inverse=True)
    k = 1 if len(classes) == 2 else len(classes)
    targets = codes[:, None].astype(X.dtype) if k == 1 else np.eye(k, dtype=X.dtype)[codes]
    W, b = np.zeros((X.shape[1], k), X.dtype), np.zeros(k, X.dtype)
    mistakes = []
    for _ in range(epochs):
        count = 0
        for x, t in zip(X, targets):
            error = t - (x @ W + b >= 0)
            if error.any():
                W += lr * np.outer(x, error)
                b += lr * error
                count += 1
        mistakes.append(count)
        if count == 0:
            break
    return W, b, mistakes


def iris_setosa():
    """Petal length and width; 1 for setosa, 0 for the rest (the lecture-notes setup)."""
    X, y = fastnn.datasets.load_iris()
    return X[:, 2:4], (y == 0).astype(np.int64)


def standardized_iris():
    X, y = fastnn.datasets.load_iris()
    return (X - X.mean(0)) / X.std(0), y


# ----------------------------------------------------------------------------------
# The learning rule
# ----------------------------------------------------------------------------------

def test_binary_rule_by_hand(active_backend):
    # From W = 0, b = 0, with step(z) = [z >= 0]:
    #   x=(1,0) t=0: z=0  -> 1, error -1: w=(-1, 0), b=-1
    #   x=(0,1) t=1: z=-1 -> 0, error +1: w=(-1, 1), b=0
    #   x=(1,1) t=1: z=0  -> 1, correct.
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([0, 1, 1])
    model = Perceptron(max_epochs=1, shuffle=False).fit(X, y)
    np.testing.assert_array_equal(model.coef_, [[-1.0], [1.0]])
    np.testing.assert_array_equal(model.intercept_, [0.0])
    assert model.n_epochs_ == 1 and model.mistakes_.tolist() == [2]
    assert model.converged_ is False
    # The second epoch makes no mistake: converged, weights unchanged.
    model = Perceptron(max_epochs=10, shuffle=False).fit(X, y)
    np.testing.assert_array_equal(model.W, [[-1.0], [1.0]])
    np.testing.assert_array_equal(model.b, [0.0])
    assert model.n_epochs_ == 2 and model.mistakes_.tolist() == [2, 0]
    assert model.converged_ is True
    np.testing.assert_array_equal(model.predict(X), y)


def test_learning_rate_scales_the_updates(active_backend):
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    model = Perceptron(lr=0.5, max_epochs=1, shuffle=False).fit(X, [0, 1, 1])
    np.testing.assert_array_equal(model.coef_, [[-0.5], [0.5]])
    np.testing.assert_array_equal(model.intercept_, [0.0])


def test_one_vs_rest_rule_by_hand(active_backend):
    # Targets per unit (classes 0, 1, 2): (1,0,0), (0,0,1), (0,1,0).
    #   x=(1,0): z=(0,0,0) -> (1,1,1), error (0,-1,-1): W[:,1]=W[:,2]=(-1,0), b=(0,-1,-1)
    #   x=(0,1): z=(0,-1,-1) -> (1,0,0), error (-1,0,1): W[:,0]=(0,-1), W[:,2]=(-1,1), b=(-1,-1,0)
    #   x=(1,1): z=(-2,-2,0) -> (0,0,1), error (0,1,-1): W[:,1]=(0,1), W[:,2]=(-2,0), b=(-1,0,-1)
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    model = Perceptron(max_epochs=1, shuffle=False).fit(X, [0, 2, 1])
    np.testing.assert_array_equal(model.coef_, [[0.0, 0.0, -2.0], [-1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(model.intercept_, [-1.0, 0.0, -1.0])
    assert model.mistakes_.tolist() == [3]
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "one-vs-rest"])
def test_matches_sample_by_sample_reference(active_backend, binary):
    # Integer pixels in float64 keep every sum exact, so the result must match exactly.
    X, y = fastnn.datasets.load_digits()
    X = X.astype(np.float64)
    if binary:
        y = (y == 3).astype(np.int64)
    model = Perceptron(max_epochs=4, shuffle=False).fit(X, y)
    W, b, mistakes = reference_perceptron(X, y, 1.0, 4)
    np.testing.assert_array_equal(model.coef_, W)
    np.testing.assert_array_equal(model.intercept_, b)
    assert model.mistakes_.tolist() == mistakes


# ----------------------------------------------------------------------------------
# What it can and cannot learn
# ----------------------------------------------------------------------------------

def test_iris_setosa_vs_rest_converges(active_backend):
    X, y = iris_setosa()
    model = Perceptron(seed=0).fit(X, y)
    assert model.converged_ is True
    assert model.n_epochs_ < model.max_epochs and model.mistakes_[-1] == 0
    assert model.score(X, y) == 1.0
    assert model.coef_.shape == (2, 1) and model.intercept_.shape == (1,)
    np.testing.assert_array_equal(model.predict([[2.0, 0.5], [5.0, 1.8]]), [1, 0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_iris_setosa_converges_for_any_order(seed):
    X, y = iris_setosa()
    model = Perceptron(seed=seed).fit(X, y)
    assert model.converged_ and model.score(X, y) == 1.0


def test_xor_is_not_solved(active_backend):
    X, y = fastnn.datasets.xor()
    model = Perceptron(max_epochs=50, seed=0).fit(X, y)
    assert model.converged_ is False
    assert model.n_epochs_ == 50
    assert (model.mistakes_ > 0).all()
    assert model.score(X, y) < 1.0


def test_iris_one_vs_rest(active_backend):
    X, y = standardized_iris()
    model = Perceptron(seed=0).fit(X, y)
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    assert model.coef_.shape == (4, 3) and model.intercept_.shape == (3,)
    assert model.converged_ is False  # versicolor is not separable from the rest
    assert model.n_epochs_ == 100
    assert model.score(X, y) >= 0.7
    # Each unit follows its own rule: the setosa unit, on a separable problem, ends with
    # no mistake on setosa-vs-rest.
    np.testing.assert_array_equal(model.decision_function(X)[:, 0] >= 0, y == 0)


def test_digits_one_vs_rest(active_backend):
    X, y = fastnn.datasets.load_digits(scale=True)
    X_train, X_test, y_train, y_test = fastnn.datasets.train_test_split(
        X, y, seed=0, stratify=True)
    model = Perceptron(max_epochs=30, seed=0).fit(X_train, y_train)
    assert model.coef_.shape == (64, 10)
    assert model.score(X_train, y_train) >= 0.9
    assert model.score(X_test, y_test) >= 0.85


def test_predictions_follow_the_net_input(active_backend):
    X, y = standardized_iris()
    X = X.astype(np.float64)
    multi = Perceptron(seed=0).fit(X, y)
    scores = X @ multi.coef_ + multi.intercept_
    np.testing.assert_allclose(multi.decision_function(X), scores, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(multi.predict(X), multi.classes_[np.argmax(scores, 1)])
    binary = Perceptron(seed=0).fit(X, y == 2)
    z = X @ binary.coef_[:, 0] + binary.intercept_[0]
    np.testing.assert_allclose(binary.decision_function(X), z, rtol=1e-12, atol=1e-12)
    assert binary.decision_function(X).shape == (150,)  # sklearn's shape for 2 classes
    np.testing.assert_array_equal(binary.predict(X), z >= 0)


# ----------------------------------------------------------------------------------
# Labels, dtypes, determinism
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [(-1, 1), (3, 7), ("no", "yes"), (False, True)])
def test_binary_labels_of_any_kind(labels):
    X, y01 = iris_setosa()
    y = np.array(labels)[y01]
    model = Perceptron(seed=0).fit(X, y)
    np.testing.assert_array_equal(model.classes_, sorted(labels))
    assert model.predict(X).dtype == model.classes_.dtype
    assert model.score(X, y) == 1.0


def test_multiclass_string_and_sparse_integer_labels():
    X, y = standardized_iris()
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    by_name = Perceptron(max_epochs=20, seed=0).fit(X, names)
    by_code = Perceptron(max_epochs=20, seed=0).fit(X, np.array([10, 20, 50])[y])
    by_index = Perceptron(max_epochs=20, seed=0).fit(X, y)
    np.testing.assert_array_equal(by_name.classes_, ["setosa", "versicolor", "virginica"])
    np.testing.assert_array_equal(by_code.classes_, [10, 20, 50])
    np.testing.assert_array_equal(by_name.coef_, by_index.coef_)
    np.testing.assert_array_equal(by_code.coef_, by_index.coef_)
    assert set(by_name.predict(X)) <= set(by_name.classes_)
    assert by_name.score(X, names) == by_index.score(X, y)


def test_integer_valued_float_labels_keep_their_dtype_as_in_sklearn():
    X, y = iris_setosa()
    model = Perceptron(seed=0).fit(X, y.astype(np.float64))
    assert model.classes_.dtype == np.float64
    np.testing.assert_array_equal(model.classes_, [0.0, 1.0])
    assert model.predict(X).dtype == np.float64


def test_object_and_minus_plus_one_labels():
    X, y = iris_setosa()
    signs = Perceptron(seed=0).fit(X, np.where(y == 1, 1, -1))
    np.testing.assert_array_equal(signs.classes_, [-1, 1])
    objects = Perceptron(seed=0).fit(X, np.array(["no", "yes"], dtype=object)[y])
    np.testing.assert_array_equal(objects.classes_, ["no", "yes"])
    np.testing.assert_array_equal(signs.coef_, objects.coef_)
    assert objects.score(X, np.array(["no", "yes"], dtype=object)[y]) == 1.0


def test_float32_input_trains_in_float32_else_float64():
    X, y = iris_setosa()
    assert Perceptron(seed=0).fit(X, y).coef_.dtype == np.float32
    assert Perceptron(seed=0).fit(X.astype(np.float64), y).coef_.dtype == np.float64
    assert Perceptron(seed=0).fit(X.tolist(), y).coef_.dtype == np.float64
    model = Perceptron(seed=0).fit(X, y)
    np.testing.assert_array_equal(model.predict(X.astype(np.float64)), model.predict(X))


def test_same_seed_same_model(active_backend):
    X, y = standardized_iris()
    a = Perceptron(max_epochs=20, seed=42).fit(X, y)
    b = Perceptron(max_epochs=20, seed=42).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)
    np.testing.assert_array_equal(a.mistakes_, b.mistakes_)
    c = Perceptron(max_epochs=20, seed=43).fit(X, y)
    assert not np.array_equal(a.coef_, c.coef_)


def test_refit_starts_from_zero():
    X, y = standardized_iris()
    model = Perceptron(max_epochs=20, seed=0)
    first = model.fit(X, y).coef_.copy()
    model.fit(X[:, :2], y == 0)
    assert model.coef_.shape == (2, 1) and model.n_features_in_ == 2
    np.testing.assert_array_equal(model.fit(X, y).coef_, first)


def test_without_shuffle_the_order_is_the_data_order():
    X, y = standardized_iris()
    a = Perceptron(max_epochs=5, shuffle=False).fit(X, y)
    b = Perceptron(max_epochs=5, shuffle=False, seed=123).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_fit_returns_self_and_repr():
    model = Perceptron(lr=0.1, max_epochs=20, shuffle=False, seed=3)
    assert repr(model) == "Perceptron(lr=0.1, max_epochs=20, shuffle=False, seed=3)"
    assert repr(Perceptron()) == "Perceptron(lr=1.0, max_epochs=100, shuffle=True, seed=None)"
    X, y = iris_setosa()
    assert model.fit(X, y) is model
    assert model.W is model.coef_ and model.b is model.intercept_


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("inf")}, ValueError, "lr"),
    ({"lr": "1"}, TypeError, "lr"),
    ({"max_epochs": 0}, ValueError, "max_epochs"),
    ({"max_epochs": 2.0}, TypeError, "max_epochs"),
    ({"shuffle": 1}, TypeError, "shuffle"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
])
def test_bad_hyperparameters_fail_at_fit(kwargs, error, match):
    model = Perceptron(**kwargs)  # sklearn convention: __init__ only stores
    assert model.get_params()[next(iter(kwargs))] is next(iter(kwargs.values()))
    with pytest.raises(error, match=match):
        model.fit(*iris_setosa())


def test_hyperparameters_changed_after_construction_are_checked_by_fit():
    model = Perceptron()
    model.lr = -0.5
    with pytest.raises(ValueError, match="lr"):
        model.fit(*iris_setosa())


@pytest.mark.parametrize("X, y, error, match", [
    (np.ones(4), [0, 1, 0, 1], ValueError, "X must be 2-D"),
    (np.ones((0, 2)), [], ValueError, "X must not be empty"),
    ([[0.0, np.nan], [1.0, 1.0]], [0, 1], ValueError, "X contains 1 NaN"),
    ([[0.0, np.inf], [1.0, 1.0]], [0, 1], ValueError, "X contains 1 NaN or infinite"),
    ([["a", "b"], ["c", "d"]], [0, 1], TypeError, "X must hold numbers"),
    (np.ones((4, 2)), [0, 1, 0], ValueError, "y has 3 samples but X has 4"),
    (np.ones((4, 2)), np.zeros((2, 2)), ValueError, "y must be a 1-D"),
    (np.ones((4, 2)), [1, 1, 1, 1], ValueError, "at least 2 classes"),
    (np.ones((4, 2)), [0.5, 1, 0, 1], ValueError, "y must hold class labels"),
    (np.ones((4, 2)), [np.nan, 1, 0, 1], ValueError, "y contains NaN"),
    (np.ones((4, 2)), None, TypeError, "y must be"),
    (np.ones((4, 2)), "abcd", TypeError, "y must be"),
    (np.ones((4, 2)), np.array(["a", 1, 2, 3], object), TypeError, "labels of one comparable"),
    (np.ones((4, 2)), np.array(["a", None, "b", "a"], object), ValueError, "missing labels"),
])
def test_bad_training_data(X, y, error, match):
    with pytest.raises(error, match=match):
        Perceptron().fit(X, y)


def test_use_before_fit():
    model = Perceptron()
    X, y = iris_setosa()
    for call in (lambda: model.predict(X), lambda: model.score(X, y),
                 lambda: model.decision_function(X), lambda: model.W, lambda: model.b):
        with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
            call()
    assert issubclass(NotFittedError, ValueError)
    assert not hasattr(model, "W")


def test_bad_prediction_input(active_backend):
    X, y = iris_setosa()
    model = Perceptron(seed=0).fit(X, y)
    with pytest.raises(ValueError, match="X has 4 features per sample, but the model expects 2"):
        model.predict(np.ones((3, 4)))
    with pytest.raises(ValueError, match="X has 3 features"):
        Perceptron(seed=0).fit(*standardized_iris()).score(np.ones((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="X contains"):
        model.predict([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="y has 2 samples but X has 3"):
        model.score(np.ones((3, 2)), [0, 1])
    with pytest.raises(TypeError, match="y must hold labels of the kind"):
        model.score(X, np.array(["a"] * 150))


def test_overflow_is_reported():
    X = np.array([[10.0], [-10.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="overflowed .* scale X or lower lr"):
        Perceptron(lr=1e38, shuffle=False).fit(X, [1, 0])


# ----------------------------------------------------------------------------------
# A scikit-learn classifier
# ----------------------------------------------------------------------------------

def test_sklearn_clone_get_params_and_set_params():
    sklearn = pytest.importorskip("sklearn")
    model = Perceptron(lr=0.5, max_epochs=7, shuffle=False, seed=1)
    copy = sklearn.base.clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert copy.set_params(lr=2.0) is copy and copy.lr == 2.0 and model.lr == 0.5
    with pytest.raises(ValueError, match="invalid parameter 'alpha' for Perceptron"):
        copy.set_params(alpha=1.0)
    assert sklearn.base.is_classifier(model)


def test_sklearn_grid_search_and_cross_val_score():
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = fastnn.datasets.load_iris()
    scores = cross_val_score(Perceptron(seed=0), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.6
    search = GridSearchCV(make_pipeline(StandardScaler(), Perceptron(seed=0)),
                          {"perceptron__max_epochs": [1, 50]}, cv=3).fit(X, y)
    assert search.best_params_ == {"perceptron__max_epochs": 50}


def test_score_with_sample_weight():
    X, y = iris_setosa()
    model = Perceptron(seed=0).fit(X, y)
    wrong = np.where(y == 1, 0, 1)
    weights = np.ones(len(y))
    weights[:10] = 0.0
    assert model.score(X, wrong) == 0.0
    assert model.score(X, y, sample_weight=weights) == 1.0


# ----------------------------------------------------------------------------------
# fastnn._labels: the label <-> code mapping Perceptron and the estimators share
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("labels, classes", [
    (["b", "a", "c", "a"], ["a", "b", "c"]),
    (np.array(["no", "yes", "no"], dtype=object), ["no", "yes"]),
    ([1, -1, -1, 1], [-1, 1]),
    ([True, False, True], [False, True]),
    ([3.0, 1.0, 3.0], [1.0, 3.0]),
    (["only", "only"], ["only"]),
    (np.array([[2], [0], [2]]), [0, 2]),
])
def test_class_labels_round_trip(labels, classes):
    mapping = ClassLabels.fit(labels)
    np.testing.assert_array_equal(mapping.classes, classes)
    codes = mapping.encode(labels)
    assert codes.dtype == np.int64 and codes.min() == 0 and codes.max() == len(classes) - 1
    np.testing.assert_array_equal(mapping.decode(codes), np.asarray(labels).reshape(-1))
    rebuilt = ClassLabels(mapping.classes)  # what a saved model keeps
    np.testing.assert_array_equal(rebuilt.encode(labels), codes)
    fitted, fit_codes = ClassLabels.fit_encode(labels)  # one sort for both
    np.testing.assert_array_equal(fitted.classes, mapping.classes)
    assert fit_codes.dtype == np.int64 and fit_codes.tolist() == codes.tolist()


def test_class_labels_refuse_what_is_not_a_label():
    mapping = ClassLabels.fit(["a", "b"])
    with pytest.raises(ValueError, match=r"not among the classes \['a', 'b'\]: \['z'\]"):
        mapping.encode(["a", "z"])
    with pytest.raises(TypeError, match="labels of the kind the classes are"):
        mapping.encode([0, 1])
    with pytest.raises(ValueError, match="classes must be distinct"):
        ClassLabels(["a", "a"])
    with pytest.raises(ValueError, match="y has 2 samples but X has 3"):
        ClassLabels.fit([0, 1], n_samples=3)
    with pytest.raises(TypeError, match="comparable with the classes"):
        ClassLabels(np.array(["a", "b"], dtype=object)).encode(np.array([1, 2], dtype=object))
