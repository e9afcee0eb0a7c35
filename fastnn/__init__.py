"""fastnn: fast CPU training of multilayer perceptrons.

Compiled kernels (Numba and Cython) do the hot work behind one contract
(``fastnn.kernels``); this package wraps them as layers, losses, optimizers and a
Keras-like ``Sequential.fit``.
"""
import os

# OpenMP threads that spin between BLAS calls steal the core BLAS needs: make idle
# OpenMP workers sleep. Must be set before any OpenMP runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import kernels  # noqa: E402
from ._backend import (  # noqa: E402
    get_backend,
    get_num_threads,
    set_backend,
    set_num_threads,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "kernels",
    "get_backend",
    "set_backend",
    "use_backend",
    "get_num_threads",
    "set_num_threads",
]
