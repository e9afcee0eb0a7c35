"""Metrics reported by fit/evaluate: accuracy, mae, mse, r2 (unweighted).

Each metric accumulates over batches (``update(out, target)``) so an epoch's value is
exact over all its samples, as if computed in one pass (r2 keeps the sums it needs).
``out`` is the raw network output (n, k); predictions go through the loss's link.
"""
import numpy as np

from .losses import BinaryCrossEntropy


class Metric:
    """Base accumulator: ``reset()``, ``update(out, target)``, ``result() -> float``.

    A metric that is a mean over elements or samples defines ``_batch_sum(out, target)
    -> (sum over the batch, count)``; the others override ``update`` and ``result``.

    Parameters
    ----------
    loss : fastnn.losses.Loss
        The model's loss; its link turns raw outputs into predictions.
    """

    def __init__(self, loss):
        self.loss = loss
        self.reset()

    def reset(self):
        """Forget the batches seen so far (start a new epoch or evaluation)."""
        self.total = 0.0
        self.count = 0

    def update(self, out, target):
        """Accumulate one batch.

        Parameters
        ----------
        out : ndarray, shape (n, k)
            Raw network output for the batch.
        target : ndarray
            The batch's targets as the loss's ``prepare_target`` returns them.
        """
        total, count = self._batch_sum(out, target)
        self.total += total
        self.count += count

    def result(self):
        """The metric over every batch since ``reset``, as a float."""
        return self.total / self.count


class Accuracy(Metric):
    """Fraction of correct predictions ("accuracy", Keras "acc").

    Multiclass: the fraction of samples whose argmax output is the label (or the
    argmax of a probability row). Binary / multi-label (binary_cross_entropy): the
    fraction of outputs whose sign (logit > 0) matches ``target >= 0.5``, over all
    elements.
    """

    name = "accuracy"

    def _batch_sum(self, out, target):
        if isinstance(self.loss, BinaryCrossEntropy):
            hits = (out > 0) == (target >= 0.5)
        else:
            labels = target if target.ndim == 1 else target.argmax(axis=1)
            hits = out.argmax(axis=1) == labels
        return int(np.count_nonzero(hits)), hits.size


class MeanAbsoluteError(Metric):
    """``mean(abs(prediction - target))`` over all elements ("mae")."""

    name = "mae"

    def _batch_sum(self, out, target):
        return float(np.abs(self.loss.link(out) - target).sum(dtype=np.float64)), target.size


class MeanSquaredError(Metric):
    """``mean((prediction - target)**2)`` over all elements ("mse")."""

    name = "mse"

    def _batch_sum(self, out, target):
        diff = self.loss.link(out).astype(np.float64) - target
        return float((diff * diff).sum()), target.size


class R2(Metric):
    """Coefficient of determination ``1 - SS_res / SS_tot``, averaged over outputs ("r2").

    Per output j: ``SS_res = sum_i (y_ij - pred_ij)**2``, ``SS_tot = sum_i (y_ij -
    mean_j)**2``; an output with ``SS_tot = 0`` counts as 0.
    """

    name = "r2"

    def reset(self):
        self.count = 0
        self.ss_res = self.sum_y = self.sum_y2 = 0.0

    def update(self, out, target):
        pred = self.loss.link(out).astype(np.float64)
        target = target.astype(np.float64)
        self.ss_res = self.ss_res + ((target - pred) ** 2).sum(axis=0)
        self.sum_y = self.sum_y + target.sum(axis=0)
        self.sum_y2 = self.sum_y2 + (target * target).sum(axis=0)
        self.count += target.shape[0]

    def result(self):
        ss_tot = self.sum_y2 - self.sum_y ** 2 / self.count
        with np.errstate(divide="ignore", invalid="ignore"):
            per_output = np.where(ss_tot > 0, 1.0 - self.ss_res / ss_tot, 0.0)
        return float(np.mean(per_output))


METRICS = {cls.name: cls for cls in (Accuracy, MeanAbsoluteError, MeanSquaredError, R2)}


#: Keras names accepted by ``compile(metrics=...)``; logs use the name they map to.
KERAS_ALIASES = {"acc": "accuracy", "mean_absolute_error": "mae",
                 "mean_squared_error": "mse"}


def check_metrics(metrics, loss):
    """Validate metric names against the loss.

    Parameters
    ----------
    metrics : str, list of str or None
        Names from ``METRICS`` ("accuracy", "mae", "mse", "r2") or ``KERAS_ALIASES``.
    loss : fastnn.losses.Loss
        "accuracy" needs a classification loss; the others real-valued targets.

    Returns
    -------
    tuple of str
        The names logged (aliases resolved).

    Raises
    ------
    ValueError
        An unknown name, or a metric that does not suit the loss.
    TypeError
        ``metrics`` is neither a name nor an iterable of names.
    """
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        metrics = [metrics]
    try:
        metrics = list(metrics)
    except TypeError:
        raise TypeError(f"metrics must be a metric name or a list of names from "
                        f"{sorted(METRICS)}, got {type(metrics).__name__}") from None
    names = []
    for name in metrics:
        name = KERAS_ALIASES.get(name, name) if isinstance(name, str) else name
        if not isinstance(name, str) or name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
        if name == "accuracy" and not loss.classification:
            raise ValueError(f"metric 'accuracy' needs a classification loss, got loss "
                             f"{loss.name!r}; use 'mae', 'mse' or 'r2'")
        if name != "accuracy" and loss.uses_labels:
            raise ValueError(f"metric {name!r} needs real-valued targets, but loss "
                             f"{loss.name!r} takes class labels; use 'accuracy'")
        names.append(name)
    return tuple(names)


def build(names, loss):
    """Fresh accumulators (a list of Metric) for the checked metric ``names``."""
    return [METRICS[name](loss) for name in names]
