"""fastnn.sklearn: the MLP estimators pass scikit-learn's estimator checks and behave as
sklearn.neural_network's MLPs do (parameters, attributes, labels, meta-estimators)."""
import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn import neural_network  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import (  # noqa: E402
    check_sample_weight_equivalence_on_dense_data,
    parametrize_with_checks,
)

from fastnn import Perceptron  # noqa: E402
from fastnn.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

#: The estimator checks fastnn's MLPs are expected to fail, and why.
EXPECTED_FAILED_CHECKS = {
    # Mini-batch solvers see a repeated sample in a different batch than a weighted one,
    # so the trained networks differ; sklearn claims the equivalence only for its lbfgs
    # solver (and so do we: test_sample_weight_equivalence_with_lbfgs).
    "check_sample_weight_equivalence_on_dense_data":
        "mini-batch training is not invariant to repeating samples",
}


@parametrize_with_checks([MLPClassifier(), MLPRegressor()],
                         expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


#: The checks fastnn.Perceptron fails: it keeps fastnn's own validation and names, and
#: does not import scikit-learn.
PERCEPTRON_FAILED_CHECKS = {
    name: why for why, names in {
        "raises fastnn's NotFittedError, not sklearn's class":
            ["check_estimators_unfitted"],
        "fastnn's wording of its ValueErrors (and a TypeError for y=None)": [
            "check_n_features_in_after_fitting", "check_complex_data",
            "check_estimators_empty_data_messages", "check_classifiers_regression_target",
            "check_fit2d_1sample", "check_fit2d_predict1d", "check_requires_y_none"],
        "refuses X of dtype object instead of converting it": ["check_dtype_object"],
        "takes a column y silently, without sklearn's DataConversionWarning":
            ["check_supervised_y_2d"],
    }.items() for name in names}


@parametrize_with_checks([Perceptron(seed=0)],
                         expected_failed_checks=lambda est: PERCEPTRON_FAILED_CHECKS)
def test_perceptron_estimator_checks(estimator, check):
    """fastnn.Perceptron passes the rest of scikit-learn's estimator checks (and a check
    that starts to fail, or to pass, shows up here). With a fixed seed, as the checks fix
    the random_state of sklearn's own estimators: with seed=None each fit shuffles anew,
    so refitting gives other weights (check_fit_idempotent), and on the checks' three
    blobs, which no line separates, 3 % of the fits end below the accuracy asked for
    (check_classifiers_train)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not a sklearn BaseEstimator
        check(estimator)


@pytest.mark.parametrize("estimator", [MLPClassifier(solver="lbfgs", dtype="float64"),
                                       MLPRegressor(solver="lbfgs", dtype="float64")],
                         ids=["classifier", "regressor"])
def test_sample_weight_equivalence_with_lbfgs(estimator):
    check_sample_weight_equivalence_on_dense_data(type(estimator).__name__, estimator)


def scaled(loader):
    X, y = loader(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def cancer():
    return scaled(load_breast_cancer)


@pytest.fixture(scope="module")
def iris():
    return scaled(load_iris)


def quiet(estimator, X, y, **fit_params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y, **fit_params)


# ----------------------------------------------------------------------------------
# A drop-in for sklearn's MLPs
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, theirs", [(MLPClassifier, neural_network.MLPClassifier),
                                          (MLPRegressor, neural_network.MLPRegressor)])
def test_same_parameter_names_and_defaults_as_sklearn(ours, theirs):
    mine, reference = ours().get_params(), theirs().get_params()
    assert set(reference) <= set(mine)
    assert {name: mine[name] for name in reference} == reference
    assert set(mine) - set(reference) == {"backend", "dtype", "n_threads"}


def test_same_initial_weights_and_attributes_as_sklearn(cancer):
    X, y = cancer
    kwargs = dict(hidden_layer_sizes=(7, 5), solver="sgd", learning_rate_init=1e-12,
                  momentum=0.0, max_iter=1, random_state=3, shuffle=False, dtype="float64")
    ours = quiet(MLPClassifier(**kwargs), X, y)
    theirs = quiet(neural_network.MLPClassifier(
        **{k: v for k, v in kwargs.items() if k != "dtype"}), X, y)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.loss_, theirs.loss_, rtol=1e-6)
    for name in ("n_iter_", "t_", "n_layers_", "n_outputs_", "out_activation_",
                 "n_features_in_"):
        assert getattr(ours, name) == getattr(theirs, name), name
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-9)


@pytest.mark.parametrize("activation, factor", [("relu", 6.0), ("logistic", 2.0)])
def test_initial_parameters_are_sklearns_draws_exactly(activation, factor):
    """One random_sample scaled per layer gives the values of sklearn's per-array
    uniform draws, bit for bit, and leaves the generator where those leave it."""
    widths = [13, 9, 5, 3]
    ours = MLPClassifier(activation=activation)._initial_params(widths,
                                                                np.random.RandomState(7))
    rng = np.random.RandomState(7)
    expected = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        bound = np.sqrt(factor / (n_in + n_out))
        expected += [rng.uniform(-bound, bound, (n_in, n_out)).ravel(),
                     rng.uniform(-bound, bound, n_out)]
    np.testing.assert_array_equal(ours, np.concatenate(expected))
    rng_ours = np.random.RandomState(7)
    MLPClassifier(activation=activation)._initial_params(widths, rng_ours)
    assert rng_ours.randint(2**31 - 1) == rng.randint(2**31 - 1)


def test_an_integer_random_state_draws_as_a_new_random_state_would(iris):
    """Fits reseed one RandomState per thread instead of building one per fit: the same
    draws as sklearn's check_random_state, whatever the previous fit left in it, and
    another thread's fits never share it."""
    import threading

    from fastnn.sklearn._base import _random_state

    first = _random_state(11)
    first.random_sample(1000)  # a fit's draws
    again = _random_state(np.int64(11))
    assert again is first
    np.testing.assert_array_equal(again.random_sample(50),
                                  np.random.RandomState(11).random_sample(50))
    other = []
    thread = threading.Thread(target=lambda: other.append(_random_state(11)))
    thread.start()
    thread.join()
    assert other[0] is not first
    shared = np.random.RandomState(11)
    assert _random_state(shared) is shared and _random_state(None) is np.random.mtrand._rand
    with pytest.raises(ValueError, match="Seed must be between"):
        _random_state(-1)
    X, y = iris
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=3)
    by_int = quiet(MLPClassifier(random_state=11, **kwargs), X, y)
    by_state = quiet(MLPClassifier(random_state=np.random.RandomState(11), **kwargs), X, y)
    for a, b in zip(by_int.coefs_ + by_int.intercepts_, by_state.coefs_ + by_state.intercepts_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dataset", ["cancer", "iris"])
def test_early_stopping_draws_the_same_validation_split_as_sklearn(dataset, request):
    X, y = request.getfixturevalue(dataset)
    kwargs = dict(hidden_layer_sizes=(7,), solver="sgd", learning_rate_init=1e-12,
                  momentum=0.0, max_iter=2, random_state=5, early_stopping=True,
                  validation_fraction=0.3)
    ours = quiet(MLPClassifier(**kwargs, dtype="float64"), X, y)
    theirs = quiet(neural_network.MLPClassifier(**kwargs), X, y)
    np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_)
    for a, b in zip(ours.coefs_, theirs.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_accuracy_matches_sklearn(cancer, solver):
    X, y = cancer
    kwargs = dict(hidden_layer_sizes=(32,), solver=solver, max_iter=100, random_state=0)
    ours = quiet(MLPClassifier(**kwargs), X[::2], y[::2]).score(X[1::2], y[1::2])
    theirs = quiet(neural_network.MLPClassifier(**kwargs), X[::2], y[::2]).score(
        X[1::2], y[1::2])
    assert ours > 0.9 and abs(ours - theirs) < 0.03


def test_regressor_r2_matches_sklearn():
    X, y = scaled(load_diabetes)
    kwargs = dict(hidden_layer_sizes=(32,), learning_rate_init=0.01, random_state=0)
    ours = quiet(MLPRegressor(**kwargs), X[::2], y[::2]).score(X[1::2], y[1::2])
    theirs = quiet(neural_network.MLPRegressor(**kwargs), X[::2], y[::2]).score(
        X[1::2], y[1::2])
    assert ours > 0.35 and abs(ours - theirs) < 0.05


@pytest.mark.parametrize("estimator", ["classifier", "regressor"])
@pytest.mark.parametrize("schedule", ["constant", "invscaling"])
def test_sgd_follows_sklearns_steps(estimator, schedule):
    # Same start, same batches (no shuffling), float64: the weights after 3 epochs agree
    # up to the one difference by design, fastnn's alpha decaying the biases too (Adam
    # is left out: it normalizes that tiny decay into full steps of near-zero-gradient
    # biases, and places epsilon as torch does).
    X, y = scaled(load_diabetes) if estimator == "regressor" else scaled(load_iris)
    if estimator == "regressor":
        y = (y - y.mean()) / y.std()
    kwargs = dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate=schedule,
                  learning_rate_init=0.01, batch_size=50, shuffle=False, max_iter=3,
                  random_state=0)
    ours_cls, theirs_cls = ((MLPRegressor, neural_network.MLPRegressor)
                            if estimator == "regressor" else
                            (MLPClassifier, neural_network.MLPClassifier))
    ours = quiet(ours_cls(**kwargs, dtype="float64"), X, y)
    theirs = quiet(theirs_cls(**kwargs), X, y)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-5)


def test_loss_scale_of_the_regressor_is_sklearns_half_squared_error():
    X, y = scaled(load_diabetes)
    model = quiet(MLPRegressor(hidden_layer_sizes=(8,), solver="lbfgs", alpha=0.0,
                               max_iter=20, random_state=0, dtype="float64"), X, y / 100)
    half_mse = 0.5 * np.mean((model.predict(X) - y / 100) ** 2)
    np.testing.assert_allclose(model.loss_, half_mse, rtol=1e-6)


# ----------------------------------------------------------------------------------
# Fitted attributes, stopping rules, solvers, schedules
# ----------------------------------------------------------------------------------

def test_stochastic_attributes_and_stop_on_no_improvement(iris):
    X, y = iris
    model = MLPClassifier(hidden_layer_sizes=(10,), max_iter=1000, tol=1e-2,
                          n_iter_no_change=3, random_state=0).fit(X, y)
    assert model.n_iter_ == len(model.loss_curve_) < 1000
    assert model.t_ == model.n_iter_ * len(X)
    assert model.loss_ == model.loss_curve_[-1]
    assert model.best_loss_ == min(model.loss_curve_)
    assert model.validation_scores_ is None and model.best_validation_score_ is None
    assert [c.shape for c in model.coefs_] == [(4, 10), (10, 3)]
    assert [b.shape for b in model.intercepts_] == [(10,), (3,)]
    assert model.out_activation_ == "softmax" and model.n_layers_ == 3


def test_early_stopping_keeps_the_best_validation_weights(cancer):
    X, y = cancer
    model = MLPClassifier(hidden_layer_sizes=(16,), early_stopping=True, max_iter=300,
                          n_iter_no_change=5, random_state=0).fit(X, y)
    assert model.best_loss_ is None
    assert len(model.validation_scores_) == model.n_iter_ < 300
    assert model.best_validation_score_ == max(model.validation_scores_)


def test_max_iter_reached_warns(iris):
    X, y = iris
    with pytest.warns(ConvergenceWarning, match="Maximum iterations \\(3\\)"):
        MLPClassifier(max_iter=3, random_state=0).fit(X, y)


@pytest.mark.parametrize("solver", ["adagrad", "rmsprop", "bfgs", "cg", "newton-cg", "gd"])
def test_fastnn_solvers(iris, solver):
    X, y = iris
    model = quiet(MLPClassifier(hidden_layer_sizes=(8,), solver=solver, max_iter=100,
                                learning_rate_init=0.05, random_state=0), X, y)
    assert model.score(X, y) > 0.8


@pytest.mark.parametrize("solver", ["lm", "newton"])
def test_second_order_solvers_on_the_regressor(solver):
    X, y = scaled(load_diabetes)
    model = quiet(MLPRegressor(hidden_layer_sizes=(4,), solver=solver, max_iter=20,
                               random_state=0, dtype="float64"), X, y / 100)
    assert model.score(X, y / 100) > 0.4


@pytest.mark.parametrize("schedule", ["invscaling", "adaptive"])
def test_sgd_learning_rate_schedules(iris, schedule):
    X, y = iris
    model = quiet(MLPClassifier(hidden_layer_sizes=(8,), solver="sgd", learning_rate=schedule,
                                learning_rate_init=0.1, n_iter_no_change=2, tol=0.5,
                                max_iter=30, random_state=0), X, y)
    lr = model._model.optimizer.lr
    if schedule == "invscaling":
        np.testing.assert_allclose(lr, 0.1 / (model.t_ + 1) ** 0.5)
    else:
        assert lr <= 0.1 / 5


# ----------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [np.array(["no", "yes"]), np.array([-1, 1]),
                                    np.array([2.0, 7.0]), np.array(["no", "yes"], object)],
                         ids=["str", "minus-plus-one", "float", "object"])
def test_binary_labels_of_any_kind(cancer, labels):
    X, y = cancer
    model = MLPClassifier(hidden_layer_sizes=(16,), random_state=0).fit(X, labels[y])
    np.testing.assert_array_equal(model.classes_, labels)
    predicted = model.predict(X)
    assert set(predicted) <= set(labels) and model.score(X, labels[y]) > 0.95
    assert model.predict_proba(X).shape == (len(X), 2)
    assert model.n_outputs_ == 1 and model.out_activation_ == "logistic"


def test_string_labels_multiclass(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])
    model = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01,
                          random_state=0).fit(X, names[y])
    assert model.score(X, names[y]) > 0.9
    np.testing.assert_allclose(np.exp(model.predict_log_proba(X[:5])), model.predict_proba(X[:5]),
                               rtol=1e-6)


def test_single_class_predicts_it(iris):
    X, _ = iris
    model = quiet(MLPClassifier(max_iter=5, random_state=0), X, np.full(len(X), "only"))
    np.testing.assert_array_equal(model.predict(X[:3]), ["only"] * 3)
    np.testing.assert_array_equal(model.predict_proba(X[:3]), np.ones((3, 1)))


def test_multilabel_indicator_gives_independent_sigmoids(iris):
    X, y = iris
    Y = np.stack([y == 0, y == 2, X[:, 0] > 0], axis=1).astype(int)
    model = quiet(MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0), X, Y)
    assert model.out_activation_ == "logistic" and model.n_outputs_ == 3
    assert model.predict(X).shape == Y.shape and model.score(X, Y) > 0.8
    prob = model.predict_proba(X)
    assert prob.shape == Y.shape and not np.allclose(prob.sum(axis=1), 1)


def test_unseen_label_in_partial_fit_is_refused(iris):
    X, y = iris
    model = MLPClassifier(random_state=0).partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])
    assert model.n_outputs_ == 3 and model.n_iter_ == 1
    with pytest.raises(ValueError, match="classes not in"):
        model.partial_fit(X, y + 1)


def test_partial_fit_needs_classes_first(iris):
    X, y = iris
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier().partial_fit(X, y)


def test_partial_fit_only_for_stochastic_solvers():
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    assert not hasattr(MLPRegressor(solver="cg"), "partial_fit")
    assert hasattr(MLPRegressor(solver="sgd"), "partial_fit")


def test_warm_start_continues_and_n_iter_counts_the_last_call(iris):
    X, y = iris
    model = quiet(MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, warm_start=True,
                                random_state=0), X, y)
    first = [c.copy() for c in model.coefs_]
    quiet(model, X, y)
    assert model.n_iter_ == 5 and len(model.loss_curve_) == 10 and model.t_ == 10 * len(X)
    assert model.loss_curve_[5] < model.loss_curve_[0]
    assert not np.array_equal(first[0], model.coefs_[0])
    model.partial_fit(X, y)
    assert model.n_iter_ == 1 and len(model.loss_curve_) == 11
    with pytest.raises(ValueError, match="warm_start can only be used"):
        model.fit(X[y < 2], y[y < 2])


def test_partial_fit_epochs_equal_fit_epochs(iris):
    X, y = iris
    kwargs = dict(hidden_layer_sizes=(8,), random_state=0, shuffle=False)
    fitted = quiet(MLPClassifier(max_iter=3, **kwargs), X, y)
    stepped = MLPClassifier(**kwargs)
    for _ in range(3):
        stepped.partial_fit(X, y, classes=np.unique(y))
    for a, b in zip(fitted.coefs_, stepped.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# sklearn conventions: clone, pickle, meta-estimators, DataFrames, errors
# ----------------------------------------------------------------------------------

def test_clone_and_set_params():
    model = MLPClassifier(hidden_layer_sizes=(5, 3), alpha=0.1, dtype="float64")
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    copy.set_params(solver="lbfgs", n_threads=1)
    assert copy.solver == "lbfgs" and model.solver == "adam"


def test_pickle_keeps_predictions_and_optimizer_state(cancer):
    X, y = cancer
    model = MLPClassifier(hidden_layer_sizes=(8,), random_state=0, shuffle=False)
    model.partial_fit(X, y, classes=[0, 1])
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_proba(X), model.predict_proba(X))
    model.partial_fit(X, y)
    restored.partial_fit(X, y)
    for a, b in zip(model.coefs_, restored.coefs_):
        np.testing.assert_array_equal(a, b)


def test_assigned_coefs_are_used(iris):
    X, y = iris
    model = quiet(MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=0), X, y)
    model.coefs_ = [np.zeros_like(c) for c in model.coefs_]
    model.intercepts_ = [np.array([0, 0, 0, 0.0]), np.array([0, 0, 1.0])]
    np.testing.assert_array_equal(model.predict(X), np.full(len(X), 2))


def test_pipeline_grid_search_and_cross_val_score():
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=300,
                                                         random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(pipe, X, y, cv=3)
        search = GridSearchCV(pipe, {"mlpclassifier__alpha": [1e-4, 1e-1]}, cv=2, n_jobs=2)
        search.fit(X, y)
    assert scores.mean() > 0.85
    assert search.best_score_ > 0.85 and search.best_params_["mlpclassifier__alpha"] in (1e-4, 0.1)


def test_dataframe_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = load_iris(return_X_y=True, as_frame=True)
    model = quiet(MLPClassifier(max_iter=20, random_state=0), X, y)
    np.testing.assert_array_equal(model.feature_names_in_, X.columns)
    model.predict(X)
    with pytest.warns(UserWarning, match="feature names"):
        model.predict(X.to_numpy())
    renamed = X.rename(columns={X.columns[0]: "other"})
    with pytest.raises(ValueError, match="feature names"):
        model.predict(renamed)
    assert isinstance(pd.Series(model.predict(X)), pd.Series)


def test_wrong_feature_count_uses_sklearn_wording(iris):
    X, y = iris
    model = quiet(MLPClassifier(max_iter=5), X, y)
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 4"):
        model.predict(X[:, :3])


def test_predict_of_an_ndarray_is_checked_as_sklearn_checks_it(iris):
    """The short path for ndarrays (no validate_data) predicts what the checked path
    does, and every input it cannot vouch for gets sklearn's error."""
    X, y = iris
    model = quiet(MLPClassifier(max_iter=5, random_state=0), X, y)
    expected = model.predict_proba(X.tolist())  # a list: sklearn's checks
    for variant in (X, np.asfortranarray(X), X.astype(np.float32), np.repeat(X, 2, axis=0)[::2]):
        np.testing.assert_array_equal(model.predict_proba(variant), expected)
    for value, match in ((np.nan, "Input X contains NaN"), (1e39, "Input X contains infinity")):
        bad = X.copy()
        bad[3, 1] = value  # 1e39 is finite in float64, infinite in the model's float32
        with pytest.raises(ValueError, match=match):
            model.predict(bad)
    with pytest.raises(ValueError, match="0 sample"):
        model.predict(X[:0])


@pytest.mark.parametrize("estimator", [MLPClassifier, MLPRegressor])
def test_fit_on_ndarrays_is_checked_as_sklearn_checks_it(estimator, iris):
    """fit's short path for ndarrays (no validate_data) trains what the checked path
    trains, records what sklearn records, and every input it cannot vouch for gets
    sklearn's error."""
    X, y = iris
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    expected = quiet(estimator(**kwargs), X.tolist(), y.tolist())  # lists: sklearn's checks
    for X_variant, y_variant in ((X, y), (np.asfortranarray(X), y), (X.astype(np.float32), y),
                                 (X, y.astype(np.float64)), (X, y.astype(np.uint8)),
                                 (np.asfortranarray(X), y.tolist())):  # sklearn's, F order
        model = quiet(estimator(**kwargs), X_variant, y_variant)
        assert model.n_features_in_ == 4
        for a, b in zip(model.coefs_ + model.intercepts_,
                        expected.coefs_ + expected.intercepts_):
            np.testing.assert_array_equal(a, b)
        assert model.loss_curve_ == expected.loss_curve_
    for value, match in ((np.nan, "Input X contains NaN"), (1e39, "Input X contains infinity")):
        bad = X.copy()
        bad[3, 1] = value  # 1e39 is finite in float64, infinite in the model's float32
        with pytest.raises(ValueError, match=match):
            estimator(**kwargs).fit(bad, y)
    bad_y = y.astype(np.float64)
    bad_y[5] = np.nan
    with pytest.raises(ValueError, match="Input y contains NaN"):
        estimator(**kwargs).fit(X, bad_y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        estimator(**kwargs).fit(X, y[:-1])
    with pytest.raises(ValueError, match="0 sample"):
        estimator(**kwargs).fit(X[:0], y[:0])
    warm = quiet(estimator(**kwargs, warm_start=True), X, y)
    with pytest.raises(ValueError, match="X has 3 features, but .* is expecting 4"):
        warm.fit(X[:, :3], y)


def test_refit_on_an_ndarray_forgets_the_feature_names():
    pytest.importorskip("pandas")
    X, y = load_iris(return_X_y=True, as_frame=True)
    model = quiet(MLPClassifier(max_iter=2, random_state=0), X, y)
    assert hasattr(model, "feature_names_in_")
    quiet(model, X.to_numpy(), y.to_numpy())
    assert not hasattr(model, "feature_names_in_") and model.n_features_in_ == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no feature-name warning for an ndarray now
        model.predict(X.to_numpy())


def test_sparse_input_is_refused_with_a_clear_error(iris):
    sparse = pytest.importorskip("scipy.sparse")
    X, y = iris
    with pytest.raises(TypeError, match="toarray"):
        MLPClassifier().fit(sparse.csr_matrix(X), y)


@pytest.mark.parametrize("param, value, error, match", [
    ("solver", "newton-raphson", ValueError, "unknown solver 'newton-raphson'"),
    ("activation", "swish", ValueError, "unknown activation 'swish'"),
    ("hidden_layer_sizes", (10, 0), ValueError, "hidden_layer_sizes\\[1\\] must be >= 1"),
    ("alpha", -1.0, ValueError, "alpha must be in"),
    ("batch_size", "big", TypeError, "batch_size must be an int"),
    ("learning_rate", "cyclic", ValueError, "unknown learning_rate"),
    ("dtype", "float16", ValueError, "dtype must be 'float32' or 'float64'"),
    ("shuffle", "yes", TypeError, "shuffle must be a bool"),
])
def test_bad_parameters_fail_at_fit_naming_them(iris, param, value, error, match):
    X, y = iris
    model = MLPClassifier(**{param: value})  # stored as given
    with pytest.raises(error, match=match):
        model.fit(X, y)


def test_float64_and_backend_and_threads(iris):
    X, y = iris
    model = quiet(MLPClassifier(max_iter=20, random_state=0, dtype="float64", backend="numpy",
                                n_threads=1), X, y)
    assert model.coefs_[0].dtype == np.float64
    assert model.predict_proba(X).dtype == np.float64


def test_verbose_prints_sklearns_progress_lines(iris, capsys):
    X, y = iris
    MLPClassifier(hidden_layer_sizes=(4,), max_iter=200, tol=10.0, n_iter_no_change=1,
                  verbose=True, random_state=0).fit(X, y)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Iteration 1, loss = ")
    assert out[-1] == ("Training loss did not improve more than tol=10.000000 for 1 "
                       "consecutive epochs. Stopping.")
