"""How a fit of the estimators runs on fastnn: the full-batch solvers with sklearn's
settings, and sklearn's per-epoch bookkeeping as a fastnn callback."""
import numpy as np

from .. import solvers
from ..callbacks import Callback


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

    def on_train_begin(self, logs=None):
        # The penalty's parts that stay fixed over the fit: its factor (sklearn's
        # 0.5 * alpha * n_batches / n_train, in that order of operations) and each
        # layer's weights as a flat view (coefs_ are views into the model's parameters).
        est = self.estimator
        self._penalty_factor = 0.5 * est.alpha * self.n_batches / self.n_train
        self._flat_coefs = [c.reshape(-1) for c in est.coefs_]
        self._loss_scale = est._loss_scale

    def on_epoch_end(self, epoch, logs=None):
        est, model = self.estimator, self.model
        est.n_iter_ += 1
        est.t_ += self.n_train
        penalty = 0.0
        if est.alpha:
            squares = 0.0  # summed as sum() did, layer after layer
            for c in self._flat_coefs:
                squares += float(np.dot(c, c))
            penalty = self._penalty_factor * squares
        est.loss_ = logs["loss"] / self._loss_scale + penalty
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
