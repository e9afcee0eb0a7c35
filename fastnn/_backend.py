"""Which kernel backend runs, and with how many threads.

Two levels decide the active backend:

- the process default, set by ``set_backend``; until then the FASTNN_BACKEND
  environment variable, else the fastest backend that loads (resolved lazily: importing
  numba costs a few hundred milliseconds);
- an override, ``with use_backend(name):``, held in a ``contextvars.ContextVar``: it
  applies to the code in the block in this thread or asyncio task only. Other threads
  and tasks keep their own. A new ``threading.Thread`` starts with no override (it runs
  the process default) unless it runs in a copy of the creator's context
  (``contextvars.copy_context().run``); an asyncio task inherits the override active
  where it was created.

Kernels are looked up when they are called: layers, losses, optimizers and the training
loop ask ``backend_module()`` at every kernel call. A model does not remember a backend;
it runs on the one active in the context that calls ``fit``, ``predict`` and the rest.
"""
import contextlib
import contextvars
import os
import sys

from . import kernels

#: The process default backend (name and module) and the process thread budget.
_state = {"name": None, "module": None, "threads": None}
#: threadpoolctl's view of the loaded BLAS libraries, and len(sys.modules) when taken.
_blas = {"controller": None, "modules": -1}
#: (name, module) set by ``use_backend`` in the current context, or None.
_override = contextvars.ContextVar("fastnn_backend_override", default=None)


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
    """Make ``name`` ("numba", "cython" or "numpy") the process default kernel backend.

    Every thread and task that is not inside a ``use_backend`` block runs on it. Inside
    such a block the block's backend stays active; the new default applies after it.
    Until it is called, the default is the FASTNN_BACKEND environment variable, else
    the fastest backend that loads.

    Parameters
    ----------
    name : {"numba", "cython", "numpy"}
        The backend.

    Raises
    ------
    ValueError
        An unknown name.
    TypeError
        ``name`` is not a str.
    ImportError
        The backend cannot be loaded on this machine (the message says why).
    """
    module = _load(name)
    _state["name"], _state["module"] = name, module


def get_backend():
    """Name (str) of the kernel backend active in the calling thread or task."""
    override = _override.get()
    if override is not None:
        return override[0]
    backend_module()
    return _state["name"]


def backend_module():
    """The kernel backend module active in the calling thread or task (resolving the
    process default on first use)."""
    override = _override.get()
    if override is not None:
        return override[1]
    if _state["module"] is None:
        requested = os.environ.get("FASTNN_BACKEND", "").strip().lower()
        set_backend(requested or kernels.default_backend())
    return _state["module"]


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the enclosed block with backend ``name``, then restore.

    The override holds in this thread or asyncio task only (see the module
    docstring); other threads keep the process default.

    Parameters
    ----------
    name : {"numba", "cython", "numpy"}
        The backend.

    Yields
    ------
    module
        The backend's kernel module.

    Raises
    ------
    ValueError, TypeError, ImportError
        As for ``set_backend``.

    Examples
    --------
    >>> import fastnn as fn
    >>> with fn.use_backend("numpy"):
    ...     fn.get_backend()
    'numpy'
    """
    module = _load(name)
    token = _override.set((name, module))
    try:
        yield module
    finally:
        _override.reset(token)


def _load(name):
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    module = kernels.load(name)
    _apply_threads(module)
    return module


def set_num_threads(n):
    """Set one thread budget for the whole process: BLAS and the kernels together.

    BLAS pools are limited through threadpoolctl; the numba and Cython kernels take the
    same count.

    Parameters
    ----------
    n : int
        From 1 to the number of CPUs this process may use.

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` is out of range.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    limit = len(usable_cpus())
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and {limit} (usable CPUs), got {n}")
    _limit_blas(n)
    _state["threads"] = n
    for name in kernels.BACKENDS:
        module = kernels._loaded.get(name)
        if module is not None:
            _apply_threads(module)


def _limit_blas(n):
    """Limit every loaded BLAS thread pool (numpy's and scipy's OpenBLAS, ...) to ``n``.

    threadpoolctl finds the pools by scanning the loaded shared libraries, 1-13 ms a
    time; the scan is kept and redone only when modules were imported since (a new BLAS
    comes with an import), so switching the budget back and forth costs ~50 us."""
    import scipy.linalg.cython_blas  # noqa: F401  (load scipy's BLAS so it is limited too)
    from threadpoolctl import ThreadpoolController

    if _blas["controller"] is None or _blas["modules"] != len(sys.modules):
        _blas["controller"] = ThreadpoolController()
        _blas["modules"] = len(sys.modules)
    _blas["controller"].limit(limits=n, user_api="blas")


def get_num_threads():
    """The process thread budget, an int (the number of usable CPUs unless set)."""
    return _state["threads"] if _state["threads"] is not None else len(usable_cpus())
