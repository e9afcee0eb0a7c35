"""Losses: validation of targets, the fused loss+gradient kernel, and the output link.

Reductions follow PyTorch so results can be checked against it: ``mse`` = MSELoss,
``mae`` = L1Loss, ``huber`` = HuberLoss(delta), ``cross_entropy`` = CrossEntropyLoss on
logits (integer labels or probability rows), ``binary_cross_entropy`` =
BCEWithLogitsLoss (0/1 targets; multi-label), ``hinge`` = multiclass SVM
(Weston-Watkins: sum over wrong classes of max(0, s_j - s_y + margin), mean over
samples). With ``sample_weight`` every loss is ``sum_i w_i l_i / sum_i w_i``.
"""
import numpy as np

from . import kernels
from ._backend import backend_module
from ._validation import _as_numeric, config_class, check_array, check_float, check_labels, check_length


class Loss:
    """Base class of the losses: a loss and its gradient in one kernel call.

    ``loss(pred, target, weights, dpred) -> float`` returns the (weighted) mean loss
    and writes d(loss)/d(pred) into ``dpred`` (unless None) through the active kernel
    backend.

    Notes
    -----
    The arguments of a call: ``pred`` (n, k) the raw network output (logits for the
    classification losses), C-contiguous float32 or float64; ``target`` as
    ``prepare_target`` returns it; ``weights`` None or per-sample weights (n,), making
    the loss ``sum(w_i l_i) / sum(w_i)``; ``dpred`` None or an output array shaped like
    ``pred``.
    """

    name = None
    #: Whether targets are integer class labels (classification by argmax).
    uses_labels = False
    #: Whether the targets are classes (class_weight applies), not values to regress.
    classification = False

    def prepare_target(self, y, n_samples, n_outputs, dtype, name="y"):
        """Validate ``y`` for a network with ``n_outputs`` outputs; return it kernel-ready.

        Parameters
        ----------
        y : array-like
            Targets (the shapes each loss takes are in its class docstring).
        n_samples, n_outputs : int
            Rows of X and outputs of the network.
        dtype : numpy dtype
            The model's dtype (float targets are converted to it).
        name : str, default "y"
            The argument name used in error messages.

        Returns
        -------
        ndarray
            C-contiguous: int64 labels (n_samples,) or float targets
            (n_samples, n_outputs).

        Raises
        ------
        ValueError, TypeError
            A wrong length, shape, dtype or range.
        """
        target = check_array(y, name, dtype, allow_1d=True)
        check_length(target, name, n_samples)
        if target.shape[1] != n_outputs:
            raise ValueError(f"{name} must have {n_outputs} column(s) to match the model's "
                             f"outputs, got shape {target.shape}")
        return target

    def check_outputs(self, n_outputs):
        """Raise ValueError if this loss cannot work with ``n_outputs`` network outputs."""

    def link(self, out):
        """Map raw network output (n, k) to predictions (a new (n, k) array); identity here."""
        return out.copy()

    def classes(self, out):
        """Predicted classes from raw network output (for ``predict_classes``).

        Raises ValueError for the regression losses.
        """
        raise ValueError(f"predict_classes needs a classification loss (cross_entropy, "
                         f"binary_cross_entropy or hinge); this model's loss is "
                         f"{self.name!r}: use predict")

    def kernel_spec(self, target):
        """How the fused ``train_epoch`` kernel computes this loss for ``target`` (as
        returned by ``prepare_target``): ``(code, param, hits_per_sample)`` — the kernel's
        loss code, its parameter (Huber's delta, the hinge margin, else 0) and how many
        accuracy hits the kernel counts per sample — or None when the kernel cannot.
        """
        return _kernel_spec(self.name)

    def get_config(self):
        """JSON-able ``{"name": ..., <parameters>}``; ``fastnn.losses.get`` rebuilds it."""
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class MeanSquaredError(Loss):
    """Mean squared error ``mean((pred - y)**2)`` over all elements (torch MSELoss).

    Targets: values (n,) for one output or (n, k), of the model's dtype.
    """

    name = "mse"

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().mean_squared_error(pred, target, weights, dpred)


class MeanAbsoluteError(Loss):
    """Mean absolute error ``mean(abs(pred - y))`` over all elements (torch L1Loss).

    Targets: values (n,) for one output or (n, k).
    """

    name = "mae"

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().mean_absolute_error(pred, target, weights, dpred)


class Huber(Loss):
    """Huber loss, mean over all elements (torch HuberLoss).

    With ``d = pred - y``: ``d**2 / 2`` where ``abs(d) <= delta``, else
    ``delta * (abs(d) - delta / 2)``. Targets: values (n,) or (n, k).

    Parameters
    ----------
    delta : float > 0, default 1.0
        Where the loss turns from quadratic to linear.
    """

    name = "huber"

    def __init__(self, delta=1.0):
        self.delta = check_float(delta, "delta", low=0.0, low_open=True)

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().huber(pred, target, self.delta, weights, dpred)

    def kernel_spec(self, target):
        return _kernel_spec(self.name, self.delta)

    def get_config(self):
        """``{"name": "huber", "delta": delta}``."""
        return {"name": self.name, "delta": self.delta}


def softmax(out):
    """Row-wise softmax ``exp(z_j) / sum_k exp(z_k)`` of (n, k) logits.

    Max-subtracted for stability; returns a new (n, k) array.
    """
    e = np.exp(out - out.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


class CrossEntropy(Loss):
    """Softmax cross-entropy on logits (torch CrossEntropyLoss).

    Per sample ``l = -log softmax(z)[y]`` for a label y, or ``-sum_j p_j log softmax(z)_j``
    for a probability row p; the mean over samples. Targets: integer labels (n,) in
    [0, k), or probability rows (n, k) in [0, 1]. Needs k >= 2 outputs.
    """

    name = "cross_entropy"
    uses_labels = True
    classification = True

    def check_outputs(self, n_outputs):
        if n_outputs < 2:
            raise ValueError("cross_entropy needs at least 2 outputs (one per class); for a "
                             "single-output binary classifier use binary_cross_entropy")

    def prepare_target(self, y, n_samples, n_outputs, dtype, name="y"):
        arr = _as_numeric(y, name)
        if arr.ndim == 2 and arr.shape[1] > 1:
            rows = check_array(arr, name, dtype)
            check_length(rows, name, n_samples)
            if rows.shape[1] != n_outputs:
                raise ValueError(f"{name} probability rows must have {n_outputs} columns, "
                                 f"got shape {rows.shape}")
            if rows.min() < 0 or rows.max() > 1:
                raise ValueError(f"{name} probability rows must lie in [0, 1], got values "
                                 f"from {rows.min()} to {rows.max()}")
            return rows
        return check_labels(arr, name, n_samples, n_outputs)

    def link(self, out):
        return softmax(out)

    def classes(self, out):
        return out.argmax(axis=1)

    def kernel_spec(self, target):
        # the kernel reads integer labels only, not probability rows
        return _kernel_spec(self.name) if target.ndim == 1 else None

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().softmax_cross_entropy(pred, target, weights, dpred)


class BinaryCrossEntropy(Loss):
    """Sigmoid + binary cross-entropy on logits (torch BCEWithLogitsLoss).

    Per element ``-(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))``, mean over all
    elements. Targets in [0, 1]: a single column (binary) or an (n, k) 0/1 matrix
    (multi-label).
    """

    name = "binary_cross_entropy"
    classification = True

    def prepare_target(self, y, n_samples, n_outputs, dtype, name="y"):
        target = super().prepare_target(y, n_samples, n_outputs, dtype, name)
        if target.min() < 0 or target.max() > 1:
            raise ValueError(f"{name} for binary_cross_entropy must lie in [0, 1], got values "
                             f"from {target.min()} to {target.max()}")
        return target

    def link(self, out):
        prob = np.empty_like(out)
        backend_module().activation_forward(kernels.ACTIVATIONS["sigmoid"], out, prob, None)
        return prob

    def classes(self, out):
        hits = (out > 0).astype(np.int64)  # sigmoid(z) > 1/2
        return hits[:, 0] if hits.shape[1] == 1 else hits

    def kernel_spec(self, target):
        # accuracy counts every output of every sample (multi-label)
        return _kernel_spec(self.name, hits_per_sample=target.shape[1])

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().sigmoid_binary_cross_entropy(pred, target, weights, dpred)


class Hinge(Loss):
    """Multiclass SVM loss (Weston-Watkins) on raw scores.

    Per sample ``sum over j != y of max(0, s_j - s_y + margin)``, mean over samples.
    Targets: integer labels (n,) in [0, k). Needs k >= 2 outputs.

    Parameters
    ----------
    margin : float >= 0, default 1.0
        The margin the true class's score must win by.
    """

    name = "hinge"
    uses_labels = True
    classification = True

    def __init__(self, margin=1.0):
        self.margin = check_float(margin, "margin", low=0.0)

    def check_outputs(self, n_outputs):
        if n_outputs < 2:
            raise ValueError("hinge needs at least 2 outputs (one score per class)")

    def prepare_target(self, y, n_samples, n_outputs, dtype, name="y"):
        return check_labels(y, name, n_samples, n_outputs)

    def __call__(self, pred, target, weights, dpred):
        """Mean loss (float); writes d(loss)/d(pred) into ``dpred`` unless None."""
        return backend_module().multiclass_hinge(pred, target, self.margin, weights, dpred)

    def classes(self, out):
        return out.argmax(axis=1)

    def kernel_spec(self, target):
        return _kernel_spec(self.name, self.margin)

    def get_config(self):
        """``{"name": "hinge", "margin": margin}``."""
        return {"name": self.name, "margin": self.margin}


def _kernel_spec(name, param=0.0, hits_per_sample=1):
    """``Loss.kernel_spec`` for the loss ``name``: None if the kernel has no code for it
    (a user-defined loss)."""
    code = kernels.LOSS_CODES.get(name)
    return None if code is None else (code, float(param), hits_per_sample)


LOSSES = {cls.name: cls for cls in
          (MeanSquaredError, MeanAbsoluteError, Huber, CrossEntropy, BinaryCrossEntropy, Hinge)}


#: Keras names accepted by ``compile(loss=...)`` for the losses above.
KERAS_ALIASES = {
    "sparse_categorical_crossentropy": "cross_entropy",  # integer labels
    "categorical_crossentropy": "cross_entropy",         # one-hot / probability rows
    "binary_crossentropy": "binary_cross_entropy",
    "mean_squared_error": "mse",
    "mean_absolute_error": "mae",
}


def get(loss):
    """A Loss from a name, a config dict or a Loss instance.

    All losses take logits: no softmax/sigmoid layer before the loss.

    Parameters
    ----------
    loss : str, dict or Loss
        A name in ``LOSSES`` ("mse", "mae", "huber", "cross_entropy",
        "binary_cross_entropy", "hinge") or in ``KERAS_ALIASES``; a config
        ``{"name": ..., <parameters>}``; or a Loss, returned as is.

    Returns
    -------
    Loss

    Raises
    ------
    ValueError
        An unknown name.
    TypeError
        Neither a name, a dict nor a Loss (a Loss class must be called).
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type) and issubclass(loss, Loss):
        raise TypeError(f"loss must be a Loss instance, got the class {loss.__name__}: "
                        f"call it, {loss.__name__}()")
    if isinstance(loss, str):
        loss = {"name": KERAS_ALIASES.get(loss, loss)}
    if isinstance(loss, dict):
        cls, kwargs = config_class(loss, LOSSES, "loss")
        return cls(**kwargs)
    raise TypeError(f"loss must be a name (one of {sorted(LOSSES)}) or a fastnn.losses.Loss, "
                    f"got {type(loss).__name__}")
