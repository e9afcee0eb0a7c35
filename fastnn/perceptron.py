"""Rosenblatt's perceptron: a step unit trained by one mistake-driven update per sample."""
import numpy as np

from ._backend import backend_module
from ._labels import ClassLabels, as_label_vector
from ._validation import (
    all_finite,
    check_array,
    check_bool,
    check_features,
    check_float,
    check_int,
    check_sample_weight,
    check_seed,
)
from .kernels import ACTIVATIONS

# Bounds of the block of samples whose net inputs one dense_forward call computes (see
# Perceptron._run_epoch).
_MIN_BLOCK = 16
_MAX_BLOCK = 2048


class NotFittedError(ValueError, AttributeError):
    """A model was used (predict, score, W, ...) before ``fit``.

    A subclass of both ValueError and AttributeError (as scikit-learn's).
    """




class Perceptron:
    """Rosenblatt's perceptron: step activation, trained sample by sample on its mistakes.

    Each unit computes ``ŷ = step(x @ w + b)`` with ``step(z) = 1 if z >= 0 else 0`` and,
    for its 0/1 target t, updates ``w += lr (t - ŷ) x``, ``b += lr (t - ŷ)`` (nothing
    changes when ŷ = t). Weights start at zero. With 2 classes there is one unit, whose
    target is ``y == classes_[1]``; with k > 2 classes there are k units trained
    one-vs-rest (unit j: ``y == classes_[j]``, each by its own rule on the same samples)
    and the prediction is the class whose unit has the largest net input
    ``x @ W + b``. Training stops after the first epoch without a mistake -- which the
    perceptron convergence theorem guarantees on linearly separable data -- or after
    ``max_epochs``. Net inputs are computed by the active kernel backend's
    ``dense_forward``.

    Parameters
    ----------
    lr : float > 0, default 1.0
        Learning rate, the step of each update. From zero weights it only scales W and b,
        so (up to rounding) the predictions do not depend on it.
    max_epochs : int >= 1, default 100
        Most passes over the training data.
    shuffle : bool, default True
        Visit the samples in a fresh random order each epoch (else in the given order);
        the shuffled copy takes as much memory as X.
    seed : int >= 0 or None, default None
        Seed of the shuffling; the same seed gives the same model.

    Attributes
    ----------
    coef_ : ndarray, shape (d, k)
        The weights (also ``W``), k = 1 for 2 classes, else the number of classes.
    intercept_ : ndarray, shape (k,)
        The biases (also ``b``).
    classes_ : ndarray, shape (c,)
        The sorted class labels; predictions are drawn from it.
    n_features_in_ : int
        d, the number of features.
    n_epochs_ : int
        Epochs run.
    mistakes_ : ndarray of int64
        Samples that caused an update in each epoch (one entry per epoch run).
    converged_ : bool
        True when the last epoch made no mistake.

    Notes
    -----
    Shapes: ``fit(X (n, d), y (n,))``; ``predict(X (m, d)) -> (m,)``. X is float32
    (kept) or converted to float64; labels may be integers, bools, strings or any
    sortable objects. The attributes above exist after ``fit``.

    It is a scikit-learn classifier (``get_params``/``set_params``, ``clone``,
    ``score``, GridSearchCV) without importing scikit-learn: as sklearn's convention
    asks, ``__init__`` only stores the hyperparameters and ``fit`` validates them. It
    keeps fastnn's errors and ``seed``: of sklearn's estimator checks (run with
    ``seed=0``) it fails the 10 that want sklearn's exception class or messages. On data
    no hyperplane separates, the weights are those of the last epoch, so they depend on
    the order of the samples, that is on ``seed``.

    Examples
    --------
    >>> import fastnn as fn
    >>> X, y = fn.datasets.load_iris()
    >>> clf = fn.Perceptron(seed=0).fit(X[:, 2:4], y == 0)
    >>> clf.converged_, clf.score(X[:, 2:4], y == 0)
    (True, 1.0)
    """

    _PARAMS = ("lr", "max_epochs", "shuffle", "seed")
    _estimator_type = "classifier"  # scikit-learn < 1.6 reads this; later ones the tags

    def __init__(self, lr=1.0, max_epochs=100, shuffle=True, seed=None):
        self.lr = lr
        self.max_epochs = max_epochs
        self.shuffle = shuffle
        self.seed = seed

    def get_params(self, deep=True):
        """The hyperparameters as a dict (scikit-learn's estimator protocol; ``deep`` is
        accepted and unused: a Perceptron holds no sub-estimators)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params):
        """Set hyperparameters by name; returns self (validated at the next fit).

        Raises ValueError for a name that is not a hyperparameter.
        """
        for name, value in params.items():
            if name not in self._PARAMS:
                raise ValueError(f"invalid parameter {name!r} for Perceptron; expected one "
                                 f"of {list(self._PARAMS)}")
            setattr(self, name, value)
        return self

    def __sklearn_tags__(self):
        """scikit-learn >= 1.6 tags: a classifier that requires y (called by sklearn only,
        so importing it here adds no dependency to fastnn)."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    transformer_tags=None, regressor_tags=None,
                    classifier_tags=ClassifierTags(), input_tags=InputTags())

    def __repr__(self):
        return (f"Perceptron(lr={self.lr!r}, max_epochs={self.max_epochs!r}, "
                f"shuffle={self.shuffle!r}, seed={self.seed!r})")

    @property
    def W(self):
        """The (d, k) weights (same array as ``coef_``)."""
        return self._fitted("W").coef_

    @property
    def b(self):
        """The (k,) biases (same array as ``intercept_``)."""
        return self._fitted("b").intercept_

    def fit(self, X, y):
        """Train from zero weights until an epoch without mistakes or ``max_epochs``.

        Parameters
        ----------
        X : array-like, shape (n, d)
            Finite features; float32 is kept, anything else converted to float64.
        y : array-like, shape (n,)
            Class labels (at least 2 classes) of any sortable kind.

        Returns
        -------
        Perceptron
            self, fitted.

        Raises
        ------
        ValueError, TypeError
            Invalid hyperparameters, X or y (the message names which), fewer than 2
            classes, or weights that overflow (scale X or lower lr).
        """
        lr = check_float(self.lr, "lr", low=0.0, low_open=True)
        max_epochs = check_int(self.max_epochs, "max_epochs", low=1)
        shuffle = check_bool(self.shuffle, "shuffle")
        rng = np.random.default_rng(check_seed(self.seed))
        dtype = np.float32 if getattr(X, "dtype", None) == np.float32 else np.float64
        X = check_array(X, "X", dtype)
        labels = ClassLabels.fit(y, "y", len(X))
        classes, codes = labels.classes, labels.encode(y)
        if len(classes) < 2:
            raise ValueError(f"y must hold at least 2 classes, got only {classes[0]!r}")
        if len(classes) == 2:
            targets = codes.astype(dtype).reshape(-1, 1)
        else:
            targets = np.zeros((len(X), len(classes)), dtype=dtype)
            targets[np.arange(len(X)), codes] = 1
        kernels = backend_module()
        W = np.zeros((X.shape[1], targets.shape[1]), dtype=dtype)
        b = np.zeros(targets.shape[1], dtype=dtype)
        buffer = np.empty((_MAX_BLOCK, targets.shape[1]), dtype=dtype)
        # Shuffling copies the data into these once per epoch, so that every block of
        # samples is then a contiguous slice.
        X_epoch, targets_epoch = X, targets
        if shuffle:
            X_epoch, targets_epoch = np.empty_like(X), np.empty_like(targets)
        mistakes = []
        for _ in range(max_epochs):
            if shuffle:
                order = rng.permutation(len(X))
                np.take(X, order, axis=0, out=X_epoch)
                np.take(targets, order, axis=0, out=targets_epoch)
            # An overflow is reported below, once, with its cause; not as numpy warnings.
            with np.errstate(over="ignore", invalid="ignore"):
                mistakes.append(self._run_epoch(kernels, X_epoch, targets_epoch, W, b, lr,
                                                buffer))
            if not (all_finite(W) and all_finite(b)):
                raise ValueError(f"the weights overflowed (inf or NaN) in epoch "
                                 f"{len(mistakes)}; X has values up to {np.abs(X).max():g} "
                                 f"and lr={lr:g}: scale X or lower lr")
            if mistakes[-1] == 0:
                break
        self.coef_, self.intercept_ = W, b
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        self.n_epochs_ = len(mistakes)
        self.mistakes_ = np.array(mistakes, dtype=np.int64)
        self.converged_ = mistakes[-1] == 0
        return self

    @staticmethod
    def _run_epoch(kernels, X, targets, W, b, lr, buffer):
        """One pass of the perceptron rule over the rows of X (n, d) with 0/1 targets
        (n, k), updating W and b in place; returns the number of samples that triggered
        an update.

        W and b change only on a mistake, so every sample up to the next mistake sees the
        same weights: one dense_forward call evaluates a whole block, the first wrong
        sample is updated, and the next block starts right after it. The result is the
        sample-by-sample rule exactly. The block doubles after a clean block and shrinks
        to twice the distance to the last mistake, so the sparse mistakes of late epochs
        cost one call per large block and the dense ones of early epochs waste little.
        """
        step = ACTIVATIONS["step"]
        n = len(X)
        mistakes, start, block = 0, 0, _MIN_BLOCK
        while start < n:
            stop = min(start + block, n)
            predicted = buffer[:stop - start]
            kernels.dense_forward(X[start:stop], W, b, step, predicted)
            wrong = np.flatnonzero((predicted != targets[start:stop]).any(axis=1))
            if wrong.size == 0:
                start = stop
                block = min(2 * block, _MAX_BLOCK)
                continue
            first = int(wrong[0])
            error = targets[start + first] - predicted[first]  # per unit: -1, 0 or +1
            W += lr * X[start + first, :, None] * error
            b += lr * error
            mistakes += 1
            start += first + 1
            block = min(max(_MIN_BLOCK, 2 * (first + 1)), _MAX_BLOCK)
        return mistakes

    def _fitted(self, what):
        if not hasattr(self, "coef_"):
            raise NotFittedError(f"this Perceptron is not fitted yet: call fit(X, y) before "
                                 f"{what}")
        return self

    def decision_function(self, X):
        """Net input ``X @ W + b`` of every unit.

        Parameters
        ----------
        X : array-like, shape (m, d)

        Returns
        -------
        ndarray, shape (m,) for 2 classes, else (m, k)
            As scikit-learn's: with 2 classes the one unit's net input, positive (or
            zero) for ``classes_[1]``; else one column per class. The dtype of ``coef_``.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        """
        self._fitted("decision_function")
        X = check_features(X, "X", self.coef_.dtype, self.n_features_in_)
        out = np.empty((len(X), self.coef_.shape[1]), dtype=self.coef_.dtype)
        backend_module().dense_forward(X, self.coef_, self.intercept_,
                                       ACTIVATIONS["identity"], out)
        return out[:, 0] if out.shape[1] == 1 else out

    def predict(self, X):
        """Predicted class labels: the step unit's class for 2 classes, else the class
        with the largest net input.

        Parameters
        ----------
        X : array-like, shape (m, d)

        Returns
        -------
        ndarray, shape (m,)
            Labels drawn from ``classes_``.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        """
        self._fitted("predict")
        if self.coef_.shape[1] > 1:
            return self.classes_[np.argmax(self.decision_function(X), axis=1)]
        X = check_features(X, "X", self.coef_.dtype, self.n_features_in_)
        out = np.empty((len(X), 1), dtype=self.coef_.dtype)
        backend_module().dense_forward(X, self.coef_, self.intercept_, ACTIVATIONS["step"],
                                       out)
        return self.classes_[out[:, 0].astype(np.intp)]

    def score(self, X, y, sample_weight=None):
        """Accuracy: the (sample_weight-weighted) fraction of samples predicted right.

        Parameters
        ----------
        X : array-like, shape (m, d)
        y : array-like, shape (m,)
            True labels, of the kind the model was fitted on.
        sample_weight : array-like, shape (m,), optional

        Returns
        -------
        float
        """
        self._fitted("score")
        X = check_features(X, "X", self.coef_.dtype, self.n_features_in_)
        y = as_label_vector(y, "y", len(X))
        if (y.dtype.kind in "US") != (self.classes_.dtype.kind in "US"):
            raise TypeError(f"y must hold labels of the kind the model was fitted on "
                            f"(classes_ dtype {self.classes_.dtype}), got dtype {y.dtype}")
        weights = check_sample_weight(sample_weight, len(X), np.float64)
        return float(np.average(self.predict(X) == y, weights=weights))
