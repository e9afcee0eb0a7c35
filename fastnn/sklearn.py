"""scikit-learn estimators trained by fastnn: drop-ins for sklearn.neural_network's MLPs.

``MLPClassifier`` and ``MLPRegressor`` take sklearn's parameter names, defaults and
meanings, expose the fitted attributes sklearn users read (``coefs_``, ``intercepts_``,
``loss_curve_``, ``n_iter_``, ...) and follow sklearn's conventions (``__init__`` only
stores, ``get_params``/``set_params``, ``clone``, pickling, tags), so they work in
Pipeline, GridSearchCV and cross_val_score. Training runs on a ``fastnn.Sequential``
(``float32`` by default, which is part of the speed).

How sklearn's objective maps onto fastnn's (s = fastnn's loss / sklearn's loss: 2 for
squared error, which sklearn halves; 1/K for K multilabel outputs, whose log-losses
sklearn sums where fastnn averages; else 1):

- stochastic solvers minimize each batch's ``s * (loss + alpha / (2 B) ||W||²)``
  through the optimizer's L2 ``weight_decay = s * alpha / B`` (B = batch size), which
  keeps fastnn's fused epoch kernel in play; unlike sklearn it decays the biases too,
  by the same tiny factor. The SGD step is ``learning_rate_init / s`` so that SGD moves
  as sklearn's does; Adam's step does not depend on the loss scale.
- full-batch solvers (lbfgs, ...) minimize ``s * (loss + alpha / (2 n) ||W||²)`` with
  each Dense layer's ``l2 = s * alpha / (2 n)`` (weights only, as sklearn).

``loss_`` and ``loss_curve_`` are reported on sklearn's scale, penalty included.
"""
import contextlib
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d

from . import optimizers, solvers
from ._backend import get_num_threads, set_num_threads, use_backend
from ._labels import ClassLabels
from ._validation import check_choice, check_dtype, check_float, check_int, check_sample_weight
from .callbacks import Callback
from .layers import Dense
from .model import Sequential

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


class _LBFGS(solvers.LBFGS):
    """fastnn's L-BFGS with sklearn's ``max_fun`` bound on loss evaluations (fastnn's own
    solver bounds them by 100 * max_iter + 100)."""

    def __init__(self, tol, max_fun):
        super().__init__(tol=tol)
        self.max_fun = max_fun

    def _options(self, max_iter):
        return {**super()._options(max_iter), "maxfun": self.max_fun}


def _full_batch_solver(name, tol, max_fun, learning_rate_init):
    if name == "lbfgs":
        return _LBFGS(tol, max_fun)
    if name == "gd":
        return solvers.GradientDescent(lr=learning_rate_init, gtol=tol)
    if name == "newton-cg":
        return solvers.NewtonCG()
    cls = {"bfgs": solvers.BFGS, "cg": solvers.ConjugateGradient,
           "lm": solvers.LevenbergMarquardt, "newton": solvers.Newton}[name]
    return cls(gtol=tol)


class _EpochControl(Callback):
    """sklearn's per-epoch bookkeeping for the stochastic solvers, run from fit's
    on_epoch_end: ``n_iter_``, ``t_``, ``loss_curve_``, the no-improvement count on the
    training loss or the validation score, the 'invscaling' and 'adaptive' learning
    rates, the best weights for early stopping, and the stop."""

    def __init__(self, estimator, n_train, batch_size, validation, incremental):
        self.estimator = estimator
        self.n_train = n_train
        self.n_batches = -(-n_train // batch_size)
        self.validation = validation
        self.incremental = incremental
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        est, model = self.estimator, self.model
        est.n_iter_ += 1
        est.t_ += self.n_train
        penalty = 0.0
        if est.alpha:
            penalty = 0.5 * est.alpha * self.n_batches / self.n_train * sum(
                float(np.dot(c.ravel(), c.ravel())) for c in est.coefs_)
        est.loss_ = logs["loss"] / est._loss_scale + penalty
        est.loss_curve_.append(est.loss_)
        if est.verbose:
            print(f"Iteration {est.n_iter_}, loss = {est.loss_:.8f}")
        if self.validation is not None:
            X_val, y_val, sw_val = self.validation
            score = est._score_network(X_val, y_val, sw_val)
            est.validation_scores_.append(score)
            if est.verbose:
                print(f"Validation score: {score:f}")
            improved = score >= est.best_validation_score_ + est.tol
            if score > est.best_validation_score_:
                est.best_validation_score_ = score
                est._best_weights = model.get_weights()
        else:
            improved = est.loss_ <= est.best_loss_ - est.tol
            est.best_loss_ = min(est.best_loss_, est.loss_)
        est._no_improvement_count = 0 if improved else est._no_improvement_count + 1
        if est.solver == "sgd" and est.learning_rate == "invscaling":
            self._set_sgd_lr(est.learning_rate_init / est._loss_scale
                             / (est.t_ + 1) ** est.power_t)
        if est._no_improvement_count > est.n_iter_no_change:
            if est.solver == "sgd" and est.learning_rate == "adaptive" and \
                    model.optimizer.lr * est._loss_scale > 1e-6:
                self._set_sgd_lr(model.optimizer.lr / 5.0)
                est._no_improvement_count = 0
            elif not self.incremental:
                what = "Validation score" if self.validation is not None else "Training loss"
                if est.verbose:
                    print(f"{what} did not improve more than tol={est.tol:f} for "
                          f"{est.n_iter_no_change} consecutive epochs. Stopping.")
                model.stop_training = True
                self.stopped = True


    def _set_sgd_lr(self, lr):
        """Change SGD's step as sklearn does. sklearn's velocity ``v = m v - lr g``
        carries the old steps' scale; fastnn's (torch's) ``v = m v + g`` is scaled by
        the current lr at each step, so the buffer is rescaled by old/new lr to keep
        the momentum sklearn would have."""
        optimizer = self.model.optimizer
        optimizer.state["momentum_buffer"] *= optimizer.lr / lr
        optimizer.lr = lr


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

    @contextlib.contextmanager
    def _runtime(self):
        """The estimator's backend and thread count for the duration of a call."""
        with contextlib.ExitStack() as stack:
            if self.backend is not None:
                stack.enter_context(use_backend(self.backend))
            previous = get_num_threads()
            # set_num_threads re-scans the loaded BLAS libraries (tens of ms): only when
            # the count changes.
            if self.n_threads is not None and self.n_threads != previous:
                set_num_threads(self.n_threads)
                stack.callback(set_num_threads, previous)
            yield

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
        layers = [Dense(n_in, n_out, activation=act if i < len(sizes) else None, l2=l2,
                        dtype=dtype)
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

    def _initial_weights(self, widths, rng):
        """sklearn's Glorot-uniform start, drawn as sklearn's MLP draws it (so the same
        random_state gives the same initial weights): per layer W, then b."""
        factor = 2.0 if self.activation == "logistic" else 6.0
        weights = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            bound = np.sqrt(factor / (n_in + n_out))
            weights.append(rng.uniform(-bound, bound, (n_in, n_out)))
            weights.append(rng.uniform(-bound, bound, n_out))
        return weights

    def _initialize(self, sizes, weights, n_train, weight_sum):
        """First fit: the network from the initial ``weights`` and the fitted
        attributes."""
        n_features, n_outputs = weights[0].shape[0], weights[-1].shape[0]
        model = self._build_network(sizes, n_features, n_outputs, n_train, weight_sum)
        model.set_weights(weights)
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
        rng = check_random_state(self.random_state)
        early_stopping = self.early_stopping and self.solver in STOCHASTIC_SOLVERS
        if early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        n_outputs = len(self.classes_) if self._uses_codes() else target.shape[1]
        if first_pass:  # drawn before the validation split, in sklearn's order
            initial = self._initial_weights([X.shape[1]] + sizes + [n_outputs], rng)
        validation = None
        if early_stopping:
            X, target, sample_weight, validation = self._split_validation(
                X, target, y_original, sample_weight, n_outputs, rng)
        with self._runtime():
            if first_pass:
                weight_sum = X.shape[0] if sample_weight is None else float(sample_weight.sum())
                self._n_train = (X.shape[0], weight_sum)
                self._initialize(sizes, initial, X.shape[0], weight_sum)
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
        model.fit(X, target, epochs=epochs, batch_size=batch, shuffle=bool(self.shuffle),
                  sample_weight=sample_weight, callbacks=[control], verbose=0,
                  seed=int(rng.randint(np.iinfo(np.int32).max)))
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

    # ------------------------------------------------------------------ inference
    def _validate_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=check_dtype(self.dtype))

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

    def _validate_input(self, X, y, incremental, reset):
        """(X, fastnn target, original y): codes (n,) for more than two classes, a 0/1
        column (n, 1) for one or two classes, the 0/1 matrix (n, K) for multilabel."""
        X, y = validate_data(self, X, y, multi_output=True, dtype=check_dtype(self.dtype),
                             reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        multilabel = type_of_target(y).startswith("multilabel")
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._multilabel = multilabel
            self._labels = None if multilabel else ClassLabels.fit(y)
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

    def _validate_input(self, X, y, incremental, reset):
        check_choice(self.loss, "loss", REGRESSION_LOSSES)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=check_dtype(self.dtype), reset=reset)
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
