"""fastnn: fast CPU training of multilayer perceptrons.

Compiled kernels (Numba and Cython) do the hot work behind one contract
(``fastnn.kernels``); this package wraps them as layers, losses, optimizers and a
Keras-like ``Sequential.fit``.

The top-level names: ``Sequential``, ``load_model``, ``History``, ``NotCompiledError``
(``fastnn.model``); the layers ``Dense``, ``Activation``, ``Dropout``, ``ReLU``,
``LeakyReLU``, ``Sigmoid``, ``Tanh``, ``Softplus``, ``ELU``, ``Identity``
(``fastnn.layers``); ``Perceptron``, ``NotFittedError``; ``gradcheck``; the backend
and thread controls ``set_backend``, ``use_backend``, ``get_backend``,
``set_num_threads``, ``get_num_threads``; and the submodules ``callbacks``,
``datasets``, ``kernels``, ``losses``, ``metrics``, ``optimizers``, ``schedules``,
``solvers``. ``fastnn.sklearn`` and ``fastnn.onnx`` are imported on their own.

Examples
--------
>>> import fastnn as fn
>>> model = fn.Sequential([fn.Dense(4, 16, activation="relu"), fn.Dense(16, 3)])
>>> model.compile(loss="cross_entropy", optimizer="adam", metrics=["accuracy"])
Sequential([Dense(4, 16, activation='relu'), Dense(16, 3)])
"""
import os

# OMP_WAIT_POLICY is left to the user: the OpenMP runtime's default (spin briefly, then
# sleep) is the fastest here. Measured at 2 threads, MNIST net, one epoch, 1 -> 2
# threads: cython's own GEMM, a thread team per product, 1.49x (batch 32) and 1.67x
# (128) with it, 0.38x and 0.81x with PASSIVE (every product waits for a sleeping
# worker to wake); numba between BLAS calls 1.6x / 1.95x with it, 1.57x / 1.67x with
# PASSIVE, 0.47x / 0.62x with ACTIVE (workers that never sleep steal BLAS's core).

try:
    from . import kernels  # noqa: E402
except ImportError as exc:
    # In the source checkout the kernels live beside fastnn/, not inside it: only an
    # install (pip install . or -e .) maps them to fastnn.kernels.
    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(_here, os.pardir, "kernels", "_numpy.py")):
        raise ImportError(
            f"fastnn was imported from its source checkout ({_here}), where the kernels "
            "are not laid out as fastnn.kernels; run 'pip install -e .' in the checkout, "
            "or start Python from another directory to use the installed fastnn") from exc
    raise

from . import (  # noqa: E402
    callbacks, datasets, losses, metrics, optimizers, schedules, solvers,
)
from ._backend import (  # noqa: E402
    get_backend,
    get_num_threads,
    set_backend,
    set_num_threads,
    use_backend,
)
from .gradcheck import gradcheck  # noqa: E402
from .layers import (  # noqa: E402
    ELU,
    Activation,
    Dense,
    Dropout,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Softplus,
    Tanh,
)
from ._history import History  # noqa: E402
from .model import NotCompiledError, Sequential, load_model  # noqa: E402
from .perceptron import NotFittedError, Perceptron  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Activation", "Dense", "Dropout", "ELU", "History", "Identity", "LeakyReLU",
    "NotCompiledError", "NotFittedError", "Perceptron", "ReLU", "Sequential", "Sigmoid", "Softplus", "Tanh",
    "callbacks", "datasets", "get_backend", "get_num_threads", "gradcheck", "kernels",
    "load_model", "losses", "metrics", "optimizers", "schedules", "set_backend", "solvers",
    "set_num_threads", "use_backend",
]
