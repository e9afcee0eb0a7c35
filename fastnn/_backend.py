"""Which kernel backend runs, and with how many threads.

The backend is resolved lazily (importing numba costs a few hundred milliseconds),
from, in order: ``set_backend`` / ``use_backend``, the FASTNN_BACKEND environment
variable, and otherwise the fastest backend that loads.
"""
import contextlib
import os

from . import kernels

_state = {"name": None, "module": None, "threads": None}


def usable_cpus():
    """The ids of the CPUs this process may run on, sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def _apply_threads(module):
    set_threads = getattr(module, "set_num_threads", None)
    if set_threads is not None and _state["threads"] is not None:
        set_threads(_state["threads"])


def set_backend(name):
    """Make ``name`` ("numba", "cython" or "numpy") the active kernel backend.

    Raises ValueError for an unknown name and ImportError, with the reason, when the
    backend cannot be loaded on this machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    module = kernels.load(name)
    _state["name"], _state["module"] = name, module
    _apply_threads(module)


def get_backend():
    """Name of the active kernel backend."""
    backend_module()
    return _state["name"]


def backend_module():
    """The active backend module (resolving the default on first use)."""
    if _state["module"] is None:
        requested = os.environ.get("FASTNN_BACKEND", "").strip().lower()
        set_backend(requested or kernels.default_backend())
    return _state["module"]


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the enclosed block with backend ``name``, then restore."""
    previous = _state["name"], _state["module"]
    set_backend(name)
    try:
        yield kernels.load(name)
    finally:
        _state["name"], _state["module"] = previous


def set_num_threads(n):
    """Set one thread budget for the whole process: BLAS and the kernels together.

    BLAS pools are limited through threadpoolctl; the numba and Cython kernels take the
    same count. ``n`` is an int from 1 to the number of CPUs this process may use.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    limit = len(usable_cpus())
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and {limit} (usable CPUs), got {n}")
    import scipy.linalg.cython_blas  # noqa: F401  (load scipy's BLAS so it is limited too)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    _state["threads"] = n
    for name in kernels.BACKENDS:
        module = kernels._loaded.get(name)
        if module is not None:
            _apply_threads(module)


def get_num_threads():
    """The process thread budget (the number of usable CPUs unless set)."""
    return _state["threads"] if _state["threads"] is not None else len(usable_cpus())
