"""The estimators: MLPClassifier and MLPRegressor."""
import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import column_or_1d

from .._labels import ClassLabels
from .._validation import check_choice
from ._base import REGRESSION_LOSSES, _BaseMLP


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by fastnn; a drop-in for
    ``sklearn.neural_network.MLPClassifier`` (same parameters, defaults and fitted
    attributes).

    Minimizes the log-loss: softmax cross-entropy for more than two classes, a single
    sigmoid unit for two, independent sigmoids for a multilabel indicator y.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(100,)
        Width of each hidden layer.
    activation : {'identity', 'logistic', 'tanh', 'relu', 'leaky_relu', 'softplus', 'elu'}
        Hidden-layer activation, default 'relu'.
    solver : {'adam', 'sgd', 'lbfgs', 'adagrad', 'rmsprop', 'bfgs', 'cg', 'lm', 'newton', \
'newton-cg', 'gd'}
        default 'adam'. The first group steps per mini-batch; the second is full-batch.
    alpha : float, default=1e-4
        L2 penalty: ``alpha / (2 n) * sum ||W||²`` added to the mean loss.
    batch_size : int or 'auto', default='auto' (min(200, n_samples)).
    learning_rate : {'constant', 'invscaling', 'adaptive'}, default='constant'
        Step schedule of the 'sgd' solver.
    learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose
        As in scikit-learn.
    warm_start, momentum, nesterovs_momentum, early_stopping, validation_fraction
        As in scikit-learn.
    beta_1, beta_2, epsilon, n_iter_no_change, max_fun
        As in scikit-learn.
    backend : {'numba', 'cython', 'numpy'} or None, default=None (fastnn's current).
    dtype : {'float32', 'float64'}, default='float32'
        Precision of the weights and of the computation.
    n_threads : int or None, default=None (fastnn's current budget).
        A count other than the process's budget is set around every fit and predict
        call and set back after it, ~13 ms each way (threadpoolctl re-scans the
        loaded BLAS libraries): for many small calls, set the process's budget once
        with ``fastnn.set_num_threads`` instead.

    Attributes
    ----------
    coefs_ : list of ndarray
        Per layer, ``coefs_[i]`` (n_in, n_out) like fastnn's Dense ``W``.
    intercepts_ : list of ndarray
        Per layer, the biases (n_out,).
    classes_ : ndarray
        The class labels.

    Notes
    -----
    The other fitted attributes are scikit-learn's: ``loss_``, ``best_loss_``,
    ``loss_curve_``, ``validation_scores_``, ``best_validation_score_``, ``n_iter_``,
    ``t_``, ``n_layers_``, ``n_outputs_``, ``out_activation_``, ``n_features_in_``,
    ``feature_names_in_``.
    """

    _score_function = staticmethod(accuracy_score)

    @property
    def _loss_scale(self):
        multilabel = getattr(self, "_multilabel", False)
        return 1.0 / len(self.classes_) if multilabel else 1.0

    def _uses_codes(self):
        return not self._multilabel and len(self.classes_) > 2

    def _fastnn_loss(self):
        return "cross_entropy" if self._uses_codes() else "binary_cross_entropy"

    def _target_from_labels(self):
        """Whether fit's target is made here from the class labels (int64 codes in
        range, or a 0/1 column), rather than the user's multilabel matrix."""
        return not self._multilabel

    def _validate_input(self, X, y, incremental, reset):
        """(X, fastnn target, original y): codes (n,) for more than two classes, a 0/1
        column (n, 1) for one or two classes, the 0/1 matrix (n, K) for multilabel."""
        X, y = self._validate_fit_data(X, y, reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if y.ndim == 1 and y.dtype.kind in "biuUS":
            # Discrete 1-D labels, 'binary' or 'multiclass' for sklearn: its two
            # type_of_target passes below would cost ~0.25 ms per fit.
            multilabel = False
        else:
            check_classification_targets(y)
            multilabel = type_of_target(y).startswith("multilabel")
        codes = None
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._multilabel = multilabel
            self._labels = None
            if not multilabel:
                self._labels, codes = ClassLabels.fit_encode(y)
            self.classes_ = np.arange(y.shape[1]) if multilabel else self._labels.classes
            self.out_activation_ = "softmax" if self._uses_codes() else "logistic"
        elif multilabel != self._multilabel:
            raise ValueError("y is of a different kind (multilabel or not) than in the "
                             "previous fit")
        elif not multilabel:
            classes = np.unique(y)
            if self.warm_start and not incremental and set(classes) != set(self.classes_):
                raise ValueError(f"warm_start can only be used where `y` has the same "
                                 f"classes as in the previous call to fit. Previously got "
                                 f"{self.classes_}, `y` has {classes}")
            if not np.isin(classes, self.classes_).all():
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` "
                                 f"has {self.classes_}. 'y' has {classes}.")
        if self._multilabel:
            return X, np.ascontiguousarray(y, dtype=X.dtype), y
        if codes is None:
            codes = self._labels.encode(y)
        if self._uses_codes():
            return X, codes, y
        return X, codes.astype(X.dtype).reshape(-1, 1), y

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y), continuing from the current weights.

        Available for the stochastic solvers only.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
        y : array-like, shape (n_samples,) or (n_samples, n_classes)
            Class labels or a multilabel indicator matrix.
        sample_weight : array-like, shape (n_samples,), optional
        classes : array-like, optional
            All labels that will ever occur; required on the first call (except for
            multilabel y).

        Returns
        -------
        self
        """
        if not hasattr(self, "classes_"):
            if classes is None and not type_of_target(y).startswith("multilabel"):
                raise ValueError("classes must be passed on the first call to partial_fit.")
            if classes is not None:
                self._multilabel = False
                self._labels = ClassLabels(classes)
                self.classes_ = self._labels.classes
                self.out_activation_ = "softmax" if self._uses_codes() else "logistic"
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"`classes={np.unique(classes)!r}` is not the same as on last "
                             f"call to partial_fit, was: {self.classes_!r}")
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _predict_validated(self, X):
        prob = self._network_output(X)
        if self._multilabel:
            return (prob > 0.5).astype(np.int64)
        if prob.shape[1] == 1:
            return self._labels.decode(prob[:, 0] > 0.5)
        return self._labels.decode(np.argmax(prob, axis=1))

    def predict(self, X):
        """Predicted class labels (n_samples,), or the 0/1 indicator matrix
        (n_samples, n_classes) for multilabel."""
        return self._predict_validated(self._validate_X(X))

    def predict_proba(self, X):
        """Probability of each class in ``classes_`` order: (n_samples, n_classes)."""
        prob = self._network_output(self._validate_X(X))
        if self._multilabel or prob.shape[1] > 1:
            return prob
        if len(self.classes_) == 1:
            return np.ones_like(prob)
        return np.hstack([1 - prob, prob])

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``, shape (n_samples, n_classes)."""
        prob = self.predict_proba(X)
        return np.log(prob, out=prob)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multilabel": True}


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by fastnn; a drop-in for
    ``sklearn.neural_network.MLPRegressor``.

    Parameters are MLPClassifier's plus ``loss``: 'squared_error' (default; sklearn's
    half mean squared error), or fastnn's 'absolute_error' and 'huber'. The output layer
    is linear (``out_activation_ = 'identity'``); y is (n_samples,) or
    (n_samples, n_outputs), and predict returns the same shape.
    """

    _score_function = staticmethod(r2_score)

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend=None, dtype="float32", n_threads=None):
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            backend=backend, dtype=dtype, n_threads=n_threads)
        self.loss = loss

    @property
    def _loss_scale(self):
        return REGRESSION_LOSSES[self.loss][1]

    def _uses_codes(self):
        return False

    def _fastnn_loss(self):
        return REGRESSION_LOSSES[self.loss][0]

    def _target_from_labels(self):
        return False  # the user's values: fit checks them (range, overflow in float32)

    def _validate_input(self, X, y, incremental, reset):
        check_choice(self.loss, "loss", REGRESSION_LOSSES)
        X, y = self._validate_fit_data(X, y, reset, y_numeric=True)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        self.out_activation_ = "identity"
        target = np.ascontiguousarray(y.reshape(len(y), -1), dtype=X.dtype)
        if not reset and target.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {target.shape[1]} outputs, but the model was fitted "
                             f"with {self.n_outputs_}")
        return X, target, y

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the current weights; returns self.

        Available for the stochastic solvers only. X (n_samples, n_features); y
        (n_samples,) or (n_samples, n_outputs); sample_weight (n_samples,), optional.
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _predict_validated(self, X):
        out = self._network_output(X)
        return out[:, 0] if out.shape[1] == 1 else out

    def predict(self, X):
        """Predicted values: (n_samples,) for one output, else (n_samples, n_outputs)."""
        return self._predict_validated(self._validate_X(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": True}
