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
from ._estimators import MLPClassifier, MLPRegressor

for _cls in (MLPClassifier, MLPRegressor):
    _cls.__module__ = __name__  # documented, and pickled, as fastnn.sklearn.<name>

__all__ = ["MLPClassifier", "MLPRegressor"]
