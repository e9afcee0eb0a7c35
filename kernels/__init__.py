"""fastnn.kernels: the compiled hot paths behind one contract.

Every backend module (``_numpy``, ``_numba``, ``_cython``) exposes the same functions
with the same positional arguments. Outputs are preallocated by the caller; a kernel
returns None or a scalar loss and never validates its inputs (the API validates once,
at the boundary). Arrays are C-contiguous float32 or float64, one dtype per call;
integer class labels are int64. Weights are stored (n_in, n_out): ``x @ w + b``.

This package never imports ``fastnn``: the API depends on the kernels, not back.
"""
import importlib

#: Activation name -> the integer code kernels take.
ACTIVATIONS = {
    "identity": 0,
    "step": 1,
    "sigmoid": 2,
    "tanh": 3,
    "relu": 4,
    "leaky_relu": 5,
    "softplus": 6,
    "elu": 7,
}

#: Default ``alpha`` per activation code (leaky_relu slope, elu alpha; unused otherwise).
DEFAULT_ALPHA = (0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.0, 1.0)

#: Loss name -> the integer code ``train_epoch`` takes.
LOSSES = {
    "cross_entropy": 0,
    "mse": 1,
    "mae": 2,
    "huber": 3,
    "binary_cross_entropy": 4,
    "hinge": 5,
}

#: Optimizer name -> the integer code ``train_epoch`` takes, with the layout of its
#: ``hyper`` array (the learning rate is not in it: ``lrs`` holds one per update).
OPTIMIZERS = {
    "sgd": (0, ("momentum", "dampening", "weight_decay", "nesterov")),
    "adagrad": (1, ("lr_decay", "weight_decay", "eps")),
    "rmsprop": (2, ("alpha", "eps", "weight_decay", "momentum", "centered")),
    "adam": (3, ("beta1", "beta2", "eps", "weight_decay", "decoupled", "amsgrad")),
}


def train_epoch_workspace_size(batch_size, widths):
    """Elements of the ``workspace`` that ``train_epoch`` needs: every layer's output for
    one batch plus two gradient buffers of the widest layer."""
    return batch_size * (sum(widths) + 2 * max(widths))


#: Backend names in the order ``default_backend`` tries them (see README: Backends).
BACKENDS = ("cython", "numba", "numpy")

_loaded = {}


def load(name):
    """Return the backend module ``name`` ("numba", "cython" or "numpy").

    Raises ValueError for an unknown name and ImportError (naming the reason) for a
    known backend that cannot be imported on this machine.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}._{name}")
        except ImportError as exc:
            raise ImportError(f"fastnn backend {name!r} cannot be loaded: {exc}") from exc
    return _loaded[name]


def available_backends():
    """Names of the backends that import on this machine, fastest first."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default_backend():
    """The fastest backend that loads (the ones after it are not imported)."""
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        return name
    raise ImportError("no fastnn backend can be loaded")  # _numpy always loads
