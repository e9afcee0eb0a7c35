"""Shared fixtures of the kernel tests: the backend x dtype parametrization lives here.

Adding a name to ``fastnn.kernels.BACKENDS`` runs every kernel test on it. A backend
that cannot be imported makes its tests error (never skip): a missing or half-written
backend must show up red.
"""
import numpy as np
import pytest

from fastnn import kernels

#: Tolerances of a backend against the oracle, keyed by dtype. ``atol`` is for values of
#: order one; kernels whose outputs are long sums or large numbers scale it (see
#: ``assert_close``).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
ATOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

SEED = 20240611


@pytest.fixture(params=kernels.BACKENDS)
def backend(request):
    """Each backend module in turn; ImportError (an error, not a skip) if it cannot load."""
    return kernels.load(request.param)


@pytest.fixture(scope="session")
def oracle():
    """The reference backend every other one is compared with."""
    return kernels.load("numpy")


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed, so every test is deterministic on its own."""
    return np.random.default_rng(SEED)


@pytest.fixture
def assert_close(dtype):
    """``assert_close(actual, desired, msg, scale=1.0)`` with the dtype's tolerances.

    ``scale`` is the magnitude of the terms behind each value (for a sum of ``m`` terms
    of size ``s``, ``s * sqrt(m)``): atol is ATOL[dtype] * scale, rtol is RTOL[dtype].
    """
    rtol, atol = RTOL[dtype], ATOL[dtype]

    def check(actual, desired, msg="", scale=1.0):
        actual = np.asarray(actual, dtype=np.float64)
        desired = np.asarray(desired, dtype=np.float64)
        # Fast path; assert_allclose (slow on big arrays) only to report a failure.
        if actual.shape == desired.shape and np.all(
                np.abs(actual - desired) <= atol * scale + rtol * np.abs(desired)):
            return
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale,
                                   equal_nan=False, err_msg=f"[{dtype}] {msg}")

    check.rtol, check.atol = rtol, atol
    return check
