"""What MLPClassifier and MLPRegressor share: parameters, validation, the network and
the fit loop."""
import contextlib
import numbers
import threading
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .. import _training, optimizers
from .._backend import get_num_threads, set_num_threads, use_backend
from .._validation import (
    all_finite,
    check_choice,
    check_dtype,
    check_float,
    check_int,
    check_sample_weight,
)
from ..layers import Dense
from ..model import Sequential
from ._control import _EpochControl, _full_batch_solver

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6 validates through a BaseEstimator method

    def validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

#: sklearn's activation names (and fastnn's own) -> fastnn's.
ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
               "leaky_relu": "leaky_relu", "softplus": "softplus", "elu": "elu"}
#: Solvers that take one optimizer step per mini-batch; learning_rate_init is their step.
STOCHASTIC_SOLVERS = ("adam", "sgd", "adagrad", "rmsprop")
#: Full-batch solvers: one fit iteration is one solver iteration.
FULL_BATCH_SOLVERS = ("lbfgs", "bfgs", "cg", "lm", "newton", "newton-cg", "gd")
#: MLPRegressor's loss names -> (fastnn loss, s = fastnn's loss / sklearn's loss).
REGRESSION_LOSSES = {"squared_error": ("mse", 2.0), "absolute_error": ("mae", 1.0),
                     "huber": ("huber", 1.0)}


#: Per thread, the RandomState that fits with an integer random_state reseed.
_REUSED = threading.local()


def _random_state(seed):
    """``check_random_state(seed)``: a RandomState in the same state, so the same draws.

    For an integer seed sklearn builds a new RandomState, ~75 us (numpy first seeds
    the new MT19937 from OS entropy, a state sklearn's legacy seeding then overwrites):
    more than 2% of a small fit. Reseeding one costs ~1.5 us and gives the same state,
    so each thread keeps one and reseeds it; a fit uses its generator only while it
    runs and keeps no reference to it.
    """
    if isinstance(seed, numbers.Integral):
        rng = getattr(_REUSED, "rng", None)
        if rng is None:
            rng = _REUSED.rng = np.random.RandomState()
        rng.seed(seed)
        return rng
    return check_random_state(seed)


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the network, training."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend=None, dtype="float32", n_threads=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.backend = backend
        self.dtype = dtype
        self.n_threads = n_threads

    # ------------------------------------------------------------------ parameters
    def _check_params(self):
        """Validate the parameters (sklearn convention: at fit, not in __init__);
        returns the hidden layer sizes as a list."""
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        for i, size in enumerate(sizes):
            check_int(size, f"hidden_layer_sizes[{i}]", low=1)
        check_choice(self.activation, "activation", ACTIVATIONS)
        check_choice(self.solver, "solver", STOCHASTIC_SOLVERS + FULL_BATCH_SOLVERS)
        check_float(self.alpha, "alpha", low=0.0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            check_int(self.batch_size, "batch_size", low=1)
        check_choice(self.learning_rate, "learning_rate", ("constant", "invscaling", "adaptive"))
        check_float(self.learning_rate_init, "learning_rate_init", low=0.0, low_open=True)
        check_float(self.power_t, "power_t", low=0.0)
        check_int(self.max_iter, "max_iter", low=1)
        check_float(self.tol, "tol", low=0.0)
        check_float(self.momentum, "momentum", low=0.0, high=1.0)
        check_float(self.validation_fraction, "validation_fraction", low=0.0, high=1.0,
                    low_open=True, high_open=True)
        check_float(self.beta_1, "beta_1", low=0.0, high=1.0, high_open=True)
        check_float(self.beta_2, "beta_2", low=0.0, high=1.0, high_open=True)
        check_float(self.epsilon, "epsilon", low=0.0, low_open=True)
        check_int(self.n_iter_no_change, "n_iter_no_change", low=1)
        check_int(self.max_fun, "max_fun", low=1)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.n_threads is not None:
            check_int(self.n_threads, "n_threads", low=1)
        return sizes

    def _runtime(self):
        """The estimator's backend and thread count for the duration of a call (a
        context manager; a no-op one, cheap enough for a 1-row predict, when both are
        the process's already)."""
        previous = get_num_threads()
        # set_num_threads re-scans the loaded BLAS libraries (tens of ms): only when
        # the count changes.
        switch_threads = self.n_threads is not None and self.n_threads != previous
        if self.backend is None and not switch_threads:
            return contextlib.nullcontext()
        with contextlib.ExitStack() as stack:  # unwinds if a step fails
            if self.backend is not None:
                stack.enter_context(use_backend(self.backend))
            if switch_threads:
                set_num_threads(self.n_threads)
                stack.callback(set_num_threads, previous)
            return stack.pop_all()

    # ------------------------------------------------------------------ the network
    def _build_network(self, sizes, n_features, n_outputs, n_train, weight_sum):
        """A compiled Sequential of Dense layers for this estimator's parameters.

        ``weight_sum`` is the training samples' total weight (n_train when unweighted):
        sklearn divides the penalty by the batch's total weight, which for a mini-batch
        of B samples is B times the mean weight.
        """
        dtype = check_dtype(self.dtype)
        full_batch = self.solver in FULL_BATCH_SOLVERS
        s = self._loss_scale
        l2 = s * self.alpha / (2 * weight_sum) if full_batch else 0.0
        widths = [n_features] + sizes + [n_outputs]
        act = ACTIVATIONS[self.activation]
        # init="zeros": the caller copies the weights in (a random start would be drawn
        # only to be overwritten)
        layers = [Dense(n_in, n_out, activation=act if i < len(sizes) else None, l2=l2,
                        dtype=dtype, init="zeros")
                  for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]))]
        model = Sequential(layers)
        if full_batch:
            optimizer = _full_batch_solver(self.solver, self.tol, self.max_fun,
                                           self.learning_rate_init)
        else:
            decay = s * self.alpha / (self._batch_size(n_train) * weight_sum / n_train)
            if self.solver == "sgd":
                optimizer = optimizers.SGD(lr=self.learning_rate_init / s,
                                           momentum=self.momentum,
                                           nesterov=bool(self.nesterovs_momentum and
                                                         self.momentum > 0),
                                           weight_decay=decay)
            elif self.solver == "adam":
                optimizer = optimizers.Adam(lr=self.learning_rate_init,
                                            betas=(self.beta_1, self.beta_2),
                                            eps=self.epsilon, weight_decay=decay)
            elif self.solver == "adagrad":
                optimizer = optimizers.Adagrad(lr=self.learning_rate_init, weight_decay=decay)
            else:
                optimizer = optimizers.RMSprop(lr=self.learning_rate_init, eps=self.epsilon,
                                               weight_decay=decay)
        model.compile(loss=self._fastnn_loss(), optimizer=optimizer)
        return model

    def _batch_size(self, n_train):
        if isinstance(self.batch_size, str):
            return min(200, n_train)
        if self.batch_size > n_train:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                          "going to be clipped")
        return min(self.batch_size, n_train)

    def _initial_params(self, widths, rng):
        """sklearn's Glorot-uniform start as one float64 vector in the layout of the
        network's flat ``params`` (per layer W (n_in, n_out) row-major, then b), with
        the values sklearn's MLP draws from ``rng`` (so the same random_state gives the
        same initial weights): per layer ``rng.uniform(-bound, bound)`` for W, then b.

        ``RandomState.uniform(low, high, size)`` is ``low + (high - low) *
        random_sample(size)``, so one ``random_sample`` of every value, each layer's
        part scaled in place, gives the same numbers and leaves ``rng`` where sklearn's
        draws leave it, with one call's overhead instead of two per layer.
        """
        factor = 2.0 if self.activation == "logistic" else 6.0
        pairs = list(zip(widths[:-1], widths[1:]))
        params = rng.random_sample(sum((n_in + 1) * n_out for n_in, n_out in pairs))
        start = 0
        for n_in, n_out in pairs:
            bound = np.sqrt(factor / (n_in + n_out))
            low, high = -bound, bound
            part = params[start:start + (n_in + 1) * n_out]
            part *= high - low
            part += low
            start += part.size
        return params

    def _initialize(self, sizes, initial, n_features, n_outputs, n_train, weight_sum):
        """First fit: the network, its parameters set to ``initial`` (float64, the
        layout of ``params``), and the fitted attributes."""
        model = self._build_network(sizes, n_features, n_outputs, n_train, weight_sum)
        model.params[...] = initial
        self._attach(model)
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(sizes) + 2
        self.n_outputs_ = n_outputs
        if self.solver in STOCHASTIC_SOLVERS:
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _attach(self, model):
        """Make ``coefs_`` / ``intercepts_`` the model's own weight views, so training
        updates them in place and an in-place edit by the user reaches the model."""
        self._model = model
        self.coefs_ = [layer.W for layer in model.layers]
        self.intercepts_ = [layer.b for layer in model.layers]

    def _network(self):
        """The fitted Sequential, with any ``coefs_`` / ``intercepts_`` the user assigned
        copied in."""
        model = self._model
        if len(self.coefs_) != len(model.layers) or not all(
                c is layer.W and b is layer.b
                for c, b, layer in zip(self.coefs_, self.intercepts_, model.layers)):
            model.set_weights([w for pair in zip(self.coefs_, self.intercepts_)
                               for w in pair])
            self._attach(model)
        return model

    def __getstate__(self):
        """Pickle the parameters, the fitted attributes and the optimizer state; the
        Sequential itself is rebuilt from them (its weights are views into one buffer,
        which pickling would not keep)."""
        state = self.__dict__.copy()
        model = state.pop("_model", None)
        if model is not None:
            state["coefs_"] = [c.copy() for c in self.coefs_]
            state["intercepts_"] = [b.copy() for b in self.intercepts_]
            opt = model.optimizer
            if isinstance(opt, optimizers.Optimizer):
                state["_optimizer_state"] = ({k: v.copy() for k, v in opt.state.items()},
                                             opt.iterations, opt.lr)
        return state

    def __setstate__(self, state):
        optimizer_state = state.pop("_optimizer_state", None)
        self.__dict__.update(state)
        if "coefs_" not in state:
            return
        sizes = [c.shape[1] for c in self.coefs_[:-1]]
        n_train, weight_sum = self._n_train
        model = self._build_network(sizes, self.coefs_[0].shape[0], self.n_outputs_, n_train,
                                    weight_sum)
        model.set_weights([w for pair in zip(self.coefs_, self.intercepts_) for w in pair])
        if optimizer_state is not None:
            buffers, iterations, lr = optimizer_state
            for name, value in buffers.items():
                model.optimizer.state[name][...] = value
            model.optimizer.iterations = iterations
            model.optimizer.lr = lr
        self._attach(model)

    # ------------------------------------------------------------------ training
    def _fit(self, X, y, sample_weight=None, incremental=False):
        sizes = self._check_params()
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, target, y_original = self._validate_input(X, y, incremental, reset=first_pass)
        dtype = check_dtype(self.dtype)
        sample_weight = check_sample_weight(sample_weight, X.shape[0], dtype)
        rng = _random_state(self.random_state)
        early_stopping = self.early_stopping and self.solver in STOCHASTIC_SOLVERS
        if early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        n_outputs = len(self.classes_) if self._uses_codes() else target.shape[1]
        if first_pass:  # drawn before the validation split, in sklearn's order
            initial = self._initial_params([X.shape[1]] + sizes + [n_outputs], rng)
        validation = None
        if early_stopping:
            X, target, sample_weight, validation = self._split_validation(
                X, target, y_original, sample_weight, n_outputs, rng)
        with self._runtime():
            if first_pass:
                weight_sum = X.shape[0] if sample_weight is None else float(sample_weight.sum())
                self._n_train = (X.shape[0], weight_sum)
                self._initialize(sizes, initial, X.shape[1], n_outputs, X.shape[0],
                                 weight_sum)
            model = self._network()
            try:
                if self.solver in STOCHASTIC_SOLVERS:
                    self._fit_stochastic(model, X, target, sample_weight, validation, rng,
                                         incremental)
                else:
                    self._fit_full_batch(model, X, target, sample_weight)
            except FloatingPointError as exc:
                raise ValueError(f"Solver produced non-finite parameter weights. The input "
                                 f"data may contain large values and need to be "
                                 f"preprocessed. ({exc})") from exc
        return self

    def _split_validation(self, X, target, y_original, sample_weight, n_outputs, rng):
        """Hold out ``validation_fraction`` for early stopping, as sklearn does (it
        stratifies by class only when the network has one output, i.e. for binary y).
        Returns (X, target, sample_weight) of the training part and the validation
        (X_val, y_val in original labels, sample_weight_val)."""
        stratify = y_original if isinstance(self, ClassifierMixin) and n_outputs == 1 else None
        parts = train_test_split(X, target, y_original,
                                 *(() if sample_weight is None else (sample_weight,)),
                                 random_state=rng, test_size=self.validation_fraction,
                                 stratify=stratify)
        X, X_val, target, _, _, y_val = parts[:6]
        sample_weight, sw_val = (None, None) if sample_weight is None else parts[6:8]
        if X_val.shape[0] < 2:
            raise ValueError("The validation set is too small. Increase "
                             "'validation_fraction' or the size of your dataset.")
        return X, target, sample_weight, (X_val, y_val, sw_val)

    def _fit_stochastic(self, model, X, target, sample_weight, validation, rng, incremental):
        self.n_iter_ = 0  # as in sklearn: the epochs of this call (t_ counts them all)
        batch = self._batch_size(X.shape[0])
        control = _EpochControl(self, X.shape[0], batch, validation, incremental)
        if validation is not None:
            self._best_weights = model.get_weights()
        epochs = 1 if incremental else self.max_iter
        # X passed sklearn's checks and the class codes (or 0/1 column) are this
        # estimator's own: fit need not check them again (~50 us of a small fit)
        prepared = sample_weight is None and self._target_from_labels()
        _training.fit(model, np.ascontiguousarray(X) if prepared else X, target,
                      epochs=epochs, batch_size=batch, shuffle=bool(self.shuffle),
                      sample_weight=sample_weight, callbacks=[control], verbose=0,
                      seed=int(rng.randint(np.iinfo(np.int32).max)), prepared=prepared)
        if validation is not None:
            model.set_weights(self._best_weights)
            del self._best_weights
        if not incremental and not control.stopped:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          f"and the optimization hasn't converged yet.", ConvergenceWarning)

    def _fit_full_batch(self, model, X, target, sample_weight):
        history = model.fit(X, target, epochs=self.max_iter, batch_size=None,
                            sample_weight=sample_weight, verbose=0)
        self.n_iter_ = len(history.epoch)
        losses = history.history.get("loss")
        if losses:
            self.loss_ = losses[-1] / self._loss_scale
        else:
            self.loss_ = model.evaluate(X, target, sample_weight)["loss"] / self._loss_scale
        if self.verbose:
            print(f"{self.solver}: {history.stop_reason}; loss = {self.loss_:.8f}")
        if history.stop_reason.startswith("reached the maximum"):
            warnings.warn(f"{self.solver} failed to converge after {self.max_iter} "
                          f"iteration(s) ({history.stop_reason}). Increase max_iter or scale "
                          f"the data.", ConvergenceWarning)

    def fit(self, X, y, sample_weight=None):
        """Fit the network to (X, y).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Training inputs.
        y : array-like
            Class labels (n_samples,) or a multilabel indicator matrix
            (n_samples, n_classes) for the classifier; values (n_samples,) or
            (n_samples, n_outputs) for the regressor.
        sample_weight : array-like, shape (n_samples,), optional
            Non-negative per-sample weights.

        Returns
        -------
        self
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self):
        if self.solver not in STOCHASTIC_SOLVERS:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                                 f"{self.solver} is not stochastic.")
        return True

    def _validate_fit_data(self, X, y, reset, **checks):
        """(X, y) for training, checked as ``validate_data(X, y, multi_output=True,
        reset=reset, **checks)`` checks them, X in the estimator's dtype.

        sklearn's checks cost ~100 us, a few percent of a small fit, so ndarrays that
        certainly pass them skip them (as ``_validate_X`` does for inference): X 2-D
        float, non-empty, finite in the estimator's dtype; y 1-D bool, integer or finite
        float, one per row of X; and, when not resetting, X of ``n_features_in_``
        columns and no feature names seen before (sklearn would warn). With ``reset``
        the shortcut records what sklearn records for an ndarray: ``n_features_in_``,
        and no ``feature_names_in_``. Any other input takes sklearn's checks and gets
        their conversions, errors and warnings.
        """
        dtype = check_dtype(self.dtype)
        if (type(X) is np.ndarray and X.ndim == 2 and X.dtype.kind == "f"
                and X.shape[0] > 0 and X.shape[1] > 0
                and type(y) is np.ndarray and y.ndim == 1 and y.dtype.kind in "biuf"
                and y.shape[0] == X.shape[0]
                and (reset or ("feature_names_in_" not in self.__dict__
                               and X.shape[1] == self.__dict__.get("n_features_in_")))):
            converted = np.ascontiguousarray(X, dtype=dtype)
            if all_finite(converted) and all_finite(y):
                if reset:
                    self.n_features_in_ = X.shape[1]
                    self.__dict__.pop("feature_names_in_", None)
                return converted, y
        return validate_data(self, X, y, multi_output=True, dtype=dtype, reset=reset,
                             **checks)

    # ------------------------------------------------------------------ inference
    def _validate_X(self, X):
        """X for inference, checked as ``validate_data(reset=False)`` checks it, in the
        estimator's dtype.

        sklearn's checks cost ~90 us, far more than a small predict, so an ndarray that
        certainly passes them skips them: fitted, 2-D float, ``n_features_in_`` columns,
        finite in the estimator's dtype, and no feature names seen at fit (sklearn
        would warn). Any other input takes sklearn's checks and gets their errors and
        warnings.
        """
        dtype = check_dtype(self.dtype)
        if (type(X) is np.ndarray and X.ndim == 2 and X.dtype.kind == "f"
                and "coefs_" in self.__dict__ and "feature_names_in_" not in self.__dict__
                and X.shape[0] > 0 and X.shape[1] == self.n_features_in_):
            converted = np.ascontiguousarray(X, dtype=dtype)
            if all_finite(converted):
                return converted
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=dtype)

    def _network_output(self, X):
        """The network's output through its link: (n_samples, n_outputs), float64 (as
        scikit-learn's estimators return, whatever precision trained the network)."""
        with self._runtime():
            return self._network().predict(X).astype(np.float64)

    def _score_network(self, X, y, sample_weight):
        """Score on already validated X (the early-stopping validation score)."""
        return self._score_function(y, self._predict_validated(X), sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags
